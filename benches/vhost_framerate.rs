//! vhost-user frame rate: ulan's vhost-user ports beside DPDK's vhost PMD
//! (`dpdk-testpmd`, io forwarding between two vhost-user ports), both
//! driven by the project's own vhost-user frontend
//! (`ulan::testkit::vhost_frontend`), in one run.
//!
//!     cargo bench --bench vhost_framerate            # 2 s per case
//!     cargo bench --bench vhost_framerate -- --quick # 0.5 s per case
//!     ULAN_BENCH_SECS=5 cargo bench --bench vhost_framerate
//!
//! One thread, pinned to the first CPU of the affinity mask, is the whole
//! generator: it posts frames on one frontend's TX ring (zero copy: only
//! a sequence number and check word change per frame) and drains the
//! other frontend's RX ring, checking sequence and integrity. The switch
//! (testpmd's forwarding lcore, or every thread of the ulan daemon) runs
//! on the second CPU.

#[allow(dead_code)]
mod common;
use common::{allowed_cpus, cpu_model, cpu_ns, gettid, pin, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ulan::api::client::Client;
use ulan::testkit::mac;
use ulan::testkit::vhost_frontend::testpmd::{self, Testpmd};
use ulan::testkit::vhost_frontend::traffic::{
    build_frame, drive, Blaster, FrameSpec, Sink, Verify,
};
use ulan::testkit::vhost_frontend::VhostFrontend;

const SIZES: [usize; 2] = [64, 1500];
/// QEMU's default queue size; ULAN_BENCH_QUEUE=1024 for bigger rings.
fn queue_size() -> u16 {
    std::env::var("ULAN_BENCH_QUEUE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}
const BATCH: usize = 64;
const DATAPLANE_THREAD: &str = "ulan-dataplane";
const NOT_AVAILABLE: &str = "n/a (vhost-user ports not available in this build)";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Switch {
    Dpdk,
    Ulan,
}

impl Switch {
    fn label(self) -> &'static str {
        match self {
            Switch::Dpdk => "dpdk testpmd",
            Switch::Ulan => "ulan",
        }
    }
}

struct Measured {
    pps: f64,
    bps: f64,
    lost: u64,
    corrupt: u64,
    out_of_order: u64,
    /// CPU time of the switch's forwarding thread per frame, ns.
    switch_ns: Option<f64>,
    /// The generator's busy time per frame, ns, and its idle share.
    gen_ns: Option<f64>,
    gen_idle: f64,
    /// Times the generator thread was preempted in the window (another
    /// task took its CPU: frames pile up and may be dropped).
    preempted: Option<u64>,
}

enum Outcome {
    Ok(Measured),
    NotAvailable,
    Failed(String),
}

/// Pins every thread of process `pid` (as they are now).
fn pin_process(pid: u32, cpu: usize) {
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            if let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                pin(tid, cpu);
            }
        }
    }
}

fn thread_named(pid: u32, name: &str) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    dir.flatten().find_map(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == name)
            .then(|| e.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

/// Involuntary context switches of the calling thread so far.
fn preemptions() -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{}/status", gettid())).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

/// The ulan daemon, started from the release binary in a private run dir.
struct Daemon {
    child: Child,
    client: Client,
    _xdg: tempfile::TempDir,
}

fn ulan_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ULAN_BIN") {
        return PathBuf::from(p);
    }
    // Built by `cargo bench` (release profile) for this bench.
    PathBuf::from(env!("CARGO_BIN_EXE_ulan"))
}

impl Daemon {
    fn start(rt: &tokio::runtime::Runtime) -> Result<Daemon, String> {
        let xdg = tempfile::tempdir().map_err(|e| e.to_string())?;
        let bin = ulan_binary();
        let child = Command::new(&bin)
            .env("XDG_RUNTIME_DIR", xdg.path())
            // Its own data folder: the daemon restores a saved lab from there.
            .env("XDG_DATA_HOME", xdg.path().join("data"))
            .env("ULAN_LAB", "vbench")
            .env_remove("RUST_LOG")
            .arg("daemon")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let sock = xdg.path().join("ulan").join("vbench").join("api.sock");
        let client = Client::new(&sock, "vbench").with_timeout(Some(Duration::from_secs(10)));
        let d = Daemon {
            child,
            client,
            _xdg: xdg,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while rt.block_on(d.client.lab()).is_err() {
            if Instant::now() > deadline {
                return Err("the ulan daemon never answered its API".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// Makes a vhost-user port on lan `l`; None when this build has no
    /// such port kind (the API answers 422).
    fn vhost_port(
        &self,
        rt: &tokio::runtime::Runtime,
        name: &str,
    ) -> Result<Option<PathBuf>, String> {
        let body = serde_json::json!({ "name": name, "kind": "vhost-user", "lan": "l" });
        let (status, v) = rt
            .block_on(
                self.client
                    .request(hyper::Method::POST, "/v1/ports", Some(body)),
            )
            .map_err(|e| e.to_string())?;
        if status.as_u16() == 422 {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(format!("POST /v1/ports: {status}: {v}"));
        }
        v.get("path")
            .and_then(|p| p.as_str())
            .map(|p| Some(PathBuf::from(p)))
            .ok_or_else(|| format!("POST /v1/ports answered no path: {v}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn frontend(path: &Path) -> Result<VhostFrontend, String> {
    VhostFrontend::builder(path)
        .queue_size(queue_size())
        .timeout(Duration::from_secs(10))
        .connect()
        .map_err(|e| e.to_string())
}

/// Drives a connected pair: warm-up, then the measured window, then a
/// drain for the loss count.
fn run_pair(
    mut tx: VhostFrontend,
    mut rx: VhostFrontend,
    size: usize,
    switch_stat: Option<String>,
    warmup: Duration,
    window: Duration,
) -> Result<Measured, String> {
    let spec = FrameSpec {
        size,
        dst: mac(2),
        src: mac(1),
        stream: 1,
    };
    let mut blaster = Blaster::new(spec).map_err(|e| e.to_string())?;
    blaster.prepare(&mut tx).map_err(|e| e.to_string())?;
    let mut sink = Sink::new(Verify::Header);
    // Both ports forward once a first frame gets through (a backend may
    // drop frames for a port whose rings it has not started yet).
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.report().frames == 0 {
        if Instant::now() > deadline {
            return Err("no frame got through in 5 s".into());
        }
        blaster.pump(&mut tx, 1);
        let _ = rx.wait_rx(Duration::from_millis(100));
        sink.poll(&mut rx);
    }
    drive(&mut tx, &mut blaster, &mut rx, &mut sink, warmup, BATCH);
    // Loss is counted from here: frames sent in the window and after.
    let lost0 = sink.report().lost;
    let sw0 = switch_stat.as_deref().and_then(cpu_ns);
    let pre0 = preemptions();
    let d = drive(&mut tx, &mut blaster, &mut rx, &mut sink, window, BATCH);
    let sw1 = switch_stat.as_deref().and_then(cpu_ns);
    let pre1 = preemptions();
    // Whatever is still in flight arrives now; the rest is lost.
    sink.drain(&mut rx, Duration::from_millis(100), Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    sink.finish(1, blaster.sent());
    let r = sink.report();
    let secs = d.elapsed.as_secs_f64();
    let pps = d.received as f64 / secs;
    Ok(Measured {
        pps,
        bps: pps * size as f64 * 8.0,
        lost: r.lost - lost0,
        corrupt: r.corrupt,
        out_of_order: r.out_of_order,
        switch_ns: sw0
            .zip(sw1)
            .filter(|_| d.received > 0)
            .map(|(a, b)| b.saturating_sub(a) as f64 / d.received as f64),
        gen_ns: d.busy_ns_per_frame(),
        gen_idle: 1.0 - d.busy.as_secs_f64() / secs.max(1e-9),
        preempted: pre0.zip(pre1).map(|(a, b)| b.saturating_sub(a)),
    })
}

fn measure_dpdk(size: usize, switch_cpu: usize, warmup: Duration, window: Duration) -> Outcome {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let pmd = match Testpmd::start(dir.path(), Some(switch_cpu)) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let pair = frontend(&pmd.s1()).and_then(|rx| Ok((frontend(&pmd.s0())?, rx)));
    let (tx, rx) = match pair {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    // The forwarding lcore appears once forwarding started.
    let mut fwd = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while fwd.is_none() && Instant::now() < deadline {
        fwd = pmd.forwarding_thread();
        std::thread::sleep(Duration::from_millis(10));
    }
    let stat = fwd.map(|t| format!("/proc/{}/task/{t}/stat", pmd.pid()));
    let r = run_pair(tx, rx, size, stat, warmup, window);
    let log = pmd.stop();
    if std::env::var_os("ULAN_BENCH_DEBUG").is_some() {
        eprintln!("{log}");
    }
    match r {
        Ok(m) => Outcome::Ok(m),
        Err(e) => Outcome::Failed(format!("{e}\n{log}")),
    }
}

fn measure_ulan(
    rt: &tokio::runtime::Runtime,
    size: usize,
    switch_cpu: usize,
    warmup: Duration,
    window: Duration,
) -> Outcome {
    let d = match Daemon::start(rt) {
        Ok(d) => d,
        Err(e) => return Outcome::Failed(e),
    };
    if let Err(e) = rt.block_on(d.client.add_lan("l")) {
        return Outcome::Failed(e.to_string());
    }
    let (g, s) = match (d.vhost_port(rt, "g"), d.vhost_port(rt, "s")) {
        (Ok(Some(g)), Ok(Some(s))) => (g, s),
        (Ok(None), _) | (_, Ok(None)) => return Outcome::NotAvailable,
        (Err(e), _) | (_, Err(e)) => return Outcome::Failed(e),
    };
    let pair = frontend(&s).and_then(|rx| Ok((frontend(&g)?, rx)));
    let (mut tx, mut rx) = match pair {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    // Learned unicast: the sink announces mac(2) first.
    let hello = match build_frame(
        &FrameSpec {
            size: 64,
            dst: ulan::wire::MacAddr::BROADCAST,
            src: mac(2),
            stream: 0,
        },
        0,
    ) {
        Ok(f) => f,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    rx.send(&[&hello[..]]);
    let _ = tx.wait_rx(Duration::from_millis(500));
    tx.recv(|_| {});
    let pid = d.child.id();
    pin_process(pid, switch_cpu);
    let stat = thread_named(pid, DATAPLANE_THREAD).map(|t| format!("/proc/{pid}/task/{t}/stat"));
    match run_pair(tx, rx, size, stat, warmup, window) {
        Ok(m) => Outcome::Ok(m),
        Err(e) => Outcome::Failed(e),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let secs: f64 = std::env::var("ULAN_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 0.5 } else { 2.0 });
    let window = Duration::from_secs_f64(secs);
    let warmup = Duration::from_millis(if quick { 100 } else { 300 });
    let cpus = allowed_cpus();
    println!(
        "ulan vhost-user frame-rate benchmark, {}, Linux {}, {} CPUs, {}",
        text("date", &["+%Y-%m-%d"]),
        text("uname", &["-r"]),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model()
    );
    let (gen_cpu, switch_cpu) = match cpus[..] {
        [a, b, ..] => (a, b),
        _ => {
            println!("SKIPPED: this benchmark needs 2 CPUs this process may use");
            return;
        }
    };
    pin(0, gen_cpu);
    let gen_tid = gettid();
    println!(
        "generator: this process's main thread (tid {gen_tid}) alone on CPU {gen_cpu}, one vhost-user \
         frontend sending (zero copy, batches of {BATCH}) and one receiving, queues of {}, \
         EVENT_IDX and MRG_RXBUF if offered; switch on CPU {switch_cpu}",
        queue_size()
    );
    println!("{secs:.1} s per case after {warmup:?} warm-up");
    println!(
        "sw ns/f: CPU time of testpmd's forwarding lcore / ulan's {DATAPLANE_THREAD} thread per frame \
         received; gen ns/f: the generator's busy time per frame (it could source and sink \
         1000/gen ns/f Mpps if the switch took no time); gen idle: its share of time spent waiting; gen prmt: times the generator \
         was preempted in the window (each can overflow a ring: lost frames)\n"
    );
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("cannot make a runtime: {e}");
            return;
        }
    };
    let have_dpdk = testpmd::available();
    if !have_dpdk {
        println!(
            "SKIPPED dpdk: {} is not installed (apt-get install dpdk-dev)\n",
            testpmd::TESTPMD
        );
    }
    println!(
        "{:>5}  {:<13} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "size",
        "path",
        "Mpps",
        "Gbit/s",
        "lost",
        "sw ns/f",
        "gen ns/f",
        "gen idle",
        "gen prmt",
        "/dpdk"
    );
    let mut checks: Vec<(usize, Option<f64>, f64)> = Vec::new();
    let mut ceilings: Vec<String> = Vec::new();
    for size in SIZES {
        let mut dpdk_pps = None;
        for path in [Switch::Dpdk, Switch::Ulan] {
            let outcome = match path {
                Switch::Dpdk if !have_dpdk => continue,
                Switch::Dpdk => measure_dpdk(size, switch_cpu, warmup, window),
                Switch::Ulan => measure_ulan(&rt, size, switch_cpu, warmup, window),
            };
            match outcome {
                Outcome::Ok(m) => {
                    let ns =
                        |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
                    let ratio = match (path, dpdk_pps) {
                        (Switch::Ulan, Some(b)) if b > 0.0 => format!("{:.2}x", m.pps / b),
                        _ => "-".into(),
                    };
                    println!(
                        "{:>5}  {:<13} {:>7.3} {:>8.3} {:>8} {:>8} {:>8} {:>7.0}% {:>8} {:>8}",
                        size,
                        path.label(),
                        m.pps / 1e6,
                        m.bps / 1e9,
                        m.lost,
                        ns(m.switch_ns),
                        ns(m.gen_ns),
                        m.gen_idle * 100.0,
                        m.preempted
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "-".into()),
                        ratio
                    );
                    if m.corrupt + m.out_of_order > 0 {
                        println!(
                            "       ^ {} corrupt, {} out of order",
                            m.corrupt, m.out_of_order
                        );
                    }
                    match path {
                        Switch::Dpdk => {
                            dpdk_pps = Some(m.pps);
                            if let Some(g) = m.gen_ns.filter(|g| *g > 0.0) {
                                let who = if m.gen_idle > 0.1 {
                                    "testpmd is the bottleneck"
                                } else {
                                    "the generator may be the bottleneck"
                                };
                                ceilings.push(format!(
                                    "  {size:>5} B  generator busy {g:.1} ns/frame: it could move \
                                     ~{:.1} Mpps; testpmd moved {:.2} Mpps and the generator \
                                     waited {:.0}% of the time: {who}",
                                    1e3 / g,
                                    m.pps / 1e6,
                                    m.gen_idle * 100.0
                                ));
                            }
                        }
                        Switch::Ulan => {
                            let target = if size <= 64 { 0.8 } else { 0.9 };
                            checks.push((size, dpdk_pps.map(|b| m.pps / b), target));
                        }
                    }
                }
                Outcome::NotAvailable => {
                    println!("{:>5}  {:<13} {NOT_AVAILABLE}", size, path.label());
                    if path == Switch::Ulan {
                        checks.push((size, None, if size <= 64 { 0.8 } else { 0.9 }));
                    }
                }
                Outcome::Failed(e) => {
                    println!("{:>5}  {:<13} failed: {e}", size, path.label());
                }
            }
        }
    }
    if !ceilings.is_empty() {
        println!("\ngenerator ceiling (one core sourcing and sinking):");
        for c in &ceilings {
            println!("{c}");
        }
    }
    println!("\ntargets (ulan's vhost-user ports against DPDK's vhost PMD, one switch core each):");
    for (size, ratio, target) in checks {
        match ratio {
            Some(r) => println!(
                "  {size:>5} B  ulan >= {target:.1}x dpdk  {r:>5.2}x  {}",
                if r >= target { "PASS" } else { "BELOW" }
            ),
            None => println!("  {size:>5} B  ulan >= {target:.1}x dpdk  n/a"),
        }
    }
}
