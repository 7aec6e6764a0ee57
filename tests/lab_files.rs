//! The examples/ lab files, run the way a user runs them: the real `ulan`
//! binary, `ulan up FILE` (which starts the daemon), `exec`, `save`,
//! `apply`, `down`. Each test has its own runtime dir, so its daemon,
//! sockets and guests are its own.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::cli::CliUser;
use common::guests::{skip_without_guests, test_store};

/// Ten TCG guests are enough load for two cores: one lab at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct User(CliUser);

impl std::ops::Deref for User {
    type Target = CliUser;
    fn deref(&self) -> &CliUser {
        &self.0
    }
}

impl User {
    fn new(lab: &str) -> User {
        User(CliUser::new(lab).with_env("ULAN_IMAGES", test_store()))
    }

    fn pid_of(&self, node: &str) -> u64 {
        self.json(&["node", "show", node])["pid"].as_u64().unwrap()
    }

    fn ping(&self, from: &str, ip: &str) -> bool {
        (0..5).any(|_| {
            self.ulan(&["exec", from, "--", "ping", "-c", "1", "-W", "2", ip])
                .status
                .success()
        })
    }

    /// QEMU processes started for this user's labs.
    fn guests_left(&self) -> Vec<String> {
        let mark = self.run_dir().display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains("qemu-system") && c.contains(&mark))
            .collect()
    }

    fn sockets_left(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            use std::os::unix::fs::FileTypeExt;
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    walk(&e.path(), out);
                } else if t.is_socket() {
                    out.push(e.path());
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.run_dir(), &mut v);
        v
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = self.ulan(&["down"]);
    }
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn two_node_example_up_save_apply_down() {
    if skip_without_guests("two_node_example") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let u = User::new("pair");
    let out = u.ok(&["up", &example("two-node.yaml")]);
    assert!(out.contains("h1") && out.contains("running"), "{out}");
    assert!(u.ping("h1", "10.0.0.2"));

    // save gives a file that up/apply reproduces: applying it changes nothing.
    let saved = u.ok(&["save"]);
    let file = u.home().join("saved.yaml");
    std::fs::write(&file, &saved).unwrap();
    let (p1, p2) = (u.pid_of("h1"), u.pid_of("h2"));
    let out = u.ok(&["apply", file.to_str().unwrap()]);
    assert!(out.contains("already matches"), "{out}");
    assert_eq!((u.pid_of("h1"), u.pid_of("h2")), (p1, p2));

    // Only h2's NIC moves to a new lan: nobody restarts, the ping stops.
    let moved = saved.replace("- lan0\n", "- lan0\n- lan1\n");
    let idx = moved.rfind("lan: lan0").unwrap();
    let moved = format!(
        "{}lan: lan1{}",
        &moved[..idx],
        &moved[idx + "lan: lan0".len()..]
    );
    std::fs::write(&file, &moved).unwrap();
    let out = u.ulan(&["apply", file.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("+ lan lan1") && text.contains("~ node h2"),
        "{text}"
    );
    assert_eq!((u.pid_of("h1"), u.pid_of("h2")), (p1, p2));
    assert!(!u.ping("h1", "10.0.0.2"), "ping crossed lans");

    // A spec change (memory) restarts that node only.
    std::fs::write(
        &file,
        moved.replace("- name: h2\n", "- name: h2\n  memory_mb: 200\n"),
    )
    .unwrap();
    u.ok(&["apply", file.to_str().unwrap()]);
    assert_eq!(u.pid_of("h1"), p1);
    assert_ne!(u.pid_of("h2"), p2);

    let ls = u.ok(&["ls"]);
    assert!(ls.contains("lan1") && ls.contains("h2.eth0"), "{ls}");

    // Nodes one by one from the CLI; a node's NIC port is not removable alone.
    let out = u.ok(&[
        "node",
        "add",
        "h3",
        "--nic",
        "lan0,ip=10.0.0.3/24,transport=vde",
        "--memory",
        "160",
    ]);
    assert!(out.contains("node h3 running"), "{out}");
    assert!(u.ping("h1", "10.0.0.3"));
    let out = u.ulan(&["port", "rm", "h3.eth0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NIC of node"));
    let out = u.ok(&["node", "stop", "h3"]);
    assert!(out.contains("stopped"), "{out}");
    u.ok(&["node", "rm", "h3"]);
    let out = u.ulan(&["node", "show", "h3"]);
    assert!(!out.status.success());

    // down: no guest, no socket, no daemon left.
    u.ok(&["down"]);
    assert!(u.guests_left().is_empty(), "{:?}", u.guests_left());
    assert!(u.sockets_left().is_empty(), "{:?}", u.sockets_left());
    let out = u.ulan(&["ls"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ulan daemon"));
}

#[test]
fn router_example_forwards_between_its_lans() {
    if skip_without_guests("router_example") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let u = User::new("router");
    u.ok(&["up", &example("router.yaml")]);
    assert!(u.ping("h1", "10.0.2.10"), "h1 cannot reach h2 through r1");
    assert!(u.ping("h2", "10.0.1.10"), "h2 cannot reach h1 through r1");
    // The path really goes through r1: its forwarding counter moved.
    let fwd = u.json(&["exec", "r1", "--", "cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(fwd["stdout"].as_str().unwrap().trim(), "1");
    let route = u.json(&["exec", "h1", "--", "ip", "route"]);
    assert!(
        route["stdout"]
            .as_str()
            .unwrap()
            .contains("default via 10.0.1.1"),
        "{route}"
    );
    // The serial console, scripted: what is typed runs in the guest's shell.
    let mut console = u
        .cmd(&["console", "r1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = console.stdin.take().unwrap();
        stdin
            .write_all(b"\necho console-$((6*7))-$(hostname)\n")
            .unwrap();
    }
    let out = console.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("console-42-r1"), "console said: {text}");
    // Unplugging the router's right leg cuts the path.
    u.ok(&["port", "move", "r1.eth1", "--detach"]);
    assert!(!u.ping("h1", "10.0.2.10"));
    u.ok(&["port", "move", "r1.eth1", "right"]);
    assert!(u.ping("h1", "10.0.2.10"));
    u.ok(&["down"]);
    assert!(u.guests_left().is_empty());
}

#[test]
fn star10_example_boots_ten_guests_that_reach_each_other() {
    if skip_without_guests("star10_example") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let u = User::new("star");
    u.ok(&["up", &example("star10.yaml")]);
    let nodes = u.json(&["node", "ls"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 10);
    assert!(nodes.iter().all(|n| n["state"] == "running"), "{nodes:?}");
    for n in 2..=10 {
        assert!(u.ping("n1", &format!("10.0.0.{n}")), "n1 cannot reach n{n}");
    }
    assert!(u.ping("n10", "10.0.0.1"));
    u.ok(&["down"]);
    assert!(u.guests_left().is_empty());
}
