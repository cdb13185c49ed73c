//! The crate's unsafe code: thin wrappers over system calls and ioctls whose
//! safety rests on invariants stated at each call.
//!
//! Everything else in the crate is safe Rust.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use kvm_bindings::{kvm_run, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};

use vm_memory::{GuestAddress, GuestMemoryBackend};

/// A second, independently owned mapping of a vCPU's `kvm_run` page, used by
/// other threads to set `immediate_exit` so that the vCPU's next (or current,
/// once kicked by a signal) `KVM_RUN` returns `EINTR` at once.
///
/// Owning its own mapping means the pointer stays valid even after the vCPU
/// thread has dropped its `VcpuFd`: the mapping holds a reference to the file.
#[derive(Debug)]
pub(crate) struct KvmRunMapping {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the only field we touch through
// it (`immediate_exit`) is accessed atomically, so sharing it between threads
// is sound.
unsafe impl Send for KvmRunMapping {}
// SAFETY: as above, all accesses go through an `AtomicU8`.
unsafe impl Sync for KvmRunMapping {}

impl KvmRunMapping {
    /// Maps the `kvm_run` structure of `vcpu` a second time.
    pub(crate) fn new(vcpu: &VcpuFd) -> io::Result<Self> {
        let len = std::mem::size_of::<kvm_run>();
        // SAFETY: a fresh shared mapping of a vCPU fd at offset 0, which is
        // where KVM exposes `kvm_run`; the result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { base, len })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        let offset = std::mem::offset_of!(kvm_run, immediate_exit);
        // SAFETY: `base` maps a whole `kvm_run` (checked in `new`), the field
        // is a single byte inside it, and `AtomicU8` has the layout of `u8`.
        // The mapping lives as long as `self`.
        unsafe { &*(self.base.cast::<u8>().add(offset).cast::<AtomicU8>()) }
    }

    /// Sets or clears `kvm_run.immediate_exit`.
    pub(crate) fn set_immediate_exit(&self, on: bool) {
        self.immediate_exit().store(u8::from(on), Ordering::SeqCst);
    }
}

impl Drop for KvmRunMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which nothing
        // references any more (we hold the only `&mut`).
        unsafe {
            libc::munmap(self.base, self.len);
        }
    }
}

/// Registers (or updates, or with `size == 0` deletes) a KVM memory slot.
///
/// # Safety
/// `[host_addr, host_addr + size)` must be a mapping owned by the caller that
/// stays mapped for as long as the VM (any of its fds, including vCPU fds)
/// exists, and is not used for anything but this guest's RAM.
pub(crate) unsafe fn set_memory_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    host_addr: u64,
    flags: u32,
) -> std::result::Result<(), kvm_ioctls::Error> {
    let region =
        kvm_userspace_memory_region { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: host_addr };
    // SAFETY: the caller guarantees the lifetime of the host range.
    unsafe { vm.set_user_memory_region(region) }
}

/// `KVM_SET_XSAVE` with a checked size: `kvm_xsave_size` is the number of
/// bytes KVM copies (KVM_CAP_XSAVE2, or 4096 without it), probed when the VM
/// was created; it must fit in `kvm_xsave`.
pub(crate) fn set_xsave(
    vcpu: &VcpuFd,
    xsave: &kvm_bindings::kvm_xsave,
    kvm_xsave_size: usize,
) -> std::result::Result<(), kvm_ioctls::Error> {
    if kvm_xsave_size > std::mem::size_of::<kvm_bindings::kvm_xsave>() {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    // SAFETY: KVM reads `kvm_xsave_size` bytes, which we checked fit in the
    // `kvm_xsave` we pass by reference.
    unsafe { vcpu.set_xsave(xsave) }
}

/// What [`madvise`] asks of a range of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Advice {
    /// `MADV_DONTNEED`: unmap the pages, so that the next access faults (into
    /// userfaultfd when registered). Anonymous memory loses them; shared
    /// memory keeps its contents, only this mapping drops them.
    DontNeed,
    /// `MADV_POPULATE_WRITE`: allocate every page and map it writable.
    PopulateWrite,
}

/// `madvise` over `[host_addr, host_addr + len)`.
///
/// # Safety
/// The range must be page-aligned and lie inside a guest-memory mapping
/// this process made (checked by the caller against the RAM layout), and no
/// Rust reference may point into it: `MADV_DONTNEED` drops anonymous pages,
/// which would change memory under such a reference. Guest memory is only
/// ever accessed through volatile copies and raw pointers.
unsafe fn madvise(host_addr: u64, len: usize, advice: Advice) -> io::Result<()> {
    let advice = match advice {
        Advice::DontNeed => libc::MADV_DONTNEED,
        Advice::PopulateWrite => libc::MADV_POPULATE_WRITE,
    };
    // SAFETY: the caller guarantees the range is guest memory of ours that
    // no Rust reference points into; either advice only unmaps or maps pages.
    let ret = unsafe { libc::madvise(host_addr as *mut libc::c_void, len, advice) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Drops `len` bytes at `gpa` of guest memory `mem` (`MADV_DONTNEED`):
/// the next access faults (into userfaultfd when the RAM is registered).
/// The range is checked against `mem`'s regions: no other memory can be
/// named.
pub(crate) fn discard_guest_range<M: GuestMemoryBackend>(mem: &M, gpa: u64, len: usize) -> io::Result<()> {
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
    // Both checked by vm-memory: the whole range lies in one region.
    mem.get_slice(GuestAddress(gpa), len).map_err(invalid)?;
    let host = mem.get_host_address(GuestAddress(gpa)).map_err(invalid)? as u64;
    // SAFETY: `[host, host + len)` lies in one region of `mem`'s guest
    // mapping (checked just above), which lives as long as `mem` and is only
    // accessed through volatile copies and raw pointers.
    unsafe { madvise(host, len, Advice::DontNeed) }
}

/// Allocates every page of `region` and maps it writable
/// (`MADV_POPULATE_WRITE`): writing there later faults no more.
pub(crate) fn populate_write(region: &vm_memory::MmapRegion<()>) -> io::Result<()> {
    // SAFETY: the whole of a live mapping that `region` owns; populating
    // only allocates and maps pages, their contents stay zero.
    unsafe { madvise(region.as_ptr() as u64, region.size(), Advice::PopulateWrite) }
}

/// Allocates the pages of `len` bytes at `gpa` of `mem` and maps them
/// writable (`MADV_POPULATE_WRITE`). The range is checked against `mem`'s
/// regions: no other memory can be named.
pub(crate) fn populate_guest_range<M: GuestMemoryBackend>(mem: &M, gpa: u64, len: usize) -> io::Result<()> {
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
    // Both checked by vm-memory: the whole range lies in one region.
    mem.get_slice(GuestAddress(gpa), len).map_err(invalid)?;
    let host = mem.get_host_address(GuestAddress(gpa)).map_err(invalid)? as u64;
    // SAFETY: `[host, host + len)` lies in one region of `mem` (checked just
    // above), which lives as long as `mem`; populating only allocates and
    // maps pages, and leaves the contents of pages already there as they are.
    unsafe { madvise(host, len, Advice::PopulateWrite) }
}

/// Waits until `fd` is readable or `timeout` passes; returns whether it is.
pub(crate) fn poll_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one valid pollfd, count 1.
        let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ret >= 0 {
            return Ok(ret > 0 && pfd.revents & libc::POLLIN != 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The calling thread's kernel thread id (what userfaultfd reports).
pub(crate) fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Outcome of one `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` / `UFFDIO_CONTINUE` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UffdFill {
    /// This many bytes from the start of the range were filled (all of them
    /// unless the call was cut short; the caller goes on after them).
    Filled(usize),
    /// The first page of the range is already present; nothing filled.
    Exists,
    /// Nothing filled: the address space is changing (`EAGAIN` with a count
    /// of `-EAGAIN`: a pending `MADV_DONTNEED`, `mremap`, `fork`, `munmap`
    /// whose userfaultfd event is unread). Retry once the event is read.
    Again,
}

/// When a fill wakes the threads waiting for its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// In the same call.
    Now,
    /// Not in the call (`..._MODE_DONTWAKE`): the caller wakes them with `UFFDIO_WAKE`.
    Later,
}

/// `UFFDIO_COPY` of `src` to `dst`, waking the faulting threads when `wake` says.
///
/// `dst` must be a page-aligned range inside memory registered with `uffd`
/// (checked by the callers against the RAM layout).
pub(crate) fn uffd_copy(uffd: &userfaultfd::Uffd, dst: u64, src: &[u8], wake: Wake) -> io::Result<UffdFill> {
    let mode = if wake == Wake::Now { 0 } else { userfaultfd_sys::UFFDIO_COPY_MODE_DONTWAKE };
    let mut arg = userfaultfd_sys::uffdio_copy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode, copy: 0 };
    // SAFETY: `arg` is a valid uffdio_copy for the duration of the call;
    // `src` is a live slice of `len` bytes; `dst` is a registered range of
    // guest memory (see above), which the kernel fills atomically; no Rust
    // reference points into guest memory.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), userfaultfd_sys::UFFDIO_COPY as _, &mut arg) };
    fill_outcome(ret, arg.copy, src.len())
}

/// `UFFDIO_ZEROPAGE` over `[dst, dst + len)`, waking the faulting threads when `wake` says.
pub(crate) fn uffd_zeropage(uffd: &userfaultfd::Uffd, dst: u64, len: usize, wake: Wake) -> io::Result<UffdFill> {
    let mode = if wake == Wake::Now { 0 } else { userfaultfd_sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE };
    let range = userfaultfd_sys::uffdio_range { start: dst, len: len as u64 };
    let mut arg = userfaultfd_sys::uffdio_zeropage { range, mode, zeropage: 0 };
    // SAFETY: `arg` is a valid uffdio_zeropage for the duration of the call;
    // `dst` is a registered range of guest memory (checked by the callers);
    // the kernel maps the zero page there.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), userfaultfd_sys::UFFDIO_ZEROPAGE as _, &mut arg) };
    fill_outcome(ret, arg.zeropage, len)
}

/// Decodes a fill ioctl's return value and count field. The kernel stores
/// in the count the bytes filled, or a negative errno when none were; a
/// call cut short after some bytes fails with `EAGAIN` and a positive count.
/// (`userfaultfd` 0.9 reads a count of `-EAGAIN` as 2^64 - 11 bytes copied,
/// and drops a partial zero-fill's count: hence the raw ioctls.)
fn fill_outcome(ret: libc::c_int, count: i64, len: usize) -> io::Result<UffdFill> {
    if ret == 0 {
        return Ok(UffdFill::Filled(len));
    }
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    decode_fill(errno, count, len)
}

/// [`fill_outcome`] after a failed call with `errno`.
fn decode_fill(errno: i32, count: i64, len: usize) -> io::Result<UffdFill> {
    match usize::try_from(count) {
        Ok(n) if n > 0 && n <= len => Ok(UffdFill::Filled(n)),
        Ok(n) if n > len => Err(io::Error::other(format!("the kernel reports {n} bytes filled of {len}"))),
        _ if errno == libc::EEXIST => Ok(UffdFill::Exists),
        _ if errno == libc::EAGAIN => Ok(UffdFill::Again),
        _ => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// `UFFDIO_CONTINUE` over `[dst, dst + len)`: maps pages already in memory
/// into a minor-fault-registered mapping, waking the faulting threads when
/// `wake` says.
pub(crate) fn uffd_continue(uffd: &userfaultfd::Uffd, dst: u64, len: usize, wake: Wake) -> io::Result<UffdFill> {
    // The crate's call is safe: the kernel only maps pages already in memory.
    // It returns a partial count as Ok, and other failures as their errno.
    match uffd.r#continue(dst as *mut libc::c_void, len, wake == Wake::Now) {
        Ok(0) => Ok(UffdFill::Again),
        Ok(n) => usize::try_from(n)
            .ok()
            .filter(|&n| n <= len)
            .map(UffdFill::Filled)
            .ok_or_else(|| io::Error::other(format!("the kernel reports {n} bytes mapped of {len}"))),
        Err(userfaultfd::Error::SystemError(errno)) => decode_fill(errno as i32, 0, len),
        Err(other) => Err(io::Error::other(other.to_string())),
    }
}

/// `UFFDIO_WAKE` over `[dst, dst + len)`: wakes threads waiting on pages
/// that are already present (after a fill that did not wake, or a fault
/// that raced with an install).
pub(crate) fn uffd_wake(uffd: &userfaultfd::Uffd, dst: u64, len: usize) -> io::Result<()> {
    uffd.wake(dst as *mut libc::c_void, len).map_err(|e| match e {
        userfaultfd::Error::SystemError(errno) => io::Error::from_raw_os_error(errno as i32),
        other => io::Error::other(other.to_string()),
    })
}

/// `CLOCK_MONOTONIC` in nanoseconds: one time base for every process of this
/// host, so that a source and a destination on one machine can compare times.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if ret != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Pins thread `tid` (0: the calling thread) to CPU `cpu`.
pub fn pin_thread(tid: i32, cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// `recv(2)` of at most `max` bytes into the spare capacity of `buf`
/// (grown as needed), without zeroing it first. `dontwait`: return
/// `WouldBlock` instead of blocking. Returns the bytes received (0: the peer
/// closed).
pub(crate) fn recv_into(fd: &impl AsRawFd, buf: &mut bytes::BytesMut, max: usize, dontwait: bool) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    let flags = if dontwait { libc::MSG_DONTWAIT } else { 0 };
    loop {
        // SAFETY: `spare` is writable memory of at least `len` bytes owned by
        // `buf`; recv writes at most `len` bytes there.
        let n = unsafe { libc::recv(fd.as_raw_fd(), spare.as_mut_ptr().cast(), len, flags) };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: recv initialised the first `n <= len` bytes of the spare
            // capacity.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Puts thread `tid` (0: the calling thread) in `SCHED_FIFO` at `priority`
/// (1-99): it then runs as soon as it wakes, ahead of every normal thread on
/// its CPU. `None`: back to the normal policy (`SCHED_OTHER`).
pub fn set_realtime(tid: i32, priority: Option<i32>) -> io::Result<()> {
    let (policy, prio) = match priority {
        Some(p) => (libc::SCHED_FIFO, p),
        None => (libc::SCHED_OTHER, 0),
    };
    let param = libc::sched_param { sched_priority: prio };
    // SAFETY: `param` is a valid sched_param; a tid of 0 is the calling thread.
    let ret = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the nice value of the calling thread (Linux: per thread).
pub fn set_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority has no memory preconditions; who = 0 is the
    // calling thread on Linux.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the TCP congestion control algorithm of `stream` (`TCP_CONGESTION`,
/// a name from `net.ipv4.tcp_available_congestion_control`).
pub fn set_tcp_congestion(stream: &impl AsRawFd, name: &str) -> io::Result<()> {
    let len = libc::socklen_t::try_from(name.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the option value is `name`'s bytes, valid for `len` bytes for
    // the duration of the call; the kernel copies them.
    let ret = unsafe {
        libc::setsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CONGESTION, name.as_ptr().cast(), len)
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the send and receive buffer sizes of `stream` (`SO_SNDBUF`,
/// `SO_RCVBUF`; the kernel doubles them for its bookkeeping and stops
/// autotuning them).
pub fn set_socket_buffers(stream: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: the option value is a c_int that lives for the call; the
        // kernel copies it.
        let ret = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// The kernel's count field decoded: a count of -EAGAIN is "retry", not
    /// 2^64 - 11 bytes; a partial count is kept whatever the errno.
    #[test]
    fn fill_counts_are_decoded() {
        let page = 4096usize;
        let again = -i64::from(libc::EAGAIN);
        assert_eq!(decode_fill(libc::EAGAIN, again, 2 * page).unwrap(), UffdFill::Again);
        assert_eq!(decode_fill(libc::EAGAIN, page as i64, 2 * page).unwrap(), UffdFill::Filled(page));
        assert_eq!(decode_fill(libc::EEXIST, -i64::from(libc::EEXIST), page).unwrap(), UffdFill::Exists);
        assert_eq!(
            decode_fill(libc::ENOMEM, -i64::from(libc::ENOMEM), page).unwrap_err().raw_os_error(),
            Some(libc::ENOMEM)
        );
        assert!(decode_fill(libc::EAGAIN, 3 * page as i64, 2 * page).is_err(), "more than asked");
    }

    #[test]
    fn congestion_control_is_set_or_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // Reno is built into every kernel; a made-up name is refused.
        set_tcp_congestion(&stream, "reno").unwrap();
        let err = set_tcp_congestion(&stream, "no-such-algorithm").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    }

    #[test]
    fn socket_buffers_are_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        set_socket_buffers(&stream, 64 * 1024).unwrap();
        for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: value and len are valid for writes of their sizes.
            let ret = unsafe {
                libc::getsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(ret, 0);
            assert_eq!(value, 128 * 1024, "the kernel reports twice the size asked");
        }
        assert!(set_socket_buffers(&stream, usize::MAX).is_err());
    }
}
