//! The few `/dev/net/tun` ioctls both sides need: the client sets a tap
//! up, the daemon checks that what it was handed is one.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

pub const IFF_TUN: i16 = libc::IFF_TUN as i16;
pub const IFF_TAP: i16 = libc::IFF_TAP as i16;
pub const IFF_NO_PI: i16 = libc::IFF_NO_PI as i16;
pub const IFF_VNET_HDR: i16 = libc::IFF_VNET_HDR as i16;

/// TUN_F_* offload bits (linux/if_tun.h) a reader of the tap may set.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;
/// Every bit a kernel knows today.
pub const TUN_F_KNOWN: u32 =
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO | TUN_F_USO4 | TUN_F_USO6;
/// What ulan's tap clients ask for: checksum and TCP segmentation, the
/// offloads `wire::offload` can finish in software (no UDP ones).
pub const TUN_F_ULAN: u32 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;

/// struct ifreq with the flags member (the only one TUNSETIFF/TUNGETIFF use).
#[repr(C)]
pub struct IfReqFlags {
    pub name: [u8; libc::IFNAMSIZ],
    pub flags: i16,
    _pad: [u8; 22],
}

impl IfReqFlags {
    pub fn new(name: &[u8], flags: i16) -> IfReqFlags {
        let mut r = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name[..n]);
        r
    }

    pub fn name_str(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// TUNGETIFF: the interface name and IFF_* flags of an attached tun/tap
/// fd. Fails (ENOTTY, EINVAL, EBADFD) on anything else.
pub fn get_iff(fd: BorrowedFd<'_>) -> io::Result<(String, i16)> {
    let mut req = IfReqFlags::new(b"", 0);
    // SAFETY: TUNGETIFF writes a struct ifreq, which IfReqFlags is sized as.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) })?;
    Ok((req.name_str(), req.flags))
}

/// TUNSETIFF on a fresh /dev/net/tun fd.
pub fn set_iff(fd: BorrowedFd<'_>, name: &str, flags: i16) -> io::Result<String> {
    let mut req = IfReqFlags::new(name.as_bytes(), flags);
    // SAFETY: TUNSETIFF reads and writes a struct ifreq.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    Ok(req.name_str())
}

pub fn get_vnet_hdr_size(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut n) })?;
    Ok(n)
}

pub fn set_vnet_hdr_size(fd: BorrowedFd<'_>, n: i32) -> io::Result<()> {
    let n: libc::c_int = n;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &n) })
}

pub fn set_offload(fd: BorrowedFd<'_>, bits: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes the bits by value.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, bits as libc::c_ulong) })
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) })
}
