//! The handover protocol of a tap port: how a client in some network
//! namespace gives the daemon the fd of a tap it opened there.
//!
//! The port's socket is SOCK_SEQPACKET. A client connects and sends one
//! message: a 16-byte header (below) with exactly one fd attached as
//! SCM_RIGHTS. The daemon answers with one message, `ok IFNAME\n` or
//! `error: REASON\n`, and closes the connection. The fd lives on in the
//! daemon; the client may exit.
//!
//! Header, version 1, little-endian:
//!
//! | bytes | field                                                        |
//! |-------|--------------------------------------------------------------|
//! | 0..4  | magic `ULTP`                                                 |
//! | 4     | version, 1                                                   |
//! | 5     | flags: bit 0 = the tap has IFF_VNET_HDR; others must be 0     |
//! | 6..8  | vnet header size: 10 or 12 with bit 0, else 0                |
//! | 8..12 | TUN_F_* offloads the client set (TUNSETOFFLOAD)               |
//! | 12..16| reserved, 0                                                  |
//!
//! The daemon believes none of it without checking: the fd must answer
//! TUNGETIFF with IFF_TAP and IFF_NO_PI, its IFF_VNET_HDR must match bit 0
//! and TUNGETVNETHDRSZ the stated size. The offloads cannot be read back
//! from the kernel; they only say whether the tap will hand over TCP
//! super-frames (the port copes either way).

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::tun;

pub const MAGIC: [u8; 4] = *b"ULTP";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
pub const FLAG_VNET_HDR: u8 = 1;
/// The longest reason an answer carries.
pub const MAX_REPLY: usize = 512;
/// fds one message may carry before the kernel truncates (more is an
/// error anyway; the room lets "two fds" be told apart from "many").
const MAX_FDS: usize = 8;

/// What a client says about its fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 0 (no IFF_VNET_HDR), 10 (virtio_net_hdr) or 12 (virtio_net_hdr_v1).
    pub vnet_hdr_len: u16,
    /// TUN_F_* bits.
    pub offloads: u32,
}

/// Why a handover was refused. The text goes back to the client and into
/// the daemon's log and events.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("header is {0} bytes, expected {HEADER_LEN}")]
    Length(usize),
    #[error("bad magic {0:02x?}: not a ulan tap handover (expected \"ULTP\")")]
    Magic([u8; 4]),
    #[error("handover version {0} is not supported (this daemon speaks {VERSION})")]
    Version(u8),
    #[error("unknown header flags {0:#04x}")]
    Flags(u8),
    #[error("vnet header size {len} does not go with flags {flags:#04x} (10 or 12 with the vnet flag, 0 without)")]
    VnetLen { len: u16, flags: u8 },
    #[error("unknown offload bits {0:#x}")]
    Offloads(u32),
    #[error("offloads {0:#x} without a vnet header cannot be honoured")]
    OffloadsWithoutVnet(u32),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("no file descriptor came with the header (send it as SCM_RIGHTS)")]
    NoFd,
    #[error("{0} file descriptors came with the header; send exactly one")]
    TooManyFds(usize),
    #[error("the file descriptor is not a tap device: {0}")]
    NotTap(io::Error),
    #[error("{ifname} is a tun (layer 3) device; a switch port needs a tap (IFF_TAP)")]
    TunMode { ifname: String },
    #[error("{ifname} is not a tap device (flags {flags:#06x})")]
    NotTapFlags { ifname: String, flags: i16 },
    #[error("{ifname} was opened without IFF_NO_PI; ulan does not read packet-info headers")]
    PacketInfo { ifname: String },
    #[error("{ifname}: the header says vnet header {said} but the device has {actual}")]
    VnetMismatch {
        ifname: String,
        said: u16,
        actual: i32,
    },
    #[error("cannot make the tap non-blocking: {0}")]
    NonBlocking(io::Error),
    #[error("the client disconnected before its handover was complete")]
    Disconnected,
    #[error("no handover within {0} ms of connecting")]
    Timeout(u64),
    #[error("reading the handover failed: {0}")]
    Io(io::Error),
    #[error("another handover to this port is in progress")]
    Busy,
}

impl Header {
    pub fn vnet(&self) -> bool {
        self.vnet_hdr_len != 0
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = if self.vnet() { FLAG_VNET_HDR } else { 0 };
        b[6..8].copy_from_slice(&self.vnet_hdr_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.offloads.to_le_bytes());
        b
    }

    /// Checks every field; nothing is indexed before the length is known.
    pub fn parse(b: &[u8]) -> Result<Header, HandoverError> {
        let b: &[u8; HEADER_LEN] = b.try_into().map_err(|_| HandoverError::Length(b.len()))?;
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(HandoverError::Magic(magic));
        }
        if b[4] != VERSION {
            return Err(HandoverError::Version(b[4]));
        }
        let flags = b[5];
        if flags & !FLAG_VNET_HDR != 0 {
            return Err(HandoverError::Flags(flags));
        }
        let len = u16::from_le_bytes([b[6], b[7]]);
        let vnet = flags & FLAG_VNET_HDR != 0;
        if (vnet && len != 10 && len != 12) || (!vnet && len != 0) {
            return Err(HandoverError::VnetLen { len, flags });
        }
        let offloads = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if offloads & !tun::TUN_F_KNOWN != 0 {
            return Err(HandoverError::Offloads(offloads & !tun::TUN_F_KNOWN));
        }
        if !vnet && offloads != 0 {
            return Err(HandoverError::OffloadsWithoutVnet(offloads));
        }
        if b[12..].iter().any(|&x| x != 0) {
            return Err(HandoverError::Reserved);
        }
        Ok(Header {
            vnet_hdr_len: len,
            offloads,
        })
    }
}

/// A checked handover: the tap fd and what it is.
#[derive(Debug)]
pub struct Handed {
    pub fd: OwnedFd,
    pub header: Header,
    pub ifname: String,
}

/// Reads the one handover message from a connection. `Ok(None)`: nothing
/// there yet (non-blocking). Every fd that came is owned here, so the ones
/// refused are closed when this returns.
pub fn receive(conn: &OwnedFd) -> Result<Option<Handed>, HandoverError> {
    let mut data = [0u8; HEADER_LEN + 1];
    // u64 alignment for the cmsg buffer, as cmsghdr needs.
    const SPACE: usize = 64 + MAX_FDS * size_of::<RawFd>();
    let mut cbuf = [0u64; SPACE / 8];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: msg points at live buffers of the sizes stated.
    let n = unsafe {
        libc::recvmsg(
            conn.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ if e.raw_os_error() == Some(libc::ECONNRESET) => Err(HandoverError::Disconnected),
            _ => Err(HandoverError::Io(e)),
        };
    }
    let fds = collect_fds(&msg);
    if n == 0 && fds.is_empty() {
        return Err(HandoverError::Disconnected);
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(HandoverError::TooManyFds(fds.len().max(MAX_FDS + 1)));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(HandoverError::Length(data.len()));
    }
    let header = Header::parse(&data[..n as usize])?;
    let mut fds = fds;
    let fd = match fds.len() {
        0 => return Err(HandoverError::NoFd),
        1 => fds.pop().expect("one fd"),
        k => return Err(HandoverError::TooManyFds(k)),
    };
    let ifname = check_tap(fd.as_fd(), &header)?;
    tun::set_nonblocking(fd.as_fd()).map_err(HandoverError::NonBlocking)?;
    Ok(Some(Handed { fd, header, ifname }))
}

/// Takes ownership of every fd in the message's SCM_RIGHTS parts.
fn collect_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..bytes / size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    out.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    out
}

/// Checks that `fd` is a tap set up as `header` says. Returns its name.
pub fn check_tap(fd: BorrowedFd<'_>, header: &Header) -> Result<String, HandoverError> {
    let (ifname, flags) = tun::get_iff(fd).map_err(HandoverError::NotTap)?;
    if flags & tun::IFF_TUN != 0 {
        return Err(HandoverError::TunMode { ifname });
    }
    if flags & tun::IFF_TAP == 0 {
        return Err(HandoverError::NotTapFlags { ifname, flags });
    }
    if flags & tun::IFF_NO_PI == 0 {
        return Err(HandoverError::PacketInfo { ifname });
    }
    let has_vnet = flags & tun::IFF_VNET_HDR != 0;
    let actual = if has_vnet {
        tun::get_vnet_hdr_size(fd).map_err(HandoverError::NotTap)?
    } else {
        0
    };
    if has_vnet != header.vnet() || actual != i32::from(header.vnet_hdr_len) {
        return Err(HandoverError::VnetMismatch {
            ifname,
            said: header.vnet_hdr_len,
            actual,
        });
    }
    Ok(ifname)
}

/// Sends `header` with `fd` attached on a connected socket.
pub fn send(conn: BorrowedFd<'_>, header: &Header, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send_raw(
        conn,
        &header.encode(),
        fd.as_slice().iter().map(|f| f.as_raw_fd()),
    )
}

/// Sends any bytes with any fds: the client, and the hostile tests.
pub fn send_raw(
    conn: BorrowedFd<'_>,
    bytes: &[u8],
    fds: impl IntoIterator<Item = RawFd>,
) -> io::Result<()> {
    let fds: Vec<RawFd> = fds.into_iter().collect();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cbuf = [0u64; (64 + MAX_FDS * size_of::<RawFd>()) / 8];
    // SAFETY: zeroed msghdr is valid; pointers outlive the call.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len().min(MAX_FDS) * size_of::<RawFd>()) as u32;
        // SAFETY: the buffer has room for CMSG_SPACE(payload) (checked by
        // the min above); the macros write within it.
        unsafe {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
            let data = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().take(MAX_FDS).enumerate() {
                std::ptr::write_unaligned(data.add(i), *fd);
            }
        }
    }
    // SAFETY: msg points at live buffers.
    let r = unsafe { libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The daemon's answer, as sent.
pub fn reply_text(result: Result<&str, &HandoverError>) -> String {
    let mut s = match result {
        Ok(ifname) => format!("ok {ifname}\n"),
        Err(e) => format!("error: {e}\n"),
    };
    if s.len() > MAX_REPLY {
        let mut cut = MAX_REPLY - 1;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('\n');
    }
    s
}

/// Parses an answer: the interface name, or the daemon's reason.
pub fn parse_reply(b: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(b);
    let line = text.trim_end_matches('\n');
    if let Some(name) = line.strip_prefix("ok ") {
        Ok(name.to_string())
    } else if let Some(why) = line.strip_prefix("error: ") {
        Err(why.to_string())
    } else {
        Err(format!("unexpected answer from the daemon: {line:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Header {
        Header {
            vnet_hdr_len: 12,
            offloads: tun::TUN_F_ULAN,
        }
    }

    #[test]
    fn round_trips() {
        for h in [
            good(),
            Header {
                vnet_hdr_len: 10,
                offloads: 0,
            },
            Header {
                vnet_hdr_len: 0,
                offloads: 0,
            },
        ] {
            assert_eq!(Header::parse(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn refuses_each_bad_field() {
        let base = good().encode();
        let with = |i: usize, v: u8| {
            let mut b = base;
            b[i] = v;
            Header::parse(&b)
        };
        assert!(matches!(
            Header::parse(&base[..15]),
            Err(HandoverError::Length(15))
        ));
        assert!(matches!(Header::parse(&[]), Err(HandoverError::Length(0))));
        assert!(matches!(with(0, b'X'), Err(HandoverError::Magic(_))));
        assert!(matches!(with(4, 2), Err(HandoverError::Version(2))));
        assert!(matches!(with(5, 3), Err(HandoverError::Flags(3))));
        assert!(matches!(with(5, 0), Err(HandoverError::VnetLen { .. })));
        assert!(matches!(with(6, 11), Err(HandoverError::VnetLen { .. })));
        assert!(matches!(with(11, 0x80), Err(HandoverError::Offloads(_))));
        assert!(matches!(with(15, 1), Err(HandoverError::Reserved)));
        let mut b = Header {
            vnet_hdr_len: 0,
            offloads: 0,
        }
        .encode();
        b[8] = 1;
        assert!(matches!(
            Header::parse(&b),
            Err(HandoverError::OffloadsWithoutVnet(1))
        ));
    }

    #[test]
    fn replies_parse_back_and_stay_short() {
        assert_eq!(
            parse_reply(reply_text(Ok("eth0")).as_bytes()),
            Ok("eth0".into())
        );
        let e = HandoverError::NoFd;
        let r = parse_reply(reply_text(Err(&e)).as_bytes()).unwrap_err();
        assert!(r.contains("no file descriptor"), "{r}");
        let long = HandoverError::TunMode {
            ifname: "é".repeat(400),
        };
        assert!(reply_text(Err(&long)).len() <= MAX_REPLY);
        assert!(parse_reply(b"garbage").unwrap_err().contains("unexpected"));
    }

    /// Random and bit-flipped headers: the parser answers every one with
    /// a header that encodes back to the same bytes, or an error.
    #[test]
    fn hostile_headers_never_panic_and_accept_only_canonical_bytes() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = 0;
        for round in 0..200_000 {
            let mut b = good().encode().to_vec();
            match round % 4 {
                0 => {
                    let bit = (next() % 128) as usize;
                    b[bit / 8] ^= 1 << (bit % 8);
                }
                1 => {
                    for _ in 0..(next() % 4 + 1) {
                        let i = (next() % 16) as usize;
                        b[i] = next() as u8;
                    }
                }
                2 => {
                    let len = (next() % 40) as usize;
                    b = (0..len).map(|_| next() as u8).collect();
                    if len >= 5 && next() % 2 == 0 {
                        b[..4].copy_from_slice(&MAGIC);
                        b[4] = VERSION;
                    }
                }
                _ => b.truncate((next() % 17) as usize),
            }
            if let Ok(h) = Header::parse(&b) {
                assert_eq!(h.encode().as_slice(), b.as_slice());
                accepted += 1;
            }
        }
        assert!(accepted > 0, "no mutation was a valid header");
    }

    #[test]
    fn receive_refuses_fd_problems_and_closes_what_came() {
        let pair = |ty| {
            let mut fds = [0; 2];
            // SAFETY: socketpair writes two fds.
            assert_eq!(
                unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) },
                0
            );
            // SAFETY: fresh fds we own.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        let (a, b) = pair(libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK);
        assert!(matches!(receive(&b), Ok(None)), "nothing sent yet");
        // No fd.
        send(a.as_fd(), &good(), None).unwrap();
        assert!(matches!(receive(&b), Err(HandoverError::NoFd)));
        // A regular file.
        let file = tempfile::tempfile().unwrap();
        send(a.as_fd(), &good(), Some(file.as_fd())).unwrap();
        assert!(matches!(receive(&b), Err(HandoverError::NotTap(_))));
        // A socket.
        let (s1, _s2) = pair(libc::SOCK_STREAM);
        send(a.as_fd(), &good(), Some(s1.as_fd())).unwrap();
        assert!(matches!(receive(&b), Err(HandoverError::NotTap(_))));
        // Two fds.
        send_raw(
            a.as_fd(),
            &good().encode(),
            [file.as_raw_fd(), s1.as_raw_fd()],
        )
        .unwrap();
        assert!(matches!(receive(&b), Err(HandoverError::TooManyFds(2))));
        // Too many for the buffer.
        send_raw(a.as_fd(), &good().encode(), [file.as_raw_fd(); 8]).unwrap();
        assert!(matches!(receive(&b), Err(HandoverError::TooManyFds(_))));
        // Garbage header with an fd.
        send_raw(a.as_fd(), b"hello, daemon!!!", [file.as_raw_fd()]).unwrap();
        assert!(matches!(receive(&b), Err(HandoverError::Magic(_))));
        // Too long.
        send_raw(a.as_fd(), &[0u8; 40], [file.as_raw_fd()]).unwrap();
        assert!(matches!(receive(&b), Err(HandoverError::Length(_))));
        // The client leaving without a word.
        drop(a);
        assert!(matches!(receive(&b), Err(HandoverError::Disconnected)));
    }
}
