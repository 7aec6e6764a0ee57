//! Real QEMU guests (TCG) of the built-in image on ulan lans.
//!
//! One test per scenario, each with its own lab. Guests boot in parallel;
//! the tests talk to them only through the exec agent, never by sleeping
//! and grepping consoles.

mod common;

use std::time::{Duration, Instant};

use common::guests::*;
use ulan::events::Event;
use ulan::lab::LabError;
use ulan::vmlaunch::node::{NodeError, NodeState};
use ulan::vmlaunch::spec::Transport;

fn with_ip(
    mut spec: ulan::vmlaunch::spec::NodeSpec,
    ips: &[&str],
) -> ulan::vmlaunch::spec::NodeSpec {
    for (nic, ip) in spec.nics.iter_mut().zip(ips) {
        nic.ip = vec![ip.parse().unwrap()];
    }
    spec
}

/// Two guests per transport, each pair on its own lan: they ping each
/// other through the switch. On the stream pair: moving one NIC to another
/// lan stops the ping, moving it back restores it; iperf3 completes.
#[test]
fn two_guests_ping_over_every_transport_and_a_move_cuts_them_apart() {
    if skip_without_guests("two_guests_ping_over_every_transport") {
        return;
    }
    let g = GuestLab::new("pairs");
    let transports = [Transport::Stream, Transport::Dgram, Transport::Vde];
    let mut names = Vec::new();
    for (i, t) in transports.iter().enumerate() {
        let lan = format!("l{}", t.as_str());
        g.lab.add_lan(&lan).unwrap();
        for h in 1..=2 {
            let name = format!("{}{h}", t.as_str());
            let mut spec = with_ip(
                GuestLab::spec(&name, &[&lan]),
                &[&format!("10.{i}.0.{h}/24")],
            );
            spec.nics[0].transport = Some(*t);
            g.add(spec);
            names.push(name);
        }
    }
    g.lab.add_lan("elsewhere").unwrap();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    g.wait_running(&refs);

    for (i, t) in transports.iter().enumerate() {
        let a = format!("{}1", t.as_str());
        assert!(
            g.ping(&a, &format!("10.{i}.0.2"), 5),
            "{t}: {a} cannot ping its peer\n{}",
            g.console_tail(&a)
        );
        let port = g.lab.port(&format!("{}2.eth0", t.as_str())).unwrap();
        assert!(port.up, "{t}: the guest's port is not up");
        let stats = g.lab.port_stats(&port.name).unwrap().counters;
        assert!(stats.rx_frames > 0 && stats.tx_frames > 0, "{t}: {stats:?}");
    }

    // Separate lans: the pairs never see each other.
    assert!(!g.ping("stream1", "10.1.0.2", 1));

    // Move stream2's NIC away: the ping stops. Back: it works again.
    g.lab.move_port("stream2.eth0", Some("elsewhere")).unwrap();
    assert!(!g.ping("stream1", "10.0.0.2", 2), "ping crossed lans");
    g.lab.move_port("stream2.eth0", Some("lstream")).unwrap();
    assert!(g.ping("stream1", "10.0.0.2", 5), "ping did not come back");
    let info = g.lab.node("stream2").unwrap();
    assert_eq!(info.nics[0].lan.as_deref(), Some("lstream"));

    // iperf3 between the dgram pair completes and moves data.
    let server = g.exec("dgram2", &["iperf3", "-s", "-D", "-1"]);
    assert_eq!(server.exit_code, 0, "{server:?}");
    std::thread::sleep(Duration::from_millis(500));
    let client = g.exec("dgram1", &["iperf3", "-c", "10.1.0.2", "-t", "2", "-J"]);
    assert_eq!(client.exit_code, 0, "{client:?}");
    let report: serde_json::Value = serde_json::from_str(&client.stdout).unwrap();
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    assert!(bps > 1e6, "iperf3 moved only {bps} bit/s");
    eprintln!("iperf3 dgram pair through ulan: {:.0} Mbit/s", bps / 1e6);
}

/// Killing a guest marks it crashed, its port goes down, an event says
/// so, and the others keep talking. Stop and start bring it back.
#[test]
fn a_killed_guest_is_crashed_and_the_rest_keep_working() {
    if skip_without_guests("a_killed_guest_is_crashed") {
        return;
    }
    let g = GuestLab::new("crash");
    g.lab.add_lan("l").unwrap();
    for (n, ip) in [
        ("a", "10.5.0.1/24"),
        ("b", "10.5.0.2/24"),
        ("c", "10.5.0.3/24"),
    ] {
        let mut spec = with_ip(GuestLab::spec(n, &["l"]), &[ip]);
        if n == "a" {
            // `auto`: the real KVM probe decides, and says why on fallback.
            spec.accel = ulan::vmlaunch::spec::Accel::Auto;
        }
        g.add(spec);
    }
    g.wait_running(&["a", "b", "c"]);
    let a = g.lab.node("a").unwrap();
    match a.accel {
        Some("tcg") => assert!(
            a.warning.as_deref().is_some_and(|w| w.contains("TCG")),
            "a TCG fallback must say why: {a:?}"
        ),
        Some("kvm") => assert!(a.warning.is_none(), "{a:?}"),
        other => panic!("accel {other:?}"),
    }
    assert!(
        g.lab.node("b").unwrap().warning.is_none(),
        "tcg was asked for"
    );
    let mut events = g.lab.events().subscribe();
    let pid = g.lab.node("c").unwrap().pid.unwrap();
    // SAFETY: kill(2) on the guest we started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.state("c") != NodeState::Crashed {
        assert!(Instant::now() < deadline, "c never became crashed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = g.lab.node("c").unwrap();
    assert!(
        info.exit.as_deref().unwrap_or("").contains("signal 9"),
        "{info:?}"
    );
    assert!(info.pid.is_none());
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.lab.port("c.eth0").unwrap().up {
        assert!(Instant::now() < deadline, "c's port stayed up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut saw_crash = false;
    while let Ok(rec) = events.try_recv() {
        if let Event::NodeState { node, state, .. } = &rec.event {
            saw_crash |= node == "c" && *state == "crashed";
        }
    }
    assert!(saw_crash, "no node_state crashed event");
    assert!(g.ping("a", "10.5.0.2", 3), "a and b stopped talking");

    // Start it again: same ports, same MAC, pingable.
    g.rt.block_on(g.lab.start_node("c")).unwrap();
    g.wait_running(&["c"]);
    assert!(g.ping("a", "10.5.0.3", 5), "c did not come back");

    // A graceful stop ends in `stopped`, not `crashed`.
    let info =
        g.rt.block_on(g.lab.stop_node("b", Some(Duration::from_secs(5))))
            .unwrap();
    assert_eq!(info.state, NodeState::Stopped, "{info:?}");
    let err =
        g.rt.block_on(
            g.lab
                .exec_node("b", &["true".into()], Duration::from_secs(5)),
        )
        .unwrap_err();
    assert!(
        matches!(err, LabError::Node(NodeError::Busy { .. })),
        "{err}"
    );
}

/// Bad node requests get a clear error and leave nothing behind.
#[test]
fn bad_node_requests_leave_nothing_half_made() {
    if skip_without_guests("bad_node_requests") {
        return;
    }
    let g = GuestLab::new("bad");
    g.lab.add_lan("l").unwrap();
    let before_ports = g.lab.ports().len();
    let cases: Vec<(ulan::vmlaunch::spec::NodeSpec, &str)> = vec![
        (
            {
                let mut s = GuestLab::spec("x1", &["l"]);
                s.image = Some("no-such-image".into());
                s
            },
            "no-such-image",
        ),
        (
            {
                let mut s = GuestLab::spec("x2", &["l"]);
                s.kernel = Some("/nonexistent/vmlinuz".into());
                s
            },
            "/nonexistent/vmlinuz",
        ),
        (
            {
                let mut s = GuestLab::spec("x3", &["l"]);
                s.memory_mb = 3;
                s
            },
            "memory_mb",
        ),
        (GuestLab::spec("x4", &["l", "nolan"]), "nolan"),
        (
            {
                let mut s = GuestLab::spec("x5", &["l"]);
                s.binary = Some("/nonexistent/qemu".into());
                s
            },
            "/nonexistent/qemu",
        ),
    ];
    for (spec, want) in cases {
        let name = spec.name.clone();
        let err = g.rt.block_on(g.lab.add_node(spec)).unwrap_err();
        let api = ulan::api::error::ApiError::from(&err);
        assert!(
            (400..500).contains(&api.status.as_u16()),
            "{name}: {err} -> {api}"
        );
        assert!(err.to_string().contains(want), "{name}: {err}");
        assert!(g.lab.node(&name).is_err(), "{name} was left behind");
        assert_eq!(g.lab.ports().len(), before_ports, "{name} left ports");
        assert!(!g.lab.run_dir().join("nodes").join(&name).exists());
    }
    // A duplicate name is refused and the first node is untouched.
    g.add(GuestLab::spec("dup", &["l"]));
    let err =
        g.rt.block_on(g.lab.add_node(GuestLab::spec("dup", &["l"])))
            .unwrap_err();
    assert_eq!(ulan::api::error::ApiError::from(&err).status.as_u16(), 409);
    g.wait_running(&["dup"]);
    assert_eq!(g.exec("dup", &["hostname"]).stdout.trim(), "dup");
}

/// A UML node of the built-in image (its initrd as root) with one NIC per
/// UML transport, each on its own lan with a QEMU guest's NIC: the QEMU
/// guest pings UML over `daemon`, `vde` and `bess`. UML does not run on
/// every host (AVX-512/AMX CPUs break its ptrace FP handling): then this
/// skips, loudly, even under CI.
#[test]
fn a_uml_node_talks_over_daemon_vde_and_bess() {
    use std::path::Path;
    use ulan::vmlaunch::spec::NodeKind;
    use ulan::vmlaunch::uml::{self, UmlStatus};
    if skip_without_guests("a_uml_node_talks") {
        return;
    }
    match uml::probe_uml(
        Path::new(uml::DEFAULT_UML_BINARY),
        uml::DEFAULT_PROBE_TIMEOUT,
    ) {
        UmlStatus::Boots => {}
        UmlStatus::Fails { reason } => {
            ulan::testkit::skipped(format_args!(
                "a_uml_node_talks_over_daemon_vde_and_bess: {reason}"
            ));
            return;
        }
        UmlStatus::Missing => {
            assert!(
                std::env::var_os("CI").is_none(),
                "linux.uml missing under CI"
            );
            ulan::testkit::skipped(format_args!("a_uml_node_talks: linux.uml is not installed"));
            return;
        }
    }
    let g = GuestLab::new("uml");
    let lans = ["ld", "lv", "lb"];
    for l in lans {
        g.lab.add_lan(l).unwrap();
    }
    let mut u = with_ip(
        GuestLab::spec("u1", &lans),
        &["10.7.1.2/24", "10.7.2.2/24", "10.7.3.2/24"],
    );
    u.kind = NodeKind::Uml;
    u.memory_mb = 128;
    for (nic, t) in u
        .nics
        .iter_mut()
        .zip([Transport::Daemon, Transport::Vde, Transport::Bess])
    {
        nic.transport = Some(t);
    }
    g.add(u);
    g.add(with_ip(
        GuestLab::spec("q1", &lans),
        &["10.7.1.1/24", "10.7.2.1/24", "10.7.3.1/24"],
    ));
    g.wait_running(&["u1", "q1"]);
    for (i, t) in ["daemon", "vde", "bess"].iter().enumerate() {
        let ip = format!("10.7.{}.2", i + 1);
        assert!(
            g.ping("q1", &ip, 10),
            "QEMU cannot ping UML over {t} ({ip})\n{}",
            g.console_tail("u1")
        );
        assert!(
            g.lab.port(&format!("u1.eth{i}")).unwrap().up,
            "{t} port down"
        );
    }
    // The console socket reaches UML's console: a command typed there runs.
    {
        use std::io::{Read, Write};
        let info = g.lab.node("u1").unwrap();
        let mut c = std::os::unix::net::UnixStream::connect(&info.console).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("uml-42") {
            assert!(
                Instant::now() < deadline,
                "no answer on the UML console: {}",
                String::from_utf8_lossy(&seen)
            );
            c.write_all(b"echo uml-$((6*7))\n").unwrap();
            if let Ok(n) = c.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
            }
        }
    }
    // No agent in a UML guest: a clear 409-class error, not a hang.
    let err =
        g.rt.block_on(
            g.lab
                .exec_node("u1", &["true".into()], Duration::from_secs(5)),
        )
        .unwrap_err();
    assert!(
        matches!(err, LabError::Node(NodeError::NoAgent(_))),
        "{err}"
    );
    let info =
        g.rt.block_on(g.lab.stop_node("u1", Some(Duration::from_secs(3))))
            .unwrap();
    assert_eq!(info.state, NodeState::Stopped);
}

/// Disks: nodes run on qcow2 overlays over a base that is never written;
/// a persistent overlay survives stop/start, a plain one is fresh at each
/// start; `commit` makes a stopped node's disk a new image that boots with
/// the data in it.
#[test]
fn overlays_persist_or_not_and_commit_makes_a_new_image() {
    use ulan::vmlaunch::image::{self, ImageStore};
    if skip_without_guests("overlays_and_commit") {
        return;
    }
    let g = GuestLab::new("disks");
    let store = ImageStore::open(&g.lab.node_config().images_dir);
    let builtin = store.get(image::BUILTIN).unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let tag = format!("{}-{nanos}", std::process::id());
    let (base_name, new_name) = (format!("t-base-{tag}"), format!("t-commit-{tag}"));
    let base = store
        .add_disk(&base_name, "test base", Some(&builtin), |p| {
            let ok = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(p)
                .arg("16M")
                .status()
                .unwrap()
                .success();
            assert!(ok, "qemu-img create");
            Ok(())
        })
        .unwrap();
    let base_bytes = std::fs::read(base.disk_path().unwrap()).unwrap();

    let disk_node = |name: &str, persistent: bool| {
        let mut s = GuestLab::spec(name, &[]);
        s.image = Some(base_name.clone());
        s.persistent = persistent;
        s
    };
    g.add(disk_node("keep", true));
    g.add(disk_node("fresh", false));
    g.wait_running(&["keep", "fresh"]);
    for n in ["keep", "fresh"] {
        let w = g.exec(n, &["sh", "-c", "printf persist-me > /dev/vda && sync"]);
        assert_eq!(w.exit_code, 0, "{n}: {w:?}");
    }
    let read = |n: &str| g.exec(n, &["head", "-c", "10", "/dev/vda"]).stdout;
    for n in ["keep", "fresh"] {
        g.rt.block_on(g.lab.stop_node(n, None)).unwrap();
        g.rt.block_on(g.lab.start_node(n)).unwrap();
    }
    g.wait_running(&["keep", "fresh"]);
    assert_eq!(read("keep"), "persist-me");
    assert_eq!(read("fresh"), "\0".repeat(10));
    assert_eq!(
        std::fs::read(base.disk_path().unwrap()).unwrap(),
        base_bytes,
        "the base image was written"
    );

    // Commit wants a stopped node, then makes an image with the data.
    let err =
        g.rt.block_on(g.lab.commit_node("keep", &new_name))
            .unwrap_err();
    assert!(
        matches!(err, LabError::Node(NodeError::Busy { .. })),
        "{err}"
    );
    g.rt.block_on(g.lab.stop_node("keep", None)).unwrap();
    let img = g.rt.block_on(g.lab.commit_node("keep", &new_name)).unwrap();
    assert!(img.manifest.agent && img.kernel_path().is_some());
    let mut s = GuestLab::spec("child", &[]);
    s.image = Some(new_name.clone());
    g.add(s);
    g.wait_running(&["child"]);
    assert_eq!(read("child"), "persist-me");
    // A name that exists is refused.
    let err =
        g.rt.block_on(g.lab.commit_node("keep", &new_name))
            .unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");

    drop(g);
    let _ = std::fs::remove_dir_all(store.dir().join(&base_name));
    let _ = std::fs::remove_dir_all(store.dir().join(&new_name));
}

/// Direct kernel boot: a node given its own kernel, initrd and command
/// line boots them (no agent: ulan does not assume what runs inside), and
/// the user's extra QEMU arguments reach QEMU last (a second `-name`
/// overrides ulan's, which QMP reports).
#[test]
fn direct_kernel_boot_with_user_arguments() {
    use ulan::vmlaunch::image::{self, ImageStore};
    use ulan::vmlaunch::qemu::qmp::Qmp;
    if skip_without_guests("direct_kernel_boot") {
        return;
    }
    let g = GuestLab::new("direct");
    g.lab.add_lan("l").unwrap();
    let builtin = ImageStore::open(&g.lab.node_config().images_dir)
        .get(image::BUILTIN)
        .unwrap();
    let mut d = GuestLab::spec("direct", &["l"]);
    d.kernel = Some(builtin.kernel_path().unwrap().display().to_string());
    d.initrd = Some(builtin.initrd_path().unwrap().display().to_string());
    d.nics[0].mac = Some("02:00:00:00:aa:01".parse().unwrap());
    d.append = Some("ulan.ip=02:00:00:00:aa:01,10.8.0.2/24 ulan.hostname=direct".into());
    d.extra_args = vec!["-name".into(), "guest=user-named".into()];
    g.add(d);
    g.add(with_ip(GuestLab::spec("peer", &["l"]), &["10.8.0.1/24"]));
    g.wait_running(&["direct", "peer"]);
    let info = g.lab.node("direct").unwrap();
    assert!(!info.agent);
    assert!(
        g.ping("peer", "10.8.0.2", 15),
        "the directly booted guest never answered\n{}",
        g.console_tail("direct")
    );
    let err =
        g.rt.block_on(
            g.lab
                .exec_node("direct", &["true".into()], Duration::from_secs(5)),
        )
        .unwrap_err();
    assert!(
        matches!(err, LabError::Node(NodeError::NoAgent(_))),
        "{err}"
    );
    let qmp = g.lab.run_dir().join("nodes/direct/qmp.sock");
    let name = g.rt.block_on(async {
        let mut q = Qmp::connect(&qmp, Duration::from_secs(5)).await.unwrap();
        q.execute("query-name").await.unwrap()
    });
    assert_eq!(name["name"], "user-named");
}
