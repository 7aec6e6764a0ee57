//! Thin safe wrappers over the socket calls the ports need (AF_UNIX stream,
//! datagram and seqpacket; recvmmsg/sendmmsg). mio's own types cover only
//! stream and datagram, and the batched calls are not in std.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::wire::offload::Offload;
use crate::wire::{check_frame_len, FrameError, MAX_FRAME_LEN};

/// An exclusive flock on `fd`: true once held, false if another holds it
/// and `wait` is false.
pub fn flock_exclusive(fd: &impl AsRawFd, wait: bool) -> io::Result<bool> {
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on an fd the caller owns.
        if unsafe { libc::flock(fd.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(false),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Frames moved per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;
/// Receive buffer per frame: one more than the limit so a too-long datagram
/// is seen as such rather than silently cut.
pub const RX_BUF_LEN: usize = MAX_FRAME_LEN + 1;

/// A Unix socket address, as the kernel hands it over (path or abstract).
#[derive(Clone, Copy)]
pub struct UnixAddr {
    pub raw: libc::sockaddr_un,
    pub len: libc::socklen_t,
}

impl PartialEq for UnixAddr {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.path_bytes() == other.path_bytes()
    }
}

impl std::fmt::Debug for UnixAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.display())
    }
}

impl UnixAddr {
    pub fn from_path(path: &Path) -> io::Result<UnixAddr> {
        let bytes = path.as_os_str().as_bytes();
        // SAFETY: sockaddr_un is plain old data; all-zero is valid.
        let mut raw: libc::sockaddr_un = unsafe { zeroed() };
        if bytes.is_empty() || bytes.len() >= raw.sun_path.len() || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "socket path must be 1 to 107 bytes without NUL: {}",
                    path.display()
                ),
            ));
        }
        raw.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in raw.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = (size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        Ok(UnixAddr { raw, len })
    }

    /// Builds an address from a raw `sockaddr_un` a client sent us (VDE
    /// request). Checks the family and that a path is terminated.
    pub fn from_wire(raw: libc::sockaddr_un) -> Option<UnixAddr> {
        if raw.sun_family != libc::AF_UNIX as libc::sa_family_t {
            return None;
        }
        let path = &raw.sun_path;
        if path[0] == 0 {
            // Abstract name: UML's daemon transport binds the full struct,
            // so the whole 108 bytes are the name.
            if path[1..].iter().all(|&c| c == 0) {
                return None;
            }
            return Some(UnixAddr {
                raw,
                len: size_of::<libc::sockaddr_un>() as libc::socklen_t,
            });
        }
        let n = path.iter().position(|&c| c == 0)?;
        let len = (size_of::<libc::sa_family_t>() + n + 1) as libc::socklen_t;
        Some(UnixAddr { raw, len })
    }

    /// Bytes of the name that matter (without the family).
    pub fn path_bytes(&self) -> &[u8] {
        let n = (self.len as usize).saturating_sub(size_of::<libc::sa_family_t>());
        let n = n.min(self.raw.sun_path.len());
        // SAFETY: c_char and u8 have the same size and alignment.
        unsafe { std::slice::from_raw_parts(self.raw.sun_path.as_ptr().cast::<u8>(), n) }
    }

    /// The file-system path of a named address; None for an abstract or
    /// unnamed one.
    pub fn fs_path(&self) -> Option<&Path> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = self.path_bytes();
        let bytes = bytes.split(|&b| b == 0).next()?;
        (!bytes.is_empty()).then(|| Path::new(std::ffi::OsStr::from_bytes(bytes)))
    }

    /// An unbound sender has no name we can answer to.
    pub fn is_named(&self) -> bool {
        self.len as usize > size_of::<libc::sa_family_t>()
    }

    pub fn display(&self) -> String {
        let b = self.path_bytes();
        if b.first() == Some(&0) {
            format!(
                "@{}",
                String::from_utf8_lossy(&b[1..]).trim_end_matches('\0')
            )
        } else {
            String::from_utf8_lossy(b)
                .trim_end_matches('\0')
                .to_string()
        }
    }

    fn empty() -> UnixAddr {
        UnixAddr {
            // SAFETY: plain old data.
            raw: unsafe { zeroed() },
            len: size_of::<libc::sockaddr_un>() as libc::socklen_t,
        }
    }

    /// The address of an unbound socket: no name.
    pub const fn unnamed() -> UnixAddr {
        UnixAddr {
            // SAFETY: plain old data; all-zero is valid.
            raw: unsafe { zeroed() },
            len: 0,
        }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A new non-blocking, close-on-exec AF_UNIX socket of `ty` (SOCK_STREAM,
/// SOCK_DGRAM or SOCK_SEQPACKET).
pub fn unix_socket(ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fd was just returned by socket() and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn bind(fd: &OwnedFd, addr: &UnixAddr) -> io::Result<()> {
    // SAFETY: addr.raw is a valid sockaddr_un of addr.len bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr.raw as *const libc::sockaddr_un).cast(),
            addr.len,
        )
    })
    .map(drop)
}

pub fn connect(fd: &OwnedFd, addr: &UnixAddr) -> io::Result<()> {
    // SAFETY: as for bind.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr.raw as *const libc::sockaddr_un).cast(),
            addr.len,
        )
    })
    .map(drop)
}

/// Dissolves a datagram socket's connection (connect to AF_UNSPEC).
pub fn disconnect(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC is what the call takes.
    let mut addr: libc::sockaddr = unsafe { zeroed() };
    addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: addr is valid for its size.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    })
    .map(drop)
}

pub fn listen(fd: &OwnedFd, backlog: i32) -> io::Result<()> {
    // SAFETY: plain syscall on an owned fd.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(drop)
}

/// A socket bound at `path`, listening if it is connection-oriented.
pub fn bound_socket(ty: libc::c_int, path: &Path) -> io::Result<OwnedFd> {
    let fd = unix_socket(ty)?;
    bind(&fd, &UnixAddr::from_path(path)?)?;
    if ty != libc::SOCK_DGRAM {
        listen(&fd, 16)?;
    }
    Ok(fd)
}

/// Accepts one connection, non-blocking and close-on-exec. `Ok(None)` when
/// there is none waiting.
pub fn accept(fd: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: null address pointers are allowed by accept4.
    let r = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            // The client gave up before we got to it: not our error.
            _ if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: r is a new fd returned by accept4.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(r) }))
}

pub fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    cvt_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn write(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // MSG_NOSIGNAL: a client that went away must not kill the daemon.
    // SAFETY: buf is valid for reads of buf.len() bytes.
    cvt_size(unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

pub fn set_buffer_sizes(fd: &OwnedFd, bytes: i32) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: passing a valid int option. Failure only means a smaller buffer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

/// Pre-allocated receive buffers for one batch of frames. Allocated once
/// per data-plane thread; nothing is allocated per frame.
pub struct RxBatch {
    bufs: Vec<Box<[u8]>>,
    lens: [usize; BATCH],
    /// What each frame's sender left undone (vhost-user guests with
    /// checksum and TSO offloads); none for socket ports.
    offloads: [Offload; BATCH],
    /// Where each frame came from, when [`recv_batch`] was asked for names.
    senders: [UnixAddr; BATCH],
    count: usize,
}

impl Default for RxBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RxBatch {
    pub fn new() -> Self {
        RxBatch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; RX_BUF_LEN].into_boxed_slice())
                .collect(),
            lens: [0; BATCH],
            offloads: [Offload::default(); BATCH],
            senders: [UnixAddr::unnamed(); BATCH],
            count: 0,
        }
    }

    pub fn clear(&mut self) {
        self.count = 0;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }

    pub fn frame(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// The next free buffer, to fill in place (a vhost-user ring copies
    /// straight into it); [`RxBatch::commit`] keeps what was written.
    /// Empty when the batch is full.
    pub fn next_buf(&mut self) -> &mut [u8] {
        if self.is_full() {
            return &mut [];
        }
        &mut self.bufs[self.count]
    }

    /// Keeps the first `len` bytes of the buffer [`RxBatch::next_buf`] gave.
    pub fn commit(&mut self, len: usize) {
        self.commit_with(len, Offload::default());
    }

    /// As [`RxBatch::commit`], for a frame its sender left work in.
    pub fn commit_with(&mut self, len: usize, offload: Offload) {
        if !self.is_full() && len <= RX_BUF_LEN {
            self.lens[self.count] = len;
            self.offloads[self.count] = offload;
            self.count += 1;
        }
    }

    pub fn offload(&self, i: usize) -> &Offload {
        &self.offloads[i]
    }

    /// The sender of frame `i`, if [`recv_batch`] was asked for names and
    /// the sender had one (an unbound socket has none).
    pub fn sender(&self, i: usize) -> Option<&UnixAddr> {
        self.senders.get(i).filter(|a| a.is_named())
    }

    /// Keeps the frames for which `keep(frame, sender)` says true, in
    /// order; returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], Option<&UnixAddr>) -> bool) -> usize {
        let mut kept = 0;
        for i in 0..self.count {
            let sender = Some(&self.senders[i]).filter(|a| a.is_named());
            if keep(&self.bufs[i][..self.lens[i]], sender) {
                if kept != i {
                    self.bufs.swap(kept, i);
                    self.lens[kept] = self.lens[i];
                    self.senders[kept] = self.senders[i];
                    self.offloads[kept] = self.offloads[i];
                }
                kept += 1;
            }
        }
        let dropped = self.count - kept;
        self.count = kept;
        dropped
    }

    /// Copies one frame in (stream framing). False when the batch is full.
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if self.is_full() || frame.len() > RX_BUF_LEN {
            return false;
        }
        self.bufs[self.count][..frame.len()].copy_from_slice(frame);
        self.lens[self.count] = frame.len();
        self.offloads[self.count] = Offload::default();
        self.senders[self.count].len = 0;
        self.count += 1;
        true
    }
}

/// Why a received datagram was not kept.
#[derive(Debug, Default, Clone, Copy)]
pub struct RxRejects {
    pub runt: u64,
    pub oversized: u64,
    /// Zero-length messages: a runt on SOCK_DGRAM, the peer's close on
    /// SOCK_SEQPACKET. Each port kind decides which.
    pub zero_len: u64,
}

/// Receives up to the free room of `batch` datagrams (or seqpacket
/// messages) in one recvmmsg. Frames failing the length rule are dropped
/// and counted in `rejects`. With `names`, each accepted frame's source
/// address is kept too ([`RxBatch::sender`]). Returns how many messages
/// were read.
pub fn recv_batch(
    fd: &OwnedFd,
    batch: &mut RxBatch,
    rejects: &mut RxRejects,
    names: bool,
) -> io::Result<usize> {
    let free = BATCH - batch.count;
    if free == 0 {
        return Ok(0);
    }
    // SAFETY: zeroed iovec/mmsghdr are valid values.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for i in 0..free {
        let buf = &mut batch.bufs[batch.count + i];
        iov[i].iov_base = buf.as_mut_ptr().cast();
        iov[i].iov_len = buf.len();
        hdrs[i].msg_hdr.msg_iov = &mut iov[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        if names {
            // The kernel writes each sender's name straight into the batch.
            let name = &mut batch.senders[batch.count + i].raw;
            hdrs[i].msg_hdr.msg_name = (name as *mut libc::sockaddr_un).cast();
            hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_un>() as libc::socklen_t;
        }
    }
    // SAFETY: every header points at live buffers of the stated sizes.
    let n = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            free as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let start = batch.count;
    for (i, hdr) in hdrs.iter().enumerate().take(n) {
        let len = hdr.msg_len as usize;
        let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        if len == 0 && !truncated {
            rejects.zero_len += 1;
            continue;
        }
        let verdict = if truncated {
            Err(FrameError::Oversized(len))
        } else {
            check_frame_len(len)
        };
        match verdict {
            Ok(()) => {
                // Keep accepted frames contiguous: swap the buffer down.
                let dst = batch.count;
                if dst != start + i {
                    batch.bufs.swap(dst, start + i);
                    if names {
                        batch.senders[dst].raw = batch.senders[start + i].raw;
                    }
                }
                batch.lens[dst] = len;
                batch.offloads[dst] = Offload::default();
                // An unnamed sender (and every one without `names`) has
                // length 0.
                batch.senders[dst].len = if names { hdr.msg_hdr.msg_namelen } else { 0 };
                batch.count += 1;
            }
            Err(FrameError::Runt(_)) => rejects.runt += 1,
            Err(FrameError::Oversized(_)) => rejects.oversized += 1,
        }
    }
    Ok(n)
}

/// Sends `frames` in one sendmmsg, to `dest` or to the connected peer.
/// Returns how many were sent (a prefix).
pub fn send_batch(fd: &OwnedFd, frames: &[&[u8]], dest: Option<&UnixAddr>) -> io::Result<usize> {
    let n = frames.len().min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: zeroed iovec/mmsghdr are valid values.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let mut dest_copy = dest.copied().unwrap_or_else(UnixAddr::empty);
    for i in 0..n {
        iov[i].iov_base = frames[i].as_ptr() as *mut libc::c_void;
        iov[i].iov_len = frames[i].len();
        hdrs[i].msg_hdr.msg_iov = &mut iov[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        if dest.is_some() {
            hdrs[i].msg_hdr.msg_name = (&mut dest_copy.raw as *mut libc::sockaddr_un).cast();
            hdrs[i].msg_hdr.msg_namelen = dest_copy.len;
        }
    }
    // SAFETY: headers point at live buffers; the kernel only reads them.
    let r = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_batch_drops_runts_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let rx = bound_socket(libc::SOCK_DGRAM, &path).unwrap();
        let tx = unix_socket(libc::SOCK_DGRAM).unwrap();
        let dest = UnixAddr::from_path(&path).unwrap();
        let a = [1u8; 20];
        let runt = [2u8; 5];
        let b = [3u8; 64];
        let sent = send_batch(&tx, &[&a, &runt, &b], Some(&dest)).unwrap();
        assert_eq!(sent, 3);
        let mut batch = RxBatch::new();
        let mut rej = RxRejects::default();
        assert_eq!(recv_batch(&rx, &mut batch, &mut rej, true).unwrap(), 3);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.frame(0), &a);
        assert_eq!(batch.frame(1), &b);
        assert_eq!(rej.runt, 1);
        // tx is unbound: nothing to answer to.
        assert!(batch.sender(0).is_none());
    }

    #[test]
    fn recv_batch_names_each_sender_and_retain_keeps_them_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let rx = bound_socket(libc::SOCK_DGRAM, &path).unwrap();
        let one = bound_socket(libc::SOCK_DGRAM, &dir.path().join("one")).unwrap();
        let two = bound_socket(libc::SOCK_DGRAM, &dir.path().join("two")).unwrap();
        let dest = UnixAddr::from_path(&path).unwrap();
        for (i, fd) in [&one, &two, &one, &two].into_iter().enumerate() {
            let f = [i as u8; 20];
            assert_eq!(send_batch(fd, &[&f], Some(&dest)).unwrap(), 1);
        }
        let mut batch = RxBatch::new();
        let mut rej = RxRejects::default();
        assert_eq!(recv_batch(&rx, &mut batch, &mut rej, true).unwrap(), 4);
        let one_addr = UnixAddr::from_path(&dir.path().join("one")).unwrap();
        let two_addr = UnixAddr::from_path(&dir.path().join("two")).unwrap();
        assert_eq!(batch.sender(1), Some(&two_addr));
        let dropped = batch.retain(|_, from| from == Some(&one_addr));
        assert_eq!(dropped, 2);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.frame(0), &[0u8; 20]);
        assert_eq!(batch.frame(1), &[2u8; 20]);
        assert_eq!(batch.sender(1), Some(&one_addr));
    }

    #[test]
    fn addr_from_wire_rejects_garbage() {
        // SAFETY: plain old data.
        let mut raw: libc::sockaddr_un = unsafe { zeroed() };
        assert!(UnixAddr::from_wire(raw).is_none());
        raw.sun_family = libc::AF_UNIX as _;
        assert!(UnixAddr::from_wire(raw).is_none(), "empty abstract name");
        for c in raw.sun_path.iter_mut() {
            *c = b'a' as _;
        }
        assert!(UnixAddr::from_wire(raw).is_none(), "unterminated path");
        raw.sun_path[5] = 0;
        let a = UnixAddr::from_wire(raw).unwrap();
        assert_eq!(a.display(), "aaaaa");
        raw.sun_path[0] = 0;
        assert!(UnixAddr::from_wire(raw).unwrap().display().starts_with('@'));
    }
}
