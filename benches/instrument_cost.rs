//! What the lab's instruments cost the data plane: the frame rate of one
//! path through ulan as it is, with a 0 ms delay set, with a 0% loss set,
//! and with a capture of the receiving port running (pcapng to a file on
//! the disk, and to one in /dev/shm, a tmpfs, which leaves out the
//! kernel's writeback of the disk's dirty pages), in one run, for a
//! vhost-user and a stream path.
//!
//!     cargo bench --bench instrument_cost            # 1 s per trial, 5 rounds
//!     cargo bench --bench instrument_cost -- --quick # 0.3 s, 2 rounds
//!     cargo bench --bench instrument_cost -- --rounds 11 --kind vhost-user
//!
//! Each trial sends as fast as the path takes frames (the `ulan bench`
//! generator: one thread sends and receives). In every round each
//! instrument's trial has a plain trial of its own right beside it (first
//! in even rounds, second in odd ones), and the instrument's cost is the
//! median of those pairs' ratios: the host's slow drifts, which move a
//! whole 1 s trial by 10% here, cancel within a pair. The generator and
//! the data plane are pinned to a CPU each, so the scheduler cannot give
//! one configuration a better placement than another. Targets: idle
//! instruments cost nothing (within the noise, 3%), a running capture
//! under 10%.

#[allow(dead_code)]
mod common;
use common::{cpu_model, text};
use std::path::Path;
use std::time::Duration;

use ulan::bench::link::{Link, SocketLink, VhostLink};
use ulan::bench::rfc2544::{Runner, TrialSpec};
use ulan::lab::{CaptureRequest, Lab, LabConfig};
use ulan::ports::PortKind;
use ulan::switch::impair::{DirectionSpec, ImpairSpec};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    Plain,
    Delay0,
    Loss0,
    CaptureDisk,
    CaptureTmpfs,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Plain => "plain port",
            Config::Delay0 => "delay 0 ms",
            Config::Loss0 => "loss 0%",
            Config::CaptureDisk => "capture to disk",
            Config::CaptureTmpfs => "capture to tmpfs",
        }
    }
}

const CONFIGS: [Config; 5] = [
    Config::Plain,
    Config::Delay0,
    Config::Loss0,
    Config::CaptureDisk,
    Config::CaptureTmpfs,
];
const SIZES: [usize; 2] = [64, 1518];

fn impair(lab: &Lab, spec: Option<DirectionSpec>) {
    let s = ImpairSpec {
        egress: spec.clone(),
        ingress: spec,
    };
    if let Err(e) = lab.set_impairments("s", s) {
        println!("cannot set impairments: {e}");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// What one trial of one configuration gave.
struct Outcome {
    pps: f64,
    lost: u64,
    /// Frames a capture wrote, and dropped.
    kept: (u64, u64),
}

/// Sets `c` up on the receiving port, runs one trial, tears `c` down.
#[allow(clippy::too_many_arguments)]
fn run_config(
    rt: &tokio::runtime::Runtime,
    lab: &Lab,
    runner: &mut Runner<'_>,
    c: Config,
    size: usize,
    window: Duration,
    disk: &Path,
    shm: &Path,
) -> Result<Outcome, String> {
    let mut capture = None;
    match c {
        Config::Plain => impair(lab, None),
        Config::Delay0 => impair(
            lab,
            Some(DirectionSpec {
                delay_ms: Some(0.0),
                ..Default::default()
            }),
        ),
        Config::Loss0 => impair(
            lab,
            Some(DirectionSpec {
                loss_pct: Some(0.0),
                ..Default::default()
            }),
        ),
        Config::CaptureDisk | Config::CaptureTmpfs => {
            impair(lab, None);
            let file = if c == Config::CaptureDisk {
                disk.join("cap.pcapng")
            } else {
                shm.join("cap.pcapng")
            };
            let req = CaptureRequest {
                port: Some("s".into()),
                lan: None,
                snaplen: None,
                path: Some(file.display().to_string()),
            };
            match rt.block_on(async { lab.start_capture(req) }) {
                Ok(info) => capture = Some(info.id),
                Err(e) => return Err(format!("cannot start a capture: {e}")),
            }
        }
    }
    let t = runner
        .trial(&TrialSpec {
            size,
            rate_pps: None,
            duration: window,
            burst: None,
            latency: false,
        })
        .map_err(|e| e.to_string())?;
    let mut out = Outcome {
        pps: t.received_pps(),
        lost: t.lost,
        kept: (0, 0),
    };
    if let Some(id) = capture {
        match rt.block_on(lab.stop_capture(&id)) {
            Ok(info) => out.kept = (info.frames, info.dropped),
            Err(e) => return Err(format!("cannot stop the capture: {e}")),
        }
    }
    Ok(out)
}

/// The data plane's threads, by name, pinned to `cpu`: every
/// configuration then runs with the same placement (the scheduler putting
/// the generator and the data plane on one CPU or on two moves the rate by
/// far more than any instrument costs).
fn pin_data_plane(cpu: usize) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut n = 0;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "ulan-dataplane" {
            if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
                common::pin(tid, cpu);
                n += 1;
            }
        }
    }
    n
}

fn run_kind(
    rt: &tokio::runtime::Runtime,
    kind: PortKind,
    window: Duration,
    rounds: usize,
    checks: &mut Vec<(String, f64, f64)>,
) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // The disk capture goes under target/ (on the project's disk even where
    // /tmp is a tmpfs).
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
    let shm = tempfile::tempdir_in("/dev/shm").map_err(|e| format!("/dev/shm: {e}"))?;
    let lab =
        Lab::start(LabConfig::new("cost", &dir.path().join("run"))).map_err(|e| e.to_string())?;
    lab.add_lan("l").map_err(|e| e.to_string())?;
    let g = lab
        .add_port("g", kind, Some("l"))
        .map_err(|e| e.to_string())?;
    let s = lab
        .add_port("s", kind, Some("l"))
        .map_err(|e| e.to_string())?;
    let cpus = common::allowed_cpus();
    if cpus.len() >= 2 {
        common::pin(0, cpus[0]);
        if pin_data_plane(cpus[1]) == 0 {
            println!("(no data-plane thread found to pin)");
        }
    }
    let mut link: Box<dyn Link> = if kind == PortKind::VhostUser {
        Box::new(
            VhostLink::connect(Path::new(&g.path), Path::new(&s.path), 1514)
                .map_err(|e| e.to_string())?,
        )
    } else {
        Box::new(
            SocketLink::connect(kind, Path::new(&g.path), Path::new(&s.path))
                .map_err(|e| e.to_string())?,
        )
    };
    let mut runner = Runner::new(link.as_mut(), None);
    runner
        .check_path(64, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    for size in SIZES {
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
        // Each configuration's rate over the plain trial beside it.
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
        let mut lost = vec![0u64; CONFIGS.len()];
        let mut kept = vec![(0u64, 0u64); CONFIGS.len()];
        for round in 0..rounds {
            for (i, &c) in CONFIGS.iter().enumerate().skip(1) {
                // Plain first in even rounds, second in odd ones: neither
                // gets the warmer turn every time.
                let order = if round % 2 == 0 {
                    [Config::Plain, c]
                } else {
                    [c, Config::Plain]
                };
                let mut pair = [0.0f64; 2];
                for o in order {
                    let r = run_config(
                        rt,
                        &lab,
                        &mut runner,
                        o,
                        size,
                        window,
                        disk.path(),
                        shm.path(),
                    )?;
                    let at = if o == Config::Plain { 0 } else { i };
                    rates[at].push(r.pps);
                    lost[at] += r.lost;
                    kept[at].0 += r.kept.0;
                    kept[at].1 += r.kept.1;
                    pair[usize::from(o != Config::Plain)] = r.pps;
                }
                if pair[0] > 0.0 {
                    ratios[i].push(pair[1] / pair[0]);
                }
            }
        }
        for (i, &c) in CONFIGS.iter().enumerate() {
            let m = median(rates[i].clone());
            let ratio = if i == 0 {
                1.0
            } else {
                median(ratios[i].clone())
            };
            let (written, dropped) = kept[i];
            let extra = if written + dropped > 0 {
                format!(
                    "  (the capture kept {:.0}% of the frames)",
                    written as f64 * 100.0 / (written + dropped) as f64
                )
            } else {
                String::new()
            };
            println!(
                "{:>5}  {:<11} {:<16} {:>8.3} {:>8} {:>7.2}x{extra}",
                size,
                kind.as_str(),
                c.label(),
                m / 1e6,
                lost[i],
                ratio
            );
            let target = match c {
                Config::Plain => continue,
                Config::CaptureDisk | Config::CaptureTmpfs => 0.90,
                _ => 0.97,
            };
            checks.push((
                format!("{size:>5} B {:<10} {}", kind.as_str(), c.label()),
                ratio,
                target,
            ));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let window = Duration::from_secs_f64(if quick { 0.3 } else { 1.0 });
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1)?.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(if quick { 2 } else { 5 });
    println!(
        "ulan instrument cost, {}, Linux {}, {} CPUs, {}",
        text("date", &["+%Y-%m-%d"]),
        text("uname", &["-r"]),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model()
    );
    println!(
        "each trial as fast as the path takes frames, {:.1} s; {rounds} rounds, each instrument \
         beside a plain trial of its own (taking turns first);\n/plain is the median of those \
         pairs' ratios, Mpps the median rate; the generator and the data plane pinned to one CPU \
         each;\nimpairments set both ways on the receiving port; the capture is of that port, to \
         a file (its writer runs under SCHED_IDLE)\n",
        window.as_secs_f64()
    );
    println!(
        "{:>5}  {:<11} {:<16} {:>8} {:>8} {:>8}",
        "size", "port kind", "instrument", "Mpps", "lost", "/plain"
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("cannot make a runtime: {e}");
            return;
        }
    };
    let mut checks = Vec::new();
    // `--kind vhost-user` (or stream): that path only.
    let only = args
        .iter()
        .position(|a| a == "--kind")
        .and_then(|i| args.get(i + 1));
    for kind in [PortKind::VhostUser, PortKind::Stream] {
        if only.is_some_and(|k| k != kind.as_str()) {
            continue;
        }
        if let Err(e) = run_kind(&rt, kind, window, rounds, &mut checks) {
            println!("{:<11} failed: {e}", kind.as_str());
        }
    }
    println!(
        "\ntargets (idle instruments: none lost, within 3% noise; a running capture: under 10%):"
    );
    for (what, ratio, target) in checks {
        let verdict = if ratio >= target { "PASS" } else { "BELOW" };
        println!("  {what:<40} >= {target:.2}x  {ratio:>5.2}x  {verdict}");
    }
}
