#!/usr/bin/env python3
"""Drives a real migration between two `postcopy run` processes with QEMU's
own client library, qemu.qmp (PyPI: qemu.qmp), as an orchestrator written
for QEMU would: run states, a refused `migrate` and `cont` on the process
waiting for its guest, capabilities, `migrate`, MIGRATION events through
qemu.qmp's listeners until `completed`, `query-migrate`, our
`x-postcopy-verify` on the destination, and `quit` with SHUTDOWN.

    qemu_qmp_vmm.py SOURCE_SOCKET DESTINATION_SOCKET PORT

The source must run a pattern guest; the destination must listen on
127.0.0.1:PORT (`postcopy run --incoming tcp:127.0.0.1:PORT`). Prints one
line per check; exits non-zero on the first failure.
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient

TIMEOUT = 60.0
checks = 0


def check(condition, what):
    global checks
    if not condition:
        raise AssertionError(what)
    checks += 1
    print(f"ok {checks}: {what}")


async def expect_error(qmp, command, arguments, desc_start):
    try:
        await qmp.execute(command, arguments)
    except ExecuteError as error:
        check(error.error_class == "GenericError" and error.error.error.desc.startswith(desc_start),
              f"{command}: {error.error_class}: {error.error.error.desc}")
        return
    raise AssertionError(f"{command} {arguments} succeeded; expected an error")


async def wait_ended(qmp):
    for _ in range(int(TIMEOUT * 100)):
        info = await qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        await asyncio.sleep(0.01)
    raise AssertionError("the migration did not end")


async def main(source_path, destination_path, port):
    uri = f"tcp:127.0.0.1:{port}"
    source = QMPClient("source")
    await source.connect(source_path)
    destination = QMPClient("destination")
    await destination.connect(destination_path)

    check(await source.execute("query-status") == {"running": True, "status": "running"}, "source runs its guest")
    check((await destination.execute("query-status"))["status"] == "inmigrate", "destination is inmigrate")
    await expect_error(destination, "migrate", {"uri": uri}, "Guest is waiting for an incoming migration")
    await expect_error(destination, "cont", None, "Guest is waiting for an incoming migration")

    await source.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True},
        {"capability": "postcopy-ram", "state": True},
        {"capability": "postcopy-preempt", "state": True},
        {"capability": "xbzrle", "state": False},
    ]})
    statuses = []
    with source.listener(("MIGRATION",)) as listener:
        await source.execute("migrate", {"uri": uri})
        while not statuses or statuses[-1] not in ("completed", "failed", "cancelled"):
            event = await asyncio.wait_for(listener.get(), TIMEOUT)
            statuses.append(event["data"]["status"])
    check(statuses[0] == "setup" and statuses[-1] == "completed" and "postcopy-active" in statuses,
          f"MIGRATION events {statuses}")
    info = await source.execute("query-migrate")
    check(info["status"] == "completed" and info["ram"]["remaining"] == 0 and info["ram"]["total"] > 0,
          "query-migrate on the source: completed, nothing remaining")
    check((await source.execute("query-status"))["status"] == "postmigrate", "the source is postmigrate")
    sent = info["x-postcopy"]["memory-digest"]

    arrived = await wait_ended(destination)
    check(arrived["status"] == "completed", "query-migrate on the destination: completed")
    check(await destination.execute("query-status") == {"running": True, "status": "running"},
          "the guest runs on the destination")
    report = await destination.execute("x-postcopy-verify")
    check(report["ok"] and report["arrived-digest"]["digest"] == sent and report["pattern"]["bad_pages"] == 0,
          f"x-postcopy-verify: digests {report['arrived-digest']['digest']} (sent {sent}), pattern ok")

    for qmp in (source, destination):
        with qmp.listener(("SHUTDOWN",)) as listener:
            await qmp.execute("quit")
            event = await asyncio.wait_for(listener.get(), TIMEOUT)
            check(event["data"] == {"guest": False, "reason": "host-qmp-quit"}, f"{qmp.name}: SHUTDOWN after quit")
        try:
            await qmp.disconnect()
        except EOFError:
            # The process closed the socket as it exited after quit, as
            # QEMU does (QEMU's machine.py expects this EOF after quit).
            pass
    print(f"qemu.qmp: {checks} checks passed")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
