//! `ulan node commit` for a container node: its image's root filesystem
//! (the overlay's lower layer) copied, with the node's upper layer applied
//! as overlayfs would show it: a whiteout (a character device 0:0) deletes
//! what it names, an opaque directory (xattr `trusted.overlay.opaque` or,
//! in a user namespace, `user.overlay.opaque` = "y") replaces the lower one
//! wholesale. Owners, modes, symlinks, hard links (within each layer) and
//! timestamps are kept; xattrs are not copied.
//!
//! Files a container made may belong to ids of the user's subordinate
//! range: the daemon runs this as `ulan container-holder --commit`, root of
//! the same user namespace mapping a holder makes (holder.rs).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn ctx(p: &Path, what: &str) -> impl FnOnce(io::Error) -> io::Error {
    let p = p.display().to_string();
    let what = what.to_string();
    move |e| io::Error::new(e.kind(), format!("{what} {p}: {e}"))
}

/// The value of xattr `name` on `p` (not following a symlink), if set.
fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let (c, n) = (cpath(p).ok()?, CString::new(name).ok()?);
    let mut buf = [0u8; 256];
    // SAFETY: lgetxattr into a local buffer of the given size.
    let len =
        unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

fn overlay_xattr(p: &Path, key: &str) -> Option<Vec<u8>> {
    xattr(p, &format!("trusted.overlay.{key}")).or_else(|| xattr(p, &format!("user.overlay.{key}")))
}

fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Hard links already copied: (device, inode) of the source -> the copy.
type Links = HashMap<(u64, u64), PathBuf>;

/// Owner, mode and times of `dst` as `meta` says (owner first: chown
/// clears set-id bits).
fn set_meta(dst: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    let c = cpath(dst)?;
    // SAFETY: lchown on a valid path.
    if unsafe { libc::lchown(c.as_ptr(), meta.uid(), meta.gid()) } != 0 {
        return Err(ctx(dst, "chown")(io::Error::last_os_error()));
    }
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(ctx(dst, "chmod"))?;
    }
    let times = [
        libc::timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        },
        libc::timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        },
    ];
    // SAFETY: utimensat with two timespecs, not following a symlink.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(ctx(dst, "set times of")(io::Error::last_os_error()));
    }
    Ok(())
}

/// Copies one non-directory entry `src` to `dst` (which does not exist).
fn copy_leaf(
    src: &Path,
    dst: &Path,
    meta: &std::fs::Metadata,
    links: &mut Links,
) -> io::Result<()> {
    let ft = meta.file_type();
    if meta.nlink() > 1 && !ft.is_dir() {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            return std::fs::hard_link(first, dst).map_err(ctx(dst, "link"));
        }
    }
    if ft.is_symlink() {
        let target = std::fs::read_link(src).map_err(ctx(src, "read link"))?;
        std::os::unix::fs::symlink(&target, dst).map_err(ctx(dst, "symlink"))?;
    } else if ft.is_file() {
        std::fs::copy(src, dst).map_err(ctx(src, "copy"))?;
    } else if ft.is_fifo() {
        let c = cpath(dst)?;
        // SAFETY: mkfifo on a valid path.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(ctx(dst, "mkfifo")(io::Error::last_os_error()));
        }
    } else if ft.is_socket() {
        // A socket file means nothing without its listener.
        return Ok(());
    } else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{}: device nodes are not committed", src.display()),
        ));
    }
    set_meta(dst, meta)?;
    if meta.nlink() > 1 {
        links.insert((meta.dev(), meta.ino()), dst.to_path_buf());
    }
    Ok(())
}

/// Copies the tree `src` to `dst` (which does not exist).
fn copy_tree(src: &Path, dst: &Path, links: &mut Links) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(src).map_err(ctx(src, "stat"))?;
    if !meta.is_dir() {
        return copy_leaf(src, dst, &meta, links);
    }
    std::fs::create_dir(dst).map_err(ctx(dst, "mkdir"))?;
    for e in std::fs::read_dir(src).map_err(ctx(src, "read"))? {
        let e = e.map_err(ctx(src, "read"))?;
        copy_tree(&e.path(), &dst.join(e.file_name()), links)?;
    }
    set_meta(dst, &meta)
}

fn remove_any(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ctx(p, "stat")(e)),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(ctx(p, "remove")),
        Ok(_) => std::fs::remove_file(p).map_err(ctx(p, "remove")),
    }
}

/// Applies the upper directory `upper` onto `dst` (a directory).
fn apply(upper: &Path, dst: &Path, links: &mut Links) -> io::Result<()> {
    for e in std::fs::read_dir(upper).map_err(ctx(upper, "read"))? {
        let e = e.map_err(ctx(upper, "read"))?;
        let (src, to) = (e.path(), dst.join(e.file_name()));
        let meta = std::fs::symlink_metadata(&src).map_err(ctx(&src, "stat"))?;
        // Off by default (redirect_dir, metacopy): a layer made with them
        // would be copied wrong, so it is refused.
        for key in ["redirect", "metacopy"] {
            if overlay_xattr(&src, key).is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{}: overlay {key} is not supported", src.display()),
                ));
            }
        }
        if is_whiteout(&meta) {
            remove_any(&to)?;
        } else if meta.is_dir() {
            let opaque = overlay_xattr(&src, "opaque").is_some_and(|v| v == b"y");
            let lower_dir = std::fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir());
            if opaque || !lower_dir {
                remove_any(&to)?;
                std::fs::create_dir(&to).map_err(ctx(&to, "mkdir"))?;
            }
            apply(&src, &to, links)?;
            set_meta(&to, &meta)?;
        } else {
            remove_any(&to)?;
            copy_leaf(&src, &to, &meta, links)?;
        }
    }
    Ok(())
}

/// Makes `dest` (which must not exist) the merged view of `lower` with
/// `upper` applied. `upper` may be missing (nothing was written).
pub fn merge(lower: &Path, upper: &Path, dest: &Path) -> io::Result<()> {
    copy_tree(lower, dest, &mut Links::new())?;
    if upper.is_dir() {
        apply(upper, dest, &mut Links::new())?;
        // The root keeps the image's owner and mode: the upper dir itself
        // is the daemon's (0700).
        let meta = std::fs::symlink_metadata(lower).map_err(ctx(lower, "stat"))?;
        set_meta(dest, &meta)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn mknod_whiteout(p: &Path) -> bool {
        let c = cpath(p).unwrap();
        // SAFETY: mknod on a valid path.
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) == 0 }
    }

    fn set_xattr(p: &Path, name: &str, value: &[u8]) -> bool {
        let (c, n) = (cpath(p).unwrap(), CString::new(name).unwrap());
        // SAFETY: lsetxattr with a valid buffer.
        unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            ) == 0
        }
    }

    #[test]
    fn lower_and_upper_merge_as_overlayfs_shows_them() {
        let t = tempfile::tempdir().unwrap();
        let (lower, upper, dest) = (t.path().join("l"), t.path().join("u"), t.path().join("d"));
        write(&lower.join("etc/hostname"), "base\n");
        write(&lower.join("etc/keep"), "keep\n");
        write(&lower.join("opq/old1"), "1");
        write(&lower.join("opq/sub/old2"), "2");
        write(&lower.join("bin/tool"), "#!/bin/sh\n");
        std::fs::set_permissions(
            lower.join("bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("tool", lower.join("bin/alias")).unwrap();
        std::fs::hard_link(lower.join("etc/keep"), lower.join("etc/keep2")).unwrap();
        write(&lower.join("file-becomes-dir"), "x");
        write(&upper.join("etc/marker"), "marked\n");
        write(&upper.join("etc/keep"), "changed\n");
        write(&upper.join("opq/new"), "new");
        write(&upper.join("file-becomes-dir/inside"), "y");
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        let whiteouts = mknod_whiteout(&upper.join("etc/hostname"));
        let opaque = set_xattr(&upper.join("opq"), "user.overlay.opaque", b"y")
            || set_xattr(&upper.join("opq"), "trusted.overlay.opaque", b"y");
        merge(&lower, &upper, &dest).unwrap();
        let read = |p: &str| std::fs::read_to_string(dest.join(p)).ok();
        assert_eq!(read("etc/marker").as_deref(), Some("marked\n"));
        assert_eq!(read("etc/keep").as_deref(), Some("changed\n"));
        // keep2 was a hard link to the lower keep: it keeps the old text.
        assert_eq!(read("etc/keep2").as_deref(), Some("keep\n"));
        assert_eq!(read("file-becomes-dir/inside").as_deref(), Some("y"));
        let m = std::fs::metadata(dest.join("bin/tool")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(dest.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
        let lm = std::fs::metadata(lower.join("bin/tool")).unwrap();
        assert_eq!(m.mtime(), lm.mtime());
        if whiteouts {
            assert!(read("etc/hostname").is_none(), "the whiteout deletes it");
        } else {
            ulan_skip("whiteouts (mknod 0:0 refused here)");
        }
        if opaque {
            let mut names: Vec<String> = std::fs::read_dir(dest.join("opq"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(names, ["new"], "an opaque dir replaces the lower one");
        } else {
            ulan_skip("opaque dirs (no user or trusted xattrs on this file system)");
        }
        // Nothing of the lower layer changed.
        assert_eq!(
            std::fs::read_to_string(lower.join("etc/hostname")).unwrap(),
            "base\n"
        );
        assert!(lower.join("opq/old1").exists());
        // An existing destination is refused.
        assert!(merge(&lower, &upper, &dest).is_err());
    }

    fn ulan_skip(what: &str) {
        crate::testkit::skipped(format_args!("commit merge: {what}"));
    }

    #[test]
    fn a_missing_upper_layer_copies_the_lower_one() {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("l");
        write(&lower.join("a/b"), "b");
        merge(&lower, &t.path().join("none"), &t.path().join("d")).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("d/a/b")).unwrap(),
            "b"
        );
    }
}
