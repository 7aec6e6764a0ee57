//! Btrfs subvolumes and snapshots, for container roots (issue 11): where
//! the image store is on Btrfs, a container image's root filesystem is a
//! subvolume and each node's root is a writable snapshot of it (what
//! Cloonix does), instead of an overlay over it.
//!
//! Plain ioctls, so running needs no btrfs-progs: an unprivileged user may
//! create a subvolume anywhere it may make a directory, and snapshot a
//! subvolume whose root directory it owns (BTRFS_IOC_SNAP_CREATE_V2).
//! Deleting one by ioctl (BTRFS_IOC_SNAP_DESTROY) needs CAP_SYS_ADMIN or a
//! mount with `user_subvol_rm_allowed`; without it the caller empties the
//! subvolume and removes it with rmdir, which Linux 4.18+ allows for an
//! empty subvolume (see [`delete`]).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// statfs f_type of Btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
/// The inode number of every subvolume's root directory.
const SUBVOL_ROOT_INO: u64 = 256;

/// `struct btrfs_ioctl_vol_args` (linux/btrfs.h).
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_ioctl_vol_args_v2` (linux/btrfs.h): fd, transid, flags,
/// the qgroup/unused union, then the name.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

/// `_IOW(BTRFS_IOCTL_MAGIC, nr, size)`.
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (0x94 << 8) | nr
}
const IOC_SUBVOL_CREATE: u64 = iow(14, std::mem::size_of::<VolArgs>());
const IOC_SNAP_DESTROY: u64 = iow(15, std::mem::size_of::<VolArgs>());
const IOC_SNAP_CREATE_V2: u64 = iow(23, std::mem::size_of::<VolArgsV2>());

#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}: not a usable subvolume name")]
    BadName(String),
}

impl BtrfsError {
    /// The errno, for callers that fall back on EPERM and the like.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            BtrfsError::Io { source, .. } => source.raw_os_error(),
            BtrfsError::BadName(_) => None,
        }
    }
}

fn io_err(what: &'static str, p: &Path) -> impl FnOnce(io::Error) -> BtrfsError {
    let path = p.display().to_string();
    move |source| BtrfsError::Io { what, path, source }
}

/// Whether `p` is on a Btrfs file system.
pub fn on_btrfs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed local.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BTRFS_SUPER_MAGIC
}

/// Whether `p` is the root directory of a Btrfs subvolume (itself, not a
/// symlink to one).
pub fn is_subvolume(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.ino() == SUBVOL_ROOT_INO)
        && on_btrfs(p)
}

fn open_dir(p: &Path) -> Result<OwnedFd, BtrfsError> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| BtrfsError::BadName(p.display().to_string()))?;
    // SAFETY: open with a NUL-terminated path; the fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(io_err("open", p)(io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `p`'s parent directory (opened) and its last component, sized for a
/// name field of `max` bytes (NUL included).
fn parent_and_name<const N: usize>(p: &Path) -> Result<(OwnedFd, [u8; N]), BtrfsError> {
    let bad = || BtrfsError::BadName(p.display().to_string());
    let name = p.file_name().ok_or_else(bad)?.as_bytes();
    if name.len() >= N || name.contains(&0) || name == b"." || name == b".." {
        return Err(bad());
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut buf = [0u8; N];
    buf[..name.len()].copy_from_slice(name);
    Ok((open_dir(parent)?, buf))
}

fn ioctl<T>(fd: &OwnedFd, req: u64, args: &mut T) -> io::Result<()> {
    // SAFETY: `args` is the repr(C) struct this request reads; it lives
    // across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, args as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes `p` a new, empty subvolume (its parent must exist, on Btrfs).
pub fn create_subvolume(p: &Path) -> Result<(), BtrfsError> {
    let (dir, name) = parent_and_name::<4088>(p)?;
    let mut args = VolArgs { fd: 0, name };
    ioctl(&dir, IOC_SUBVOL_CREATE, &mut args).map_err(io_err("create subvolume", p))
}

/// Makes `dest` a writable snapshot of subvolume `src` (same Btrfs; the
/// caller owns `src`'s root directory).
pub fn snapshot(src: &Path, dest: &Path) -> Result<(), BtrfsError> {
    let source = open_dir(src)?;
    let (dir, name) = parent_and_name::<4040>(dest)?;
    let mut args = VolArgsV2 {
        fd: source.as_raw_fd() as i64,
        transid: 0,
        flags: 0,
        unused: [0; 4],
        name,
    };
    ioctl(&dir, IOC_SNAP_CREATE_V2, &mut args).map_err(io_err("snapshot to", dest))
}

/// Deletes subvolume `p` by ioctl, whatever it holds. EPERM without
/// CAP_SYS_ADMIN unless the file system is mounted with
/// `user_subvol_rm_allowed`: then empty it and rmdir it instead
/// (`std::fs::remove_dir_all` does both; so does the holder's `--rm`).
pub fn delete(p: &Path) -> Result<(), BtrfsError> {
    let (dir, name) = parent_and_name::<4088>(p)?;
    let mut args = VolArgs { fd: 0, name };
    ioctl(&dir, IOC_SNAP_DESTROY, &mut args).map_err(io_err("delete subvolume", p))
}

/// Makes `p` a directory for an image's root filesystem: a subvolume when
/// its parent is on Btrfs (so nodes can snapshot it), else a plain
/// directory. Returns whether it is a subvolume.
pub fn make_root_dir(p: &Path) -> io::Result<bool> {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
        if on_btrfs(parent) {
            match create_subvolume(p) {
                Ok(()) => return Ok(true),
                Err(e) => tracing::warn!("{e}; a plain directory instead"),
            }
        }
    }
    std::fs::create_dir(p)?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_btrfs_h() {
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
        assert_eq!(IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(IOC_SNAP_CREATE_V2, 0x5000_9417);
    }

    #[test]
    fn names_are_checked_and_plain_dirs_are_made_off_btrfs() {
        let t = tempfile::tempdir().unwrap();
        let nul = t.path().join(std::ffi::OsStr::from_bytes(b"a\0b"));
        for bad in [Path::new("/"), Path::new("x/.."), Path::new(""), &nul] {
            assert!(
                matches!(parent_and_name::<4088>(bad), Err(BtrfsError::BadName(_))),
                "{bad:?}"
            );
        }
        let long = t.path().join("n".repeat(4100));
        assert!(matches!(
            parent_and_name::<4088>(&long),
            Err(BtrfsError::BadName(_))
        ));
        let root = t.path().join("img/rootfs");
        let sub = make_root_dir(&root).unwrap();
        assert!(root.is_dir());
        assert_eq!(sub, on_btrfs(t.path()), "a subvolume exactly on Btrfs");
        assert_eq!(is_subvolume(&root), sub);
        if !sub {
            let e = snapshot(&root, &t.path().join("snap")).unwrap_err();
            assert!(e.raw_os_error().is_some(), "{e}");
        }
    }
}
