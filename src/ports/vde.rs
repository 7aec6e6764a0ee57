//! `vde` ports: the vde_switch protocol, so unmodified `vde_plug`, QEMU
//! `-netdev vde,sock=DIR`, `slirpvde` and UML's `daemon`/`vde` transports
//! connect.
//!
//! The port is a directory holding the control socket `ctl`. A client
//! connects to it and sends a `request_v3` (magic 0xfeedface, version 3,
//! REQ_NEW_CONTROL, the address of its own datagram socket, an optional
//! description). The port makes a datagram socket for it, bound in the
//! directory and connected to the client's, and writes that address back.
//! Frames then go one per datagram; closing the control connection ends it.
//!
//! One `vde` port takes one client at a time, like `stream` and `bess`:
//! each client gets its own port object with its own lan and counters.
//! Make one `vde` port per client (a NIC, a vde_plug).

use std::io;
use std::mem::size_of;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::ports::own;
use crate::ports::queue::{FrameQueue, FRAME_QUEUE_DEPTH};
use crate::ports::sys::{self, UnixAddr};
use crate::ports::{
    accept_single, count_lost, count_tx_drop_full, count_tx_drop_no_peer, deregister_fd,
    set_interest, Accepted, PortCx, PortIo, PortKind, PortLink, RxBatch, RxState,
};
use crate::ports::{receive_datagrams, track_backlog};

pub const VDE_MAGIC: u32 = 0xfeed_face;
pub const VDE_VERSION: u32 = 3;
pub const REQ_NEW_CONTROL: u32 = 0;
/// magic + version + type + sockaddr_un.
pub const REQUEST_HEADER_LEN: usize = 12 + size_of::<libc::sockaddr_un>();
/// libvdeplug sends at most 128 description bytes.
pub const MAX_DESCRIPTION: usize = 128;
/// A client that connects and sends no request is dropped after this.
const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// What an attached client may write on its control connection (clients
/// send nothing after the request; vde_switch ignores what comes). More
/// ends the session: a client cannot keep the data plane reading it.
const MAX_CTL_CHATTER: usize = 64 * 1024;

const SUB_CTL_LISTENER: usize = 0;
const SUB_CTL: usize = 1;
const SUB_DATA: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VdeRequestError {
    #[error("request too short: {0} bytes, a request_v3 needs {REQUEST_HEADER_LEN}")]
    Short(usize),
    #[error("bad magic {0:#010x} (want 0xfeedface)")]
    Magic(u32),
    #[error("unsupported protocol version {0} (want 3)")]
    Version(u32),
    #[error("unsupported request type {0:#x} (want REQ_NEW_CONTROL)")]
    Type(u32),
    #[error("the client's data socket address is not a valid AF_UNIX address")]
    Address,
}

/// A checked `request_v3`.
#[derive(Debug, Clone)]
pub struct VdeRequest {
    pub data_addr: UnixAddr,
    /// Port number the client asked for (0 = any); ulan ignores it.
    pub wanted_port: u32,
    pub description: String,
}

/// Parses a `request_v3` in host byte order, as vde_switch does.
pub fn parse_request(bytes: &[u8]) -> Result<VdeRequest, VdeRequestError> {
    if bytes.len() < REQUEST_HEADER_LEN {
        return Err(VdeRequestError::Short(bytes.len()));
    }
    let word = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let (magic, version, ty) = (word(0), word(4), word(8));
    if magic != VDE_MAGIC {
        return Err(VdeRequestError::Magic(magic));
    }
    if version != VDE_VERSION {
        return Err(VdeRequestError::Version(version));
    }
    if ty & 0xff != REQ_NEW_CONTROL {
        return Err(VdeRequestError::Type(ty));
    }
    // SAFETY: sockaddr_un is plain old data; every bit pattern is valid,
    // and read_unaligned copies exactly its size from a checked range.
    let raw: libc::sockaddr_un =
        unsafe { std::ptr::read_unaligned(bytes[12..REQUEST_HEADER_LEN].as_ptr().cast()) };
    let data_addr = UnixAddr::from_wire(raw).ok_or(VdeRequestError::Address)?;
    let rest = &bytes[REQUEST_HEADER_LEN..];
    let rest = &rest[..rest.len().min(MAX_DESCRIPTION)];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let description = String::from_utf8_lossy(&rest[..end])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    Ok(VdeRequest {
        data_addr,
        wanted_port: ty >> 8,
        description,
    })
}

enum Session {
    /// Connected to `ctl`, request not complete yet.
    Pending {
        ctl: OwnedFd,
        buf: Box<[u8; REQUEST_HEADER_LEN + MAX_DESCRIPTION]>,
        got: usize,
        since_ms: u64,
    },
    Attached {
        ctl: OwnedFd,
        data: OwnedFd,
        data_path: PathBuf,
        want_write: bool,
        /// Bytes read from `ctl` since the request.
        chatter: usize,
        _own: own::OwnSocket,
        /// The client's data socket: no other port may send to it.
        _peer: Option<own::OwnSocket>,
    },
}

pub struct VdePort {
    link: PortLink,
    dir: PathBuf,
    ctl_listener: OwnedFd,
    session: Option<Session>,
    queue: FrameQueue,
    next_data_id: u32,
    _own_ctl: own::OwnSocket,
}

impl VdePort {
    pub fn open(dir: &Path, link: PortLink) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        match sys::bound_socket(libc::SOCK_STREAM, &dir.join("ctl")) {
            Ok(ctl_listener) => Ok(VdePort {
                link,
                dir: dir.to_path_buf(),
                ctl_listener,
                session: None,
                queue: FrameQueue::new(FRAME_QUEUE_DEPTH),
                next_data_id: 1,
                _own_ctl: own::OwnSocket::claim(&dir.join("ctl")),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(dir);
                Err(e)
            }
        }
    }

    fn end_session(&mut self, cx: &mut PortCx<'_>, reason: &str) {
        match self.session.take() {
            Some(Session::Pending { ctl, .. }) => deregister_fd(cx.registry, &ctl),
            Some(Session::Attached {
                ctl,
                data,
                data_path,
                ..
            }) => {
                deregister_fd(cx.registry, &ctl);
                deregister_fd(cx.registry, &data);
                let _ = std::fs::remove_file(&data_path);
                count_lost(cx.counters, self.queue.clear());
                self.link.down(cx.counters, reason);
            }
            None => {}
        }
    }

    fn reject(&mut self, cx: &mut PortCx<'_>, why: std::fmt::Arguments<'_>) {
        cx.counters.rejected_clients += 1;
        cx.counters.protocol_errors += 1;
        self.link
            .warn(cx.now_ms, format_args!("refused a vde client: {why}"));
        self.end_session(cx, "bad request");
    }

    /// Reads the request; once it is whole, answers it and attaches.
    fn read_request(&mut self, cx: &mut PortCx<'_>) {
        let Some(Session::Pending { ctl, buf, got, .. }) = self.session.as_mut() else {
            return;
        };
        loop {
            if *got == buf.len() {
                break;
            }
            match sys::read(ctl, &mut buf[*got..]) {
                Ok(0) => {
                    if *got < REQUEST_HEADER_LEN {
                        self.end_session(cx, "closed before its request");
                        return;
                    }
                    break;
                }
                Ok(n) => *got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.end_session(cx, "control read failed");
                    return;
                }
            }
        }
        if *got < REQUEST_HEADER_LEN {
            return; // wait for the rest (bounded by the request timeout)
        }
        let req = match parse_request(&buf[..*got]) {
            Ok(r) => r,
            Err(e) => return self.reject(cx, format_args!("{e}")),
        };
        let Some(Session::Pending { ctl, .. }) = self.session.take() else {
            return;
        };
        match self.attach(ctl, &req, cx) {
            Ok(()) => {}
            Err(e) => {
                cx.counters.rejected_clients += 1;
                self.link.warn(
                    cx.now_ms,
                    format_args!("cannot attach vde client {}: {e}", req.data_addr.display()),
                );
            }
        }
    }

    fn attach(&mut self, ctl: OwnedFd, req: &VdeRequest, cx: &mut PortCx<'_>) -> io::Result<()> {
        // The client's socket is resolved to its inode before ours is
        // made, and that inode must not be one of the switch's own sockets
        // under any name (symlink, hard link): see `ports::own`.
        let target = match check_data_addr(&self.dir, &req.data_addr)
            .and_then(|()| own::resolve(&req.data_addr))
        {
            Ok(t) => t,
            Err(e) => {
                deregister_fd(cx.registry, &ctl);
                return Err(e);
            }
        };
        let id = self.next_data_id;
        self.next_data_id = self.next_data_id.wrapping_add(1).max(1);
        let data_path = self.dir.join(format!("{id:03}"));
        let _ = std::fs::remove_file(&data_path);
        let data = sys::unix_socket(libc::SOCK_DGRAM)?;
        let ours = UnixAddr::from_path(&data_path)?;
        sys::bind(&data, &ours)?;
        let own_data = own::OwnSocket::claim(&data_path);
        let result = (|| {
            own::connect(&data, &req.data_addr, target.as_ref())?;
            sys::set_buffer_sizes(&data, 4 << 20);
            // The reply is our data socket's whole sockaddr_un.
            // SAFETY: sockaddr_un is plain old data, read as bytes.
            let reply: &[u8] = unsafe {
                std::slice::from_raw_parts(
                    (&ours.raw as *const libc::sockaddr_un).cast::<u8>(),
                    size_of::<libc::sockaddr_un>(),
                )
            };
            if sys::write(&ctl, reply)? != reply.len() {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "short reply"));
            }
            set_interest(cx.registry, &ctl, cx.token(SUB_CTL), false, false)?;
            set_interest(cx.registry, &data, cx.token(SUB_DATA), false, true)
        })();
        if let Err(e) = result {
            deregister_fd(cx.registry, &ctl);
            let _ = std::fs::remove_file(&data_path);
            return Err(e);
        }
        let peer = if req.description.is_empty() {
            req.data_addr.display()
        } else {
            format!("{} ({})", req.data_addr.display(), req.description)
        };
        self.session = Some(Session::Attached {
            ctl,
            data,
            data_path,
            want_write: false,
            chatter: 0,
            _own: own_data,
            _peer: target.map(own::OwnSocket::claim_target),
        });
        self.link.up(cx.counters, Some(peer));
        Ok(())
    }

    /// Anything on an attached control connection: EOF ends the session,
    /// other bytes are read and ignored (vde_switch ignores them too), up
    /// to [`MAX_CTL_CHATTER`].
    fn watch_ctl(&mut self, cx: &mut PortCx<'_>) {
        let Some(Session::Attached { ctl, chatter, .. }) = self.session.as_mut() else {
            return;
        };
        let mut scratch = [0u8; 4096];
        loop {
            match sys::read(ctl, &mut scratch) {
                Ok(0) => return self.end_session(cx, "client closed"),
                Ok(n) => {
                    *chatter += n;
                    if *chatter > MAX_CTL_CHATTER {
                        cx.counters.rejected_clients += 1;
                        return self
                            .end_session(cx, "client kept writing on its control connection");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.end_session(cx, "control connection failed"),
            }
        }
    }

    fn receive(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) -> RxState {
        let Some(Session::Attached { data, .. }) = self.session.as_ref() else {
            return RxState::Drained;
        };
        let rx = receive_datagrams(data, batch, &mut self.link, cx, false, false);
        if let Some(e) = rx.error {
            self.link
                .warn(cx.now_ms, format_args!("receive failed: {e}"));
        }
        rx.state
    }
}

/// The client's data socket must be its own, not one of the lab's port
/// sockets: naming this port's `ctl` or data socket would loop the port
/// into itself, naming another port's would bridge two lans. libvdeplug
/// binds its data socket in the switch's directory as a dot-file, so that
/// directory is fine except for the names the port itself makes.
fn check_data_addr(port_dir: &Path, addr: &UnixAddr) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Some(path) = addr.fs_path() else {
        return Ok(()); // abstract: none of ours are
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(parent) = std::fs::canonicalize(parent) else {
        return Ok(()); // connect will fail and say so
    };
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("its data socket {} {why}", path.display()),
        ))
    };
    let ours = std::fs::canonicalize(port_dir)?;
    if parent == ours {
        let name = name.as_bytes();
        if name == b"ctl" || (!name.is_empty() && name.iter().all(u8::is_ascii_digit)) {
            return refuse("is this port's own socket");
        }
        return Ok(());
    }
    if let Some(ports_dir) = ours.parent() {
        if parent == ports_dir || parent.parent() == Some(ports_dir) {
            return refuse("is another port's socket");
        }
    }
    Ok(())
}

impl PortIo for VdePort {
    fn kind(&self) -> PortKind {
        PortKind::Vde
    }

    fn register(&mut self, cx: &mut PortCx<'_>) -> io::Result<()> {
        set_interest(
            cx.registry,
            &self.ctl_listener,
            cx.token(SUB_CTL_LISTENER),
            false,
            true,
        )
    }

    fn on_ready(
        &mut self,
        sub: usize,
        readable: bool,
        writable: bool,
        cx: &mut PortCx<'_>,
        batch: &mut RxBatch,
    ) -> RxState {
        match sub {
            SUB_CTL_LISTENER => {
                // A pending client may have given up already: notice that
                // before turning the new one away.
                if matches!(self.session, Some(Session::Pending { .. })) {
                    self.read_request(cx);
                }
                let occupied = self.session.is_some();
                let ctl = match accept_single(&self.ctl_listener, occupied, &mut self.link, cx) {
                    Accepted::Client(fd) => Some(fd),
                    Accepted::Busy => return RxState::More,
                    Accepted::Done => None,
                };
                if let Some(ctl) = ctl {
                    if set_interest(cx.registry, &ctl, cx.token(SUB_CTL), false, true).is_ok() {
                        self.session = Some(Session::Pending {
                            ctl,
                            buf: Box::new([0; REQUEST_HEADER_LEN + MAX_DESCRIPTION]),
                            got: 0,
                            since_ms: cx.now_ms,
                        });
                        self.read_request(cx);
                    }
                    return RxState::More; // look at this one before the next
                }
                RxState::Drained
            }
            SUB_CTL => {
                match self.session {
                    Some(Session::Pending { .. }) => self.read_request(cx),
                    Some(Session::Attached { .. }) => self.watch_ctl(cx),
                    None => {}
                }
                RxState::Drained
            }
            SUB_DATA => {
                if writable {
                    self.flush(cx);
                }
                if readable {
                    self.receive(cx, batch)
                } else {
                    RxState::Drained
                }
            }
            _ => RxState::Drained,
        }
    }

    fn enqueue(&mut self, frame: &[u8], cx: &mut PortCx<'_>) {
        if !matches!(self.session, Some(Session::Attached { .. })) {
            count_tx_drop_no_peer(cx.counters);
        } else if !self.queue.push(frame) {
            count_tx_drop_full(cx.counters);
        }
    }

    fn flush(&mut self, cx: &mut PortCx<'_>) -> bool {
        let Some(Session::Attached {
            data, want_write, ..
        }) = self.session.as_mut()
        else {
            return false;
        };
        if self.queue.is_empty() {
            return false;
        }
        match self.queue.flush(data, None, cx.counters) {
            Ok(done) => {
                track_backlog(cx, data, SUB_DATA, want_write, done);
                !done
            }
            Err(e) => {
                let reason = format!("send failed: {e}");
                self.end_session(cx, &reason);
                false
            }
        }
    }

    fn tick(&mut self, cx: &mut PortCx<'_>) {
        if let Some(Session::Pending { since_ms, .. }) = self.session {
            if cx.now_ms.saturating_sub(since_ms) > REQUEST_TIMEOUT_MS {
                self.reject(cx, format_args!("no request within 5 s"));
            }
        }
    }

    fn discard_queued(&mut self, cx: &mut PortCx<'_>) {
        crate::ports::count_moved(cx.counters, self.queue.clear());
    }

    fn deregister(&mut self, registry: &mio::Registry) {
        deregister_fd(registry, &self.ctl_listener);
        match &self.session {
            Some(Session::Pending { ctl, .. }) => deregister_fd(registry, ctl),
            Some(Session::Attached { ctl, data, .. }) => {
                deregister_fd(registry, ctl);
                deregister_fd(registry, data);
            }
            None => {}
        }
    }
}

impl Drop for VdePort {
    fn drop(&mut self) {
        if let Some(Session::Attached { data_path, .. }) = &self.session {
            let _ = std::fs::remove_file(data_path);
        }
        let _ = std::fs::remove_file(self.dir.join("ctl"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn request(path: &str, descr: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(VDE_MAGIC.to_ne_bytes());
        b.extend(VDE_VERSION.to_ne_bytes());
        b.extend(REQ_NEW_CONTROL.to_ne_bytes());
        b.extend((libc::AF_UNIX as u16).to_ne_bytes());
        let mut p = [0u8; 108];
        p[..path.len()].copy_from_slice(path.as_bytes());
        b.extend(p);
        b.extend(descr.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn parses_a_libvdeplug_request() {
        let r = parse_request(&request("/tmp/vde.123-0", "vde_plug user=me")).unwrap();
        assert_eq!(r.data_addr.display(), "/tmp/vde.123-0");
        assert_eq!(r.description, "vde_plug user=me");
        assert_eq!(r.wanted_port, 0);
    }

    #[test]
    fn accepts_a_request_without_description() {
        let b = request("/x", "");
        let r = parse_request(&b[..REQUEST_HEADER_LEN]).unwrap();
        assert_eq!(r.description, "");
    }

    #[test]
    fn rejects_bogus_requests() {
        let good = request("/x", "d");
        assert_eq!(
            parse_request(&good[..50]).unwrap_err(),
            VdeRequestError::Short(50)
        );
        assert!(parse_request(&[]).is_err());
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(parse_request(&b), Err(VdeRequestError::Magic(_))));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(parse_request(&b).unwrap_err(), VdeRequestError::Version(2));
        let mut b = good.clone();
        b[8] = 5;
        assert!(matches!(parse_request(&b), Err(VdeRequestError::Type(_))));
        let mut b = good.clone();
        b[12] = 2; // AF_INET
        assert_eq!(parse_request(&b).unwrap_err(), VdeRequestError::Address);
        let mut b = good;
        for x in &mut b[14..122] {
            *x = b'a';
        }
        assert_eq!(parse_request(&b).unwrap_err(), VdeRequestError::Address);
    }
}

#[cfg(test)]
mod hostile_bytes {
    use super::*;

    /// Random and mutated requests never panic the parser, and whatever it
    /// accepts names a usable address (the fuzz target explores further).
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = tests::request("/tmp/x", "d");
        for _ in 0..20_000 {
            let mut b = if next() % 2 == 0 {
                good.clone()
            } else {
                vec![0u8; (next() % 400) as usize]
            };
            for _ in 0..(next() % 8) {
                if !b.is_empty() {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
            }
            b.truncate((next() % 300) as usize);
            if let Ok(r) = parse_request(&b) {
                assert!(!r.data_addr.path_bytes().is_empty());
            }
        }
    }
}
