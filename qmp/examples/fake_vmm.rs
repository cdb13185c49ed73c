//! A QMP server with the simulated VMM behind it, for trying clients (socat,
//! QEMU's `qmp-shell`, `qemu.qmp` scripts) without a guest:
//!
//! ```text
//! cargo run -p postcopy-qmp --example fake_vmm -- SOCKET [--incoming-defer] [--advance-ms N]
//! ```
//!
//! A migration advances one step every N ms (default 200; 0: never). Exits
//! after `quit`.

use std::sync::Arc;
use std::time::Duration;

use postcopy_qmp::fake::FakeVmm;
use postcopy_qmp::{EventBus, Server, ServerConfig};

fn usage() -> ! {
    eprintln!("usage: fake_vmm SOCKET [--incoming-defer] [--advance-ms N]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next() else { usage() };
    let mut incoming = false;
    let mut advance_ms = 200u64;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--incoming-defer" => incoming = true,
            "--advance-ms" => advance_ms = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    let bus = EventBus::new();
    let sink = Arc::new(bus.clone());
    let vmm = Arc::new(if incoming { FakeVmm::incoming_deferred(sink) } else { FakeVmm::running(sink) });
    let server = match Server::bind(&socket, ServerConfig::default(), vmm.clone(), bus) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("fake_vmm: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("fake_vmm: QMP on {socket}");
    let tick = Duration::from_millis(if advance_ms == 0 { 20 } else { advance_ms });
    while !vmm.quit_requested() {
        std::thread::sleep(tick);
        if advance_ms > 0 {
            vmm.advance();
        }
    }
    server.shutdown();
}
