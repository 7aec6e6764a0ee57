//! Frame-rate harness: frames per second through ulan's switch for dgram,
//! stream and vde ports, beside a direct socket link (no switch) and
//! `vde_switch`, all in one run with the same generator and sink.
//!
//!     cargo bench --bench framerate            # 2 s per case
//!     cargo bench --bench framerate -- --quick # 0.5 s per case
//!     ULAN_BENCH_SECS=5 cargo bench --bench framerate
//!     ULAN_BENCH_ONLY="ulan vde" cargo bench --bench framerate   # one path
//!
//! The generator and sink are `ulan bench`'s (`ulan::bench`): the generator
//! sends one frame per syscall (send/sendto, or one write of a
//! length-prefixed record for stream), as QEMU's socket backends do; the
//! sink receives in batches (recvmmsg, or large reads) so it is never the
//! limit, and checks each frame. Frames are learned unicast: the sink
//! announces its MAC first.

#[allow(dead_code)]
mod common;
use common::{allowed_cpus, cpu_model, cpu_ns, gettid, pin, text};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ulan::bench::frames::{Generator, Meter};
use ulan::bench::link::{Framing as LinkFraming, SendMode, SocketRx, SocketTx, VdeSwitch};
use ulan::lab::{Lab, LabConfig};
use ulan::ports::sys::{self, UnixAddr};
use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, Endpoint};
use ulan::wire::MacAddr;

const SIZES: [usize; 3] = [64, 512, 1500];

/// What the frames go through. Each ulan port kind is compared with the
/// direct link its clients would have without a switch: two QEMU `dgram`
/// netdevs send to each other's bound, unconnected sockets; two `stream`
/// ends share one stream socket; two VDE clients' data sockets are
/// connected datagram sockets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Direct(PortKind),
    Ulan(PortKind),
    VdeSwitch,
}

impl Setup {
    fn label(self) -> String {
        match self {
            Setup::Direct(k) => format!("direct {}", k.as_str()),
            Setup::Ulan(k) => format!("ulan {}", k.as_str()),
            Setup::VdeSwitch => "vde_switch".into(),
        }
    }
}

/// How the generator writes and the sink reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Datagram,
    Stream,
}

struct Wire {
    gen_fd: OwnedFd,
    gen_dest: Option<UnixAddr>,
    sink_fd: OwnedFd,
    framing: Framing,
    lab: Option<Arc<Lab>>,
    /// The switch's thread (ulan's data plane) or process (vde_switch).
    switch_task: Option<SwitchTask>,
}

#[derive(Clone, Copy)]
enum SwitchTask {
    Thread(libc::pid_t),
    Process(libc::pid_t),
}

impl SwitchTask {
    fn stat_path(self) -> String {
        match self {
            SwitchTask::Thread(t) => format!("/proc/self/task/{t}/stat"),
            SwitchTask::Process(p) => format!("/proc/{p}/stat"),
        }
    }

    fn pin(self, cpu: usize) {
        let (SwitchTask::Thread(t) | SwitchTask::Process(t)) = self;
        pin(t, cpu);
    }
}

/// What must stay alive for a case: endpoints, temp dirs, vde_switch.
type Keep = Vec<Box<dyn std::any::Any>>;

struct Measured {
    pps: f64,
    bps: f64,
    sent: u64,
    received: u64,
    switch_drops: Option<u64>,
    /// CPU time per frame sent, in ns: the switch's and the generator's.
    switch_ns: Option<f64>,
    gen_ns: Option<f64>,
}

/// Where the parties run. `Shared` leaves it to the scheduler (three busy
/// threads on however many CPUs there are). `Pinned` gives the generator
/// one CPU to itself and puts the sink on another, for every path, and the
/// switch (if any) beside the sink: the generator runs alike everywhere,
/// and the question is whether switch and sink together keep up with it on
/// one core.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    Shared,
    Pinned { generator: usize, sink: usize },
}

const DATAPLANE_THREAD: &str = "ulan-dataplane";

/// The threads of this process whose name is `name`.
fn threads_named(name: &str) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            if comm.trim() != name {
                return None;
            }
            e.file_name().to_str()?.parse().ok()
        })
        .collect()
}

fn wait_poll(fd: &OwnedFd, events: libc::c_short) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 10) };
}

fn framing(f: Framing) -> LinkFraming {
    match f {
        Framing::Datagram => LinkFraming::Datagram,
        Framing::Stream => LinkFraming::Stream,
    }
}

/// The library's generator (as `ulan bench` uses it), one frame per
/// syscall like QEMU's socket netdevs.
fn generator(wire: &Wire, size: usize, stop: &AtomicBool, sent: &AtomicU64) {
    let (Ok(fd), Ok(mut gen)) = (
        wire.gen_fd.try_clone(),
        Generator::new(size, mac(2), mac(1), 1, Instant::now(), false),
    ) else {
        return;
    };
    let mut tx = SocketTx::new(fd, wire.gen_dest, framing(wire.framing), SendMode::PerFrame);
    let mut n = 0u64;
    while !stop.load(Relaxed) {
        match tx.send(&mut gen, 1) {
            Ok(1) => {
                n += 1;
                if n % 256 == 0 {
                    sent.store(n, Relaxed);
                }
            }
            Ok(_) => wait_poll(&wire.gen_fd, libc::POLLOUT),
            Err(_) => break,
        }
    }
    sent.store(gen.sent(), Relaxed);
}

/// The library's sink: batched receives (recvmmsg, or large reads), each
/// frame checked and counted.
fn sink(fd: &OwnedFd, framing_: Framing, stop: &AtomicBool, got: &AtomicU64) {
    let Ok(fd2) = fd.try_clone() else {
        return;
    };
    let mut rx = SocketRx::new(fd2, framing(framing_));
    let mut meter = Meter::new(1, Instant::now(), false);
    while !stop.load(Relaxed) {
        match rx.recv(&mut meter) {
            Ok(k) if k > 0 => {}
            Ok(_) => wait_poll(fd, libc::POLLIN),
            Err(_) => break,
        }
        got.store(meter.counts().frames, Relaxed);
    }
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Announces the sink's MAC (so the switch learns it) and drains what the
/// generator got from that.
fn learn(sink: &mut Endpoint, gen: &mut Endpoint) -> io::Result<()> {
    sink.send(&frame(MacAddr::BROADCAST, mac(2), 64, 0))?;
    gen.drain(Duration::from_millis(100))?;
    Ok(())
}

fn setup(which: Setup) -> io::Result<(Wire, Keep)> {
    let dir = scratch();
    match which {
        Setup::Direct(PortKind::Dgram) => {
            // Two bound, unconnected sockets, as two QEMU dgram netdevs.
            let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
            let a = sys::bound_socket(libc::SOCK_DGRAM, &pa)?;
            let b = sys::bound_socket(libc::SOCK_DGRAM, &pb)?;
            sys::set_buffer_sizes(&a, 4 << 20);
            sys::set_buffer_sizes(&b, 4 << 20);
            let wire = Wire {
                gen_fd: a,
                gen_dest: Some(UnixAddr::from_path(&pb)?),
                sink_fd: b,
                framing: Framing::Datagram,
                lab: None,
                switch_task: None,
            };
            Ok((wire, vec![Box::new(dir)]))
        }
        Setup::Direct(kind) => {
            let (ty, framing) = if kind == PortKind::Stream {
                (libc::SOCK_STREAM, Framing::Stream)
            } else {
                (libc::SOCK_DGRAM, Framing::Datagram)
            };
            let mut fds = [0i32; 2];
            // SAFETY: socketpair fills two fds that we then own.
            let r = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            use std::os::fd::FromRawFd;
            // SAFETY: fresh fds from socketpair.
            let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            sys::set_buffer_sizes(&a, 4 << 20);
            sys::set_buffer_sizes(&b, 4 << 20);
            let wire = Wire {
                gen_fd: a,
                gen_dest: None,
                sink_fd: b,
                framing,
                lab: None,
                switch_task: None,
            };
            Ok((wire, vec![Box::new(dir)]))
        }
        Setup::Ulan(kind) => {
            let before = threads_named(DATAPLANE_THREAD);
            let lab = Lab::start(LabConfig::new("bench", &dir.path().join("run")))?;
            // A new thread names itself once it runs: look for a moment.
            let mut dataplane = None;
            for _ in 0..100 {
                dataplane = threads_named(DATAPLANE_THREAD)
                    .into_iter()
                    .find(|t| !before.contains(t));
                if dataplane.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            lab.add_lan("l").map_err(io::Error::other)?;
            let g = lab
                .add_port("g", kind, Some("l"))
                .map_err(io::Error::other)?;
            let s = lab
                .add_port("s", kind, Some("l"))
                .map_err(io::Error::other)?;
            let clients = dir.path().join("c");
            std::fs::create_dir(&clients)?;
            let mut gen = Endpoint::connect(kind, Path::new(&g.path), &clients)?;
            let mut snk = Endpoint::connect(kind, Path::new(&s.path), &clients)?;
            if kind == PortKind::Dgram {
                // A dgram port learns its client from the client's first frame.
                gen.send(&frame(MacAddr::BROADCAST, mac(1), 64, 0))?;
                snk.drain(Duration::from_millis(100))?;
            }
            learn(&mut snk, &mut gen)?;
            let framing = if kind == PortKind::Stream {
                Framing::Stream
            } else {
                Framing::Datagram
            };
            let gen_dest = (kind == PortKind::Dgram)
                .then(|| UnixAddr::from_path(Path::new(&g.path)))
                .transpose()?;
            let gen_fd = gen.raw_fd().try_clone()?;
            let sink_fd = snk.raw_fd().try_clone()?;
            let wire = Wire {
                gen_fd,
                gen_dest,
                sink_fd,
                framing,
                lab: Some(lab),
                switch_task: dataplane.map(SwitchTask::Thread),
            };
            Ok((wire, vec![Box::new(gen), Box::new(snk), Box::new(dir)]))
        }
        Setup::VdeSwitch => {
            let child = VdeSwitch::start().map_err(io::Error::other)?;
            let vde_pid = child.pid() as libc::pid_t;
            let sw_dir = child.path();
            let clients = dir.path().join("c");
            std::fs::create_dir(&clients)?;
            let mut gen = Endpoint::connect(PortKind::Vde, &sw_dir, &clients)?;
            let mut snk = Endpoint::connect(PortKind::Vde, &sw_dir, &clients)?;
            learn(&mut snk, &mut gen)?;
            let gen_fd = gen.raw_fd().try_clone()?;
            let sink_fd = snk.raw_fd().try_clone()?;
            let wire = Wire {
                gen_fd,
                gen_dest: None,
                sink_fd,
                framing: Framing::Datagram,
                lab: None,
                switch_task: Some(SwitchTask::Process(vde_pid)),
            };
            Ok((
                wire,
                vec![Box::new(gen), Box::new(snk), Box::new(child), Box::new(dir)],
            ))
        }
    }
}

fn measure(
    which: Setup,
    size: usize,
    placement: Placement,
    warmup: Duration,
    window: Duration,
) -> io::Result<Measured> {
    let (wire, _keep) = setup(which)?;
    let wire = Arc::new(wire);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let got = Arc::new(AtomicU64::new(0));
    let gen_tid = Arc::new(AtomicI32::new(0));
    let cpus = match placement {
        Placement::Pinned { generator, sink } => Some((generator, sink)),
        Placement::Shared => None,
    };
    if let (Some((_, sink)), Some(task)) = (cpus, wire.switch_task) {
        task.pin(sink);
    }
    let sink_thread = {
        let (wire, stop, got) = (wire.clone(), stop.clone(), got.clone());
        std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || {
                if let Some((_, cpu)) = cpus {
                    pin(0, cpu);
                }
                sink(&wire.sink_fd, wire.framing, &stop, &got)
            })?
    };
    let gen_thread = {
        let (wire, stop, sent, tid) = (wire.clone(), stop.clone(), sent.clone(), gen_tid.clone());
        std::thread::Builder::new()
            .name("bench-gen".into())
            .spawn(move || {
                tid.store(gettid(), Relaxed);
                if let Some((cpu, _)) = cpus {
                    pin(0, cpu);
                }
                generator(&wire, size, &stop, &sent)
            })?
    };
    std::thread::sleep(warmup);
    let switch_stat = wire.switch_task.map(SwitchTask::stat_path);
    let gen_stat = format!("/proc/self/task/{}/stat", gen_tid.load(Relaxed));
    let cpu = |path: &Option<String>| path.as_deref().and_then(cpu_ns);
    let drops0 = switch_drops(&wire);
    let (sw0, gen0) = (cpu(&switch_stat), cpu_ns(&gen_stat));
    let (s0, g0, t0) = (sent.load(Relaxed), got.load(Relaxed), Instant::now());
    std::thread::sleep(window);
    let (s1, g1, t1) = (sent.load(Relaxed), got.load(Relaxed), Instant::now());
    let (sw1, gen1) = (cpu(&switch_stat), cpu_ns(&gen_stat));
    let drops1 = switch_drops(&wire);
    stop.store(true, Relaxed);
    let _ = gen_thread.join();
    let _ = sink_thread.join();
    let secs = (t1 - t0).as_secs_f64();
    let received = g1 - g0;
    let sent = s1 - s0;
    let per_frame = |a: Option<u64>, b: Option<u64>| {
        a.zip(b)
            .filter(|_| sent > 0)
            .map(|(a, b)| b.saturating_sub(a) as f64 / sent as f64)
    };
    Ok(Measured {
        pps: received as f64 / secs,
        bps: received as f64 * size as f64 * 8.0 / secs,
        sent,
        received,
        switch_drops: drops0.zip(drops1).map(|(a, b)| b - a),
        switch_ns: per_frame(sw0, sw1),
        gen_ns: per_frame(gen0, gen1),
    })
}

fn switch_drops(wire: &Wire) -> Option<u64> {
    let lab = wire.lab.as_ref()?;
    Some(lab.port_stats("s").ok()?.counters.tx_dropped)
}

fn have_vde_switch() -> bool {
    Command::new("sh")
        .args(["-c", "command -v vde_switch"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// What systemd sets `net.unix.max_dgram_qlen` to on boot (Debian 12 and
/// most distributions): how many datagrams may wait for a receiver that is
/// not connected back to the sender, as a QEMU dgram netdev's socket is.
/// The kernel's own default is 10; hosts without systemd (containers)
/// keep it.
const SYSTEMD_DGRAM_QLEN: u32 = 512;
const QLEN_PATH: &str = "/proc/sys/net/unix/max_dgram_qlen";
const IN_NAMESPACE: &str = "ULAN_BENCH_NETNS";

fn dgram_qlen() -> Option<u32> {
    std::fs::read_to_string(QLEN_PATH).ok()?.trim().parse().ok()
}

/// On a host that keeps the kernel's 10, runs the benchmark again in a
/// private user and network namespace (no privilege needed) where it is
/// set to systemd's 512, so the numbers are those of a stock Debian host.
/// Returns the note for the header, or exits with the inner run's status.
fn qlen_setup(args: &[String]) -> String {
    let host = dgram_qlen();
    if std::env::var_os(IN_NAMESPACE).is_some() {
        let set = std::fs::write(QLEN_PATH, SYSTEMD_DGRAM_QLEN.to_string());
        let host: String = std::env::var(IN_NAMESPACE).unwrap_or_default();
        return match set {
            Ok(()) => format!(
                "net.unix.max_dgram_qlen {SYSTEMD_DGRAM_QLEN} (systemd's value; this host has {host}: \
                 run in a private user+net namespace; --host-qlen keeps the host's)"
            ),
            Err(e) => format!("net.unix.max_dgram_qlen {host} (could not set {SYSTEMD_DGRAM_QLEN}: {e})"),
        };
    }
    let keep = args.iter().any(|a| a == "--host-qlen");
    match host {
        Some(q) if q < SYSTEMD_DGRAM_QLEN && !keep => {
            let status = std::env::current_exe().and_then(|exe| {
                Command::new("unshare")
                    .args(["--user", "--map-root-user", "--net", "--"])
                    .arg(exe)
                    .args(&args[1..])
                    .env(IN_NAMESPACE, q.to_string())
                    .status()
            });
            match status {
                Ok(s) if s.code().is_some() => std::process::exit(s.code().unwrap_or(1)),
                Ok(s) => {
                    eprintln!("benchmark in a namespace ended by {s}");
                    std::process::exit(1)
                }
                Err(e) => format!(
                    "net.unix.max_dgram_qlen {q} (this host's; a user+net namespace to set \
                     {SYSTEMD_DGRAM_QLEN} could not be made: {e})"
                ),
            }
        }
        Some(q) => format!("net.unix.max_dgram_qlen {q} (this host's)"),
        None => "net.unix.max_dgram_qlen unknown".into(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let qlen_note = qlen_setup(&args);
    let quick = args.iter().any(|a| a == "--quick");
    let secs: f64 = std::env::var("ULAN_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 0.5 } else { 2.0 });
    let window = Duration::from_secs_f64(secs);
    let warmup = Duration::from_millis(if quick { 100 } else { 300 });
    let date = text("date", &["+%Y-%m-%d"]);
    let kernel = text("uname", &["-r"]);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "ulan frame-rate benchmark, {date}, Linux {kernel}, {cpus} CPUs, {}",
        cpu_model()
    );
    println!("generator: one frame per syscall; sink: batched; {secs:.1} s per case after {warmup:?} warm-up");
    println!("{qlen_note}");
    println!(
        "sw ns/f, gen ns/f: CPU time of the switch (ulan's data-plane thread, the vde_switch \
         process) and of the generator per frame sent\n"
    );

    let kinds = [PortKind::Dgram, PortKind::Stream, PortKind::Vde];
    let mut setups = Vec::new();
    for k in kinds {
        setups.push(Setup::Direct(k));
        setups.push(Setup::Ulan(k));
    }
    if have_vde_switch() {
        setups.push(Setup::VdeSwitch);
    } else {
        println!("SKIPPED vde_switch: not installed (apt-get install vde2)\n");
    }
    // ULAN_BENCH_ONLY=word keeps the paths whose label contains it (profiling).
    if let Ok(only) = std::env::var("ULAN_BENCH_ONLY") {
        setups.retain(|s| s.label().contains(&only));
    }
    let want = |name: &str| {
        !args.iter().any(|a| a.starts_with("--placement"))
            || args.iter().any(|a| a == &format!("--placement={name}"))
    };
    let mut placements = Vec::new();
    if want("shared") {
        placements.push(Placement::Shared);
    }
    if want("pinned") {
        match allowed_cpus()[..] {
            [generator, sink, ..] => placements.push(Placement::Pinned { generator, sink }),
            _ => println!("SKIPPED pinned placement: it needs 2 CPUs this process may use\n"),
        }
    }
    for placement in placements {
        run_table(&setups, placement, warmup, window);
    }
}

fn run_table(setups: &[Setup], placement: Placement, warmup: Duration, window: Duration) {
    match placement {
        Placement::Shared => println!(
            "== shared: the scheduler places generator, switch and sink on the CPUs there are"
        ),
        Placement::Pinned { generator, sink } => println!(
            "== pinned: the generator alone on CPU {generator}; the sink, and the switch if any, \
             on CPU {sink}"
        ),
    }
    println!(
        "{:>5}  {:<14} {:>7} {:>8} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9}",
        "size",
        "path",
        "Mpps",
        "Gbit/s",
        "lost",
        "sw drops",
        "sw ns/f",
        "gen ns/f",
        "/direct",
        "/vde_sw"
    );
    let mut checks = Vec::new();
    for size in SIZES {
        let mut results: Vec<(Setup, Measured)> = Vec::new();
        for &s in setups {
            match measure(s, size, placement, warmup, window) {
                Ok(m) => results.push((s, m)),
                Err(e) => println!("{size:>5}  {:<14} failed: {e}", s.label()),
            }
        }
        let rate = |w: Setup| results.iter().find(|(s, _)| *s == w).map(|(_, m)| m.pps);
        let vde_sw = rate(Setup::VdeSwitch);
        for (s, m) in &results {
            let ratio = |base: Option<f64>| {
                base.filter(|b| *b > 0.0)
                    .map(|b| format!("{:.2}x", m.pps / b))
                    .unwrap_or_else(|| "-".into())
            };
            let ns = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
            let direct = match s {
                Setup::Ulan(k) | Setup::Direct(k) => rate(Setup::Direct(*k)),
                Setup::VdeSwitch => rate(Setup::Direct(PortKind::Vde)),
            };
            println!(
                "{:>5}  {:<14} {:>7.3} {:>8.3} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9}",
                size,
                s.label(),
                m.pps / 1e6,
                m.bps / 1e9,
                m.sent.saturating_sub(m.received),
                m.switch_drops
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "-".into()),
                ns(m.switch_ns),
                ns(m.gen_ns),
                ratio(direct),
                ratio(vde_sw),
            );
            if let Setup::Ulan(k) = s {
                if let Some(d) = direct {
                    checks.push((size, k.as_str(), "0.9x direct", m.pps / d, 0.9));
                }
                if let Some(v) = vde_sw {
                    checks.push((size, k.as_str(), "1.5x vde_switch", m.pps / v, 1.5));
                }
            }
        }
        println!();
    }
    println!("targets (the switch is never the bottleneck):");
    for (size, kind, what, ratio, target) in checks {
        let verdict = if ratio >= target { "PASS" } else { "BELOW" };
        println!("  {size:>5} B  ulan {kind:<7} >= {what:<16} {ratio:>5.2}x  {verdict}");
    }
    println!();
}
