//! QEMU's own Python client (`qemu.qmp`, PyPI `qemu.qmp`) against this
//! crate's server with the fake VMM: tests/qemu_qmp_client.py does the
//! checking. Skips, saying so, where python3 or qemu.qmp is missing, unless
//! POSTCOPY_REQUIRE_QEMU_QMP=1 (CI), which turns the skip into a failure.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postcopy_qmp::fake::FakeVmm;
use postcopy_qmp::{EventBus, Server, ServerConfig};

const INSTALL: &str = "python3 -m pip install qemu.qmp (add --break-system-packages on a system Python)";

fn qemu_qmp_available() -> Result<(), String> {
    let probe = Command::new("python3")
        .args(["-c", "import qemu.qmp, qemu.qmp.legacy"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("python3 does not run ({e})"))?;
    if probe.status.success() {
        Ok(())
    } else {
        Err(format!("python3 cannot import qemu.qmp: {}", String::from_utf8_lossy(&probe.stderr).trim()))
    }
}

#[test]
fn qemu_qmp_library_drives_the_server() {
    if let Err(why) = qemu_qmp_available() {
        let required = std::env::var("POSTCOPY_REQUIRE_QEMU_QMP").is_ok_and(|v| v == "1");
        assert!(!required, "POSTCOPY_REQUIRE_QEMU_QMP=1 but {why}; install it with: {INSTALL}");
        eprintln!("SKIPPED qemu_qmp_library_drives_the_server: {why}; install it with: {INSTALL}");
        return;
    }
    let socket = std::env::temp_dir().join(format!("postcopy-qemu-qmp-{}.sock", std::process::id()));
    let bus = EventBus::new();
    let vmm = Arc::new(FakeVmm::running(Arc::new(bus.clone())));
    let server = Server::bind(&socket, ServerConfig::default(), vmm.clone(), bus).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qemu_qmp_client.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(output.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("checks passed"), "{stdout}");
    assert!(vmm.quit_requested(), "the script ended with quit");
    server.shutdown();
}
