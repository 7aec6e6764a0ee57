//! `GET /metrics`: the lab's counters in the Prometheus text exposition
//! format 0.0.4, and a strict parser of that format (`ulan top` reads
//! `/metrics` with it; the tests check the output with it).
//!
//! Per-port counters come from [`PortCounters::fields`], so every counter
//! the data plane keeps is exported under `ulan_port_<name>_total`, with
//! its doc comment as the HELP text, without a change here.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::ports::PortKind;
use crate::switch::stats::{DataPlaneLoad, PortCounters};
use crate::vmlaunch::node::NodeState;

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every node state, each exported as a 0/1 gauge.
pub const NODE_STATES: [NodeState; 5] = [
    NodeState::Starting,
    NodeState::Running,
    NodeState::Stopping,
    NodeState::Stopped,
    NodeState::Crashed,
];

/// What `/metrics` shows, gathered in one go (see `Lab::metrics`).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub lab: String,
    pub uptime_s: f64,
    pub ports: Vec<PortSample>,
    pub lans: Vec<LanSample>,
    pub nodes: Vec<(String, NodeState)>,
    pub dataplane: Vec<ThreadSample>,
}

#[derive(Debug, Clone)]
pub struct PortSample {
    pub name: String,
    pub kind: PortKind,
    pub lan: Option<String>,
    pub up: bool,
    pub counters: PortCounters,
}

#[derive(Debug, Clone)]
pub struct LanSample {
    pub name: String,
    pub ports: usize,
    /// Addresses in the lan's MAC table (None: the data plane did not
    /// answer).
    pub fdb_entries: Option<usize>,
}

/// One data-plane thread.
#[derive(Debug, Clone, Default)]
pub struct ThreadSample {
    pub load: DataPlaneLoad,
    /// CPU time the kernel charged to the thread, when it can be read.
    pub cpu_ns: Option<u64>,
}

/// CPU time of thread `tid` of this process, in nanoseconds: from
/// `schedstat` (ns) if the kernel has it, else `stat` (clock ticks).
pub fn thread_cpu_ns(tid: u64) -> Option<u64> {
    if tid == 0 {
        return None;
    }
    let dir = format!("/proc/self/task/{tid}");
    if let Ok(s) = std::fs::read_to_string(format!("{dir}/schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(ns);
        }
    }
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parens).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // rest starts at field 3 (state); utime and stime are fields 14, 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some((utime + stime).saturating_mul(1_000_000_000 / hz))
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes HELP text: backslash and newline.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Writes families: HELP and TYPE once, then the samples.
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help.trim()));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The exposition of `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut w = Writer { out: String::new() };
    let lab = snap.lab.as_str();

    w.family(
        "ulan_build_info",
        "gauge",
        "The ulan version serving this lab (always 1).",
    );
    w.sample(
        "ulan_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    w.family(
        "ulan_uptime_seconds",
        "gauge",
        "Seconds since the lab started.",
    );
    w.sample("ulan_uptime_seconds", &[("lab", lab)], snap.uptime_s);

    let labels: Vec<[(&str, &str); 4]> = snap
        .ports
        .iter()
        .map(|p| {
            [
                ("lab", lab),
                ("port", p.name.as_str()),
                ("kind", p.kind.as_str()),
                ("lan", p.lan.as_deref().unwrap_or("")),
            ]
        })
        .collect();
    w.family(
        "ulan_port_up",
        "gauge",
        "1 while a client is attached to the port (for dgram: heard from).",
    );
    for (p, l) in snap.ports.iter().zip(&labels) {
        w.sample("ulan_port_up", l, u8::from(p.up));
    }
    let values: Vec<_> = snap.ports.iter().map(|p| p.counters.fields()).collect();
    for (i, f) in PortCounters::default().fields().iter().enumerate() {
        let name = format!("ulan_port_{}_total", f.name);
        w.family(&name, "counter", f.help);
        for (v, l) in values.iter().zip(&labels) {
            w.sample(&name, l, v.get(i).map_or(0, |c| c.value));
        }
    }

    w.family("ulan_lan_ports", "gauge", "Ports on the lan.");
    for l in &snap.lans {
        w.sample("ulan_lan_ports", &[("lab", lab), ("lan", &l.name)], l.ports);
    }
    w.family(
        "ulan_lan_fdb_entries",
        "gauge",
        "Addresses in the lan's MAC table (learned and not aged out).",
    );
    for l in &snap.lans {
        if let Some(n) = l.fdb_entries {
            w.sample("ulan_lan_fdb_entries", &[("lab", lab), ("lan", &l.name)], n);
        }
    }

    let threads: Vec<String> = (0..snap.dataplane.len()).map(|i| i.to_string()).collect();
    let thread_family = |w: &mut Writer,
                         name: &str,
                         kind: &str,
                         help: &str,
                         value: &dyn Fn(&ThreadSample) -> Option<String>| {
        w.family(name, kind, help);
        for (t, id) in snap.dataplane.iter().zip(&threads) {
            if let Some(v) = value(t) {
                w.sample(name, &[("lab", lab), ("thread", id)], v);
            }
        }
    };
    thread_family(
        &mut w,
        "ulan_dataplane_cpu_seconds_total",
        "counter",
        "CPU time the kernel charged to the data-plane thread.",
        &|t| t.cpu_ns.map(|ns| seconds(ns).to_string()),
    );
    thread_family(
        &mut w,
        "ulan_dataplane_busy_seconds_total",
        "counter",
        "Wall time the data-plane thread spent working (outside epoll).",
        &|t| Some(seconds(t.load.busy_ns).to_string()),
    );
    thread_family(
        &mut w,
        "ulan_dataplane_wait_seconds_total",
        "counter",
        "Wall time the data-plane thread spent waiting in epoll.",
        &|t| Some(seconds(t.load.wait_ns).to_string()),
    );
    thread_family(
        &mut w,
        "ulan_dataplane_busy_ratio",
        "gauge",
        "Share of the last second the data-plane thread spent working (0 to 1).",
        &|t| Some((t.load.busy_ppm as f64 / 1e6).to_string()),
    );
    thread_family(
        &mut w,
        "ulan_dataplane_rounds_total",
        "counter",
        "Rounds of the data-plane loop (each serves what one wakeup found).",
        &|t| Some(t.load.rounds.to_string()),
    );
    thread_family(
        &mut w,
        "ulan_dataplane_polls_total",
        "counter",
        "Rounds of the data-plane loop that asked epoll.",
        &|t| Some(t.load.polls.to_string()),
    );

    w.family(
        "ulan_node_state",
        "gauge",
        "1 for the state each node is in, 0 for the others.",
    );
    for (node, state) in &snap.nodes {
        for s in NODE_STATES {
            w.sample(
                "ulan_node_state",
                &[("lab", lab), ("node", node), ("state", s.as_str())],
                u8::from(*state == s),
            );
        }
    }
    w.out
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// TYPE of each family.
    pub types: BTreeMap<String, String>,
    pub help: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Samples of metric `name`.
    pub fn get<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The one sample of `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.get(name)
            .find(|s| labels.iter().all(|(k, v)| s.label(k) == *v))
            .map(|s| s.value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    pub line: usize,
    pub what: String,
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    chars.next().is_some_and(ok_first)
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

/// The family a sample belongs to: a histogram's or summary's `_bucket`,
/// `_sum` and `_count` belong to the base name.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
            {
                return Some(base);
            }
        }
    }
    None
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if s
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) =>
        {
            s.parse().ok()
        }
        _ => None,
    }
}

/// Parses a text exposition strictly: every line is empty, a comment, a
/// HELP or TYPE line, or `name{labels} value [timestamp]`; names and label
/// names are valid, label values are properly escaped, every sample's
/// family has a TYPE before its first sample, a family's TYPE comes once,
/// and no sample (name and labels) appears twice.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut e = Exposition::default();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let err = |what: String| ParseError { line: i + 1, what };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), text) => {
                    if !is_name(name, true) {
                        return Err(err(format!("bad metric name {name:?} in HELP")));
                    }
                    let text = unescape(text.unwrap_or(""), false)
                        .ok_or_else(|| err("bad escape in HELP".into()))?;
                    if e.help.insert(name.into(), text).is_some() {
                        return Err(err(format!("second HELP for {name}")));
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !is_name(name, true) {
                        return Err(err(format!("bad metric name {name:?} in TYPE")));
                    }
                    let kind = kind.trim();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(err(format!("unknown type {kind:?}")));
                    }
                    if e.samples.iter().any(|s| s.name == name) {
                        return Err(err(format!("TYPE for {name} after its samples")));
                    }
                    if e.types.insert(name.into(), kind.into()).is_some() {
                        return Err(err(format!("second TYPE for {name}")));
                    }
                }
                (Some("TYPE"), _, _) => return Err(err("TYPE without a type".into())),
                _ => {} // a comment
            }
            continue;
        }
        let sample = parse_sample(line).map_err(err)?;
        if family_of(&sample.name, &e.types).is_none() {
            return Err(err(format!("sample of {} has no TYPE", sample.name)));
        }
        let key = (sample.name.clone(), sample.labels.clone());
        if !seen.insert(format!("{key:?}")) {
            return Err(err(format!("duplicate sample {line:?}")));
        }
        e.samples.push(sample);
    }
    Ok(e)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value in {line:?}"))?;
    let name = &line[..name_end];
    if !is_name(name, true) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            while chars.peek().is_some_and(|(_, c)| *c == ' ') {
                chars.next();
            }
            match chars.peek() {
                Some((j, '}')) => {
                    end = Some(*j);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut lname = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                lname.push(c);
            }
            if !is_name(&lname, false) {
                return Err(format!("bad label name {lname:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {lname} has no quoted value"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape \\{other:?} in label {lname}")),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\n' => return Err("newline in a label value".into()),
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("label {lname} is not closed"));
            }
            if labels.insert(lname.clone(), value).is_some() {
                return Err(format!("label {lname} twice"));
            }
            match chars.peek() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((_, '}')) => {}
                _ => return Err("expected , or } after a label".into()),
            }
        }
        let end = end.ok_or_else(|| "labels are not closed".to_string())?;
        rest = &body[end + 1..];
    }
    let mut parts = rest.split_whitespace();
    let value = parts.next().ok_or_else(|| "no value".to_string())?;
    let value = parse_value(value).ok_or_else(|| format!("bad value {value:?}"))?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("junk after the value".into());
    }
    if !rest.starts_with(' ') {
        return Err("no space before the value".into());
    }
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

/// Undoes HELP escaping (`\\`, `\n`); with `quotes` also `\"`.
fn unescape(s: &str, quotes: bool) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quotes => out.push('"'),
            // HELP text may hold other backslashes as they are.
            Some(c) if !quotes => {
                out.push('\\');
                out.push(c);
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(lab: &str, port: &str, lan: Option<&str>) -> Snapshot {
        let counters = PortCounters {
            rx_frames: 7,
            tx_bytes: 1 << 40,
            ..PortCounters::default()
        };
        Snapshot {
            lab: lab.into(),
            uptime_s: 1.5,
            ports: vec![PortSample {
                name: port.into(),
                kind: PortKind::Dgram,
                lan: lan.map(str::to_string),
                up: true,
                counters,
            }],
            lans: vec![LanSample {
                name: lan.unwrap_or("l").into(),
                ports: 1,
                fdb_entries: Some(3),
            }],
            nodes: vec![("n\"1".into(), NodeState::Running)],
            dataplane: vec![ThreadSample {
                load: DataPlaneLoad {
                    busy_ppm: 250_000,
                    busy_ns: 1_500_000_000,
                    ..DataPlaneLoad::default()
                },
                cpu_ns: Some(42),
            }],
        }
    }

    #[test]
    fn every_counter_is_exported_with_its_doc() {
        let text = render(&snapshot("t", "p0", Some("l0")));
        let e = parse(&text).unwrap();
        for f in PortCounters::default().fields() {
            let name = format!("ulan_port_{}_total", f.name);
            assert_eq!(e.types[&name], "counter", "{name}");
            assert_eq!(e.help[&name], f.help.trim(), "{name}");
            assert!(!f.help.trim().is_empty(), "{name} has no doc comment");
            assert_eq!(e.get(&name).count(), 1, "{name}");
        }
        let labels = [
            ("port", "p0"),
            ("kind", "dgram"),
            ("lan", "l0"),
            ("lab", "t"),
        ];
        assert_eq!(e.value("ulan_port_rx_frames_total", &labels), Some(7.0));
        assert_eq!(
            e.value("ulan_port_tx_bytes_total", &labels),
            Some((1u64 << 40) as f64)
        );
        assert_eq!(e.value("ulan_port_up", &labels), Some(1.0));
        assert_eq!(e.value("ulan_lan_fdb_entries", &[("lan", "l0")]), Some(3.0));
        assert_eq!(
            e.value("ulan_dataplane_busy_ratio", &[("thread", "0")]),
            Some(0.25)
        );
        assert_eq!(e.value("ulan_dataplane_busy_seconds_total", &[]), Some(1.5));
        assert_eq!(
            e.value("ulan_node_state", &[("node", "n\"1"), ("state", "running")]),
            Some(1.0)
        );
        assert_eq!(
            e.value("ulan_node_state", &[("node", "n\"1"), ("state", "crashed")]),
            Some(0.0)
        );
        assert_eq!(e.get("ulan_node_state").count(), NODE_STATES.len());
        assert_eq!(
            e.value("ulan_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
            Some(1.0)
        );
        // Every family has HELP and TYPE; the counters are named _total.
        for (name, kind) in &e.types {
            assert!(e.help.contains_key(name), "{name} has no HELP");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
        }
    }

    #[test]
    fn hostile_label_values_cannot_break_the_format() {
        // Names of lans and ports cannot hold these (src/names.rs), but a
        // lab name or a node name reaching here must still come out whole.
        for evil in [
            "a\"b",
            "a\\b",
            "a\\",
            "\\\"",
            "x\ny",
            "} 1\nfake_metric 2",
            "\"}",
            "é ünïcode",
            "",
        ] {
            let text = render(&snapshot(evil, evil, Some(evil)));
            let e = parse(&text).unwrap_or_else(|err| panic!("{evil:?}: {err}\n{text}"));
            assert!(e.get("fake_metric").next().is_none());
            let s = e.get("ulan_port_rx_frames_total").next().unwrap();
            assert_eq!(
                (s.label("lab"), s.label("port"), s.label("lan")),
                (evil, evil, evil)
            );
            assert_eq!(
                text.lines()
                    .filter(|l| l.starts_with("ulan_port_up"))
                    .count(),
                1
            );
        }
        for bad in ["a\"b", "a\\b", "x\ny", "} 1"] {
            assert!(crate::names::check_name(bad).is_err());
        }
    }

    #[test]
    fn parser_rejects_what_is_not_the_format() {
        let ok = "# HELP m A metric.\n# TYPE m counter\nm{a=\"1\"} 3\nm{a=\"2\"} 4 1700000000\n";
        assert_eq!(parse(ok).unwrap().samples.len(), 2);
        for bad in [
            "m 1\n",                                    // no TYPE
            "# TYPE m counter\nm{a=\"1} 1\n",           // label not closed
            "# TYPE m counter\nm{a=\"\\x\"} 1\n",       // bad escape
            "# TYPE m counter\nm{1a=\"x\"} 1\n",        // bad label name
            "# TYPE m counter\nm{a=\"x\",a=\"y\"} 1\n", // label twice
            "# TYPE m counter\nm{a=\"x\"} one\n",       // bad value
            "# TYPE m counter\nm 1 2 3\n",              // junk
            "# TYPE m counter\nm\n",                    // no value
            "# TYPE m counter\nm 1\nm 2\n",             // duplicate
            "# TYPE m counter\n# TYPE m gauge\n",       // two TYPEs
            "# TYPE m counter\nm 1\n# TYPE m counter\n",
            "# TYPE 9m counter\n",                      // bad name
            "# TYPE m kettle\n",                        // bad type
            "# TYPE m counter\nm{a=\"x\"}1\n",          // no space
            "# TYPE m counter\nm{a=\"x\" b=\"y\"} 1\n", // no comma
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn random_text_never_panics_the_parser() {
        let alphabet: Vec<char> = "m_a{}=\",\\n\n #HELPTYPEcounter 1.5e-3+Inf é}"
            .chars()
            .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = render(&snapshot("t", "p", Some("l")));
        for _ in 0..4_000 {
            let len = (next() % 80) as usize;
            let junk: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let _ = parse(&junk);
            let _ = parse(&format!("# TYPE m counter\n{junk}"));
            // A valid exposition cut anywhere (on a char boundary).
            let mut cut = (next() as usize) % valid.len();
            while !valid.is_char_boundary(cut) {
                cut -= 1;
            }
            let _ = parse(&valid[..cut]);
        }
    }

    #[test]
    fn this_threads_cpu_time_is_read() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u64;
        let before = thread_cpu_ns(tid).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = thread_cpu_ns(tid).unwrap();
        assert!(after > before, "{before} -> {after}");
        assert_eq!(thread_cpu_ns(0), None);
    }
}
