//! Node lifecycle edge cases with a stand-in emulator (a shell script given
//! as the node's `binary`), so they run in a second and need no QEMU:
//! concurrent removes, a crash explained by its own run's log, a client
//! that hangs up during a stop, UML helper processes that outlive their
//! leader.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use ulan::api;
use ulan::events::Event;
use ulan::lab::{Lab, LabConfig, LabError};
use ulan::vmlaunch::node::{NodeInfo, NodeState};
use ulan::vmlaunch::spec::NodeSpec;

const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    dir: tempfile::TempDir,
    lab: Arc<Lab>,
}

impl Fixture {
    fn new(stop_grace: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let mut config = LabConfig::new("t", &run);
        config.nodes.images_dir = dir.path().join("images");
        config.nodes.data_dir = dir.path().join("data");
        config.nodes.stop_grace = stop_grace;
        let lab = Lab::start(config).unwrap();
        Fixture { dir, lab }
    }

    /// A stand-in UML binary: `body` is its shell script. A UML node with
    /// an initrd of its own does not need the built-in image.
    fn uml_node(&self, name: &str, body: &str) -> NodeSpec {
        let script = self.dir.path().join(format!("{name}-emulator"));
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let initrd = self.dir.path().join("initrd");
        std::fs::write(&initrd, b"not really an initrd").unwrap();
        serde_json::from_value(serde_json::json!({
            "name": name,
            "kind": "uml",
            "binary": script.display().to_string(),
            "initrd": initrd.display().to_string(),
        }))
        .unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The API on `api.sock` in the fixture's directory: its path, the
    /// stop switch and the server task.
    fn serve(&self) -> (PathBuf, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let sock = self.path("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (stop, rx) = watch::channel(false);
        let server = tokio::spawn(api::serve(listener, self.lab.clone(), rx));
        (sock, stop, server)
    }
}

/// The node events received so far, as "added n1", "running n1", ...
fn node_events(
    rx: &mut tokio::sync::broadcast::Receiver<ulan::events::EventRecord>,
) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(rec) = rx.try_recv() {
        match rec.event {
            Event::NodeAdded { node } => seen.push(format!("added {node}")),
            Event::NodeState { node, state, .. } => seen.push(format!("{state} {node}")),
            Event::NodeRemoved { node } => seen.push(format!("removed {node}")),
            _ => {}
        }
    }
    seen
}

async fn wait_for_state(lab: &Lab, node: &str, want: NodeState) -> NodeInfo {
    let deadline = Instant::now() + WAIT;
    loop {
        let info = lab.node(node).unwrap();
        if info.state == want {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} never got to {want:?}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_removes_of_one_node_remove_it_once() {
    let f = Fixture::new(Duration::from_secs(1));
    let mut events = f.lab.events().subscribe();
    f.lab
        .add_node(f.uml_node("n1", "exec sleep 600"))
        .await
        .unwrap();
    let (a, b) = tokio::join!(f.lab.remove_node("n1"), f.lab.remove_node("n1"));
    let results = [a, b];
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let not_found = results
        .iter()
        .filter(|r| matches!(r, Err(LabError::NotFound { .. })))
        .count();
    assert_eq!(
        (ok, not_found),
        (1, 1),
        "one remove succeeds, the other finds nothing: {results:?}"
    );
    let mut removed = 0;
    while let Ok(rec) = events.try_recv() {
        if matches!(&rec.event, Event::NodeRemoved { node } if node == "n1") {
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "exactly one node_removed event");
    assert!(f.lab.node("n1").is_err());
    assert!(
        f.lab.ports().is_empty(),
        "no port left: {:?}",
        f.lab.ports()
    );
    // The name is free again.
    f.lab
        .add_node(f.uml_node("n1", "exec sleep 600"))
        .await
        .unwrap();
    f.lab.remove_node("n1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_is_explained_by_its_own_run() {
    let f = Fixture::new(Duration::from_secs(1));
    let count = f.path("count");
    let pidfile = f.path("pid");
    // Run 1 says why it fails and exits 1; run 2 says nothing and waits to
    // be killed.
    let body = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); echo $((n+1)) > {c}\n\
         if [ \"$n\" = 0 ]; then echo 'run one: no such device' >&2; exit 1; fi\n\
         echo $$ > {p}; exec sleep 600",
        c = count.display(),
        p = pidfile.display()
    );
    f.lab.add_node(f.uml_node("n1", &body)).await.unwrap();
    let info = wait_for_state(&f.lab, "n1", NodeState::Crashed).await;
    let first = info.exit.clone().unwrap_or_default();
    assert!(
        first.contains("run one: no such device"),
        "run 1's reason: {first}"
    );

    f.lab.start_node("n1").await.unwrap();
    let deadline = Instant::now() + WAIT;
    let pid: i32 = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        assert!(Instant::now() < deadline, "run 2 never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // SAFETY: kill(2) on the stand-in's own pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let info = wait_for_state(&f.lab, "n1", NodeState::Crashed).await;
    let second = info.exit.unwrap_or_default();
    assert!(second.contains("signal 9"), "run 2's reason: {second}");
    assert!(
        !second.contains("run one"),
        "run 2's reason must not quote run 1's log: {second}"
    );
    f.lab.remove_node("n1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn helpers_of_a_crashed_guest_do_not_outlive_it() {
    let f = Fixture::new(Duration::from_secs(1));
    let helper_pid = f.path("helper");
    // The leader starts a helper in its process group (as UML does), then
    // dies on its own.
    let body = format!(
        "sleep 600 & echo $! > {h}; sleep 0.3; exit 3",
        h = helper_pid.display()
    );
    f.lab.add_node(f.uml_node("n1", &body)).await.unwrap();
    wait_for_state(&f.lab, "n1", NodeState::Crashed).await;
    let pid: i32 = std::fs::read_to_string(&helper_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    // Once killed it may linger as a zombie until its new parent reaps it:
    // that counts as gone.
    while pid_alive(pid) && !is_zombie(pid) {
        assert!(Instant::now() < deadline, "helper {pid} outlived its guest");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.lab.remove_node("n1").await.unwrap();
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A client that sends a stop and hangs up at once: the stop still runs
/// to its end (it is not left `stopping` with the guest alive).
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_whose_client_hangs_up_still_finishes() {
    // Ignores SIGTERM: the stop waits out the grace, then kills.
    let f = Fixture::new(Duration::from_millis(1500));
    let (sock, stop_server, server) = f.serve();
    let ready = f.path("ready");
    let body = format!(
        "trap '' TERM; touch {r}; sleep 600 & wait",
        r = ready.display()
    );
    f.lab.add_node(f.uml_node("n1", &body)).await.unwrap();
    let pid = f.lab.node("n1").unwrap().pid.expect("a pid") as i32;
    // Not before the stand-in ignores SIGTERM.
    let deadline = Instant::now() + WAIT;
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the stand-in never got ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut conn = UnixStream::connect(&sock).await.unwrap();
    conn.write_all(b"POST /v1/nodes/n1/stop HTTP/1.1\r\nHost: ulan\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = f.lab.node("n1").unwrap();
    assert_eq!(
        info.state,
        NodeState::Stopping,
        "the stop is under way: {info:?}"
    );
    drop(conn); // hang up mid-stop

    let info = wait_for_state(&f.lab, "n1", NodeState::Stopped).await;
    assert!(info.pid.is_none(), "{info:?}");
    assert!(!pid_alive(pid) || is_zombie(pid), "guest {pid} still runs");

    // The API still answers, and the node can start again.
    let mut conn = UnixStream::connect(&sock).await.unwrap();
    conn.write_all(b"GET /v1/nodes/n1 HTTP/1.1\r\nHost: ulan\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"stopped\""), "{reply}");

    f.lab.remove_node("n1").await.unwrap();
    let _ = stop_server.send(true);
    let _ = tokio::time::timeout(WAIT, server).await;
}

/// A node's events come in order: added, then its states (its supervisor
/// sends those on its own); a node whose emulator cannot even start is
/// added and removed again, and the request fails.
#[tokio::test(flavor = "multi_thread")]
async fn node_events_come_in_order() {
    let f = Fixture::new(Duration::from_secs(1));
    let mut events = f.lab.events().subscribe();
    f.lab
        .add_node(f.uml_node("n1", "sleep 0.5; exit 3"))
        .await
        .unwrap();
    wait_for_state(&f.lab, "n1", NodeState::Crashed).await;
    let seen = node_events(&mut events);
    // No agent or monitor to wait for: running as soon as it runs.
    assert_eq!(
        seen,
        ["added n1", "starting n1", "running n1", "crashed n1"]
    );

    // An interpreter that is not there: the launch itself fails.
    let spec = f.uml_node("n2", "exit 0");
    let binary = PathBuf::from(spec.binary.clone().unwrap());
    std::fs::write(&binary, "#!/nonexistent/interpreter\n").unwrap();
    let err = f.lab.add_node(spec).await.unwrap_err();
    assert!(err.to_string().contains("n2-emulator"), "{err}");
    assert!(f.lab.node("n2").is_err(), "nothing left of n2");
    let seen = node_events(&mut events);
    assert_eq!(seen, ["added n2", "removed n2"]);
    f.lab.remove_node("n1").await.unwrap();
}

/// `ulan apply` replacing a node: a missing file in the new spec stops it
/// before the old node is touched, and a new spec that fails to launch
/// puts the old node back.
#[tokio::test(flavor = "multi_thread")]
async fn apply_keeps_a_node_whose_replacement_cannot_start() {
    let f = Fixture::new(Duration::from_secs(1));
    let (sock, stop_server, server) = f.serve();
    let client = api::Client::new(&sock, "t");
    let good = f.uml_node("n1", "exec sleep 600");
    let lab_with = |spec: &NodeSpec| ulan::labfile::LabFile {
        nodes: vec![spec.clone()],
        ..Default::default()
    };
    ulan::cli::labctl::apply_file(&client, &lab_with(&good), false)
        .await
        .unwrap();
    let pid = f.lab.node("n1").unwrap().pid.unwrap();

    // A memory change with an initrd that is not there.
    let mut typo = good.clone();
    typo.memory_mb = 512;
    typo.initrd = Some(f.path("no-such-initrd").display().to_string());
    let err = ulan::cli::labctl::apply_file(&client, &lab_with(&typo), false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a file"), "{err}");
    assert_eq!(f.lab.node("n1").unwrap().pid, Some(pid), "old node touched");

    // A memory change whose emulator cannot be launched.
    let mut broken = good.clone();
    broken.memory_mb = 512;
    let bad_binary = f.path("bad-emulator");
    std::fs::write(&bad_binary, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&bad_binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    broken.binary = Some(bad_binary.display().to_string());
    let err = ulan::cli::labctl::apply_file(&client, &lab_with(&broken), false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the old node is back"), "{err}");
    let back = f.lab.node("n1").unwrap();
    assert_eq!(back.spec.memory_mb, good.memory_mb, "{back:?}");
    assert!(
        matches!(back.state, NodeState::Starting | NodeState::Running),
        "{back:?}"
    );

    f.lab.remove_node("n1").await.unwrap();
    let _ = stop_server.send(true);
    let _ = tokio::time::timeout(WAIT, server).await;
}

/// An emulator told to end by someone else (QEMU exits 0 on SIGTERM and
/// logs it) is stopped, and the reason says it was no power-off.
#[tokio::test(flavor = "multi_thread")]
async fn an_emulator_ended_from_outside_is_not_a_power_off() {
    let f = Fixture::new(Duration::from_secs(1));
    let body = "sleep 0.3; echo 'qemu-system-x86_64: terminating on signal 15 from pid 4242 (kill)' >&2; exit 0";
    f.lab.add_node(f.uml_node("n1", body)).await.unwrap();
    let info = wait_for_state(&f.lab, "n1", NodeState::Stopped).await;
    let why = info.exit.unwrap_or_default();
    assert!(
        why.starts_with("ended from outside") && why.contains("signal 15"),
        "{why}"
    );
    // One that ends by itself, quietly, powered off.
    f.lab.remove_node("n1").await.unwrap();
    f.lab
        .add_node(f.uml_node("n1", "sleep 0.3; exit 0"))
        .await
        .unwrap();
    let info = wait_for_state(&f.lab, "n1", NodeState::Stopped).await;
    assert_eq!(info.exit.as_deref(), Some("the guest powered off"));
    f.lab.remove_node("n1").await.unwrap();
}
