//! Container limits (memory, cpu, pids) against the kernel's own cgroups,
//! with the daemon and CLI as the unprivileged test user:
//!
//! - without a delegated cgroup the node runs, and its warning and
//!   `ulan doctor` say the limits were not applied and how to get them;
//! - in a cgroup delegated to the test user (made here as root, as an admin
//!   or systemd would: cgroup v1 hierarchies, where this host has them, or
//!   cgroup v2) the node's cgroups are the user's, hold the limits, and the
//!   kernel enforces them: a process over the memory limit is OOM-killed
//!   while the node lives on, forks past pids.max fail, two busy loops
//!   under a one-cpu quota are throttled; a stop removes the cgroups;
//! - the daemon's half of a cgroup v2 delegation against the kernel's
//!   cgroup2 with whatever controllers it has (hugetlb alone on a hybrid
//!   host): the move into its leaf, the hand-down, a node's join, and the
//!   refusal when a stranger shares its cgroup.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::containers::{skip_unless_root_ci, user_or_skip, wait_until, Daemon};
use common::unprivileged::TestUser;
use ulan::vmlaunch::container::limits::{cgroup2_mount, probe, Delegation};

#[test]
fn a_container_without_a_delegated_cgroup_runs_and_says_its_limits_were_not_applied() {
    let Some(user) = user_or_skip() else { return };
    // In this test's own cgroups: root's when the tests run as root, not
    // the test user's.
    let d = Daemon::start(user);
    d.add_sleeper("l", &["--memory-mb", "64", "--pids-max", "50"]);
    let v = d.node("l");
    assert_eq!(v["state"], "running", "{v}");
    let doctor = d.ok(&["doctor"]);
    if v["cgroups"].as_array().is_some_and(|c| !c.is_empty()) {
        // A developer whose session delegates a cgroup: limits apply.
        assert!(v["warning"].is_null(), "{v}");
        assert!(doctor.contains("container limits apply"), "{doctor}");
        return;
    }
    let w = v["warning"].as_str().unwrap_or("").to_string();
    assert!(w.contains("limits not applied"), "{w}");
    assert!(doctor.contains("limits are not applied"), "{doctor}");
    assert!(doctor.contains("Delegate=yes"), "{doctor}");
}

/// A cgroup subtree delegated to the test user, made as root: on cgroup v1
/// one cgroup in each of the memory, cpu and pids hierarchies under this
/// process's own, on cgroup v2 one under the root with the controllers
/// handed down; chowned to the user as systemd's `Delegate=yes` does.
/// Removed when dropped (after the daemon is gone).
struct Delegated {
    /// The cgroups' name (the same in every hierarchy).
    name: String,
    dirs: Vec<PathBuf>,
    procs: Vec<PathBuf>,
}

impl Delegated {
    fn make(user: &TestUser) -> Result<Delegated, String> {
        // SAFETY: getuid cannot fail.
        if unsafe { libc::getuid() } != 0 {
            return Err("making a cgroup for the test user needs root".into());
        }
        let name = format!("ulan-test-delegated-{}", std::process::id());
        let (parents, v2) = match probe() {
            // As root, this process's own v1 cgroups are writable.
            Ok(Delegation::V1 { memory, cpu, pids }) => (vec![memory, cpu, pids], false),
            _ if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => {
                let root = PathBuf::from("/sys/fs/cgroup");
                std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu +pids")
                    .map_err(|e| format!("cannot enable memory, cpu, pids at the root: {e}"))?;
                (vec![root], true)
            }
            Ok(d) => return Err(format!("unexpected delegation {d:?}")),
            Err(why) => return Err(why),
        };
        let mut made = Delegated {
            name: name.clone(),
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        for p in parents {
            let dir = p.join(&name);
            std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            made.dirs.push(dir.clone());
            let files: &[&str] = if v2 {
                &["cgroup.procs", "cgroup.subtree_control", "cgroup.threads"]
            } else {
                &["cgroup.procs", "tasks"]
            };
            for f in [""].iter().chain(files) {
                let path = if f.is_empty() {
                    dir.clone()
                } else {
                    dir.join(f)
                };
                std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
            }
            made.procs.push(dir.join("cgroup.procs"));
        }
        Ok(made)
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&e.path());
                    }
                }
            }
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("cannot remove the test's cgroup {}: {e}", dir.display());
            }
        }
        for d in &self.dirs {
            remove(d);
        }
    }
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_string()
}

/// A counter of a flat-keyed cgroup file (`memory.events`, `cpu.stat`).
fn counter(dir: &Path, file: &str, key: &str) -> u64 {
    read(dir, file)
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {}/{file}", dir.display()))
}

/// The node's cgroup that has `file`.
fn with_file(cgroups: &[PathBuf], file: &str) -> PathBuf {
    cgroups
        .iter()
        .find(|d| d.join(file).exists())
        .unwrap_or_else(|| panic!("no cgroup of {cgroups:?} has {file}"))
        .clone()
}

#[test]
fn limits_are_applied_and_enforced_in_a_cgroup_delegated_to_the_test_user() {
    let Some(user) = user_or_skip() else { return };
    let uid = user.uid;
    let delegated = match Delegated::make(&user) {
        Ok(d) => d,
        Err(why) => {
            return skip_unless_root_ci(&format!(
                "container limit enforcement needs a delegated cgroup: {why}"
            ))
        }
    };
    let d = Daemon::start_in_cgroups(user, &delegated.procs, &delegated.name);
    d.add_sleeper(
        "l",
        &["--memory-mb", "64", "--pids-max", "40", "--cpus", "1"],
    );
    let v = d.node("l");
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["warning"].is_null(), "{v}");
    let cgroups: Vec<PathBuf> = v["cgroups"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|c| PathBuf::from(c.as_str().unwrap()))
        .collect();
    assert_eq!(cgroups.len(), delegated.dirs.len(), "{v}");
    let holder = v["pid"].as_u64().unwrap().to_string();
    for c in &cgroups {
        assert!(
            delegated.dirs.iter().any(|d| c.starts_with(d)),
            "{} outside the delegation",
            c.display()
        );
        // Made by the daemon, as the user.
        assert_eq!(std::fs::metadata(c).unwrap().uid(), uid, "{}", c.display());
        let procs = read(c, "cgroup.procs");
        assert!(
            procs.lines().any(|p| p == holder),
            "the holder {holder} is not in {}: {procs}",
            c.display()
        );
    }

    // The values, where each version keeps them.
    let v2 = cgroups[0].join("memory.max").exists();
    let memory = with_file(
        &cgroups,
        if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        },
    );
    let cpu = with_file(&cgroups, "cpu.stat");
    let pids = with_file(&cgroups, "pids.max");
    if v2 {
        assert_eq!(read(&memory, "memory.max"), (64u64 << 20).to_string());
        assert_eq!(read(&cpu, "cpu.max"), "100000 100000");
    } else {
        assert_eq!(
            read(&memory, "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "100000");
    }
    assert_eq!(read(&pids, "pids.max"), "40");

    // Memory: a shell that holds 200 MB is killed; the node lives on.
    let (code, out, err) = d.sh(
        "l",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(!out.contains("survived"), "{out}");
    let ooms = if v2 {
        counter(&memory, "memory.events", "oom_kill")
    } else {
        counter(&memory, "memory.oom_control", "oom_kill")
    };
    assert!(ooms >= 1, "no OOM kill counted");
    assert_eq!(d.node("l")["state"], "running");

    // Cpu: two busy loops under a one-cpu quota are throttled.
    let before = counter(&cpu, "cpu.stat", "nr_throttled");
    let (code, out, err) = d.sh(
        "l",
        "for i in 1 2; do timeout 2 sh -c 'while :; do :; done' & done; wait; echo done",
    );
    assert!(out.contains("done"), "{code} {out}{err}");
    assert!(
        counter(&cpu, "cpu.stat", "nr_throttled") > before,
        "two busy loops were never throttled at one cpu"
    );

    // Pids, last: 60 background sleeps in a node allowed 40 processes
    // (the shell gives up at the first failed fork, and its orphans stay
    // zombies of an init, `sleep`, that reaps nothing).
    let (_, out, err) = d.sh("l", "for i in $(seq 60); do sleep 2 & done; wait");
    assert!(err.contains("fork"), "all forks succeeded: {out}{err}");
    assert!(counter(&pids, "pids.events", "max") >= 1);

    // A stop removes the node's cgroups; a start makes new ones (each run
    // its own, so a start never meets the last run's going away).
    d.ok(&["node", "stop", "l"]);
    wait_until("the cgroups removed", || {
        cgroups.iter().all(|c| !c.exists())
    });
    d.ok(&["node", "start", "l"]);
    wait_until("l running", || d.node("l")["state"] == "running");
    let again: Vec<PathBuf> = d.node("l")["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| PathBuf::from(c.as_str().unwrap()))
        .collect();
    assert_eq!(again.len(), cgroups.len());
    for c in &again {
        assert!(c.exists() && !cgroups.contains(c), "{}", c.display());
    }
    assert_eq!(read(&with_file(&again, "pids.max"), "pids.max"), "40");
    d.ok(&["node", "stop", "l"]);
    wait_until("the cgroups removed again", || {
        again.iter().all(|c| !c.exists())
    });
    drop(d);
    // The daemon's own dirs go with it (v1: `ulan-PID`; v2 leaves its
    // leaf, which the delegation's owner removes).
    for c in &cgroups {
        if let Some(p) = c
            .parent()
            .filter(|p| !delegated.dirs.iter().any(|d| d == p))
        {
            wait_until("the daemon's cgroup dir removed", || !p.exists());
        }
    }
}

const V2_BASE: &str = "ULAN_TEST_V2_BASE";

/// The daemon's half of a cgroup v2 delegation, as the test user in the
/// cgroup `v2_the_daemon_moves_into_its_leaf_and_hands_controllers_down`
/// made for it (run by that test, never alone).
#[test]
#[ignore = "run by v2_the_daemon_moves_into_its_leaf_and_hands_controllers_down as the test user"]
fn v2_hand_down_as_the_test_user() {
    let base = PathBuf::from(std::env::var_os(V2_BASE).expect("run by the v2 test"));
    let controllers: Vec<String> = std::env::var("ULAN_TEST_V2_CONTROLLERS")
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect();
    let own = || {
        let t = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let p = t
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string();
        cgroup2_mount().unwrap().join(p.trim_start_matches('/'))
    };
    // The parent moves this process into `base` once it exists.
    wait_until("moved into the delegation", || own() == base);
    let names: Vec<&str> = controllers.iter().map(|s| s.as_str()).collect();
    match ulan::vmlaunch::container::limits::hand_down(&base, &names) {
        Ok(()) => {}
        Err(e) => {
            println!("HAND_DOWN_ERROR {e}");
            return;
        }
    }
    assert_eq!(own(), base.join("ulan-daemon"));
    let on = read(&base, "cgroup.subtree_control");
    for c in &controllers {
        assert!(on.split_whitespace().any(|x| x == c), "{c} not on: {on}");
    }
    // A node's cgroup beside the leaf, made and joined as this user.
    let node = base.join("node-x");
    std::fs::create_dir(&node).unwrap();
    let procs = std::ffi::CString::new(node.join("cgroup.procs").to_str().unwrap()).unwrap();
    ulan::vmlaunch::container::limits::NodeCgroup::join(&[procs]).unwrap();
    assert_eq!(own(), node);
    println!("HAND_DOWN_OK");
}

/// The v2 half that the limits test cannot reach on a hybrid host (whose
/// cgroup2 has no memory, cpu or pids): against the kernel's cgroup2 with
/// the controllers it has, a daemon-to-be as the test user in a cgroup
/// delegated to it moves into its leaf, hands the controllers down and
/// joins a node's cgroup; with a stranger process in its cgroup the hand
/// down is refused with the reason.
#[test]
fn v2_the_daemon_moves_into_its_leaf_and_hands_controllers_down() {
    let Some(user) = user_or_skip() else { return };
    let skip =
        |why: String| skip_unless_root_ci(&format!("the cgroup v2 delegation test needs {why}"));
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return skip("root, to make a cgroup delegated to the test user".into());
    }
    let Some(mount) = cgroup2_mount() else {
        return skip("a cgroup2 hierarchy".into());
    };
    // Every controller the root has is handed down to the delegation.
    let controllers = read(&mount, "cgroup.controllers");
    if !controllers.is_empty() {
        let on: Vec<String> = controllers
            .split_whitespace()
            .map(|c| format!("+{c}"))
            .collect();
        std::fs::write(mount.join("cgroup.subtree_control"), on.join(" ")).unwrap();
    }
    for stranger in [false, true] {
        let base = mount.join(format!(
            "ulan-test-v2-{}-{}",
            std::process::id(),
            u8::from(stranger)
        ));
        std::fs::create_dir(&base).unwrap();
        for f in [
            "",
            "cgroup.procs",
            "cgroup.subtree_control",
            "cgroup.threads",
        ] {
            std::os::unix::fs::chown(base.join(f), Some(user.uid), Some(user.gid)).unwrap();
        }
        let mut sleeper = stranger.then(|| {
            let c = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap();
            std::fs::write(base.join("cgroup.procs"), c.id().to_string()).unwrap();
            c
        });
        let mut child = user
            .command(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "v2_hand_down_as_the_test_user",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(V2_BASE, &base)
            .env("ULAN_TEST_V2_CONTROLLERS", &controllers)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::fs::write(base.join("cgroup.procs"), child.id().to_string()).unwrap();
        let out = {
            let mut o = String::new();
            use std::io::Read;
            child.stdout.take().unwrap().read_to_string(&mut o).unwrap();
            let status = child.wait().unwrap();
            let mut e = String::new();
            child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
            assert!(status.success(), "{o}{e}");
            o
        };
        if let Some(s) = sleeper.as_mut() {
            let _ = s.kill();
            let _ = s.wait();
        }
        if stranger && !controllers.is_empty() {
            assert!(out.contains("HAND_DOWN_ERROR"), "{out}");
            assert!(out.contains("other processes share"), "{out}");
        } else {
            assert!(out.contains("HAND_DOWN_OK"), "{out}");
        }
        for d in [base.join("node-x"), base.join("ulan-daemon"), base.clone()] {
            if d.exists() {
                wait_until("the test's cgroup empty", || {
                    std::fs::remove_dir(&d).is_ok()
                });
            }
        }
    }
}
