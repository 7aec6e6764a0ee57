//! `ulan top`: the lab's ports live, from two reads of `GET /metrics` an
//! interval apart: frames and bits per second each way, drops, and in the
//! header how busy the data plane is and each lan's MAC table size.
//! Plain ANSI: the screen is cleared and redrawn each interval; `q` or
//! Ctrl-C ends it and puts the terminal back. `--once` prints one
//! snapshot and exits.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::api::client::Client;
use crate::metrics::Exposition;

/// One row of the table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PortRow {
    pub name: String,
    pub kind: String,
    pub lan: Option<String>,
    pub up: bool,
    pub rx_fps: f64,
    pub tx_fps: f64,
    pub rx_mbps: f64,
    pub tx_mbps: f64,
    pub drops_ps: f64,
    /// rx_dropped + tx_dropped since the port was made.
    pub drops: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LanRow {
    pub name: String,
    pub ports: u64,
    pub macs: Option<u64>,
}

/// What one screen shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct View {
    pub lab: String,
    pub interval_s: f64,
    /// Share of the interval the data plane spent working (0 to 1).
    pub busy: Option<f64>,
    /// Its CPU time over the interval (0 to 1).
    pub cpu: Option<f64>,
    pub lans: Vec<LanRow>,
    pub ports: Vec<PortRow>,
    /// Nodes per state.
    pub nodes: BTreeMap<String, u64>,
}

fn port_key(s: &crate::metrics::Sample) -> String {
    s.label("port").to_string()
}

/// Counter `field` of each port, by port name.
fn per_port(e: &Exposition, field: &str) -> BTreeMap<String, f64> {
    e.get(&format!("ulan_port_{field}_total"))
        .map(|s| (port_key(s), s.value))
        .collect()
}

fn sum(e: &Exposition, name: &str) -> Option<f64> {
    let mut it = e.get(name).peekable();
    it.peek()?;
    Some(it.map(|s| s.value).sum())
}

/// The view from samples `a` and `b` taken `dt` apart.
pub fn view(a: &Exposition, b: &Exposition, dt: Duration) -> View {
    let secs = dt.as_secs_f64().max(1e-6);
    // A counter that went down belongs to a new port of the same name.
    let delta = |old: Option<f64>, new: f64| match old {
        Some(o) if new >= o => new - o,
        _ => new,
    };
    let fields = [
        "rx_frames",
        "tx_frames",
        "rx_bytes",
        "tx_bytes",
        "rx_dropped",
        "tx_dropped",
    ];
    let before: Vec<_> = fields.iter().map(|f| per_port(a, f)).collect();
    let after: Vec<_> = fields.iter().map(|f| per_port(b, f)).collect();
    let ports = b
        .get("ulan_port_up")
        .map(|s| {
            let name = port_key(s);
            let rate = |i: usize| {
                let new = after[i].get(&name).copied().unwrap_or(0.0);
                delta(before[i].get(&name).copied(), new) / secs
            };
            let lan = s.label("lan");
            let total = |i: usize| after[i].get(&name).copied().unwrap_or(0.0);
            PortRow {
                kind: s.label("kind").to_string(),
                lan: (!lan.is_empty()).then(|| lan.to_string()),
                up: s.value > 0.0,
                rx_fps: rate(0),
                tx_fps: rate(1),
                rx_mbps: rate(2) * 8.0 / 1e6,
                tx_mbps: rate(3) * 8.0 / 1e6,
                drops_ps: rate(4) + rate(5),
                drops: (total(4) + total(5)) as u64,
                name,
            }
        })
        .collect();
    let macs: BTreeMap<String, f64> = b
        .get("ulan_lan_fdb_entries")
        .map(|s| (s.label("lan").to_string(), s.value))
        .collect();
    let lans = b
        .get("ulan_lan_ports")
        .map(|s| LanRow {
            name: s.label("lan").to_string(),
            ports: s.value as u64,
            macs: macs.get(s.label("lan")).map(|v| *v as u64),
        })
        .collect();
    let d = |name: &str| Some(sum(b, name)? - sum(a, name)?);
    let busy = match (
        d("ulan_dataplane_busy_seconds_total"),
        d("ulan_dataplane_wait_seconds_total"),
    ) {
        (Some(busy), Some(wait)) if busy + wait > 0.0 => {
            Some((busy / (busy + wait)).clamp(0.0, 1.0))
        }
        _ => sum(b, "ulan_dataplane_busy_ratio"),
    };
    let cpu = d("ulan_dataplane_cpu_seconds_total").map(|c| (c / secs).max(0.0));
    let mut nodes = BTreeMap::new();
    for s in b.get("ulan_node_state").filter(|s| s.value > 0.0) {
        *nodes.entry(s.label("state").to_string()).or_insert(0) += 1;
    }
    let lab = b
        .get("ulan_uptime_seconds")
        .next()
        .map(|s| s.label("lab").to_string())
        .unwrap_or_default();
    View {
        lab,
        interval_s: dt.as_secs_f64(),
        busy,
        cpu,
        lans,
        ports,
        nodes,
    }
}

fn rate(v: f64) -> String {
    if v >= 10_000_000.0 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 100_000.0 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// The view as text (the table of `ulan top`).
pub fn render(v: &View) -> String {
    let mut out = format!(
        "ulan top  lab {}  every {:.1} s  data plane busy {}  cpu {}\n",
        v.lab,
        v.interval_s,
        pct(v.busy),
        pct(v.cpu)
    );
    let lans: Vec<String> = v
        .lans
        .iter()
        .map(|l| {
            let macs = l.macs.map_or_else(|| "?".into(), |m| m.to_string());
            format!("{} {} ports {} MACs", l.name, l.ports, macs)
        })
        .collect();
    out.push_str(&format!(
        "lans: {}\n",
        if lans.is_empty() {
            "none".into()
        } else {
            lans.join(", ")
        }
    ));
    if !v.nodes.is_empty() {
        let nodes: Vec<String> = v.nodes.iter().map(|(s, n)| format!("{n} {s}")).collect();
        out.push_str(&format!("nodes: {}\n", nodes.join(", ")));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = v
        .ports
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.kind.clone(),
                p.lan.clone().unwrap_or_else(|| "-".into()),
                if p.up { "up" } else { "down" }.into(),
                rate(p.rx_fps),
                rate(p.tx_fps),
                format!("{:.2}", p.rx_mbps),
                format!("{:.2}", p.tx_mbps),
                rate(p.drops_ps),
                p.drops.to_string(),
            ]
        })
        .collect();
    out.push_str(&super::table(
        &[
            "PORT",
            "KIND",
            "LAN",
            "LINK",
            "RX/s",
            "TX/s",
            "RX Mbit/s",
            "TX Mbit/s",
            "DROP/s",
            "DROPS",
        ],
        &rows,
    ));
    out
}

/// Parses `1`, `0.5`, `500ms`, `2s`: at least 100 ms, at most an hour.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an interval (like 1, 0.5, 500ms, 2s)"))?;
    let secs = v * scale;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!(
            "the interval must be between 100ms and 1h, not {s}"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Puts the terminal in non-canonical, no-echo mode (for `q`) while it
/// lives, and on the alternate screen; restores both when dropped.
struct Screen {
    saved: Option<libc::termios>,
}

impl Screen {
    fn enter() -> Screen {
        let mut saved = None;
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            // SAFETY: termios is plain data; tcgetattr fills it.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: fd 0 is a terminal; `t` is a valid termios.
            if unsafe { libc::tcgetattr(0, &mut t) } == 0 {
                let mut raw = t;
                raw.c_lflag &= !(libc::ICANON | libc::ECHO);
                raw.c_cc[libc::VMIN] = 1;
                raw.c_cc[libc::VTIME] = 0;
                // SAFETY: as above, with a modified copy.
                if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } == 0 {
                    saved = Some(t);
                }
            }
        }
        print!("\x1b[?1049h\x1b[?25l");
        let _ = std::io::stdout().flush();
        Screen { saved }
    }

    fn draw(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\x1b[H\x1b[2J{text}");
        let _ = out.flush();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        if let Some(t) = self.saved {
            // SAFETY: restoring the settings read in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

async fn sample(client: &Client) -> anyhow::Result<(Exposition, Instant)> {
    let e = client.metrics().await?;
    Ok((e, Instant::now()))
}

/// `ulan top`. With `once`, two samples `interval` apart, one table (or
/// JSON), and done.
pub async fn top(
    client: &Client,
    interval: Duration,
    once: bool,
    json: bool,
) -> anyhow::Result<()> {
    let (mut prev, mut prev_t) = sample(client).await?;
    if once {
        tokio::time::sleep(interval).await;
        let (cur, t) = sample(client).await?;
        let v = view(&prev, &cur, t - prev_t);
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", render(&v));
        }
        return Ok(());
    }
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    // Blocking reads of stdin on a thread of their own; it ends with the
    // process.
    std::thread::Builder::new()
        .name("ulan-top-keys".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            while let Ok(1) = std::io::stdin().read(&mut b) {
                if keys_tx.send(b[0]).is_err() {
                    break;
                }
            }
        })
        .context("cannot read the keyboard")?;
    // Registered now, before the screen changes: Ctrl-C from here on
    // ends the loop and the screen is put back.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot catch Ctrl-C")?;
    let screen = Screen::enter();
    screen.draw("ulan top: first sample...\n");
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let (cur, t) = sample(client).await?;
                screen.draw(&format!("{}\nq quits\n", render(&view(&prev, &cur, t - prev_t))));
                (prev, prev_t) = (cur, t);
            }
            key = keys.recv() => match key {
                Some(b'q') | Some(b'Q') | Some(3) | None => break,
                _ => {}
            },
            _ = interrupt.recv() => break,
        }
    }
    drop(screen);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expo(rx: u64, busy: f64, wait: f64) -> Exposition {
        let text = format!(
            "# TYPE ulan_port_up gauge\n\
             ulan_port_up{{lab=\"t\",port=\"p\",kind=\"dgram\",lan=\"l\"}} 1\n\
             # TYPE ulan_port_rx_frames_total counter\n\
             ulan_port_rx_frames_total{{lab=\"t\",port=\"p\",kind=\"dgram\",lan=\"l\"}} {rx}\n\
             # TYPE ulan_port_rx_bytes_total counter\n\
             ulan_port_rx_bytes_total{{lab=\"t\",port=\"p\",kind=\"dgram\",lan=\"l\"}} {}\n\
             # TYPE ulan_port_rx_dropped_total counter\n\
             ulan_port_rx_dropped_total{{lab=\"t\",port=\"p\",kind=\"dgram\",lan=\"l\"}} 5\n\
             # TYPE ulan_lan_ports gauge\nulan_lan_ports{{lab=\"t\",lan=\"l\"}} 1\n\
             # TYPE ulan_lan_fdb_entries gauge\nulan_lan_fdb_entries{{lab=\"t\",lan=\"l\"}} 4\n\
             # TYPE ulan_dataplane_busy_seconds_total counter\nulan_dataplane_busy_seconds_total{{thread=\"0\"}} {busy}\n\
             # TYPE ulan_dataplane_wait_seconds_total counter\nulan_dataplane_wait_seconds_total{{thread=\"0\"}} {wait}\n",
            rx * 100
        );
        crate::metrics::parse(&text).unwrap()
    }

    #[test]
    fn rates_come_from_two_samples() {
        let v = view(
            &expo(100, 1.0, 1.0),
            &expo(1100, 1.5, 2.5),
            Duration::from_secs(2),
        );
        assert_eq!(v.ports.len(), 1);
        let p = &v.ports[0];
        assert_eq!(
            (p.name.as_str(), p.kind.as_str(), p.lan.as_deref()),
            ("p", "dgram", Some("l"))
        );
        assert_eq!(p.rx_fps, 500.0);
        assert_eq!(p.rx_mbps, 500.0 * 100.0 * 8.0 / 1e6);
        assert_eq!((p.drops_ps, p.drops), (0.0, 5));
        assert_eq!(v.busy, Some(0.25));
        assert_eq!(
            v.lans,
            vec![LanRow {
                name: "l".into(),
                ports: 1,
                macs: Some(4)
            }]
        );
        // A counter that went back (the port was made again) counts from 0.
        let v = view(
            &expo(1000, 0.0, 0.0),
            &expo(10, 0.0, 0.0),
            Duration::from_secs(1),
        );
        assert_eq!(v.ports[0].rx_fps, 10.0);
        let text = render(&v);
        assert!(
            text.lines()
                .any(|l| l.starts_with("p ") && l.contains("dgram")),
            "{text}"
        );
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("2s").unwrap(), Duration::from_secs(2));
        for bad in ["0", "1ms", "x", "", "-1", "1e9", "NaN"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
