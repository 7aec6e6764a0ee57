//! What the lab's instruments cost the data plane: the frame rate of one
//! path through ulan as it is, with a 0 ms delay set, with a 0% loss set,
//! and with a capture of the receiving port running (pcapng to a file on
//! the disk, and to one in /dev/shm, a tmpfs, which leaves out the
//! kernel's writeback of the disk's dirty pages), in one run, for a
//! vhost-user and a stream path.
//!
//!     cargo bench --bench instrument_cost            # 1 s per trial, 3 rounds
//!     cargo bench --bench instrument_cost -- --quick # 0.3 s, 2 rounds
//!
//! Each trial sends as fast as the path takes frames (the `ulan bench`
//! generator: one thread sends and receives). The configurations take
//! turns round by round, and each reports its median, so a noisy moment
//! of the host does not land on one of them only. Targets: idle
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
        let mut lost = vec![0u64; CONFIGS.len()];
        // Per configuration: frames a capture wrote, and dropped.
        let mut kept = vec![(0u64, 0u64); CONFIGS.len()];
        for _ in 0..rounds {
            for (i, &c) in CONFIGS.iter().enumerate() {
                let mut capture = None;
                match c {
                    Config::Plain => impair(&lab, None),
                    Config::Delay0 => impair(
                        &lab,
                        Some(DirectionSpec {
                            delay_ms: Some(0.0),
                            ..Default::default()
                        }),
                    ),
                    Config::Loss0 => impair(
                        &lab,
                        Some(DirectionSpec {
                            loss_pct: Some(0.0),
                            ..Default::default()
                        }),
                    ),
                    Config::CaptureDisk | Config::CaptureTmpfs => {
                        impair(&lab, None);
                        let file = if c == Config::CaptureDisk {
                            disk.path().join("cap.pcapng")
                        } else {
                            shm.path().join("cap.pcapng")
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
                rates[i].push(t.received_pps());
                lost[i] += t.lost;
                if let Some(id) = capture {
                    match rt.block_on(lab.stop_capture(&id)) {
                        Ok(info) => {
                            kept[i].0 += info.frames;
                            kept[i].1 += info.dropped;
                        }
                        Err(e) => return Err(format!("cannot stop the capture: {e}")),
                    }
                }
            }
        }
        let plain = median(rates[0].clone());
        for (i, &c) in CONFIGS.iter().enumerate() {
            let m = median(rates[i].clone());
            let ratio = if plain > 0.0 { m / plain } else { 0.0 };
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
    let rounds = if quick { 2 } else { 3 };
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
        "each trial as fast as the path takes frames, {:.1} s; median of {rounds} rounds; \
         impairments set both ways on the receiving port; the capture is of that port, to a file\n\
         (the capture writer runs under SCHED_IDLE)\n",
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
    for kind in [PortKind::VhostUser, PortKind::Stream] {
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
