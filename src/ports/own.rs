//! The switch's own socket files, and connecting to a client-named socket
//! without ever reaching one of them.
//!
//! Two port kinds send to an address a client names: a `vde` port connects
//! its data socket to the address in the client's request, a `dgram` port
//! connects to the address its first sender has. If that address led to one
//! of the switch's own sockets (by name, through a symlink, or through a
//! hard link elsewhere), a port would loop into itself or bridge two lans.
//! Names cannot be trusted, inodes can: every socket file a port binds is
//! claimed here by its (device, inode) while the port lives, the target is
//! resolved once (`O_PATH`, symlinks followed) and its (device, inode)
//! compared with every claim, and the connect then goes to that very inode
//! through `/proc/self/fd/N`, so the file cannot be swapped in between.
//!
//! The client sockets ports are connected to (a dgram port's peer, a vde
//! client's data socket) are claimed the same way while connected: one
//! port's client cannot be named to another port either.
//!
//! The set is process-wide: a test process with several labs refuses a
//! crossing between any two of them too. Every port kind claims its socket
//! files ([`OwnSocket::claim`]); a new kind must do the same.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::ports::sys::{self, UnixAddr};

/// (device, inode) of a file.
pub type FileId = (u64, u64);

fn claims() -> MutexGuard<'static, HashMap<FileId, usize>> {
    static CLAIMS: OnceLock<Mutex<HashMap<FileId, usize>>> = OnceLock::new();
    CLAIMS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Whether `id` is one of the switch's own socket files.
pub fn is_own(id: FileId) -> bool {
    claims().contains_key(&id)
}

/// A claim on a socket file: one the switch bound, held as long as the
/// socket, or the client socket a port is connected to, held while it is.
#[derive(Debug)]
pub struct OwnSocket {
    id: Option<FileId>,
    /// A client's socket file is not ours to keep alive: once its client
    /// unlinks it, the filesystem may hand the inode number to a new,
    /// unrelated file, and a claim by number alone would refuse that
    /// stranger. The `O_PATH` fd the target was resolved by holds the inode,
    /// so its number cannot be reused while the claim lives. (A socket the
    /// switch bound holds its own inode through the bound socket.)
    _pin: Option<OwnedFd>,
}

impl OwnSocket {
    /// Claims the socket file just bound at `path` (not followed: the port
    /// made it there itself).
    pub fn claim(path: &Path) -> OwnSocket {
        match std::fs::symlink_metadata(path) {
            Ok(m) => OwnSocket::claim_id((m.dev(), m.ino()), None),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot stat a socket the switch bound: {e}");
                OwnSocket {
                    id: None,
                    _pin: None,
                }
            }
        }
    }

    fn claim_id(id: FileId, pin: Option<OwnedFd>) -> OwnSocket {
        *claims().entry(id).or_insert(0) += 1;
        OwnSocket {
            id: Some(id),
            _pin: pin,
        }
    }

    /// Claims the client socket a port is connected to, which no other port
    /// may send to (that would carry one lan's frames to another lan's
    /// client); the claim keeps `target`'s inode, so its number is not
    /// reused by another file while claimed.
    pub fn claim_target(target: Target) -> OwnSocket {
        OwnSocket::claim_id(target.id, Some(target.fd))
    }
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut c = claims();
            if let Some(n) = c.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    c.remove(&id);
                }
            }
        }
    }
}

/// A client-named socket file, resolved to its inode and checked: not one
/// of the switch's own.
pub struct Target {
    /// `O_PATH` fd of the socket file (the inode itself, not its name).
    fd: OwnedFd,
    pub id: FileId,
}

fn refused(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is (or leads to) one of the switch's own sockets",
            path.display()
        ),
    )
}

/// Resolves a named address to the socket file it leads to (symlinks
/// followed) and refuses the switch's own sockets. `Ok(None)` for an
/// abstract address: none of the switch's sockets are abstract.
pub fn resolve(addr: &UnixAddr) -> io::Result<Option<Target>> {
    let Some(path) = addr.fs_path() else {
        return Ok(None);
    };
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain open(2) of a NUL-terminated path; the fd is owned
    // right away.
    let raw = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw was just returned by open and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fstat into a zeroed stat of an fd we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    let id = (st.st_dev, st.st_ino);
    if is_own(id) {
        return Err(refused(path));
    }
    Ok(Some(Target { fd, id }))
}

/// Connects `sock` to the inode `target` resolved to (or to `addr` when it
/// is abstract). Without `/proc` the name is connected to and checked
/// again afterwards.
pub fn connect(sock: &OwnedFd, addr: &UnixAddr, target: Option<&Target>) -> io::Result<()> {
    let Some(t) = target else {
        return sys::connect(sock, addr);
    };
    let by_fd = UnixAddr::from_path(Path::new(&format!("/proc/self/fd/{}", t.fd.as_raw_fd())))?;
    match sys::connect(sock, &by_fd) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && !Path::new("/proc/self/fd").is_dir() => {
            sys::connect(sock, addr)?;
            let path = addr.fs_path().unwrap_or(Path::new(""));
            let now = std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
            if now != Some(t.id) {
                let _ = sys::disconnect(sock);
                return Err(refused(path));
            }
            Ok(())
        }
        r => r,
    }
}

/// [`resolve`] then [`connect`]: the (device, inode) connected to, None for
/// an abstract address.
pub fn connect_checked(sock: &OwnedFd, addr: &UnixAddr) -> io::Result<Option<FileId>> {
    let target = resolve(addr)?;
    connect(sock, addr, target.as_ref())?;
    Ok(target.map(|t| t.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_sockets_are_refused_by_name_symlink_and_hard_link() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        let _s = sys::bound_socket(libc::SOCK_DGRAM, &ours).unwrap();
        let claim = OwnSocket::claim(&ours);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&ours, &link).unwrap();
        let hard = dir.path().join("hard");
        std::fs::hard_link(&ours, &hard).unwrap();
        let c = sys::unix_socket(libc::SOCK_DGRAM).unwrap();
        for p in [&ours, &link, &hard] {
            let e = connect_checked(&c, &UnixAddr::from_path(p).unwrap()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{}", p.display());
        }
        // Once the port is gone the inode is nobody's.
        drop(claim);
        let id = connect_checked(&c, &UnixAddr::from_path(&link).unwrap()).unwrap();
        let m = std::fs::metadata(&ours).unwrap();
        assert_eq!(id, Some((m.dev(), m.ino())));
    }

    #[test]
    fn a_client_socket_is_connected_through_its_inode() {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs");
        let peer = sys::bound_socket(libc::SOCK_DGRAM, &theirs).unwrap();
        let c = sys::unix_socket(libc::SOCK_DGRAM).unwrap();
        connect_checked(&c, &UnixAddr::from_path(&theirs).unwrap()).unwrap();
        assert_eq!(sys::write(&c, b"hello").unwrap(), 5);
        let mut buf = [0u8; 16];
        assert_eq!(sys::read(&peer, &mut buf).unwrap(), 5);
        let missing = dir.path().join("missing");
        assert!(connect_checked(&c, &UnixAddr::from_path(&missing).unwrap()).is_err());
    }

    /// A client claimed by a port goes away (socket closed, file removed)
    /// before the port notices: new sockets made afterwards, which on ext4
    /// would get the freed inode number at once, are strangers, not the
    /// switch's own (a flake in CI: a new test client was refused).
    #[test]
    fn a_gone_clients_inode_number_is_not_given_to_a_new_socket_while_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs");
        let peer = sys::bound_socket(libc::SOCK_DGRAM, &theirs).unwrap();
        let target = resolve(&UnixAddr::from_path(&theirs).unwrap())
            .unwrap()
            .unwrap();
        let claimed = target.id;
        let claim = OwnSocket::claim_target(target);
        drop(peer);
        std::fs::remove_file(&theirs).unwrap();
        let mut fresh = Vec::new();
        for i in 0..64 {
            let p = dir.path().join(format!("new{i}"));
            fresh.push(sys::bound_socket(libc::SOCK_DGRAM, &p).unwrap());
            let t = resolve(&UnixAddr::from_path(&p).unwrap())
                .unwrap_or_else(|e| panic!("{} refused: {e}", p.display()))
                .unwrap();
            assert_ne!(t.id, claimed, "inode number reused while claimed");
        }
        assert!(is_own(claimed));
        drop(claim);
        assert!(!is_own(claimed));
    }
}
