//! `ulan bench`: RFC 2544-style frame-rate tests through the running
//! daemon, on a temporary lan and two temporary ports it makes and
//! removes; `--compare vde_switch` runs the same tests through a
//! vde_switch it starts itself.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use super::{print_json, table, Output};
use crate::api::client::Client;
use crate::bench::frames::{port_len, DEFAULT_SIZES};
use crate::bench::link::{Link, SocketLink, VdeSwitch, VhostLink};
use crate::bench::rfc2544::{self, LatencySummary, Runner, TrialSpec};
use crate::bench::BenchError;
use crate::ports::PortKind;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Port kind to test: dgram, stream, vde or vhost-user.
    #[arg(long, default_value = "dgram")]
    pub kind: String,
    /// Frame sizes in bytes, counting the 4-byte FCS as RFC 2544 does
    /// (64 to 9216).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_SIZES)]
    pub sizes: Vec<usize>,
    /// Length of each trial: 1s, 500ms, 2 (seconds).
    #[arg(long, default_value = "1s", value_parser = super::top::parse_interval)]
    pub duration: Duration,
    /// Tests to run: throughput, latency, loss, burst.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,latency,loss,burst"
    )]
    pub tests: Vec<String>,
    /// Load of the latency test: a share of the measured throughput (50%)
    /// or frames per second (100k, 1.5M, 20000).
    #[arg(long, default_value = "100%", value_parser = parse_rate)]
    pub latency_load: RateSpec,
    /// Rates of the loss test: shares of the path's maximum rate (as fast
    /// as it takes frames) or frames per second.
    #[arg(long, value_delimiter = ',', default_value = "100%,90%,80%,50%", value_parser = parse_rate)]
    pub loss_at: Vec<RateSpec>,
    /// Loss (percent) a throughput trial may have and still pass.
    #[arg(long, default_value = "0", value_parser = super::instruments::parse_pct)]
    pub loss_tolerance: f64,
    /// Longest back-to-back burst tried (frames).
    #[arg(long, default_value_t = 65536)]
    pub max_burst: u64,
    /// Run the same tests through another switch and show both: vde_switch.
    #[arg(long, value_parser = ["vde_switch"])]
    pub compare: Option<String>,
}

/// A rate as given: a share of a reference rate, or frames per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateSpec {
    Percent(f64),
    Pps(f64),
}

impl RateSpec {
    fn resolve(self, reference: f64) -> f64 {
        match self {
            RateSpec::Percent(p) => reference * p / 100.0,
            RateSpec::Pps(r) => r,
        }
    }
}

impl std::fmt::Display for RateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateSpec::Percent(p) => write!(f, "{p}%"),
            RateSpec::Pps(r) => write!(f, "{} pps", fmt_rate(*r)),
        }
    }
}

/// `50%`, `100k`, `1.5M`, `20000`, `20000pps`.
pub fn parse_rate(s: &str) -> Result<RateSpec, String> {
    let t = s.trim();
    let bad =
        || format!("{s:?} is not a rate: give a share (50%) or frames per second (100k, 1.5M)");
    if let Some(p) = t.strip_suffix('%') {
        let v: f64 = p.trim().parse().map_err(|_| bad())?;
        if !v.is_finite() || v <= 0.0 || v > 1000.0 {
            return Err(format!("{s:?}: a share must be above 0% and at most 1000%"));
        }
        return Ok(RateSpec::Percent(v));
    }
    let t = t.strip_suffix("pps").unwrap_or(t).trim();
    let (n, scale) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = n.trim().parse().map_err(|_| bad())?;
    let v = v * scale;
    if !v.is_finite() || !(1.0..=1e9).contains(&v) {
        return Err(format!("{s:?}: frames per second must be from 1 to 1G"));
    }
    Ok(RateSpec::Pps(v))
}

fn fmt_rate(pps: f64) -> String {
    if pps >= 1e6 {
        format!("{:.3}M", pps / 1e6)
    } else if pps >= 1e3 {
        format!("{:.1}k", pps / 1e3)
    } else {
        format!("{pps:.0}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Throughput,
    Latency,
    Loss,
    Burst,
}

fn parse_tests(names: &[String]) -> anyhow::Result<Vec<Test>> {
    let mut tests = Vec::new();
    for n in names {
        let t = match n.trim() {
            "throughput" => Test::Throughput,
            "latency" => Test::Latency,
            "loss" => Test::Loss,
            "burst" | "back-to-back" => Test::Burst,
            other => {
                bail!("unknown test {other:?}: the tests are throughput, latency, loss, burst")
            }
        };
        if !tests.contains(&t) {
            tests.push(t);
        }
    }
    if tests.is_empty() {
        bail!("no test to run: give --tests throughput,latency,loss,burst (or some of them)");
    }
    Ok(tests)
}

/// What `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub date: String,
    pub kind: String,
    pub trial_s: f64,
    pub loss_tolerance_pct: f64,
    /// net.unix.max_dgram_qlen: how many datagrams wait for a dgram
    /// port's client (the kernel's default of 10 limits dgram bursts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dgram_qlen: Option<u32>,
    pub paths: Vec<PathReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    pub path: String,
    pub sizes: Vec<SizeReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SizeReport {
    pub size: usize,
    /// Frames per second offered when sending as fast as the path takes
    /// them (the reference of the loss test's shares).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<ThroughputReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loss: Vec<LossPoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub back_to_back: Option<BurstReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    /// The highest rate with no more loss than the tolerance (None: no
    /// rate tried passed).
    pub pps: Option<f64>,
    /// `pps` times the frame size (FCS included, no preamble or gap).
    pub mbit_s: Option<f64>,
    pub trials: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub load_pps: f64,
    pub offered_pps: f64,
    #[serde(flatten)]
    pub percentiles: LatencySummary,
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossPoint {
    pub rate: RateSpec,
    pub aimed_pps: f64,
    pub offered_pps: f64,
    pub sent: u64,
    pub lost: u64,
    pub loss_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BurstReport {
    /// The longest burst with no loss.
    pub frames: u64,
    /// Whether that is `--max-burst` (the path may take longer ones).
    pub at_limit: bool,
    pub trials: u32,
}

/// A temporary lan and two ports on the daemon, removed on drop... but
/// removing takes the API, so `remove` is called explicitly.
struct TempPorts {
    lan: String,
    ports: Vec<String>,
}

impl TempPorts {
    async fn remove(&self, client: &Client) {
        for p in &self.ports {
            if let Err(e) = client.remove_port(p).await {
                eprintln!("ulan bench: could not remove port {p}: {e}");
            }
        }
        if let Err(e) = client.remove_lan(&self.lan).await {
            eprintln!("ulan bench: could not remove lan {}: {e}", self.lan);
        }
    }
}

/// A path to test: a name for the table and its link.
struct BenchPath {
    name: String,
    link: Box<dyn Link + Send>,
}

async fn ulan_path(
    client: &Client,
    kind: PortKind,
    max_len: usize,
    temp: &mut Option<TempPorts>,
) -> anyhow::Result<BenchPath> {
    let base = format!("bench-{}", std::process::id());
    let lan = base.clone();
    client
        .add_lan(&lan)
        .await
        .with_context(|| format!("cannot make the temporary lan {lan}"))?;
    let t = temp.insert(TempPorts {
        lan: lan.clone(),
        ports: Vec::new(),
    });
    let mut paths = Vec::new();
    for end in ["gen", "sink"] {
        let name = format!("{base}-{end}");
        let p = client
            .add_port(&name, kind, Some(&lan))
            .await
            .with_context(|| format!("cannot make the temporary {} port {name}", kind.as_str()))?;
        t.ports.push(name);
        paths.push(PathBuf::from(p.path));
    }
    let link: Box<dyn Link + Send> = if kind == PortKind::VhostUser {
        Box::new(VhostLink::connect(&paths[0], &paths[1], max_len)?)
    } else {
        Box::new(SocketLink::connect(kind, &paths[0], &paths[1])?)
    };
    Ok(BenchPath {
        name: format!("ulan {}", kind.as_str()),
        link,
    })
}

fn vde_switch_path() -> anyhow::Result<BenchPath> {
    let sw = VdeSwitch::start().context("--compare vde_switch")?;
    let mut link = SocketLink::connect(PortKind::Vde, &sw.path(), &sw.path())?;
    link.keep(sw);
    Ok(BenchPath {
        name: "vde_switch".into(),
        link: Box::new(link),
    })
}

/// What every path runs.
#[derive(Clone)]
struct Plan {
    sizes: Vec<usize>,
    tests: Vec<Test>,
    duration: Duration,
    latency_load: RateSpec,
    loss_at: Vec<RateSpec>,
    tolerance: f64,
    max_burst: u64,
}

const SEARCH_RESOLUTION: f64 = 0.01;
const SEARCH_TRIALS: u32 = 10;
const BURST_TRIALS: u32 = 12;

fn run_path(
    path: &mut BenchPath,
    plan: &Plan,
    cancel: &AtomicBool,
    bar: &indicatif::ProgressBar,
) -> Result<PathReport, BenchError> {
    let mut runner = Runner::new(path.link.as_mut(), Some(cancel));
    let mut sizes = Vec::new();
    for &size in &plan.sizes {
        let label = format!("{} {size} B", path.name);
        bar.set_message(format!("{label}: first frames"));
        runner.check_path(size, Duration::from_secs(5))?;
        let mut r = SizeReport {
            size,
            ..SizeReport::default()
        };
        let need_throughput = plan.tests.contains(&Test::Throughput)
            || (plan.tests.contains(&Test::Latency)
                && matches!(plan.latency_load, RateSpec::Percent(_)));
        let need_max = plan.tests.contains(&Test::Loss)
            && plan
                .loss_at
                .iter()
                .any(|s| matches!(s, RateSpec::Percent(_)));
        let mut throughput = None;
        if need_throughput {
            let (best, top, trials) = rfc2544::throughput(
                &mut runner,
                size,
                plan.duration,
                plan.tolerance,
                SEARCH_RESOLUTION,
                SEARCH_TRIALS,
                |m| bar.set_message(format!("{label} throughput: {m}")),
            )?;
            r.max_pps = Some(top.offered_pps());
            throughput = best;
            if plan.tests.contains(&Test::Throughput) {
                r.throughput = Some(ThroughputReport {
                    pps: best,
                    mbit_s: best.map(|p| p * size as f64 * 8.0 / 1e6),
                    trials,
                });
                bar.inc(1);
            }
        } else if need_max {
            bar.set_message(format!("{label}: maximum rate"));
            let top = runner.trial(&TrialSpec {
                size,
                rate_pps: None,
                duration: plan.duration,
                burst: None,
                latency: false,
            })?;
            r.max_pps = Some(top.offered_pps());
        }
        for &test in &plan.tests {
            match test {
                Test::Throughput => {}
                Test::Latency => {
                    let load = match plan.latency_load {
                        RateSpec::Percent(_) => throughput.map(|t| plan.latency_load.resolve(t)),
                        RateSpec::Pps(p) => Some(p),
                    };
                    if let Some(load) = load {
                        bar.set_message(format!("{label} latency at {}", fmt_rate(load)));
                        let t = runner.trial(&TrialSpec {
                            size,
                            rate_pps: Some(load),
                            duration: plan.duration,
                            burst: None,
                            latency: true,
                        })?;
                        r.latency = Some(LatencyReport {
                            load_pps: load,
                            offered_pps: t.offered_pps(),
                            percentiles: t.latency.unwrap_or_default(),
                            lost: t.lost,
                        });
                    }
                    bar.inc(1);
                }
                Test::Loss => {
                    for &spec in &plan.loss_at {
                        let aimed = spec.resolve(r.max_pps.unwrap_or(0.0));
                        if aimed < 1.0 {
                            continue;
                        }
                        bar.set_message(format!("{label} loss at {spec}"));
                        let t = runner.trial(&TrialSpec {
                            size,
                            rate_pps: Some(aimed),
                            duration: plan.duration,
                            burst: None,
                            latency: false,
                        })?;
                        r.loss.push(LossPoint {
                            rate: spec,
                            aimed_pps: aimed,
                            offered_pps: t.offered_pps(),
                            sent: t.sent,
                            lost: t.lost,
                            loss_pct: t.loss_pct(),
                        });
                    }
                    bar.inc(1);
                }
                Test::Burst => {
                    let (frames, trials) = rfc2544::back_to_back(
                        &mut runner,
                        size,
                        plan.max_burst,
                        BURST_TRIALS,
                        |m| bar.set_message(format!("{label} back-to-back: {m}")),
                    )?;
                    r.back_to_back = Some(BurstReport {
                        frames,
                        at_limit: frames >= plan.max_burst,
                        trials,
                    });
                    bar.inc(1);
                }
            }
        }
        sizes.push(r);
    }
    Ok(PathReport {
        path: path.name.clone(),
        sizes,
    })
}

/// Today as YYYY-MM-DD (UTC).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `ulan bench`.
pub async fn bench(client: &Client, args: &BenchArgs, out: Output) -> anyhow::Result<()> {
    let kind: PortKind = args.kind.parse().map_err(|_| {
        anyhow::anyhow!(
            "unknown port kind {:?}: dgram, stream, vde or vhost-user",
            args.kind
        )
    })?;
    if kind == PortKind::Bess {
        bail!("bess ports are not benchmarked: take dgram, stream, vde or vhost-user");
    }
    if kind == PortKind::Tap {
        bail!(
            "tap ports take a tap device from a network namespace, not a synthetic client: \
             take dgram, stream, vde or vhost-user (cargo bench --bench tap_iperf measures taps)"
        );
    }
    let tests = parse_tests(&args.tests)?;
    if args.sizes.is_empty() {
        bail!("no frame size: give --sizes 64,1518 (or some sizes)");
    }
    let mut max_len = 0;
    for &s in &args.sizes {
        max_len = max_len.max(port_len(s)?);
    }
    if args.duration < Duration::from_millis(10) || args.duration > Duration::from_secs(3600) {
        bail!("--duration must be from 10ms to 1h");
    }
    if args.max_burst == 0 || args.max_burst > 100_000_000 {
        bail!("--max-burst must be from 1 to 100000000 frames");
    }
    let plan = Plan {
        sizes: args.sizes.clone(),
        tests: tests.clone(),
        duration: args.duration,
        latency_load: args.latency_load,
        loss_at: args.loss_at.clone(),
        tolerance: args.loss_tolerance,
        max_burst: args.max_burst,
    };
    client.lab().await.context(
        "ulan bench runs through the lab's daemon: is it running (ulan daemon --detach)?",
    )?;
    let mut temp = None;
    let setup = async {
        let mut paths = vec![ulan_path(client, kind, max_len, &mut temp).await?];
        if args.compare.is_some() {
            paths.push(vde_switch_path()?);
        }
        anyhow::Ok(paths)
    };
    let paths = setup.await;
    let result = match paths {
        Ok(paths) => run_all(paths, plan, out).await,
        Err(e) => Err(e),
    };
    if let Some(t) = temp {
        t.remove(client).await;
    }
    let paths = result?;
    let report = BenchReport {
        date: today(),
        kind: kind.as_str().to_string(),
        trial_s: args.duration.as_secs_f64(),
        loss_tolerance_pct: args.loss_tolerance,
        dgram_qlen: std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        paths,
    };
    if out == Output::Json {
        return print_json(&report);
    }
    print!("{}", render(&report, &tests, args));
    Ok(())
}

/// Runs the paths one after the other on a thread of their own (the
/// trials are paced by busy loops); Ctrl-C stops them between turns.
async fn run_all(
    paths: Vec<BenchPath>,
    plan: Plan,
    out: Output,
) -> anyhow::Result<Vec<PathReport>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let steps = (paths.len() * plan.sizes.len() * plan.tests.len()) as u64;
    let bar = if out == Output::Json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:20}] {pos}/{len} {elapsed} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    };
    let worker = {
        let (cancel, bar) = (cancel.clone(), bar.clone());
        tokio::task::spawn_blocking(move || {
            let mut reports = Vec::new();
            for mut p in paths {
                reports.push(run_path(&mut p, &plan, &cancel, &bar)?);
            }
            Ok::<_, BenchError>(reports)
        })
    };
    tokio::pin!(worker);
    let joined = tokio::select! {
        r = &mut worker => r,
        _ = tokio::signal::ctrl_c() => {
            cancel.store(true, Ordering::Relaxed);
            (&mut worker).await
        }
    };
    bar.finish_and_clear();
    match joined.context("the benchmark thread failed")? {
        Ok(r) => Ok(r),
        Err(BenchError::Interrupted) => bail!("interrupted: the temporary ports are removed"),
        Err(e) => Err(e.into()),
    }
}

fn render(report: &BenchReport, tests: &[Test], args: &BenchArgs) -> String {
    let mut s = format!(
        "ulan bench {}: {} ports, {} s trials, loss tolerance {}%\n",
        report.date, report.kind, report.trial_s, report.loss_tolerance_pct
    );
    s.push_str(
        "sizes count the 4-byte FCS (a 64-byte frame is 60 bytes on the port); Mbit/s = \
         frames/s x size x 8\n",
    );
    if let (Some(q), "dgram") = (report.dgram_qlen, report.kind.as_str()) {
        s.push_str(&format!(
            "net.unix.max_dgram_qlen is {q}: at most {q} datagrams wait for a dgram port's client \
             (systemd hosts set 512)\n"
        ));
    }
    let compare = report.paths.len() > 1;
    let base = |size: usize, f: &dyn Fn(&SizeReport) -> Option<f64>| {
        report
            .paths
            .get(1)
            .and_then(|p| p.sizes.iter().find(|r| r.size == size))
            .and_then(f)
    };
    let ratio = |v: Option<f64>, b: Option<f64>| match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    };
    // Rows by size, then path: the paths of one size side by side.
    let rows_of = |f: &dyn Fn(&PathReport, &SizeReport) -> Vec<Vec<String>>| {
        let mut rows = Vec::new();
        for &size in &args.sizes {
            for p in &report.paths {
                if let Some(r) = p.sizes.iter().find(|r| r.size == size) {
                    rows.extend(f(p, r));
                }
            }
        }
        rows
    };
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for t in tests {
        s.push('\n');
        match t {
            Test::Throughput => {
                s.push_str("throughput: the highest rate that loses nothing (RFC 2544 26.1)\n");
                let tput = |r: &SizeReport| r.throughput.as_ref().and_then(|t| t.pps);
                let rows = rows_of(&|p, r| {
                    let Some(t) = r.throughput.as_ref() else {
                        return vec![];
                    };
                    let mut row = vec![
                        r.size.to_string(),
                        p.path.clone(),
                        dash(t.pps.map(|v| format!("{:.3}", v / 1e6))),
                        dash(t.mbit_s.map(|v| format!("{v:.0}"))),
                        dash(r.max_pps.map(|v| format!("{:.3}", v / 1e6))),
                        t.trials.to_string(),
                    ];
                    if compare {
                        row.push(ratio(tput(r), base(r.size, &tput)));
                    }
                    vec![row]
                });
                let mut h = vec!["SIZE", "PATH", "MPPS", "MBIT/S", "MAX MPPS", "TRIALS"];
                if compare {
                    h.push("VS VDE_SWITCH");
                }
                s.push_str(&table(&h, &rows));
            }
            Test::Latency => {
                s.push_str(&format!(
                    "latency: one-way, at {} of throughput (RFC 2544 26.2), microseconds\n",
                    args.latency_load
                ));
                let rows = rows_of(&|p, r| {
                    let Some(l) = r.latency.as_ref() else {
                        return vec![];
                    };
                    let q = &l.percentiles;
                    vec![vec![
                        r.size.to_string(),
                        p.path.clone(),
                        fmt_rate(l.load_pps),
                        format!("{:.1}", q.p50_us),
                        format!("{:.1}", q.p99_us),
                        format!("{:.1}", q.p999_us),
                        format!("{:.1}", q.max_us),
                        l.lost.to_string(),
                    ]]
                });
                s.push_str(&table(
                    &[
                        "SIZE", "PATH", "LOAD PPS", "P50", "P99", "P99.9", "MAX", "LOST",
                    ],
                    &rows,
                ));
            }
            Test::Loss => {
                s.push_str(
                    "frame loss at rates (shares of the path's maximum rate) (RFC 2544 26.3)\n",
                );
                let rows = rows_of(&|p, r| {
                    r.loss
                        .iter()
                        .map(|l| {
                            vec![
                                r.size.to_string(),
                                p.path.clone(),
                                l.rate.to_string(),
                                fmt_rate(l.aimed_pps),
                                fmt_rate(l.offered_pps),
                                l.lost.to_string(),
                                format!("{:.3}", l.loss_pct),
                            ]
                        })
                        .collect()
                });
                s.push_str(&table(
                    &[
                        "SIZE",
                        "PATH",
                        "RATE",
                        "AIMED PPS",
                        "OFFERED PPS",
                        "LOST",
                        "LOSS %",
                    ],
                    &rows,
                ));
            }
            Test::Burst => {
                s.push_str("back-to-back: the longest burst that loses nothing (RFC 2544 26.4)\n");
                let b2b = |r: &SizeReport| r.back_to_back.as_ref().map(|b| b.frames as f64);
                let rows = rows_of(&|p, r| {
                    let Some(b) = r.back_to_back.as_ref() else {
                        return vec![];
                    };
                    let mut row = vec![
                        r.size.to_string(),
                        p.path.clone(),
                        format!("{}{}", if b.at_limit { ">=" } else { "" }, b.frames),
                        b.trials.to_string(),
                    ];
                    if compare {
                        row.push(ratio(b2b(r), base(r.size, &b2b)));
                    }
                    vec![row]
                });
                let mut h = vec!["SIZE", "PATH", "FRAMES", "TRIALS"];
                if compare {
                    h.push("VS VDE_SWITCH");
                }
                s.push_str(&table(&h, &rows));
            }
        }
    }
    s.push_str(
        "\nSockets and vhost-user rings push back rather than drop: a rate the path cannot take \
         shows as a lower offered rate, and fails the throughput search like a loss.\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_absurd_ones_are_refused() {
        assert_eq!(parse_rate("50%"), Ok(RateSpec::Percent(50.0)));
        assert_eq!(parse_rate("100k"), Ok(RateSpec::Pps(100_000.0)));
        assert_eq!(parse_rate("1.5M"), Ok(RateSpec::Pps(1_500_000.0)));
        assert_eq!(parse_rate("20000pps"), Ok(RateSpec::Pps(20_000.0)));
        for bad in [
            "", "%", "-5%", "0%", "5000%", "abc", "0", "-1k", "nan", "inf", "2G", "1e300",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(RateSpec::Percent(50.0).resolve(2e6), 1e6);
        assert_eq!(RateSpec::Pps(7.0).resolve(2e6), 7.0);
    }

    #[test]
    fn tests_parse_with_clear_errors() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_tests(&v(&["loss", "throughput", "loss"])).unwrap(),
            vec![Test::Loss, Test::Throughput]
        );
        let e = parse_tests(&v(&["speed"])).unwrap_err().to_string();
        assert!(e.contains("speed") && e.contains("throughput"), "{e}");
        assert!(parse_tests(&[]).is_err());
    }

    #[test]
    fn today_is_a_date() {
        let d = today();
        assert_eq!(d.len(), 10, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
