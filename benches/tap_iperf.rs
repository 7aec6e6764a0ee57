//! `cargo bench --bench tap_iperf`: iperf3 TCP between two network
//! namespaces (user namespaces, no root) through ulan's tap ports, beside
//! the kernel's own paths measured in the same run: a veth pair between
//! the two namespaces, and a Linux bridge with a veth to each. Prints one
//! table: Gbit/s (median of the runs) and, for ulan, the CPU time of its
//! data-plane thread per second of traffic.
//!
//! `ULAN_BENCH_SECS` (default 5) per run, `ULAN_BENCH_RUNS` (default 3);
//! `--quick`: 2 s, one run.

#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::netns::{finish, have, kernel_path, median, sh_in_ns};

use ulan::lab::{Lab, LabConfig};
use ulan::ports::PortKind;

const BIN: &str = env!("CARGO_BIN_EXE_ulan");

/// The data-plane thread of this process (the lab runs in process).
fn dataplane_tid() -> Option<String> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .find_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim() == "ulan-dataplane").then(|| t.file_name().to_string_lossy().into_owned())
        })
}

/// ulan: two tap ports on one lan, a tap in each of two namespaces.
/// Returns Gbit/s and data-plane CPU seconds per second.
fn ulan_path(secs: u64) -> Result<(f64, f64), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let lab = Lab::start(LabConfig::new("tapbench", &dir.path().join("run")))
        .map_err(|e| e.to_string())?;
    lab.add_lan("l").map_err(|e| e.to_string())?;
    let a = lab
        .add_port("a", PortKind::Tap, Some("l"))
        .map_err(|e| e.to_string())?;
    let b = lab
        .add_port("b", PortKind::Tap, Some("l"))
        .map_err(|e| e.to_string())?;
    // The thread may still be starting.
    let mut tid = None;
    for _ in 0..100 {
        tid = dataplane_tid();
        if tid.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let tid = tid.ok_or("no ulan-dataplane thread")?;
    let stat = format!("/proc/self/task/{tid}/stat");
    let server = sh_in_ns(
        &[],
        &format!(
            "set -e
            {BIN} tap-attach --socket {} --ifname eth0
            ip addr add 10.1.0.1/24 dev eth0
            exec iperf3 -s -1 -B 10.1.0.1",
            a.path
        ),
    );
    let client = sh_in_ns(
        &[],
        &format!(
            "set -e
            {BIN} tap-attach --socket {} --ifname eth0
            ip addr add 10.1.0.2/24 dev eth0
            ping -c 1 -W 5 10.1.0.1 >/dev/null
            sleep 0.2
            exec iperf3 -c 10.1.0.1 -t {secs} -J",
            b.path
        ),
    );
    let cpu0 = common::cpu_ns(&stat).unwrap_or(0);
    let t0 = Instant::now();
    let rate = finish(client, "ulan path");
    let cpu = common::cpu_ns(&stat).unwrap_or(0).saturating_sub(cpu0);
    let wall = t0.elapsed().as_secs_f64();
    let _ = server.wait_with_output();
    lab.shutdown();
    Ok((rate?, cpu as f64 / 1e9 / wall))
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
    let runs = env_num("ULAN_BENCH_RUNS", if quick { 1 } else { 3 }).max(1) as usize;
    for tool in ["unshare", "ip", "iperf3", "ping", "timeout"] {
        if !have(tool) {
            println!("SKIPPED: {tool} is not installed");
            return;
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: /dev/net/tun is missing");
        return;
    }
    println!(
        "tap_iperf: iperf3 TCP, {secs} s x {runs} runs, {} ({} CPUs allowed), {}, {}",
        common::cpu_model(),
        common::allowed_cpus().len(),
        common::text("uname", &["-sr"]),
        common::text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    );
    let (mut veth, mut bridge, mut tap, mut cpu) = (vec![], vec![], vec![], vec![]);
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
        match ulan_path(secs) {
            Ok((g, c)) => {
                tap.push(g);
                cpu.push(c);
            }
            Err(e) => {
                println!("FAILED: ulan tap path: {e}");
                std::process::exit(1);
            }
        }
        eprintln!(
            "run {}: veth {:.2}  bridge {:.2}  ulan {:.2} Gbit/s",
            run + 1,
            veth[run],
            bridge[run],
            tap[run]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (v, b, t) = (median(veth), median(bridge), median(tap));
    println!();
    println!(
        "{:<44} {:>9} {:>10} {:>14}",
        "path", "Gbit/s", "vs bridge", "ulan CPU s/s"
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}x {:>14}",
        "veth pair (kernel, direct)",
        v,
        v / b,
        "-"
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}x {:>14}",
        "Linux bridge + 2 veth (kernel)", b, 1.0, "-"
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}x {:>14.2}",
        "ulan: tap ports, vnet hdr + TSO",
        t,
        t / b,
        median(cpu)
    );
}
