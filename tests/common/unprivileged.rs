//! Running test programs as an ordinary user, so "rootless" is shown, not
//! assumed: as root (CI), the user `ulan-test` (made here if missing);
//! otherwise the user running the tests.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

pub const USER: &str = "ulan-test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestUser {
    pub uid: u32,
    pub gid: u32,
}

fn lookup(name: &str) -> Option<TestUser> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0] != name {
            return None;
        }
        Some(TestUser {
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
        })
    })
}

/// The user tests run their unprivileged parts as. Err: why there is none.
pub fn test_user() -> Result<TestUser, String> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if uid != 0 {
        return Ok(TestUser { uid, gid });
    }
    if let Some(u) = lookup(USER) {
        return Ok(u);
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            USER,
        ])
        .output()
        .map_err(|e| format!("cannot run useradd: {e}"))?;
    // Exit 9: made meanwhile by a test running beside this one.
    if !out.status.success() && out.status.code() != Some(9) {
        return Err(format!(
            "useradd {USER} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    lookup(USER).ok_or_else(|| format!("{USER} missing after useradd"))
}

impl TestUser {
    /// `program` to be run as this user (no supplementary groups).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        // SAFETY: getuid cannot fail.
        if unsafe { libc::getuid() } != self.uid {
            c.uid(self.uid).gid(self.gid);
        }
        c
    }

    /// Gives `path` and everything under it to this user.
    pub fn chown_tree(&self, path: &Path) {
        let _ = std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid));
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    self.chown_tree(&e.path());
                } else {
                    let _ = std::os::unix::fs::lchown(e.path(), Some(self.uid), Some(self.gid));
                }
            }
        }
    }
}
