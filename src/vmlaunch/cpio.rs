//! A small writer of newc cpio archives, the format the kernel unpacks as
//! an initramfs. Only what initramfs images need: directories, files,
//! symlinks and device nodes, all owned by root.

/// File type bits of `mode`.
pub const DIR: u32 = 0o040_000;
pub const FILE: u32 = 0o100_000;
pub const SYMLINK: u32 = 0o120_000;
pub const CHAR_DEV: u32 = 0o020_000;

#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// One entry. `mode` has the type bits; `rdev` is major << 8 | minor;
    /// a symlink's `data` is its target. Names are relative (`bin/sh`).
    pub fn entry(&mut self, name: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170_000 == DIR { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, DIR | 0o755, 0, &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, FILE | perm, 0, data);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, SYMLINK | 0o777, 0, target.as_bytes());
    }

    /// Every parent directory of `path` not yet written, then nothing
    /// else: callers add the entry itself.
    pub fn parents(&mut self, path: &str, made: &mut std::collections::BTreeSet<String>) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if made.insert(acc.clone()) {
                self.dir(&acc);
            }
        }
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The system's cpio reads back what we wrote.
    #[test]
    fn cpio_tool_extracts_it() {
        let mut w = Cpio::default();
        let mut made = Default::default();
        w.parents("usr/bin/tool", &mut made);
        w.file("usr/bin/tool", 0o755, b"#!/bin/sh\necho hi\n");
        w.symlink("usr/bin/alias", "tool");
        w.file("odd", 0o644, &[0u8; 5]);
        let bytes = w.finish();
        assert_eq!(bytes.len() % 4, 0);
        let dir = tempfile::tempdir().unwrap();
        let tool = ["cpio", "busybox"]
            .into_iter()
            .find(|t| std::process::Command::new(t).arg("--help").output().is_ok());
        let Some(tool) = tool else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no cpio or busybox under CI"
            );
            eprintln!("SKIPPED: neither cpio nor busybox is installed");
            return;
        };
        let mut cmd = std::process::Command::new(tool);
        if tool == "busybox" {
            cmd.arg("cpio");
        }
        let mut child = cmd
            .args(["-i", "-d"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        let p = dir.path();
        assert_eq!(
            std::fs::read(p.join("usr/bin/tool")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read_link(p.join("usr/bin/alias")).unwrap(),
            std::path::Path::new("tool")
        );
        assert_eq!(std::fs::read(p.join("odd")).unwrap(), [0u8; 5]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(p.join("usr/bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
