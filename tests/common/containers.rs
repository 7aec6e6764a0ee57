//! What the container tests share: whether container nodes can run here
//! (tools, /dev/net/tun, user namespaces for the test user), and the
//! daemon and CLI as that user, with exec helpers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::cli::CliUser;
use super::unprivileged::{subid_user, test_user, SubidUser, TestUser};

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Why `user` cannot run container nodes here, if it cannot.
pub fn usable_by(user: &TestUser) -> Result<(), String> {
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing (modprobe tun)".into());
    }
    for (t, pkg) in [
        ("crun", "crun"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
        ("iperf3", "iperf3"),
        ("busybox", "busybox-static"),
    ] {
        if !have(t) {
            return Err(format!("{t} is not installed (apt-get install {pkg})"));
        }
    }
    let out = user
        .command("unshare")
        .args(["--user", "--map-root-user", "--mount", "--net", "true"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "uid {} cannot make user namespaces (sysctl user.max_user_namespaces?): {}",
            user.uid,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The user to run as, or why container nodes cannot run here.
pub fn usable() -> Result<TestUser, String> {
    let user = test_user()?;
    usable_by(&user)?;
    Ok(user)
}

/// Skips loudly (fails under CI) when the tests cannot run.
pub fn user_or_skip() -> Option<TestUser> {
    match usable() {
        Ok(u) => Some(u),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot run under CI: {why}"
            );
            ulan::testkit::skipped(format_args!("container tests need {why}"));
            None
        }
    }
}

/// The user and its ranges, or a loud skip (a failure under CI as root,
/// where the account and its range can always be made).
pub fn subid_user_or_skip() -> Option<SubidUser> {
    let got = subid_user().and_then(|s| {
        if !have("newuidmap") || !have("newgidmap") {
            return Err("newuidmap/newgidmap (apt-get install uidmap)".into());
        }
        usable_by(&s.user)?;
        Ok(s)
    });
    match got {
        Ok(s) => Some(s),
        Err(why) => {
            skip_unless_root_ci(&format!("the subordinate id test needs {why}"));
            None
        }
    }
}

/// Skips loudly with `what`; a failure under CI as root, where the test
/// can always make what it needs (accounts, cgroups, ranges).
pub fn skip_unless_root_ci(what: &str) {
    // SAFETY: getuid cannot fail.
    let root = unsafe { libc::getuid() } == 0;
    assert!(
        !(root && std::env::var_os("CI").is_some()),
        "cannot run under CI: {what}"
    );
    ulan::testkit::skipped(format_args!("{what}"));
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon and the CLI as the test user (lab "ct"); the daemon is
/// stopped, its containers with it, when dropped.
pub struct Daemon(super::cli::Daemon);

impl std::ops::Deref for Daemon {
    type Target = super::cli::Daemon;
    fn deref(&self) -> &super::cli::Daemon {
        &self.0
    }
}

impl Daemon {
    pub fn start(user: TestUser) -> Daemon {
        Daemon::start_as(CliUser::as_account("ct", user))
    }

    /// The daemon of a CLI user made by the caller (a home elsewhere).
    pub fn start_as(cli: CliUser) -> Daemon {
        Daemon(super::cli::Daemon::start(cli))
    }

    /// The daemon started in the cgroups whose `cgroup.procs` files are
    /// `procs` (dirs named `marker`), as a user would start it in a
    /// delegated scope: a shell as the user waits until this process (root:
    /// cgroup v2 needs the mover to own the common ancestor) has moved it
    /// there, then becomes the daemon, which finds itself in them from its
    /// first instruction.
    pub fn start_in_cgroups(user: TestUser, procs: &[PathBuf], marker: &str) -> Daemon {
        let cli = CliUser::as_account("ct", user);
        let script = format!(
            "until grep -q '{marker}' /proc/self/cgroup; do sleep 0.01; done; exec \"$0\" daemon"
        );
        Daemon(super::cli::Daemon::start_then(
            cli,
            "sh",
            &["-c", &script, env!("CARGO_BIN_EXE_ulan")],
            |pid| {
                for p in procs {
                    std::fs::write(p, pid.to_string())
                        .unwrap_or_else(|e| panic!("moving the daemon into {}: {e}", p.display()));
                }
            },
        ))
    }

    pub fn user(&self) -> &TestUser {
        self.account().expect("run as the test user")
    }

    pub fn node(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["--json", "node", "show", name])).unwrap()
    }

    /// `ulan node add NAME --kind container --cmd sleep --cmd 1000 EXTRA`.
    pub fn add_sleeper(&self, name: &str, extra: &[&str]) {
        let mut args = vec![
            "node",
            "add",
            name,
            "--kind",
            "container",
            "--cmd",
            "sleep",
            "--cmd",
            "1000",
        ];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    /// `ulan exec NODE -- ARGV`: (exit code, stdout, stderr).
    pub fn exec(&self, node: &str, argv: &[&str]) -> (i32, String, String) {
        let mut args = vec!["exec", node, "--"];
        args.extend_from_slice(argv);
        let o = self.ulan(&args);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    pub fn sh(&self, node: &str, script: &str) -> (i32, String, String) {
        self.exec(node, &["sh", "-c", script])
    }

    /// `sh -c SCRIPT` in NODE, which must succeed; its stdout.
    pub fn sh_ok(&self, node: &str, script: &str) -> String {
        let (code, out, err) = self.sh(node, script);
        assert_eq!(code, 0, "{node}: {script}: {out}{err}");
        out
    }

    /// The lab's run directory.
    pub fn lab_dir(&self) -> PathBuf {
        self.run_dir().join("ulan/ct")
    }

    /// The lab's data directory (persistent nodes, snapshot roots).
    pub fn lab_data_dir(&self) -> PathBuf {
        self.data_dir().join("ulan/labs/ct")
    }

    pub fn builtin_rootfs(&self) -> PathBuf {
        self.data_dir().join("ulan/images/builtin-container/rootfs")
    }
}

pub fn overlay_mounts_under(dir: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .count()
}
