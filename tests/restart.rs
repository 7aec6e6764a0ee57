//! A daemon restart loses nothing: kill -9 of the daemon, then `ulan
//! daemon` again, brings back every lan, port and node (`ulan ls` the
//! same); a clean stop does too; a corrupt state file is set aside and the
//! daemon starts empty; `ulan down` forgets the lab, with or without a
//! daemon. The real binary, each test in its own runtime and data dirs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::cli::CliUser;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

struct User {
    cli: CliUser,
    lab: String,
    daemon: Option<Child>,
    starts: usize,
}

impl std::ops::Deref for User {
    type Target = CliUser;
    fn deref(&self) -> &CliUser {
        &self.cli
    }
}

impl User {
    fn new(lab: &str, images: PathBuf) -> User {
        User {
            cli: CliUser::new(lab).with_env("ULAN_IMAGES", images),
            lab: lab.into(),
            daemon: None,
            starts: 0,
        }
    }

    fn state_file(&self) -> PathBuf {
        self.home()
            .join("data/ulan/labs")
            .join(&self.lab)
            .join("lab-state.json")
    }

    fn log(&self, n: usize) -> PathBuf {
        self.home().join(format!("daemon-{n}.log"))
    }

    /// Starts a foreground daemon (its log in `daemon-N.log`) and waits for
    /// its API; returns N.
    fn start(&mut self) -> usize {
        assert!(self.daemon.is_none());
        self.starts += 1;
        let log = std::fs::File::create(self.log(self.starts)).unwrap();
        let child = self
            .cmd(&["daemon"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + WAIT;
        while !self.ulan(&["lab"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "daemon never answered: {}",
                self.log_text(self.starts)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.starts
    }

    fn log_text(&self, n: usize) -> String {
        std::fs::read_to_string(self.log(n)).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let mut d = self.daemon.take().expect("no daemon");
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(d.id() as i32, libc::SIGKILL) };
        d.wait().unwrap();
    }

    /// `ulan stop` (SIGTERM), and the child reaped.
    fn stop(&mut self) {
        self.ok(&["stop"]);
        if let Some(mut d) = self.daemon.take() {
            d.wait().unwrap();
        }
    }

    /// `ulan down` with a daemon: it stops the daemon too.
    fn down(&mut self) {
        self.ok(&["down"]);
        if let Some(mut d) = self.daemon.take() {
            d.wait().unwrap();
        }
    }

    /// What must survive: lans, ports (not whether a client is attached
    /// right now), nodes with their state and NICs (not pids or times).
    fn lab_view(&self) -> Value {
        let mut ports = self.json(&["port", "ls"]);
        for p in ports.as_array_mut().unwrap() {
            p.as_object_mut().unwrap().remove("up");
        }
        let mut ls = self.json(&["ls"]);
        for n in ls["nodes"].as_array_mut().unwrap() {
            let n = n.as_object_mut().unwrap();
            for volatile in ["pid", "started_ms", "exit", "warning", "accel"] {
                n.remove(volatile);
            }
            for nic in n["nics"].as_array_mut().unwrap() {
                nic.as_object_mut().unwrap().remove("up");
            }
            // A restored node's spec has its NICs' lans as they are now
            // (as `ulan save` writes them); `nics` above says the same.
            for nic in n["spec"]["nics"].as_array_mut().unwrap() {
                nic.as_object_mut().unwrap().remove("lan");
            }
        }
        serde_json::json!({ "ports": ports, "ls": ls })
    }

    fn wait_node(&self, node: &str, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let n = self.json(&["node", "show", node]);
            if n["state"] == state {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "{node} never {state}: {n}\n{}",
                self.log_text(self.starts)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A stand-in emulator: a UML node whose binary is a shell script
    /// that sleeps, so nodes come and go in a second without QEMU.
    fn stand_in(&self) -> (String, String) {
        let script = self.home().join("emulator");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let initrd = self.home().join("initrd");
        std::fs::write(&initrd, b"not really an initrd").unwrap();
        (script.display().to_string(), initrd.display().to_string())
    }
}

impl Drop for User {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn alive(pid: u64) -> bool {
    // Not a zombie either: a killed guest reaped by nobody shows as Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
}

fn empty_images() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ulan-no-images");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A lab of lans, ports of every kind and two stand-in nodes (one
/// stopped): after kill -9 and a restart, and after a clean stop and a
/// restart, `ulan ls` and `ulan port ls` are the same, the port sockets
/// take clients, the running node runs again (a new process), the stopped
/// one stays stopped. Then `ulan down`, and a new daemon has an empty lab.
#[test]
fn kill_9_then_restart_brings_back_the_same_lab() {
    let mut u = User::new("keep", empty_images());
    u.start();
    let (binary, initrd) = u.stand_in();
    let file = u.home().join("lab.yaml");
    std::fs::write(
        &file,
        format!(
            "lans: [a, b, c]\n\
             nodes:\n\
             - {{name: n1, kind: uml, binary: {binary}, initrd: {initrd}, nics: [{{lan: a, transport: vde}}, {{lan: b}}]}}\n\
             - {{name: n2, kind: uml, binary: {binary}, initrd: {initrd}, nics: [{{lan: c}}]}}\n\
             ports:\n\
             - {{name: p1, kind: stream, lan: a}}\n\
             - {{name: p2, kind: dgram, lan: b}}\n\
             - {{name: p3, kind: vde, lan: a}}\n\
             - {{name: p4, kind: bess}}\n"
        ),
    )
    .unwrap();
    u.ok(&["up", file.to_str().unwrap()]);
    // Changes after `up`, through the API: a move, a stop, a NIC move.
    u.ok(&["port", "move", "p2", "c"]);
    u.ok(&["port", "move", "n1.eth1", "c"]);
    u.ok(&["node", "stop", "n2"]);
    u.wait_node("n1", "running", WAIT);
    let pid1 = u.json(&["node", "show", "n1"])["pid"].as_u64().unwrap();
    let before = u.lab_view();
    assert_eq!(before["ls"]["nodes"].as_array().unwrap().len(), 2);
    assert!(u.state_file().is_file());

    u.kill9();
    // The guest died with its daemon.
    let deadline = Instant::now() + WAIT;
    while alive(pid1) {
        assert!(Instant::now() < deadline, "the guest outlived its daemon");
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = u.start();
    let restored = u.wait_node("n1", "running", WAIT);
    assert_ne!(restored["pid"].as_u64(), Some(pid1));
    assert_eq!(u.lab_view(), before, "log:\n{}", u.log_text(n));
    assert!(u.log_text(n).contains("lab restored"), "{}", u.log_text(n));
    // The ports are really there: a client connects to each socket.
    for p in ["p1", "p4"] {
        let ports = u.json(&["port", "ls"]);
        let path = ports
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == p)
            .unwrap()["path"]
            .as_str()
            .unwrap()
            .to_string();
        let ty = if p == "p1" {
            libc::SOCK_STREAM
        } else {
            libc::SOCK_SEQPACKET
        };
        let fd = ulan::ports::sys::unix_socket(ty).unwrap();
        let r = ulan::ports::sys::connect(
            &fd,
            &ulan::ports::sys::UnixAddr::from_path(Path::new(&path)).unwrap(),
        );
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.raw_os_error() == Some(libc::EINPROGRESS)),
            "{p}: {r:?}"
        );
    }

    // A clean stop keeps the lab too (and does not save its guests as
    // stopped just because the daemon stopped them).
    u.stop();
    u.start();
    u.wait_node("n1", "running", WAIT);
    assert_eq!(u.lab_view(), before);

    // Only down forgets.
    u.down();
    assert!(!u.state_file().exists());
    u.start();
    let ls = u.json(&["ls"]);
    assert_eq!(ls["nodes"], serde_json::json!([]));
    assert_eq!(ls["lans"], serde_json::json!([]));
    assert_eq!(u.json(&["port", "ls"]), serde_json::json!([]));
    u.stop();
}

/// Link state and impairments of plain ports and of NICs are part of
/// the saved lab: a kill -9 and a restart bring them back, including a
/// change made through the API after `up`.
#[test]
fn kill_9_then_restart_keeps_link_state_and_impairments() {
    let mut u = User::new("links", empty_images());
    u.start();
    let (binary, initrd) = u.stand_in();
    let file = u.home().join("lab.yaml");
    std::fs::write(
        &file,
        format!(
            "lans: [a]\n\
             nodes:\n\
             - {{name: n1, kind: uml, binary: {binary}, initrd: {initrd}, nics: [{{lan: a, link: down, impairments: {{ingress: {{delay_ms: 5}}}}}}]}}\n\
             ports:\n\
             - {{name: p1, kind: stream, lan: a, link: down}}\n\
             - {{name: p2, kind: dgram, lan: a, impairments: {{egress: {{loss_pct: 2.5, rate_kbps: 800}}}}}}\n"
        ),
    )
    .unwrap();
    u.ok(&["up", file.to_str().unwrap()]);
    u.ok(&["link", "p2", "down"]);
    let before = u.ok(&["save"]);
    assert_eq!(before.matches("link: down").count(), 3, "{before}");
    assert!(before.contains("delay_ms: 5"), "{before}");
    assert!(before.contains("loss_pct: 2.5"), "{before}");
    u.kill9();
    let n = u.start();
    let after = u.ok(&["save"]);
    assert_eq!(after, before, "log:\n{}", u.log_text(n));
    let ports = u.json(&["port", "ls"]);
    let port = |name: &str| {
        ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone()
    };
    for (name, link, impaired) in [
        ("p1", "down", false),
        ("p2", "down", true),
        ("n1.eth0", "down", true),
    ] {
        assert_eq!(port(name)["link"], link, "{name}");
        assert_eq!(port(name)["impaired"], impaired, "{name}");
    }
    u.down();
}

/// A truncated and a garbage state file: each is moved aside (kept, with
/// a log line naming where), the daemon starts with an empty lab and
/// saves anew. A lab whose daemon died is forgotten by `ulan down`.
#[test]
fn a_corrupt_state_file_is_set_aside_and_the_daemon_starts() {
    let mut u = User::new("corrupt", empty_images());
    let data = u.state_file().parent().unwrap().to_path_buf();
    let aside = |data: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(data)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().contains(".corrupt-"))
            .collect();
        v.sort();
        v
    };
    for (case, mangle) in [
        (
            "truncated",
            &(|b: &[u8]| b[..b.len() / 2].to_vec()) as &dyn Fn(&[u8]) -> Vec<u8>,
        ),
        ("garbage", &|b: &[u8]| {
            b.iter()
                .enumerate()
                .map(|(i, _)| (i * 7919 % 251) as u8)
                .collect()
        }),
        ("empty", &|_: &[u8]| Vec::new()),
    ] {
        u.start();
        u.ok(&["lan", "add", "x"]);
        u.ok(&["port", "add", "p", "--kind", "stream", "--lan", "x"]);
        u.kill9();
        let good = std::fs::read(u.state_file()).unwrap();
        let bad = mangle(&good);
        std::fs::write(u.state_file(), &bad).unwrap();
        let before = aside(&data);
        let n = u.start();
        assert_eq!(u.json(&["lan", "ls"]), serde_json::json!([]), "{case}");
        assert_eq!(u.json(&["port", "ls"]), serde_json::json!([]), "{case}");
        let after = aside(&data);
        assert_eq!(after.len(), before.len() + 1, "{case}: not set aside");
        let kept = after.iter().find(|p| !before.contains(p)).unwrap();
        assert_eq!(std::fs::read(kept).unwrap(), bad, "{case}");
        let log = u.log_text(n);
        assert!(
            log.contains("corrupt") && log.contains(&kept.display().to_string()),
            "{case}: no clear log line:\n{log}"
        );
        assert!(
            !u.state_file().exists(),
            "{case}: an empty lab has no state"
        );
        // The next change is saved again.
        u.ok(&["lan", "add", "again"]);
        assert!(u.state_file().is_file(), "{case}");
        u.ok(&["lan", "rm", "again"]);
        u.stop();
    }

    // Killed, then `ulan down` without a daemon: forgotten.
    u.start();
    u.ok(&["lan", "add", "y"]);
    u.kill9();
    assert!(u.state_file().is_file());
    let out = u.ok(&["down"]);
    assert!(out.contains("forgotten"), "{out}");
    assert!(!u.state_file().exists());
    u.start();
    assert_eq!(u.json(&["lan", "ls"]), serde_json::json!([]));
    u.stop();
}

/// Two real guests pinging; kill -9 of the daemon kills them; the restart
/// brings them back from their specs, the ping works again and `ulan ls`
/// shows the same lab.
#[test]
fn kill_9_with_two_guests_pinging_then_restart() {
    if common::guests::skip_without_guests("kill_9_with_two_guests_pinging_then_restart") {
        return;
    }
    let mut u = User::new("guests", common::guests::test_store());
    u.start();
    let file = u.home().join("pair.yaml");
    std::fs::write(
        &file,
        "lans: [l]\n\
         nodes:\n\
         - {name: h1, accel: tcg, memory_mb: 192, nics: [{lan: l, ip: 10.0.0.1/24}]}\n\
         - {name: h2, accel: tcg, memory_mb: 192, nics: [{lan: l, ip: 10.0.0.2/24, transport: dgram}]}\n",
    )
    .unwrap();
    u.ok(&["up", file.to_str().unwrap()]);
    let boot = common::guests::BOOT;
    u.wait_node("h1", "running", boot);
    u.wait_node("h2", "running", boot);
    let ping = |u: &User| {
        (0..5).any(|_| {
            u.ulan(&["exec", "h1", "--", "ping", "-c", "1", "-W", "2", "10.0.0.2"])
                .status
                .success()
        })
    };
    assert!(ping(&u), "no ping before the restart");
    let pids: Vec<u64> = ["h1", "h2"]
        .iter()
        .map(|n| u.json(&["node", "show", n])["pid"].as_u64().unwrap())
        .collect();
    let before = u.lab_view();

    u.kill9();
    let deadline = Instant::now() + WAIT;
    while pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "a guest outlived its daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = u.start();
    u.wait_node("h1", "running", boot);
    u.wait_node("h2", "running", boot);
    assert_eq!(u.lab_view(), before, "log:\n{}", u.log_text(n));
    assert!(ping(&u), "no ping after the restart");
    u.down();
}

/// A node that cannot come back (its emulator is gone) is named in the
/// log and the state it was in is kept as `lab-state.json.unrestored`;
/// the rest of the lab comes back.
#[test]
fn what_cannot_be_restored_is_logged_and_kept() {
    let mut u = User::new("partial", empty_images());
    u.start();
    let (binary, initrd) = u.stand_in();
    let file = u.home().join("lab.yaml");
    std::fs::write(
        &file,
        format!(
            "lans: [a]\n\
             nodes:\n\
             - {{name: n1, kind: uml, binary: {binary}, initrd: {initrd}, nics: [{{lan: a}}]}}\n\
             ports:\n\
             - {{name: p1, kind: stream, lan: a}}\n"
        ),
    )
    .unwrap();
    u.ok(&["up", file.to_str().unwrap()]);
    u.kill9();
    std::fs::remove_file(&binary).unwrap();
    let n = u.start();
    let log = u.log_text(n);
    assert!(log.contains("could not restore node n1"), "{log}");
    let kept = std::fs::read_to_string(u.state_file().with_extension("json.unrestored")).unwrap();
    assert!(kept.contains("\"n1\""), "{kept}");
    let ls = u.json(&["ls"]);
    assert_eq!(ls["nodes"], serde_json::json!([]));
    assert_eq!(ls["lans"][0]["name"], "a");
    assert_eq!(u.json(&["port", "ls"])[0]["name"], "p1");
    u.down();
}
