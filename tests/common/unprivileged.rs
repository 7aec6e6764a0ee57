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
    system_account(USER)
}

/// The system account `name`, made if missing (as root).
fn system_account(name: &str) -> Result<TestUser, String> {
    if let Some(u) = lookup(name) {
        return Ok(u);
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .output()
        .map_err(|e| format!("cannot run useradd: {e}"))?;
    // Exit 9: made meanwhile by a test running beside this one.
    if !out.status.success() && out.status.code() != Some(9) {
        return Err(format!(
            "useradd {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    lookup(name).ok_or_else(|| format!("{name} missing after useradd"))
}

/// The account with subordinate ids: its own, so `ulan-test` keeps none
/// and the other tests keep testing the single-id mapping most rootless
/// setups without /etc/subuid entries have.
pub const SUBID_USER: &str = "ulan-test-subid";
/// The range given to it: 300000-365535, for uids and gids.
const SUBID_RANGE: &str = "300000-365535";

/// A user's subordinate range in `/etc/subuid`-style `file`.
pub fn subid_range(file: &str, name: &str, id: u32) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    ulan::vmlaunch::container::parse_subid(&text, name, id)
}

/// A user and its subordinate (start, count) ranges.
pub struct SubidUser {
    pub user: TestUser,
    pub uids: (u32, u32),
    pub gids: (u32, u32),
}

/// A user with subordinate uid and gid ranges:
/// as root, [`SUBID_USER`], given [`SUBID_RANGE`] if it has none yet
/// (left in place: running again finds it); otherwise the user running
/// the tests, if /etc/subuid and /etc/subgid give it ranges.
pub fn subid_user() -> Result<SubidUser, String> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let (user, name) = if uid == 0 {
        (system_account(SUBID_USER)?, SUBID_USER.to_string())
    } else {
        // SAFETY: getpwuid; the name is copied at once.
        let name = unsafe {
            let pw = libc::getpwuid(uid);
            if pw.is_null() {
                return Err(format!("uid {uid} has no passwd entry"));
            }
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned()
        };
        (TestUser { uid, gid }, name)
    };
    let ranges = || {
        Some((
            subid_range("/etc/subuid", &name, user.uid)?,
            subid_range("/etc/subgid", &name, user.gid)?,
        ))
    };
    if ranges().is_none() && uid == 0 {
        let out = Command::new("usermod")
            .args(["--add-subuids", SUBID_RANGE, "--add-subgids", SUBID_RANGE])
            .arg(&name)
            .output()
            .map_err(|e| format!("cannot run usermod: {e}"))?;
        if !out.status.success() && ranges().is_none() {
            return Err(format!(
                "usermod --add-subuids {SUBID_RANGE} {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let (uids, gids) = ranges().ok_or_else(|| {
        format!("{name} has no range in /etc/subuid and /etc/subgid (usermod --add-subuids)")
    })?;
    Ok(SubidUser { user, uids, gids })
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
