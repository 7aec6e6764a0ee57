//! The client side of a tap port: make a tap in the current network
//! namespace and hand it to a port. Used by `ulan tap-attach` (which
//! container nodes run inside their namespace) and by tests.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::handover::{self, Header, MAX_REPLY};
use super::tun;

/// The vnet header ulan's taps use: virtio_net_hdr_v1.
pub const VNET_HDR_LEN: u16 = 12;
/// How long [`hand_over`] waits for the daemon's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("interface name {0:?} must be 1 to 15 bytes without '/', NUL or spaces")]
    BadName(String),
    #[error("MTU {0} is outside 68..=65521")]
    BadMtu(u32),
    #[error("MAC {0} is multicast; a NIC needs a unicast address")]
    MulticastMac(String),
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    OpenTun(io::Error),
    #[error("cannot create tap {name}: {source} (needs CAP_NET_ADMIN in this network namespace, e.g. inside `unshare --user --map-root-user --net`)")]
    CreateTap { name: String, source: io::Error },
    #[error("tap {name}: {what} failed: {source}")]
    Setup {
        name: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot connect to the tap port at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("sending the tap to {path} failed: {source}")]
    Send { path: PathBuf, source: io::Error },
    #[error("no answer from the daemon at {path}: {source}")]
    NoAnswer { path: PathBuf, source: io::Error },
    #[error("the daemon refused the tap: {0}")]
    Refused(String),
}

fn check_name(ifname: &str) -> Result<(), TapError> {
    let ok = !ifname.is_empty()
        && ifname.len() < libc::IFNAMSIZ
        && ifname != "."
        && ifname != ".."
        && !ifname
            .bytes()
            .any(|b| b == b'/' || b == 0 || b == b':' || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(ifname.to_string()))
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An ifreq for the SIOC* calls: name plus a union we fill by hand.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

fn sioc(sock: &OwnedFd, req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: the SIOC* calls used here read/write one struct ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), req as _, r as *mut libc::ifreq) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates tap `ifname` in the current network namespace, with a
/// virtio_net_hdr_v1 header and checksum/TSO offloads, MAC `mac`, the
/// MTU if given, and the link up. The tap lives as long as the returned
/// fd (and its copies, such as the one handed to the daemon).
pub fn create_tap(ifname: &str, mac: [u8; 6], mtu: Option<u32>) -> Result<OwnedFd, TapError> {
    check_name(ifname)?;
    if let Some(m) = mtu {
        if !(68..=65521).contains(&m) {
            return Err(TapError::BadMtu(m));
        }
    }
    if mac[0] & 1 != 0 {
        return Err(TapError::MulticastMac(mac_text(mac)));
    }
    let tap = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let fd = OwnedFd::from(tap);
    let setup = |what, source| TapError::Setup {
        name: ifname.to_string(),
        what,
        source,
    };
    let name = tun::set_iff(
        fd.as_fd(),
        ifname,
        tun::IFF_TAP | tun::IFF_NO_PI | tun::IFF_VNET_HDR,
    )
    .map_err(|source| TapError::CreateTap {
        name: ifname.to_string(),
        source,
    })?;
    tun::set_vnet_hdr_size(fd.as_fd(), i32::from(VNET_HDR_LEN))
        .map_err(|e| setup("TUNSETVNETHDRSZ", e))?;
    tun::set_offload(fd.as_fd(), tun::TUN_F_ULAN).map_err(|e| setup("TUNSETOFFLOAD", e))?;

    // SAFETY: plain socket call; the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(setup("socket(AF_INET)", io::Error::last_os_error()));
    }
    // SAFETY: raw is a new fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut r = ifreq(&name);
    // SAFETY: writing the hwaddr member of the union.
    unsafe {
        r.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in r.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *d = s as libc::c_char;
        }
    }
    sioc(&sock, libc::SIOCSIFHWADDR, &mut r).map_err(|e| setup("setting the MAC", e))?;
    if let Some(m) = mtu {
        let mut r = ifreq(&name);
        r.ifr_ifru.ifru_mtu = m as libc::c_int;
        sioc(&sock, libc::SIOCSIFMTU, &mut r).map_err(|e| setup("setting the MTU", e))?;
    }
    let mut r = ifreq(&name);
    sioc(&sock, libc::SIOCGIFFLAGS, &mut r).map_err(|e| setup("reading the flags", e))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    sioc(&sock, libc::SIOCSIFFLAGS, &mut r).map_err(|e| setup("bringing the link up", e))?;
    Ok(fd)
}

/// The header that describes `fd` as it is (checked with the kernel, so a
/// tap made elsewhere is described truthfully).
pub fn header_for(fd: BorrowedFd<'_>) -> Header {
    match tun::get_iff(fd) {
        Ok((_, flags)) if flags & tun::IFF_VNET_HDR != 0 => Header {
            vnet_hdr_len: tun::get_vnet_hdr_size(fd).map_or(VNET_HDR_LEN, |n| n as u16),
            // Not readable back from the kernel: what create_tap sets.
            offloads: tun::TUN_F_ULAN,
        },
        _ => Header {
            vnet_hdr_len: 0,
            offloads: 0,
        },
    }
}

/// Hands `fd` (a tap) to the tap port at `socket` and waits for the
/// daemon's answer. Ok once the daemon took it; the daemon's reason when
/// it refused.
pub fn hand_over(socket: &Path, fd: BorrowedFd<'_>) -> Result<(), TapError> {
    hand_over_with(socket, &header_for(fd), Some(fd))
}

/// [`hand_over`] with a header of the caller's choosing (tests).
pub fn hand_over_with(
    socket: &Path,
    header: &Header,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), TapError> {
    let conn = connect(socket)?;
    handover::send(conn.as_fd(), header, fd).map_err(|source| TapError::Send {
        path: socket.to_path_buf(),
        source,
    })?;
    let answer = read_answer(&conn).map_err(|source| TapError::NoAnswer {
        path: socket.to_path_buf(),
        source,
    })?;
    handover::parse_reply(&answer)
        .map(drop)
        .map_err(TapError::Refused)
}

/// A blocking SOCK_SEQPACKET connection to a tap port.
pub fn connect(socket: &Path) -> Result<OwnedFd, TapError> {
    let err = |source| TapError::Connect {
        path: socket.to_path_buf(),
        source,
    };
    let addr = crate::ports::sys::UnixAddr::from_path(socket).map_err(err)?;
    // SAFETY: plain socket call; the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: raw is a new fd we own.
    let conn = unsafe { OwnedFd::from_raw_fd(raw) };
    crate::ports::sys::connect(&conn, &addr).map_err(err)?;
    Ok(conn)
}

/// Reads the daemon's one answer message (blocking, with a timeout).
pub fn read_answer(conn: &OwnedFd) -> io::Result<Vec<u8>> {
    let tv = libc::timeval {
        tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setting a timeval option.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut buf = vec![0u8; MAX_REPLY];
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::recv(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without an answer",
        ));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "MAC {s:?} must be six hex bytes like 02:00:00:00:00:01"
        ));
    }
    for (d, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!(
                "MAC {s:?} must be six hex bytes like 02:00:00:00:00:01"
            ));
        }
        *d = u8::from_str_radix(p, 16)
            .map_err(|_| format!("MAC {s:?} must be six hex bytes like 02:00:00:00:00:01"))?;
    }
    Ok(mac)
}

/// A locally administered unicast MAC derived from `seed` (a port or node
/// name): stable across runs, when the caller gives none.
pub fn mac_from_name(seed: &str) -> [u8; 6] {
    // FNV-1a: stable, no dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_refuse_junk() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Ok([2, 0, 10, 255, 0, 1]));
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:0:0:0:0:1",
            "zz:00:00:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let m = mac_from_name("n1.eth0");
        assert_eq!(m[0], 2);
        assert_eq!(m, mac_from_name("n1.eth0"));
        assert_ne!(m, mac_from_name("n1.eth1"));
    }

    #[test]
    fn create_tap_checks_its_arguments_first() {
        for bad in ["", "a/b", "0123456789abcdef", "a b", ".."] {
            assert!(
                matches!(
                    create_tap(bad, [2, 0, 0, 0, 0, 1], None),
                    Err(TapError::BadName(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            create_tap("t0", [2, 0, 0, 0, 0, 1], Some(10)),
            Err(TapError::BadMtu(10))
        ));
        assert!(matches!(
            create_tap("t0", [1, 0, 0, 0, 0, 1], None),
            Err(TapError::MulticastMac(_))
        ));
    }
}
