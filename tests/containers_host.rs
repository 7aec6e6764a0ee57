//! Container nodes on a host that cannot run them, as an unprivileged
//! user: no crun on the daemon's PATH, and user namespaces switched off
//! (user.max_user_namespaces = 0 in the daemon's own user namespace, the
//! sysctl's per-namespace form, so no host setting is touched). Each is a
//! clear error or a `crashed` node naming the reason, with no node files,
//! ports or mounts left behind, and the daemon goes on serving.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{unprivileged_or_skip, Account, CliUser};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Loud skip (a failure under CI) unless the tools are here.
fn tools_or_skip(test: &str) -> bool {
    for (t, pkg) in [
        ("crun", "crun"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
        ("busybox", "busybox-static"),
    ] {
        if !have(t) {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: {t} is not installed under CI"
            );
            ulan::testkit::skipped(format_args!(
                "{test}: {t} is not installed (apt-get install {pkg})"
            ));
            return false;
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        ulan::testkit::skipped(format_args!("{test}: /dev/net/tun is missing"));
        return false;
    }
    true
}

/// A daemon started by `program args` as the account; stopped and killed
/// when dropped (after the CLI user's own `ulan stop`).
struct OddDaemon {
    cli: CliUser,
    child: Child,
}

impl OddDaemon {
    fn start(cli: CliUser, program: &str, args: &[&str]) -> OddDaemon {
        let child = cli
            .program(program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = OddDaemon { cli, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.cli.ulan(&["lab"]).status.success() {
            assert!(Instant::now() < deadline, "the daemon's API never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn lab_dir(&self) -> std::path::PathBuf {
        self.cli.run_dir().join("ulan").join("ct-host")
    }

    /// `node add` of a container must fail (at once, or as `crashed` with
    /// `reason` in its error); nothing of it may stay.
    fn add_fails_cleanly(&self, needle: &str) {
        let o = self.cli.ulan(&[
            "node",
            "add",
            "c",
            "--kind",
            "container",
            "--nic",
            "l1",
            "--cmd",
            "sleep",
            "--cmd",
            "100",
        ]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let ls = self.cli.ok(&["--json", "node", "ls"]);
        if ls.contains("\"c\"") {
            // Made, then it must be crashed with the reason (kept so its
            // reason can be read, as a crashed guest is).
            let v = self.cli.json(&["node", "show", "c"]);
            assert_eq!(v["state"], "crashed", "{v}");
            let why = v["exit"].as_str().unwrap_or("").to_string();
            assert!(why.contains(needle), "expected {needle:?} in {v}");
            if !o.status.success() {
                assert!(err.contains(needle), "expected {needle:?} in {err}");
            }
            self.cli.ok(&["node", "rm", "c"]);
        } else {
            assert!(!o.status.success(), "node add succeeded but made no node");
            assert!(err.contains(needle), "expected {needle:?} in {err}");
        }
        let ls = self.cli.ok(&["--json", "node", "ls"]);
        assert!(!ls.contains("\"c\""), "a node was left: {ls}");
        let ports = self.cli.ok(&["--json", "port", "ls"]);
        assert!(!ports.contains("c.eth0"), "a port was left: {ports}");
        assert!(
            !self.lab_dir().join("nodes/c").exists(),
            "node files were left in {}",
            self.lab_dir().display()
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let home = self.cli.home().to_string_lossy().into_owned();
        assert!(!mounts.contains(&home), "a mount was left under {home}");
        // The daemon still serves.
        self.cli.ok(&["lan", "add", "after"]);
        self.cli.ok(&["lan", "rm", "after"]);
    }
}

impl Drop for OddDaemon {
    fn drop(&mut self) {
        let _ = self.cli.ulan(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn account_or_skip(test: &str) -> Option<Account> {
    if !tools_or_skip(test) {
        return None;
    }
    unprivileged_or_skip(test)
}

#[test]
fn a_container_without_crun_is_a_clear_error() {
    let test = "a_container_without_crun_is_a_clear_error";
    let Some(account) = account_or_skip(test) else {
        return;
    };
    // A PATH with every tool the daemon uses but crun.
    let bin = tempfile::Builder::new()
        .prefix("ulan-nocrun")
        .tempdir()
        .unwrap();
    for t in [
        "ip",
        "nsenter",
        "unshare",
        "newuidmap",
        "newgidmap",
        "busybox",
        "iperf3",
    ] {
        if let Ok(p) = which(t) {
            std::os::unix::fs::symlink(p, bin.path().join(t)).unwrap();
        }
    }
    common::cli::give_read(bin.path());
    let cli =
        CliUser::as_account("ct-host", account).with_env("PATH", bin.path().as_os_str().to_owned());
    let d = OddDaemon::start(cli, env!("CARGO_BIN_EXE_ulan"), &["daemon"]);
    d.cli.ok(&["lan", "add", "l1"]);
    d.add_fails_cleanly("crun is not installed");
}

#[test]
fn a_container_where_user_namespaces_are_off_is_a_clear_error() {
    let test = "a_container_where_user_namespaces_are_off_is_a_clear_error";
    let Some(account) = account_or_skip(test) else {
        return;
    };
    let cli = CliUser::as_account("ct-host", account);
    // The daemon runs as root of its own user namespace, where no further
    // user namespace may be made.
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && exec {} daemon",
        env!("CARGO_BIN_EXE_ulan")
    );
    let probe = cli
        .program(
            "unshare",
            &[
                "--user",
                "--map-root-user",
                "sh",
                "-c",
                "echo 0 > /proc/sys/user/max_user_namespaces && ! unshare --user true 2>/dev/null",
            ],
        )
        .status()
        .unwrap();
    if !probe.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: user.max_user_namespaces cannot be set in a user namespace here"
        );
        ulan::testkit::skipped(format_args!(
            "{test}: user.max_user_namespaces cannot be set in a user namespace here"
        ));
        return;
    }
    let d = OddDaemon::start(
        cli,
        "unshare",
        &["--user", "--map-root-user", "sh", "-c", &script],
    );
    d.cli.ok(&["lan", "add", "l1"]);
    d.add_fails_cleanly("user namespace");
}

fn which(tool: &str) -> Result<String, ()> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map_err(|_| ())?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !p.is_empty() {
        Ok(p)
    } else {
        Err(())
    }
}
