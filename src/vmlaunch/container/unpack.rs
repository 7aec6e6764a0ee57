//! Applying image layers (tar streams) to a root filesystem directory,
//! without trusting them: every entry's path is checked and resolved by
//! ulan, never by the tar crate's own unpack.
//!
//! - `..` components and absolute paths are refused (docker strips a
//!   leading `/`; ulan refuses it: no image builder writes one).
//! - Parents are resolved inside the root one component at a time with
//!   lstat: a real directory is entered, a missing one is made, a symlink
//!   is followed only when its target stays inside the root (relative, not
//!   climbing above it); an absolute or escaping symlink as a parent is an
//!   error. Operations on the last component never follow a symlink
//!   (O_NOFOLLOW | O_EXCL, lstat, unlink), so nothing is written outside
//!   the root. The root is a fresh scratch dir of the importing user, so
//!   no one else races these checks.
//! - Symlinks may point anywhere (the kernel resolves them inside the
//!   container); they are made, never followed.
//! - Hard links must name an existing non-directory inside the root.
//! - Device nodes and fifos are skipped with a warning (an unprivileged
//!   user cannot make them; the container gets its own /dev).
//! - Whiteouts: `.wh.NAME` removes NAME of lower layers; `.wh..wh..opq`
//!   empties a directory of what lower layers put there.
//! - Ownership is not kept: files belong to the importing user, which is
//!   uid 0 inside the container. Modes are (setuid included; directories
//!   keep u+rwx so the store stays removable); mtimes and xattrs (file
//!   capabilities) are not.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A path inside the root, as resolved components (no symlinks, no `..`).
type Rel = Vec<OsString>;

/// Why one layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {entry:?}: {message}")]
    Entry { entry: String, message: String },
    #[error("the layer is not a valid tar stream: {0}")]
    Tar(io::Error),
    #[error("the image unpacks to more than {limit} bytes (the limit; see --max-size)")]
    TooBig { limit: u64 },
}

/// The state of a root filesystem being made, layer after layer.
pub struct Unpacker {
    root: PathBuf,
    /// Bytes of file content written so far, and the cap.
    written: u64,
    limit: u64,
    /// Directory modes, applied when all layers are in: a directory
    /// without u+w (0555) would stop this unprivileged writer.
    dir_modes: BTreeMap<Rel, u32>,
    pub warnings: Vec<String>,
}

fn entry_err(entry: &[u8], message: impl Into<String>) -> UnpackError {
    UnpackError::Entry {
        entry: String::from_utf8_lossy(entry).chars().take(200).collect(),
        message: message.into(),
    }
}

fn host_path(root: &Path, rel: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(rel);
    p
}

fn is_prefix(prefix: &[OsString], path: &[OsString]) -> bool {
    path.len() >= prefix.len() && path[..prefix.len()] == *prefix
}

/// An entry's path split into its names; `..` and absolute paths refused.
fn split_entry(path: &[u8]) -> Result<Vec<OsString>, String> {
    if path.first() == Some(&b'/') {
        return Err("absolute path (refused: an image's paths are relative to its root)".into());
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("a `..` component (refused: it would leave the root)".into()),
            _ => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

impl Unpacker {
    /// `root` must exist (an empty dir in the store's scratch dir).
    pub fn new(root: &Path, limit: u64) -> Unpacker {
        Unpacker {
            root: root.to_path_buf(),
            written: 0,
            limit,
            dir_modes: BTreeMap::new(),
            warnings: Vec::new(),
        }
    }

    /// Resolves directory `names` inside the root, making missing ones.
    /// Symlinks are followed only where they stay inside the root. `None`:
    /// a directory is missing and `create` is off.
    fn resolve_dir(&self, names: &[OsString], create: bool) -> Result<Option<Rel>, String> {
        let mut at: Rel = Vec::new();
        let mut pending: Vec<OsString> = names.iter().rev().cloned().collect();
        let mut hops = 0;
        while let Some(c) = pending.pop() {
            match c.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    if at.pop().is_none() {
                        return Err("a symlink on the way climbs above the image root".into());
                    }
                    continue;
                }
                _ => {}
            }
            let here = host_path(&self.root, &at).join(&c);
            match std::fs::symlink_metadata(&here) {
                Ok(m) if m.is_dir() => at.push(c),
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err("too many symlinks on the way".into());
                    }
                    let target = std::fs::read_link(&here).map_err(|e| e.to_string())?;
                    let t = target.as_os_str().as_bytes();
                    if t.first() == Some(&b'/') {
                        return Err(format!(
                            "parent {:?} is a symlink to the absolute path {:?}; \
                             refusing to write through it",
                            host_rel(&at, &c),
                            target
                        ));
                    }
                    pending.extend(
                        t.split(|&b| b == b'/')
                            .rev()
                            .map(|s| OsStr::from_bytes(s).to_os_string()),
                    );
                }
                Ok(_) => {
                    return Err(format!("parent {:?} is not a directory", host_rel(&at, &c)));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    mkdir(&here).map_err(|e| format!("cannot make a parent: {e}"))?;
                    at.push(c);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(format!("{:?}: {e}", host_rel(&at, &c))),
            }
        }
        Ok(Some(at))
    }

    /// Applies one layer's tar stream. `touched` is per layer: what this
    /// layer made (and their parents), which its own whiteouts spare.
    pub fn apply<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), UnpackError> {
        let mut touched: HashSet<Rel> = HashSet::new();
        let entries = archive.entries().map_err(UnpackError::Tar)?;
        for entry in entries {
            let mut entry = entry.map_err(UnpackError::Tar)?;
            // pax global headers (git archive) describe, they hold no file.
            if entry.header().entry_type() == tar::EntryType::XGlobalHeader {
                continue;
            }
            let raw = entry.path_bytes().into_owned();
            let names = split_entry(&raw).map_err(|m| entry_err(&raw, m))?;
            self.apply_entry(&mut entry, &raw, names, &mut touched)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        mut names: Vec<OsString>,
        touched: &mut HashSet<Rel>,
    ) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let mut kind = entry.header().entry_type();
        // Old (v7) tars mark directories by a trailing slash only.
        if kind == T::Regular && raw.ends_with(b"/") {
            kind = T::Directory;
        }
        let mode = entry
            .header()
            .mode()
            .map_err(|e| entry_err(raw, e.to_string()))?
            & 0o7777;
        let Some(last) = names.pop() else {
            // The root itself ("./").
            if kind == T::Directory {
                self.dir_modes.insert(Vec::new(), mode);
                return Ok(());
            }
            return Err(entry_err(
                raw,
                "names the image root but is not a directory",
            ));
        };
        if matches!(kind, T::Char | T::Block | T::Fifo) {
            self.warnings.push(format!(
                "skipped {:?}: device nodes and fifos are not made (the container gets its own /dev)",
                String::from_utf8_lossy(raw)
            ));
            return Ok(());
        }
        let lb = last.as_bytes();
        let whiteout = lb.starts_with(b".wh.");
        // A whiteout under a directory no layer made removes nothing.
        let Some(parent) = self
            .resolve_dir(&names, !whiteout)
            .map_err(|m| entry_err(raw, m))?
        else {
            return Ok(());
        };
        for i in 0..=parent.len() {
            touched.insert(parent[..i].to_vec());
        }
        if lb == b".wh..wh..opq" {
            return self
                .clear_lower(&parent, touched)
                .map_err(|e| entry_err(raw, format!("opaque whiteout: {e}")));
        }
        if lb.starts_with(b".wh..wh.") {
            // Other aufs metadata (.wh..wh.plnk): nothing to apply.
            return Ok(());
        }
        if let Some(hidden) = lb.strip_prefix(b".wh.") {
            let mut victim = parent.clone();
            victim.push(OsStr::from_bytes(hidden).to_os_string());
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(entry_err(raw, "a whiteout of no name"));
            }
            if !touched.contains(&victim) {
                self.remove(&victim)
                    .map_err(|e| entry_err(raw, format!("whiteout: {e}")))?;
            }
            return Ok(());
        }
        let mut rel = parent;
        rel.push(last);
        let path = host_path(&self.root, &rel);
        touched.insert(rel.clone());
        let existing = std::fs::symlink_metadata(&path).ok();
        match kind {
            T::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    if existing.is_some() {
                        self.remove(&rel)
                            .map_err(|e| entry_err(raw, e.to_string()))?;
                    }
                    mkdir(&path).map_err(|e| entry_err(raw, e.to_string()))?;
                }
                self.dir_modes.insert(rel, mode);
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                if existing.is_some() {
                    self.remove(&rel)
                        .map_err(|e| entry_err(raw, e.to_string()))?;
                }
                self.write_file(entry, &path, mode).map_err(|e| match e {
                    FileError::TooBig => UnpackError::TooBig { limit: self.limit },
                    FileError::Io(e) => entry_err(raw, e.to_string()),
                })?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_err(raw, "a symlink without a target"))?
                    .into_owned();
                if target.is_empty() {
                    return Err(entry_err(raw, "a symlink with an empty target"));
                }
                if existing.is_some() {
                    self.remove(&rel)
                        .map_err(|e| entry_err(raw, e.to_string()))?;
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| entry_err(raw, e.to_string()))?;
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_err(raw, "a hard link without a target"))?
                    .into_owned();
                let from = self.link_source(&target).map_err(|m| {
                    entry_err(raw, format!("hard link to {:?}: {m}", lossy(&target)))
                })?;
                if from == rel {
                    return Ok(());
                }
                if existing.is_some() {
                    self.remove(&rel)
                        .map_err(|e| entry_err(raw, e.to_string()))?;
                }
                // linkat without AT_SYMLINK_FOLLOW: a symlink is linked
                // itself, never what it points at.
                std::fs::hard_link(host_path(&self.root, &from), &path)
                    .map_err(|e| entry_err(raw, e.to_string()))?;
            }
            other => {
                return Err(entry_err(
                    raw,
                    format!("unsupported tar entry type {other:?}"),
                ));
            }
        }
        Ok(())
    }

    /// What a hard link names: an existing non-directory inside the root.
    fn link_source(&self, target: &[u8]) -> Result<Rel, String> {
        let mut names = split_entry(target)?;
        let last = names.pop().ok_or("an empty target")?;
        if last.as_bytes().starts_with(b".wh.") {
            return Err("a whiteout name".into());
        }
        let mut rel = self
            .resolve_dir(&names, false)?
            .ok_or("it does not exist in the image (so far)")?;
        rel.push(last);
        match std::fs::symlink_metadata(host_path(&self.root, &rel)) {
            Ok(m) if m.is_dir() => Err("it is a directory".into()),
            Ok(_) => Ok(rel),
            Err(_) => Err("it does not exist in the image (so far)".into()),
        }
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        mode: u32,
    ) -> Result<(), FileError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(FileError::Io)?;
        let room = self.limit.saturating_sub(self.written);
        let n = io::copy(&mut entry.take(room.saturating_add(1)), &mut f).map_err(FileError::Io)?;
        if n > room {
            return Err(FileError::TooBig);
        }
        self.written += n;
        // fchmod on our own descriptor: setuid and read-only modes are
        // fine, the content is already in.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(FileError::Io)?;
        Ok(())
    }

    /// Removes `rel` (a whole tree for a directory) if it exists.
    fn remove(&mut self, rel: &Rel) -> io::Result<()> {
        let path = host_path(&self.root, rel);
        let Ok(m) = std::fs::symlink_metadata(&path) else {
            return Ok(());
        };
        self.dir_modes.retain(|k, _| !is_prefix(rel, k));
        if m.is_dir() {
            make_writable(&path)?;
            // std's remove_dir_all never follows symlinks.
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
    }

    /// An opaque directory: what lower layers put in it goes, what this
    /// layer made stays (and below it, only this layer's own entries).
    fn clear_lower(&mut self, dir: &Rel, touched: &HashSet<Rel>) -> io::Result<()> {
        let path = host_path(&self.root, dir);
        let mut children: Vec<OsString> = std::fs::read_dir(&path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        children.sort();
        for name in children {
            let mut rel = dir.clone();
            rel.push(name);
            if !touched.contains(&rel) {
                self.remove(&rel)?;
            } else if std::fs::symlink_metadata(host_path(&self.root, &rel))?.is_dir() {
                self.clear_lower(&rel, touched)?;
            }
        }
        Ok(())
    }

    /// Gives directories their modes, deepest first, once every layer is in.
    pub fn finish(self) -> io::Result<Vec<String>> {
        for (rel, mode) in self.dir_modes.iter().rev() {
            let path = host_path(&self.root, rel);
            // chmod follows symlinks: every component must still be a real
            // directory (removals drop their keys; this is the backstop).
            let real_dirs = (1..=rel.len()).all(|i| {
                std::fs::symlink_metadata(host_path(&self.root, &rel[..i]))
                    .is_ok_and(|m| m.is_dir())
            });
            if real_dirs {
                // The owner keeps rwx: it is root inside the container
                // (which ignores it), and the store stays removable.
                let mode = mode | 0o700;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
        }
        Ok(self.warnings)
    }
}

enum FileError {
    TooBig,
    Io(io::Error),
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn host_rel(at: &[OsString], c: &OsStr) -> String {
    let mut p = PathBuf::new();
    p.extend(at);
    p.push(c);
    p.display().to_string()
}

fn mkdir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o755).create(path)
}

/// Gives u+rwx to every directory under `path` (not following symlinks),
/// so a tree with a 0555 directory can be removed.
fn make_writable(path: &Path) -> io::Result<()> {
    let m = std::fs::symlink_metadata(path)?;
    if !m.is_dir() {
        return Ok(());
    }
    if m.permissions().mode() & 0o700 != 0o700 {
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(m.permissions().mode() | 0o700),
        )?;
    }
    for e in std::fs::read_dir(path)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            make_writable(&e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_are_split_and_checked() {
        assert_eq!(split_entry(b"./a//b/").unwrap(), ["a", "b"]);
        assert!(split_entry(b"a/../b").is_err());
        assert!(split_entry(b"/etc/passwd").is_err());
        assert!(split_entry(b"..").is_err());
        assert!(split_entry(b"./").unwrap().is_empty());
    }
}
