//! Container nodes on a host that cannot run them, as an unprivileged
//! user: no crun on the daemon's PATH, and user namespaces switched off
//! (user.max_user_namespaces = 0 in the daemon's own user namespace, the
//! sysctl's per-namespace form, so no host setting is touched). Each is a
//! clear error or a `crashed` node naming the reason, with no node files,
//! ports or mounts left behind, and the daemon goes on serving.

mod common;

use std::process::Command;

use common::cli::{CliUser, Daemon};
use common::containers::user_or_skip;

fn lab_dir(d: &Daemon) -> std::path::PathBuf {
    d.run_dir().join("ulan").join("ct-host")
}

/// `node add` of a container must fail (at once, or as `crashed` with
/// `needle` in its reason); nothing of it may stay, and the daemon goes
/// on serving.
fn add_fails_cleanly(d: &Daemon, needle: &str) {
    let o = d.ulan(&[
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
    let ls = d.ok(&["--json", "node", "ls"]);
    if ls.contains("\"c\"") {
        // Made, then it must be crashed with the reason (kept so its
        // reason can be read, as a crashed guest is).
        let v = d.json(&["node", "show", "c"]);
        assert_eq!(v["state"], "crashed", "{v}");
        let why = v["exit"].as_str().unwrap_or("").to_string();
        assert!(why.contains(needle), "expected {needle:?} in {v}");
        if !o.status.success() {
            assert!(err.contains(needle), "expected {needle:?} in {err}");
        }
        d.ok(&["node", "rm", "c"]);
    } else {
        assert!(!o.status.success(), "node add succeeded but made no node");
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    }
    let ls = d.ok(&["--json", "node", "ls"]);
    assert!(!ls.contains("\"c\""), "a node was left: {ls}");
    let ports = d.ok(&["--json", "port", "ls"]);
    assert!(!ports.contains("c.eth0"), "a port was left: {ports}");
    assert!(
        !lab_dir(d).join("nodes/c").exists(),
        "node files were left in {}",
        lab_dir(d).display()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let home = d.home().to_string_lossy().into_owned();
    assert!(!mounts.contains(&home), "a mount was left under {home}");
    // The daemon still serves.
    d.ok(&["lan", "add", "after"]);
    d.ok(&["lan", "rm", "after"]);
}

#[test]
fn a_container_without_crun_is_a_clear_error() {
    let Some(account) = user_or_skip() else {
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
    let d = Daemon::start(cli);
    d.ok(&["lan", "add", "l1"]);
    add_fails_cleanly(&d, "crun is not installed");
}

#[test]
fn a_container_where_user_namespaces_are_off_is_a_clear_error() {
    let test = "a_container_where_user_namespaces_are_off_is_a_clear_error";
    let Some(account) = user_or_skip() else {
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
    let d = Daemon::start_by(
        cli,
        "unshare",
        &["--user", "--map-root-user", "sh", "-c", &script],
    );
    d.ok(&["lan", "add", "l1"]);
    add_fails_cleanly(&d, "user namespace");
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
