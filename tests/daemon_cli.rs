//! The real `ulan` binary: daemon lifecycle (lock, stale socket, signals,
//! file modes) and the CLI against a running daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ulan");

struct Env {
    xdg: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            xdg: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self, lab: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env("XDG_RUNTIME_DIR", self.xdg.path())
            // Saved lab states stay in the test's own data folder.
            .env("XDG_DATA_HOME", self.xdg.path().join("data"))
            .env("ULAN_LAB", lab)
            .env_remove("RUST_LOG");
        c
    }

    fn run_dir(&self, lab: &str) -> PathBuf {
        self.xdg.path().join("ulan").join(lab)
    }

    fn ulan(&self, lab: &str, args: &[&str]) -> Output {
        self.cmd(lab).args(args).output().unwrap()
    }

    fn ok(&self, lab: &str, args: &[&str]) -> String {
        let o = self.ulan(lab, args);
        assert!(
            o.status.success(),
            "ulan {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, lab: &str, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(lab, &a)).unwrap()
    }

    /// Starts a foreground daemon and waits for its API.
    fn daemon(&self, lab: &str) -> Child {
        let child = self
            .cmd(lab)
            .args(["daemon"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&self.run_dir(lab).join("api.sock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ulan(lab, &["lab"]).status.success() {
            assert!(Instant::now() < deadline, "daemon never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }
}

fn wait_for(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

#[test]
fn no_daemon_gives_one_clear_line_and_fails() {
    let env = Env::new();
    let o = env.ulan("nolab", &["lan", "ls"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("ulan daemon --lab nolab"), "{err}");
}

#[test]
fn daemon_lifecycle_lock_signals_and_stale_socket() {
    let env = Env::new();
    let mut d = env.daemon("life");
    let dir = env.run_dir("life");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("api.sock")), 0o600);

    // A second daemon for the same lab is refused, the first is untouched.
    let second = env.ulan("life", &["daemon"]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already has a daemon"), "{err}");
    assert!(err.contains(&d.id().to_string()), "no pid in: {err}");
    let detached = env.ulan("life", &["daemon", "--detach"]);
    assert!(!detached.status.success(), "detach started a second daemon");
    env.ok("life", &["lan", "add", "x"]);
    env.ok(
        "life",
        &["port", "add", "p", "--kind", "stream", "--lan", "x"],
    );
    assert!(dir.join("ports/p").exists());

    // SIGTERM: clean stop, sockets gone.
    signal(&d, libc::SIGTERM);
    let status = d.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!dir.join("api.sock").exists());
    assert!(!dir.join("ports").exists());

    // SIGKILL leaves a stale socket; the next daemon replaces it. The
    // lab itself is saved: it comes back after a stop and after a kill.
    let mut d = env.daemon("life");
    let names = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(env.json("life", &["lan", "ls"])), ["x"]);
    env.ok("life", &["port", "add", "q", "--kind", "vde"]);
    signal(&d, libc::SIGKILL);
    d.wait().unwrap();
    assert!(dir.join("api.sock").exists(), "expected a stale socket");
    // The killed daemon's socket file is there, and dead.
    let ctl = dir.join("ports/q/ctl");
    assert!(std::os::unix::net::UnixStream::connect(&ctl).is_err());
    let mut d = env.daemon("life");
    assert_eq!(names(env.json("life", &["lan", "ls"])), ["x"]);
    assert_eq!(names(env.json("life", &["port", "ls"])), ["p", "q"]);
    // A new socket, bound by the new daemon, not the stale file kept
    // (the inode number tells nothing: ext4 hands a freed one out again).
    assert!(
        std::os::unix::net::UnixStream::connect(&ctl).is_ok(),
        "the stale port socket was kept"
    );
    // SIGINT works like SIGTERM.
    signal(&d, libc::SIGINT);
    assert!(d.wait().unwrap().success());
    assert!(!dir.join("api.sock").exists());
}

#[test]
fn cli_round_trip() {
    let env = Env::new();
    let mut d = env.daemon("cli");
    env.ok("cli", &["lan", "add", "red"]);
    env.ok("cli", &["lan", "add", "blue"]);
    let p = env.json(
        "cli",
        &["port", "add", "a", "--kind", "dgram", "--lan", "red"],
    );
    assert_eq!(p["kind"], "dgram");
    assert_eq!(p["lan"], "red");
    assert!(Path::new(p["path"].as_str().unwrap()).exists());
    env.ok("cli", &["port", "add", "b", "-k", "bess"]);
    let table = env.ok("cli", &["port", "ls"]);
    assert!(table.starts_with("PORT"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("red")),
        "{table}"
    );
    let moved = env.json("cli", &["port", "move", "a", "blue"]);
    assert_eq!(moved["lan"], "blue");
    let moved = env.json("cli", &["port", "move", "a", "--detach"]);
    assert_eq!(moved["lan"], serde_json::Value::Null);
    let stats = env.json("cli", &["port", "stats", "a"]);
    assert_eq!(stats["rx_frames"], 0);
    assert_eq!(stats["up"], false);
    let fdb = env.json("cli", &["fdb", "red"]);
    assert_eq!(fdb["entries"], serde_json::json!([]));
    // Errors: one line, non-zero exit, nothing changed.
    for bad in [
        vec!["port", "add", "../evil", "-k", "vde"],
        vec!["port", "add", "c", "-k", "macvtap"],
        vec!["port", "move", "a", "nolan"],
        vec!["lan", "add", "red"],
        vec!["fdb", "nolan"],
    ] {
        let o = env.ulan("cli", &bad);
        assert!(!o.status.success(), "{bad:?} succeeded");
        assert_eq!(String::from_utf8_lossy(&o.stderr).trim().lines().count(), 1);
    }
    let ports = env.json("cli", &["port", "ls"]);
    assert_eq!(ports.as_array().unwrap().len(), 2);
    env.ok("cli", &["port", "rm", "a"]);
    env.ok("cli", &["port", "rm", "b"]);
    env.ok("cli", &["lan", "rm", "red"]);
    let lans = env.json("cli", &["lan", "ls"]);
    assert_eq!(lans.as_array().unwrap().len(), 1);

    // `ulan events` follows changes as they happen.
    let mut ev = env
        .cmd("cli")
        .args(["--json", "events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = ev.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .take(3)
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(300));
    env.ok("cli", &["lan", "add", "green"]);
    env.ok(
        "cli",
        &["port", "add", "g", "-k", "stream", "--lan", "green"],
    );
    let lines = lines.join().unwrap();
    let _ = ev.kill();
    let _ = ev.wait();
    let stopped = env.ok("cli", &["stop"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    assert!(d.wait().unwrap().success());
    assert!(
        !env.ulan("cli", &["stop"]).status.success(),
        "stop without a daemon succeeded"
    );
    let names: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["hello", "lan_added", "port_added"]);
}

/// `ulan stop` returns once the daemon is gone, lock included: a daemon
/// started right after it gets the lab, every time.
#[test]
fn stop_then_start_again_at_once() {
    let env = Env::new();
    for round in 0..3 {
        let started = env.ulan("again", &["daemon", "--detach"]);
        assert!(
            started.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        // The lans of the rounds before are back.
        let lans: Vec<String> = env
            .json("again", &["lan", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect();
        let earlier: Vec<String> = (0..round).map(|r| format!("x{r}")).collect();
        assert_eq!(lans, earlier, "round {round}");
        env.ok("again", &["lan", "add", &format!("x{round}")]);
        let stopped = env.ok("again", &["stop"]);
        assert!(stopped.contains("stopped"), "round {round}: {stopped}");
    }
    // And for scripts: JSON only.
    let started = env.json("again", &["daemon", "--detach"]);
    assert!(started["pid"].as_u64().is_some(), "{started}");
    assert_eq!(started["lab"], "again");
    let stopped = env.json("again", &["stop"]);
    assert_eq!(stopped["stopped"], true, "{stopped}");
    assert_eq!(stopped["pid"], started["pid"]);
    assert!(!env.ulan("again", &["stop"]).status.success());
    // The lock file stays, empty: no pid to signal by mistake.
    let lock = std::fs::read_to_string(env.run_dir("again").join("lock")).unwrap();
    assert_eq!(lock, "");
}

/// A symlink or a hard link planted as `daemon.log` is not written
/// through: `--detach` refuses to start and says which file, and the
/// file it led to is untouched.
#[test]
fn detach_never_writes_through_a_planted_daemon_log() {
    use std::os::unix::fs::DirBuilderExt;
    let env = Env::new();
    for (lab, hard) in [("planted-sym", false), ("planted-hard", true)] {
        let dir = env.run_dir(lab);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)
            .unwrap();
        let victim = env.xdg.path().join(format!("{lab}-victim"));
        std::fs::write(&victim, b"precious\n").unwrap();
        if hard {
            std::fs::hard_link(&victim, dir.join("daemon.log")).unwrap();
        } else {
            std::os::unix::fs::symlink(&victim, dir.join("daemon.log")).unwrap();
        }
        let o = env.ulan(lab, &["daemon", "--detach"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{lab}: detach started: {err}");
        assert!(err.contains("daemon.log"), "{lab}: {err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n", "{lab}");
        assert!(
            !dir.join("api.sock").exists(),
            "{lab}: a daemon came up anyway"
        );
    }
}
