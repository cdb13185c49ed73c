#!/usr/bin/env python3
"""Drives a postcopy QMP server with QEMU's own client library, qemu.qmp
(PyPI: qemu.qmp), to check the assumptions a client written for QEMU makes:
the greeting's shape, negotiation, replies routed by id, error classes and
descriptions, events and their listeners, and qemu.qmp's synchronous legacy
shim (QEMUMonitorProtocol, as QEMU's iotests use it).

    qemu_qmp_client.py SOCKET

The server behind SOCKET must be a running guest that is not migrating (the
fake VMM: `cargo run -p postcopy-qmp --example fake_vmm -- SOCKET
--advance-ms 0`, or the Rust test qemu_qmp_client.rs). Ends with `quit`.
Prints one line per check; exits non-zero on the first failure.
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 10.0
checks = 0


def check(condition, what):
    global checks
    if not condition:
        raise AssertionError(what)
    checks += 1
    print(f"ok {checks}: {what}")


async def expect_error(qmp, command, arguments, error_class, desc_start):
    try:
        await qmp.execute(command, arguments)
    except ExecuteError as error:
        check(error.error_class == error_class and error.error.error.desc.startswith(desc_start),
              f"{command} {arguments}: {error.error_class}: {error.error.error.desc}")
        return
    raise AssertionError(f"{command} {arguments} succeeded; expected {error_class}")


async def next_event(listener):
    return await asyncio.wait_for(listener.get(), TIMEOUT)


def legacy_client(path):
    """The synchronous shim most QEMU test scripts use."""
    legacy = QEMUMonitorProtocol(path)
    greeting = legacy.connect(negotiate=True)
    check("QMP" in greeting, "legacy: greeting")
    check(legacy.cmd("query-status")["status"] == "paused", "legacy: query-status")
    legacy.cmd("cont")
    event = legacy.pull_event(wait=TIMEOUT)
    check(event["event"] == "RESUME" and "seconds" in event["timestamp"], "legacy: RESUME event")
    reply = legacy.cmd_obj({"execute": "query-version", "id": "legacy-1"})
    check(reply["id"] == "legacy-1" and reply["return"]["qemu"]["major"] >= 10, "legacy: cmd_obj with an id")
    legacy.close()


async def main(path):
    qmp = QMPClient("postcopy-check")
    await qmp.connect(path)

    greeting = qmp.greeting
    version = greeting.QMP.version
    check(version["qemu"]["major"] == 10 and version["package"].startswith("postcopy"),
          f"greeting version {version}")
    check(list(greeting.QMP.capabilities) == [], "no oob offered, so qemu.qmp did not ask for it")

    status = await qmp.execute("query-status")
    check(status == {"running": True, "status": "running"}, f"query-status {status}")

    names = {c["name"] for c in await qmp.execute("query-commands")}
    check({"migrate", "migrate-incoming", "migrate-start-postcopy", "migrate_cancel", "migrate-pause",
           "migrate-recover", "query-migrate", "migrate-set-capabilities"} <= names, "query-commands")

    # Errors: class and QEMU's description.
    await expect_error(qmp, "no-such-command", None, "CommandNotFound", "The command no-such-command has not")
    await expect_error(qmp, "migrate", {"uri": 5}, "GenericError", "Invalid parameter type for 'uri'")
    await expect_error(qmp, "migrate", {}, "GenericError", "Parameter 'uri' is missing")
    await expect_error(qmp, "stop", {"force": True}, "GenericError", "Parameter 'force' is unexpected")
    await expect_error(qmp, "migrate-pause", None, "GenericError", "migrate-pause is currently only supported")
    await expect_error(qmp, "migrate-start-postcopy", None, "GenericError", "Enable postcopy")
    await expect_error(qmp, "migrate-set-capabilities",
                       {"capabilities": [{"capability": "postcopy-turbo", "state": True}]},
                       "GenericError", "Parameter 'capability' does not accept value 'postcopy-turbo'")
    await expect_error(qmp, "migrate-set-parameters", {"downtime-limit": "short"},
                       "GenericError", "Parameter 'downtime-limit' expects uint64")
    await expect_error(qmp, "qmp_capabilities", None, "CommandNotFound", "Capabilities negotiation is already")

    # Capabilities and parameters.
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "postcopy-ram", "state": True},
        {"capability": "postcopy-preempt", "state": True},
        {"capability": "events", "state": True},
        {"capability": "xbzrle", "state": False},
    ]})
    caps = {c["capability"]: c["state"] for c in await qmp.execute("query-migrate-capabilities")}
    check(caps["postcopy-ram"] and caps["postcopy-preempt"] and not caps["xbzrle"], "capabilities set")
    await expect_error(qmp, "migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]},
                       "GenericError", "Migration capability 'xbzrle' is not supported")
    await qmp.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 125000000, "downtime-limit": 500})
    params = await qmp.execute("query-migrate-parameters")
    check(params["max-postcopy-bandwidth"] == 125000000 and params["downtime-limit"] == 500, "parameters set")
    check(await qmp.execute("query-migrate") == {}, "query-migrate before any migration is {}")

    # Events through qemu.qmp's listeners.
    with qmp.listener(("STOP",)) as listener:
        await qmp.execute("stop")
        event = await next_event(listener)
        check(event["event"] == "STOP" and set(event["timestamp"]) == {"seconds", "microseconds"},
              "STOP event with a timestamp")
    # Two commands in flight at once: qemu.qmp routes the replies by id.
    status, info = await asyncio.gather(qmp.execute("query-status"), qmp.execute("query-migrate"))
    check(status["status"] == "paused" and info == {}, "concurrent executions routed by id")

    # The legacy synchronous client, as a second client at once.
    await asyncio.get_running_loop().run_in_executor(None, legacy_client, path)

    with qmp.listener(("MIGRATION",)) as listener:
        await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
        event = await next_event(listener)
        check(event["data"] == {"status": "setup"}, f"MIGRATION event {event['data']}")
    info = await qmp.execute("query-migrate")
    check(info["status"] == "setup" and "total" in info["ram"], "query-migrate during a migration")
    await expect_error(qmp, "migrate", {"uri": "tcp:127.0.0.1:4444"}, "GenericError",
                       "There's a migration process in progress")
    with qmp.listener(("MIGRATION",)) as listener:
        await qmp.execute("migrate_cancel")
        statuses = [(await next_event(listener))["data"]["status"] for _ in range(2)]
        check(statuses == ["cancelling", "cancelled"], f"migrate_cancel: {statuses}")

    with qmp.listener(("SHUTDOWN",)) as listener:
        await qmp.execute("quit")
        event = await next_event(listener)
        check(event["data"] == {"guest": False, "reason": "host-qmp-quit"}, "SHUTDOWN after quit")
    await qmp.disconnect()
    print(f"qemu.qmp: {checks} checks passed")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1]))
