//! The `ulan` binary as a user runs it: a private home with its own
//! runtime and data dirs, one lab name, and optionally a different,
//! unprivileged account, so tests prove "rootless" instead of assuming it
//! (CI runs as root).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// A uid/gid to run commands as: the unprivileged test user.
pub use super::unprivileged::TestUser as Account;

/// An account without privileges: this process's own when it is not root;
/// as root, the `ulan-test` system account, made on first use. Err says why
/// there is none.
pub fn unprivileged_account() -> Result<Account, String> {
    super::unprivileged::test_user()
}

/// The account, or a loud skip (a failure under CI, which runs as root and
/// can always make the account).
pub fn unprivileged_or_skip(test: &str) -> Option<Account> {
    match unprivileged_account() {
        Ok(a) => Some(a),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: no unprivileged account under CI: {why}"
            );
            ulan::testkit::skipped(format_args!("{test}: {why}"));
            None
        }
    }
}

/// Makes `path` (and everything under it) belong to `who`.
pub fn give_to(path: &Path, who: &Account) {
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", who.uid, who.gid))
        .arg(path)
        .status()
        .expect("chown");
    assert!(st.success(), "chown {}", path.display());
}

/// Reads a process's real uid from /proc.
pub fn uid_of_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One user of the CLI: a home under /tmp with `run` (XDG_RUNTIME_DIR)
/// and `data` (XDG_DATA_HOME), and a lab name.
pub struct CliUser {
    home: tempfile::TempDir,
    lab: String,
    envs: Vec<(String, OsString)>,
    account: Option<Account>,
}

impl CliUser {
    pub fn new(lab: &str) -> CliUser {
        CliUser::new_in(lab, &std::env::temp_dir())
    }

    /// The same with the home in `parent` (a file system the test made).
    pub fn new_in(lab: &str, parent: &Path) -> CliUser {
        let home = tempfile::Builder::new()
            .prefix("ulan-u")
            .tempdir_in(parent)
            .unwrap();
        std::fs::create_dir(home.path().join("run")).unwrap();
        CliUser {
            home,
            lab: lab.into(),
            envs: Vec::new(),
            account: None,
        }
    }

    /// The same, but every command runs as `account` (its home is given
    /// to it).
    pub fn as_account(lab: &str, account: Account) -> CliUser {
        CliUser::as_account_in(lab, account, &std::env::temp_dir())
    }

    /// An account's CLI user with its home (run and data dirs) in `parent`.
    pub fn as_account_in(lab: &str, account: Account, parent: &Path) -> CliUser {
        let mut u = CliUser::new_in(lab, parent);
        std::fs::create_dir(u.home.path().join("data")).unwrap();
        give_to(u.home.path(), &account);
        u.account = Some(account);
        u
    }

    /// Sets an environment variable for every command.
    pub fn with_env(mut self, key: &str, value: impl Into<OsString>) -> CliUser {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.home.path().join("run")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.home.path().join("data")
    }

    pub fn account(&self) -> Option<&Account> {
        self.account.as_ref()
    }

    /// `ulan ARGS` with this user's environment (stdin closed).
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.program(env!("CARGO_BIN_EXE_ulan"), args)
    }

    /// Any program, run as this user with this user's environment.
    pub fn program(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env("XDG_RUNTIME_DIR", self.run_dir())
            .env("XDG_DATA_HOME", self.data_dir())
            .env("ULAN_LAB", &self.lab)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        if let Some(a) = &self.account {
            c.uid(a.uid).gid(a.gid).env("HOME", self.home.path());
            if let Ok(cwd) = std::env::current_dir() {
                c.current_dir(cwd);
            }
        }
        c
    }

    pub fn ulan(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ulan(args);
        assert!(
            out.status.success(),
            "ulan {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ulan --json ARGS`, parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Writes a file in the home (owned by the account) and returns its path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.home.path().join(name);
        std::fs::write(&path, text).unwrap();
        if let Some(a) = &self.account {
            give_to(&path, a);
        }
        path.display().to_string()
    }
}

impl Drop for CliUser {
    /// A test that fails halfway leaves no daemon behind.
    fn drop(&mut self) {
        let _ = self.ulan(&["stop"]);
    }
}

/// Lets every account read `path` and enter its directories (a store of
/// images built by root for an unprivileged test).
pub fn give_read(path: &Path) {
    let st = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(path)
        .status()
        .expect("chmod");
    assert!(st.success(), "chmod {}", path.display());
    // Each parent in the project (the target dir) must be enterable too.
    let mut p = path.parent();
    while let Some(dir) = p.filter(|d| d.starts_with(env!("CARGO_MANIFEST_DIR"))) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(dir) {
            if m.permissions().mode() & 0o001 == 0 {
                let mut perm = m.permissions();
                perm.set_mode(perm.mode() | 0o001);
                let _ = std::fs::set_permissions(dir, perm);
            }
        }
        p = dir.parent();
    }
}

/// `ulan daemon` in the foreground, run as a CLI user (its account), for
/// tests that want the daemon's own process; `ulan stop` when dropped,
/// killed if it has not gone within 15 s.
pub struct Daemon {
    cli: CliUser,
    child: Option<std::process::Child>,
}

impl Daemon {
    pub fn start(cli: CliUser) -> Daemon {
        let ulan = env!("CARGO_BIN_EXE_ulan");
        Daemon::start_by(cli, ulan, &["daemon"])
    }

    /// The same, started by `program args` (e.g. `unshare ... ulan daemon`).
    pub fn start_by(cli: CliUser, program: &str, args: &[&str]) -> Daemon {
        Daemon::start_then(cli, program, args, |_| {})
    }

    /// The same, with `spawned(pid)` run as soon as the process exists
    /// (before its API answers): e.g. to move it into a cgroup.
    pub fn start_then(
        cli: CliUser,
        program: &str,
        args: &[&str],
        spawned: impl FnOnce(u32),
    ) -> Daemon {
        let child = cli
            .program(program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        spawned(child.id());
        let d = Daemon {
            cli,
            child: Some(child),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !d.ulan(&["lab"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon's API never answered"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        d
    }
}

impl std::ops::Deref for Daemon {
    type Target = CliUser;
    fn deref(&self) -> &CliUser {
        &self.cli
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.cli.ulan(&["stop"]);
        if let Some(mut c) = self.child.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
