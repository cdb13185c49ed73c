//! Kernel TLS offload probe. Once a handshake is done, the kernel's `tls`
//! upper-layer protocol can take the session's keys (setsockopt TCP_ULP
//! "tls", then SOL_TLS TLS_TX/TLS_RX) and the socket stays a plain fd.
//! That needs a kernel built with CONFIG_TLS; this probe tells whether the
//! running kernel has it, so callers pick userspace rustls otherwise.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

/// Whether the running kernel accepts the `tls` ULP on a connected TCP
/// socket. Err: the probe's own loopback socket failed.
pub fn kernel_tls_available() -> io::Result<bool> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let stream = TcpStream::connect(listener.local_addr()?)?;
    let _accepted = listener.accept()?;
    let name = b"tls";
    // SAFETY: `stream` is an open socket for the whole call; the option
    // value points to `name`, valid for `name.len()` bytes, which the
    // kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error().raw_os_error() {
        // No `tls` module (ENOENT), or ULPs unsupported here.
        Some(libc::ENOENT | libc::ENOPROTOOPT | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_agrees_with_the_kernels_list_of_ulps() {
        let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .map(|s| s.split_whitespace().any(|u| u == "tls"))
            .unwrap_or(false);
        let probed = super::kernel_tls_available().unwrap();
        // The probe may load the module on demand, so it can find more
        // than the list; it must never find less.
        assert!(probed || !listed, "the kernel lists the tls ULP but the probe did not find it");
        eprintln!("kernel TLS offload available: {probed}");
    }
}
