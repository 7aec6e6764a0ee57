//! The life of a vhost-user port with real QEMU frontends: a guest that
//! reboots, a QEMU that quits and comes back, and a daemon that dies and
//! restarts while QEMU (`reconnect=1`) waits for it. Each time the port
//! works again and nothing of the old guest memory stays mapped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guests::*;
use ulan::lab::{Lab, LabConfig};
use ulan::ports::PortKind;
use ulan::vmlaunch::agent;
use ulan::vmlaunch::qemu::{self, QemuBoot, QemuNic, QemuPaths};
use ulan::vmlaunch::spec::{NodeSpec, Transport};
use ulan::wire::MacAddr;

/// The tests count mappings of this whole process: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// QEMU guest RAM (memory-backend-memfd) mapped in this process: bytes
/// mapped per memfd (by inode). One QEMU's table may describe its RAM as
/// one region or several, and differently from one start to the next, so
/// the tests look at which memfds are mapped and how much of each.
fn guest_ram() -> std::collections::BTreeMap<u64, u64> {
    let mut out = std::collections::BTreeMap::new();
    for l in std::fs::read_to_string("/proc/self/maps").unwrap().lines() {
        if !l.contains("memfd:memory-backend-memfd") {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        let (a, b) = f[0].split_once('-').unwrap();
        let len = u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap();
        *out.entry(f[4].parse::<u64>().unwrap()).or_insert(0) += len;
    }
    out
}

/// Every memfd mapped at most once over: no mapping outlives its table.
fn assert_each_mapped_once(ram: &std::collections::BTreeMap<u64, u64>) {
    for (inode, bytes) in ram {
        assert!(
            *bytes <= 192 << 20,
            "memfd {inode}: {bytes} bytes mapped for a 192 MiB guest"
        );
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A QEMU the test runs itself (not a ulan node), so it outlives a lab.
struct Guest {
    child: Child,
    agent: PathBuf,
    dir: PathBuf,
}

impl Guest {
    fn start(dir: &Path, name: &str, mac: &str, ip: &str, port: &Path) -> Guest {
        let store = test_store();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut spec = NodeSpec::new(name, &["l"]);
        spec.memory_mb = 192;
        spec.nics[0].ip = vec![ip.parse().unwrap()];
        let mac: MacAddr = mac.parse().unwrap();
        let nics = [QemuNic {
            mac,
            transport: Transport::VhostUser,
            port_path: port.to_path_buf(),
            local_path: None,
        }];
        let paths = QemuPaths {
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.sock"),
            console_log: dir.join("console.log"),
            agent: Some(dir.join("agent.sock")),
        };
        let boot = QemuBoot {
            kernel: Some(store.join("builtin/vmlinuz")),
            initrd: Some(store.join("builtin/initrd.img")),
            cmdline: qemu::builtin_cmdline(&spec, &[mac]),
            disk: None,
        };
        let accel: Vec<String> = ["-accel", "tcg", "-cpu", "max"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let argv = qemu::qemu_args(&spec, &nics, &boot, &paths, &accel).unwrap();
        let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Guest {
            child,
            agent: paths.agent.unwrap(),
            dir,
        }
    }

    fn exec(&self, rt: &tokio::runtime::Runtime, argv: &[&str]) -> agent::ExecOutput {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        rt.block_on(agent::exec(&self.agent, &argv, Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("exec {argv:?}: {e}\n{}", self.log()))
    }

    fn wait_agent(&self, rt: &tokio::runtime::Runtime) {
        let deadline = tokio::time::Instant::now() + BOOT;
        rt.block_on(agent::wait_ready(&self.agent, deadline))
            .unwrap_or_else(|e| panic!("agent: {e}\n{}", self.log()));
    }

    fn ping(&self, rt: &tokio::runtime::Runtime, ip: &str) -> bool {
        (0..8).any(|_| self.exec(rt, &["ping", "-c", "1", "-W", "2", ip]).exit_code == 0)
    }

    fn log(&self) -> String {
        let q = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
        let c = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
        let c = String::from_utf8_lossy(&c[c.len().saturating_sub(1500)..]).to_string();
        format!("--- qemu.log ---\n{q}\n--- console tail ---\n{c}")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lab_with_ports(run: &Path) -> std::sync::Arc<Lab> {
    let lab = Lab::start(LabConfig::new("vulife", run)).unwrap();
    lab.add_lan("l").unwrap();
    lab.add_port("p1", PortKind::VhostUser, Some("l")).unwrap();
    lab.add_port("p2", PortKind::VhostUser, Some("l")).unwrap();
    lab
}

/// QEMU with `reconnect=1` waits for a killed daemon's ports to come
/// back: the restarted lab serves the same running guests, and the first
/// lab's mappings of their memory are gone.
#[test]
fn qemu_reconnects_to_a_restarted_daemon_and_old_memory_is_unmapped() {
    if skip_without_guests("qemu_reconnects_to_a_restarted_daemon") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("ulan-vl")
        .tempdir()
        .unwrap();
    let run = dir.path().join("run");
    assert!(guest_ram().is_empty(), "another guest's memory is mapped");
    let lab = lab_with_ports(&run);
    let ports = lab.ports_dir().to_path_buf();
    let g1 = Guest::start(
        dir.path(),
        "g1",
        "02:00:00:00:aa:01",
        "10.7.0.1/24",
        &ports.join("p1"),
    );
    let g2 = Guest::start(
        dir.path(),
        "g2",
        "02:00:00:00:aa:02",
        "10.7.0.2/24",
        &ports.join("p2"),
    );
    g1.wait_agent(&rt);
    g2.wait_agent(&rt);
    assert!(
        g1.ping(&rt, "10.7.0.2"),
        "no ping before the restart\n{}",
        g1.log()
    );
    let mapped = guest_ram();
    assert_eq!(mapped.len(), 2, "both guests' RAM is mapped: {mapped:?}");
    assert_each_mapped_once(&mapped);

    // The daemon dies: every port goes, the guests keep running.
    lab.shutdown();
    drop(lab);
    wait_for(
        "the old memory to be unmapped",
        Duration::from_secs(10),
        || guest_ram().is_empty(),
    );

    // A new daemon makes the same ports; QEMU reconnects on its own.
    let lab = lab_with_ports(&run);
    wait_for("both guests to reconnect", Duration::from_secs(30), || {
        lab.port("p1").unwrap().up && lab.port("p2").unwrap().up
    });
    assert!(
        g1.ping(&rt, "10.7.0.2"),
        "no ping after the restart\n{}",
        g1.log()
    );
    assert!(
        g2.ping(&rt, "10.7.0.1"),
        "no ping back after the restart\n{}",
        g2.log()
    );
    let c = lab.port_stats("p1").unwrap().counters;
    assert!(c.rx_frames > 0 && c.tx_frames > 0, "{c:?}");
    assert_eq!(c.protocol_errors, 0, "{c:?}");
    // The same two guests' memory, each mapped once.
    let now = guest_ram();
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        mapped.keys().collect::<Vec<_>>()
    );
    assert_each_mapped_once(&now);
    lab.shutdown();
}

/// A ulan node on vhost-user: its guest reboots (a virtio reset: rings
/// stopped with GET_VRING_BASE and set up again) and is stopped and
/// started (QEMU quits and a new one connects); the ping comes back each
/// time and only the live QEMU's memory is mapped.
#[test]
fn a_vhost_user_guest_reboots_and_restarts_and_the_port_works_each_time() {
    if skip_without_guests("a_vhost_user_guest_reboots_and_restarts") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(guest_ram().is_empty(), "another guest's memory is mapped");
    let g = GuestLab::new("vureboot");
    g.lab.add_lan("l").unwrap();
    for (name, ip) in [("r1", "10.8.0.1/24"), ("r2", "10.8.0.2/24")] {
        let mut spec = GuestLab::spec(name, &["l"]);
        spec.nics[0].ip = vec![ip.parse().unwrap()];
        spec.nics[0].transport = Some(Transport::VhostUser);
        g.add(spec);
    }
    g.wait_running(&["r1", "r2"]);
    assert!(g.ping("r1", "10.8.0.2", 5), "{}", g.console_tail("r1"));
    let mapped = guest_ram();
    assert_eq!(mapped.len(), 2, "{mapped:?}");

    // Reboot r2 from inside: the same QEMU resets the device.
    let uptime = |g: &GuestLab| -> f64 {
        let out = g.exec("r2", &["cat", "/proc/uptime"]).stdout;
        out.split_whitespace().next().unwrap().parse().unwrap()
    };
    std::thread::sleep(Duration::from_secs(2));
    let up_before = uptime(&g);
    let pid = g.lab.node("r2").unwrap().pid;
    let _ = g.rt.block_on(g.lab.exec_node(
        "r2",
        &["sh".into(), "-c".into(), "(sleep 1; reboot -f) &".into()],
        Duration::from_secs(10),
    ));
    std::thread::sleep(Duration::from_secs(3));
    let info = g.lab.node("r2").unwrap();
    g.rt.block_on(agent::wait_ready(
        &Path::new(&info.console_log).with_file_name("agent.sock"),
        (Instant::now() + BOOT).into(),
    ))
    .unwrap_or_else(|e| panic!("r2 after reboot: {e}\n{}", g.console_tail("r2")));
    assert!(
        g.ping("r1", "10.8.0.2", 8),
        "no ping after the reboot\n{}",
        g.console_tail("r2")
    );
    assert!(uptime(&g) < up_before, "r2 did not reboot");
    assert_eq!(g.lab.node("r2").unwrap().pid, pid, "the same QEMU");
    let now = guest_ram();
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        mapped.keys().collect::<Vec<_>>(),
        "a reboot maps no other memory"
    );
    assert_each_mapped_once(&now);

    // Stop and start r2: QEMU quits, its memory is let go, a new QEMU comes.
    g.rt.block_on(g.lab.stop_node("r2", None)).unwrap();
    wait_for(
        "r2's memory to be unmapped",
        Duration::from_secs(10),
        || guest_ram().len() == 1,
    );
    assert!(!g.lab.port("r2.eth0").unwrap().up);
    g.rt.block_on(g.lab.start_node("r2")).unwrap();
    g.wait_running(&["r2"]);
    assert!(
        g.ping("r1", "10.8.0.2", 8),
        "no ping after the restart\n{}",
        g.console_tail("r2")
    );
    let now = guest_ram();
    assert_eq!(now.len(), 2, "r1's and the new r2's: {now:?}");
    assert_each_mapped_once(&now);
    let c = g.lab.port_stats("r2.eth0").unwrap().counters;
    assert_eq!(c.protocol_errors, 0, "{c:?}");
}
