//! VM-level benchmark: iperf3 (TCP) between two guests of the built-in
//! image, in one run, through ulan (each QEMU transport), over a direct
//! QEMU `-netdev dgram` link (no switch), and through `vde_switch`.
//!
//!     cargo bench --bench vm_iperf              # 3 runs of 5 s per setup
//!     cargo bench --bench vm_iperf -- --quick   # 1 run of 2 s
//!     ULAN_BENCH_SECS=10 ULAN_BENCH_RUNS=5 cargo bench --bench vm_iperf
//!
//! Every guest has the same memory, one vCPU and the same accelerator
//! (TCG here: KVM is probed and used where it works). The median run of
//! each setup is reported.

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::netns::have;
use common::vm::{measure, spec, through_ulan, Run, MEMORY_MB};
use ulan::vmlaunch::image::{self, Image, ImageStore};
use ulan::vmlaunch::qemu::accel;
use ulan::vmlaunch::qemu::{self, QemuBoot, QemuNic, QemuPaths};
use ulan::vmlaunch::spec::Transport;
use ulan::wire::MacAddr;

struct Row {
    setup: String,
    runs: Vec<Run>,
    note: Option<String>,
}

impl Row {
    fn median(&self) -> Option<Run> {
        let mut v = self.runs.clone();
        v.sort_by(|a, b| a.mbps.total_cmp(&b.mbps));
        v.get(v.len() / 2).copied()
    }
}

/// A QEMU this bench started itself; killed when dropped.
struct Guest {
    child: Child,
    agent: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct VdeSwitch(Child);

impl Drop for VdeSwitch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mac(n: u8) -> MacAddr {
    MacAddr([0x02, 0xbe, 0, 0, 0, n])
}

/// Starts one built-in-image guest with one NIC, outside ulan.
fn start_guest(
    dir: &Path,
    img: &Image,
    accel_args: &[String],
    name: &str,
    ip: &str,
    nic: QemuNic,
) -> std::io::Result<Guest> {
    let gdir = dir.join(name);
    std::fs::create_dir_all(&gdir)?;
    let s = spec(name, ip);
    let paths = QemuPaths {
        qmp: gdir.join("qmp.sock"),
        console: gdir.join("console.sock"),
        console_log: gdir.join("console.log"),
        agent: Some(gdir.join("agent.sock")),
    };
    let boot = QemuBoot {
        kernel: img.kernel_path(),
        initrd: img.initrd_path(),
        cmdline: qemu::builtin_cmdline(&s, &[nic.mac]),
        disk: None,
    };
    let args = qemu::qemu_args(&s, &[nic], &boot, &paths, accel_args)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let child = Command::new("qemu-system-x86_64")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Guest {
        child,
        agent: gdir.join("agent.sock"),
    })
}

async fn direct(
    img: &Image,
    accel_args: &[String],
    secs: u64,
    runs: usize,
) -> Result<Vec<Run>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let nic = |m: u8, local: &Path, remote: &Path| QemuNic {
        mac: mac(m),
        transport: Transport::Dgram,
        port_path: remote.to_path_buf(),
        local_path: Some(local.to_path_buf()),
    };
    let e = |e: std::io::Error| e.to_string();
    let a = start_guest(
        dir.path(),
        img,
        accel_args,
        "a",
        "10.9.0.1/24",
        nic(1, &sa, &sb),
    )
    .map_err(e)?;
    let b = start_guest(
        dir.path(),
        img,
        accel_args,
        "b",
        "10.9.0.2/24",
        nic(2, &sb, &sa),
    )
    .map_err(e)?;
    measure(&a.agent, &b.agent, "10.9.0.2", secs, runs).await
}

async fn via_vde_switch(
    img: &Image,
    accel_args: &[String],
    secs: u64,
    runs: usize,
) -> Result<Vec<Run>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sw_dir = dir.path().join("switch");
    // vde_switch reads commands from stdin and quits at its end: keep it open.
    let sw = VdeSwitch(
        Command::new("vde_switch")
            .arg("-s")
            .arg(&sw_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("vde_switch: {e}"))?,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !sw_dir.join("ctl").exists() {
        if std::time::Instant::now() > deadline {
            return Err("vde_switch did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let nic = |m: u8| QemuNic {
        mac: mac(m),
        transport: Transport::Vde,
        port_path: sw_dir.clone(),
        local_path: None,
    };
    let e = |e: std::io::Error| e.to_string();
    let a = start_guest(dir.path(), img, accel_args, "a", "10.9.0.1/24", nic(1)).map_err(e)?;
    let b = start_guest(dir.path(), img, accel_args, "b", "10.9.0.2/24", nic(2)).map_err(e)?;
    let r = measure(&a.agent, &b.agent, "10.9.0.2", secs, runs).await;
    drop((a, b, sw));
    r
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let secs = env_num("ULAN_BENCH_SECS", if quick { 2 } else { 5 });
    let runs = env_num("ULAN_BENCH_RUNS", if quick { 1 } else { 3 }) as usize;
    if !have("qemu-system-x86_64") {
        println!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    }
    let store_dir = image::default_store_dir();
    let store = ImageStore::open(&store_dir);
    let img = match image::ensure_builtin(&store) {
        Ok(i) => i,
        Err(e) => {
            println!("SKIPPED: no built-in image: {e}");
            return;
        }
    };
    let kvm = common::vm::kvm_usable(&img);
    let accel_args = accel::qemu_accel_args(kvm, 1);
    let date = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "ulan VM benchmark, {date}, {cpus} CPUs; iperf3 TCP between two built-in-image guests \
         ({MEMORY_MB} MiB, 1 vCPU, {}), {runs} x {secs} s per setup, median shown\n",
        if kvm { "KVM" } else { "TCG" }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    let mut push = |setup: &str, r: Result<Vec<Run>, String>| {
        let (runs, note) = match r {
            Ok(v) => (v, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        rows.push(Row {
            setup: setup.into(),
            runs,
            note,
        });
    };
    push(
        "direct dgram link",
        rt.block_on(direct(&img, &accel_args, secs, runs)),
    );
    for t in [
        Transport::VhostUser,
        Transport::Stream,
        Transport::Dgram,
        Transport::Vde,
    ] {
        let label = format!("ulan {}", t.as_str());
        push(
            &label,
            rt.block_on(through_ulan(&store_dir, t, kvm, secs, runs)),
        );
    }
    if have("vde_switch") {
        push(
            "vde_switch",
            rt.block_on(via_vde_switch(&img, &accel_args, secs, runs)),
        );
    } else {
        push(
            "vde_switch",
            Err("SKIPPED: vde_switch is not installed (apt-get install vde2)".into()),
        );
    }

    let value = |name: &str| {
        rows.iter()
            .find(|r| r.setup == name)
            .and_then(Row::median)
            .map(|r| r.mbps)
    };
    let (direct_mbps, vde_mbps) = (value("direct dgram link"), value("vde_switch"));
    println!(
        "{:<18} {:>10} {:>8} {:>10} {:>12}   runs (Mbit/s)",
        "setup", "Mbit/s", "retrans", "vs direct", "vs vde_switch"
    );
    let ratio = |x: f64, base: Option<f64>| base.map_or("-".into(), |b| format!("{:.2}x", x / b));
    for r in &rows {
        match r.median() {
            Some(m) => println!(
                "{:<18} {:>10.0} {:>8} {:>10} {:>12}   {}",
                r.setup,
                m.mbps,
                m.retransmits,
                ratio(m.mbps, direct_mbps),
                ratio(m.mbps, vde_mbps),
                r.runs
                    .iter()
                    .map(|x| format!("{:.0}", x.mbps))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            None => println!(
                "{:<18} {:>10}   {}",
                r.setup,
                "-",
                r.note.as_deref().unwrap_or("no result")
            ),
        }
    }
    println!("\ntargets: ulan at least as fast as vde_switch, and within 10% of the direct link");
    for r in rows.iter().filter(|r| r.setup.starts_with("ulan")) {
        let Some(m) = r.median() else { continue };
        let vs_vde = vde_mbps.map(|v| m.mbps >= v);
        let vs_direct = direct_mbps.map(|d| m.mbps >= 0.9 * d);
        let word = |b: Option<bool>| match b {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        println!(
            "  {:<16} >= vde_switch: {:<12} >= 0.9 x direct: {}",
            r.setup,
            word(vs_vde),
            word(vs_direct)
        );
    }
    // vhost-user: at least twice the best socket transport.
    let best_socket = ["ulan stream", "ulan dgram", "ulan vde"]
        .iter()
        .filter_map(|n| value(n).map(|v| (*n, v)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let (Some(vu), Some((name, best))) = (value("ulan vhost-user"), best_socket) {
        println!(
            "  ulan vhost-user >= 2 x the best socket transport ({name}, {best:.0} Mbit/s): {:.2}x {}",
            vu / best,
            if vu >= 2.0 * best { "met" } else { "NOT met" }
        );
    }
}
