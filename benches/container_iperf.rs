//! `cargo bench --bench container_iperf`: iperf3 TCP between two container
//! nodes of a real daemon (crun, rootless, built-in container image) whose
//! NICs are ulan tap ports on one lan, beside, in the same run:
//! - the kernel's paths between two user+net namespaces: a veth pair, and
//!   a Linux bridge with a veth to each;
//! - the socket-port VM paths of `vm_iperf` (two TCG/KVM guests of the
//!   built-in image through ulan over `stream`, `dgram` and `vde`), whose
//!   best the target is set against (`--no-vm` leaves them out);
//! - how long a container node takes to start (`ulan node add` until it is
//!   running) and to answer a first ping.
//!
//! For ulan, also the CPU time of the daemon's data-plane thread per
//! second of traffic.
//!
//! `ULAN_BENCH_SECS` (default 5) per run, `ULAN_BENCH_RUNS` (default 3);
//! `--quick`: 2 s, one run.

#[allow(dead_code)]
mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netns::{gbits, have, kernel_path, median, threads_cpu_ns};
use common::vm::through_ulan;
use ulan::vmlaunch::image::{self, ImageStore};
use ulan::vmlaunch::spec::Transport;

const BIN: &str = env!("CARGO_BIN_EXE_ulan");

/// A foreground `ulan daemon` with its own runtime dir (the user's image
/// store, so the built-in container image is made once); stopped on drop.
struct Daemon {
    run: tempfile::TempDir,
    child: Child,
}

impl Daemon {
    fn start() -> Result<Daemon, String> {
        let run = tempfile::Builder::new()
            .prefix("ulan-ctbench")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // A data dir of its own (the lab's saved state stays out of the
        // user's), holding the user's image store.
        let data = run.path().join("data");
        std::fs::create_dir_all(data.join("ulan")).map_err(|e| e.to_string())?;
        let store = image::default_store_dir();
        std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(&store, data.join("ulan/images")).map_err(|e| e.to_string())?;
        let child = Command::new(BIN)
            .arg("daemon")
            .env("XDG_RUNTIME_DIR", run.path())
            .env("XDG_DATA_HOME", &data)
            .env("ULAN_LAB", "ctbench")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("ulan daemon: {e}"))?;
        let d = Daemon { run, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.ulan(&["lab"]).is_ok_and(|o| o.status.success()) {
            if Instant::now() > deadline {
                return Err("the daemon's API never answered".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    fn ulan(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new(BIN)
            .args(args)
            .env("XDG_RUNTIME_DIR", self.run.path())
            .env("XDG_DATA_HOME", self.run.path().join("data"))
            .env("ULAN_LAB", "ctbench")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
    }

    /// Runs and insists on success; returns stdout.
    fn ok(&self, args: &[&str]) -> Result<String, String> {
        let out = self.ulan(args).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "ulan {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A container node with one NIC on lan `l`; seconds until running.
    fn add_container(&self, name: &str, ip: &str, cmd: &[&str]) -> Result<f64, String> {
        let nic = format!("l,ip={ip}");
        let mut args = vec!["node", "add", name, "--kind", "container", "--nic", &nic];
        for c in cmd {
            args.extend(["--cmd", c]);
        }
        let t0 = Instant::now();
        self.ok(&args)?;
        let took = t0.elapsed().as_secs_f64();
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["--json", "node", "show", name])?)
                .map_err(|e| e.to_string())?;
        if v["state"] != "running" {
            return Err(format!("node {name} is not running after add: {v}"));
        }
        Ok(took)
    }

    /// Seconds until `from` gets a first ping answer from `ip`.
    fn first_ping(&self, from: &str, ip: &str) -> Result<f64, String> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            let out = self
                .ulan(&["exec", from, "--", "ping", "-c", "1", "-W", "1", ip])
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                return Ok(t0.elapsed().as_secs_f64());
            }
        }
        Err(format!("{from} never got an answer from {ip}"))
    }

    fn data_plane_cpu_ns(&self) -> u64 {
        threads_cpu_ns(self.child.id(), "ulan-dataplane")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.ulan(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(20);
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

/// The container lab: a warm-up node (the image is built on first use),
/// then server `s` and client `c`. Returns the start times of s and c and
/// the time to c's first ping.
fn container_lab(d: &Daemon) -> Result<(Vec<f64>, f64), String> {
    d.ok(&["lan", "add", "l"])?;
    d.add_container("warm", "10.1.0.9/24", &["sleep", "1000"])?;
    let _ = d.ok(&["node", "rm", "warm"]);
    let s = d.add_container("s", "10.1.0.1/24", &["iperf3", "-s"])?;
    let c = d.add_container("c", "10.1.0.2/24", &["sleep", "100000"])?;
    let ping = d.first_ping("c", "10.1.0.1")?;
    Ok((vec![s, c], ping))
}

/// One iperf3 run from c to s; Gbit/s and data-plane CPU s per s.
fn container_run(d: &Daemon, secs: u64) -> Result<(f64, f64), String> {
    let cpu0 = d.data_plane_cpu_ns();
    let t0 = Instant::now();
    let t = secs.to_string();
    let out = d.ok(&[
        "exec", "c", "--", "iperf3", "-c", "10.1.0.1", "-t", &t, "-J",
    ])?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = d.data_plane_cpu_ns().saturating_sub(cpu0);
    let json = &out[out.find('{').unwrap_or(0)..];
    let g = gbits(json).ok_or_else(|| format!("no iperf3 result in {out}"))?;
    Ok((g, cpu as f64 / 1e9 / wall))
}

/// The best of the socket-port VM paths, one pair of guests each.
fn vm_paths(secs: u64) -> Vec<(String, Result<f64, String>)> {
    if !have("qemu-system-x86_64") {
        return vec![(
            "VM paths".into(),
            Err("SKIPPED: qemu-system-x86_64 is not installed".into()),
        )];
    }
    let store_dir: PathBuf = image::default_store_dir();
    let store = ImageStore::open(&store_dir);
    let img = match image::ensure_builtin(&store) {
        Ok(i) => i,
        Err(e) => return vec![("VM paths".into(), Err(format!("no built-in image: {e}")))],
    };
    let kvm = common::vm::kvm_usable(&img);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    [Transport::Stream, Transport::Dgram, Transport::Vde]
        .into_iter()
        .map(|t| {
            let label = format!(
                "VM {}: 2 {} guests, ulan {}",
                t.as_str(),
                if kvm { "KVM" } else { "TCG" },
                t.as_str()
            );
            let r = rt
                .block_on(through_ulan(&store_dir, t, kvm, secs, 1))
                .map(|runs| runs[0].mbps / 1000.0);
            (label, r)
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let with_vm = !args.iter().any(|a| a == "--no-vm");
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let secs = env_num("ULAN_BENCH_SECS", if quick { 2 } else { 5 });
    let runs = env_num("ULAN_BENCH_RUNS", if quick { 1 } else { 3 }).max(1) as usize;
    for tool in ["unshare", "ip", "iperf3", "ping", "timeout", "crun"] {
        if !have(tool) {
            println!("SKIPPED: {tool} is not installed");
            return;
        }
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    println!(
        "container_iperf: iperf3 TCP, {secs} s x {runs} runs, {} ({} CPUs allowed), {}, {}, uid {uid}",
        common::cpu_model(),
        common::allowed_cpus().len(),
        common::text("uname", &["-sr"]),
        common::text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    );
    let d = match Daemon::start() {
        Ok(d) => d,
        Err(e) => {
            println!("FAILED: {e}");
            std::process::exit(1);
        }
    };
    let (starts, ping) = match container_lab(&d) {
        Ok(v) => v,
        Err(e) => {
            println!("FAILED: the container lab: {e}");
            std::process::exit(1);
        }
    };
    let (mut veth, mut bridge, mut ct, mut cpu) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        // Interleaved, so drift on a shared machine hits every path alike.
        for (name, v) in [("veth", &mut veth), ("bridge", &mut bridge)] {
            match kernel_path(name == "bridge", secs) {
                Ok(g) => v.push(g),
                Err(e) => {
                    println!("SKIPPED: the {name} path cannot run here: {e}");
                    return;
                }
            }
        }
        match container_run(&d, secs) {
            Ok((g, c)) => {
                ct.push(g);
                cpu.push(c);
            }
            Err(e) => {
                println!("FAILED: containers through ulan: {e}");
                std::process::exit(1);
            }
        }
        eprintln!(
            "run {}: veth {:.2}  bridge {:.2}  ulan containers {:.2} Gbit/s",
            run + 1,
            veth[run],
            bridge[run],
            ct[run]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(d);
    let vms = if with_vm { vm_paths(secs) } else { Vec::new() };

    let (v, b, c) = (median(veth), median(bridge), median(ct));
    println!();
    println!(
        "{:<44} {:>9} {:>10} {:>14}",
        "path", "Gbit/s", "vs bridge", "ulan CPU s/s"
    );
    let row = |name: &str, g: f64, cpu: Option<f64>| {
        println!(
            "{:<44} {:>9.2} {:>9.2}x {:>14}",
            name,
            g,
            g / b,
            cpu.map_or("-".into(), |c| format!("{c:.2}"))
        )
    };
    row("veth pair (kernel, direct)", v, None);
    row("Linux bridge + 2 veth (kernel)", b, None);
    row("ulan: 2 containers, tap ports", c, Some(median(cpu)));
    let mut best_vm: Option<(String, f64)> = None;
    for (label, r) in &vms {
        match r {
            Ok(g) => {
                row(label, *g, None);
                if best_vm.as_ref().map_or(true, |(_, x)| g > x) {
                    best_vm = Some((label.clone(), *g));
                }
            }
            Err(e) => println!("{label:<44} {:>9}   {e}", "-"),
        }
    }
    println!(
        "\ncontainer start (`ulan node add` until running): {}; first ping {:.2} s",
        starts
            .iter()
            .map(|s| format!("{s:.2} s"))
            .collect::<Vec<_>>()
            .join(", "),
        ping
    );
    let word = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("\ntargets:");
    println!(
        "  ulan containers >= 0.5 x the Linux bridge: {:.2}x {}",
        c / b,
        word(c >= 0.5 * b)
    );
    match best_vm {
        Some((label, g)) => println!(
            "  ulan containers >= 3 x the best socket-port VM path ({label}, {:.3} Gbit/s): {:.1}x {}",
            g,
            c / g,
            word(c >= 3.0 * g)
        ),
        None => println!("  ulan containers >= 3 x the best socket-port VM path: not measured"),
    }
}
