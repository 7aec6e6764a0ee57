//! `GET /metrics` of a real lab with traffic through real sockets: the
//! exposition parses strictly, its port counters are the frames the test
//! sent, the lan's MAC table size is the addresses the test taught, the
//! counters only grow while traffic flows, and the data plane's load
//! figures are sane.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::net::UnixListener;
use ulan::api::{self, Client, ServerConfig};
use ulan::metrics::{parse, Exposition};
use ulan::ports::PortKind;
use ulan::switch::stats::PortCounters;
use ulan::testkit::{frame, mac};
use ulan::wire::MacAddr;

struct Served {
    rt: tokio::runtime::Runtime,
    client: Client,
    sock: std::path::PathBuf,
    _stop: tokio::sync::watch::Sender<bool>,
}

fn serve(fx: &Fixture) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sock = fx.dir.path().join("api.sock");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let lab = fx.lab.clone();
    let s = sock.clone();
    rt.spawn(async move {
        let listener = UnixListener::bind(&s).unwrap();
        api::serve_with(listener, lab, rx, ServerConfig::default()).await
    });
    let deadline = Instant::now() + WAIT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the API never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    let client = Client::new(&sock, "test").with_timeout(Some(WAIT));
    Served {
        rt,
        client,
        sock,
        _stop: stop,
    }
}

impl Served {
    fn scrape(&self) -> Exposition {
        let text = self.rt.block_on(self.client.metrics_text()).unwrap();
        parse(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"))
    }

    /// The raw response, to see its headers.
    fn raw(&self) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&self.sock).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

fn port_value(e: &Exposition, field: &str, port: &str) -> u64 {
    e.value(&format!("ulan_port_{field}_total"), &[("port", port)])
        .unwrap_or_else(|| panic!("no {field} for {port}")) as u64
}

/// Every port counter of `port` in the exposition equals `c`, field by
/// field (whatever fields PortCounters has).
fn assert_counters(e: &Exposition, port: &str, c: &PortCounters) {
    for f in c.fields() {
        assert_eq!(port_value(e, f.name, port), f.value, "{port} {}", f.name);
    }
}

fn drain_n(ep: &mut ulan::testkit::Endpoint, n: usize) {
    for i in 0..n {
        assert!(ep.recv(WAIT).unwrap().is_some(), "frame {i} of {n} missing");
    }
}

#[test]
fn metrics_are_the_traffic_sent() {
    let fx = Fixture::new();
    fx.lan("l0");
    fx.lan("quiet");
    // dgram: the plug sends one frame on no lan (rx_drop_no_lan).
    let mut a = fx.plug("a", PortKind::Dgram, Some("l0"));
    let mut b = fx.plug("b", PortKind::Stream, Some("l0"));
    let mut c = fx.plug("c", PortKind::Vde, Some("l0"));
    let _idle = fx.lab.add_port("idle", PortKind::Bess, None).unwrap();
    let api = serve(&fx);

    // Each teaches its MAC with a broadcast that the two others get.
    for (i, ep) in [&mut b, &mut c, &mut a].into_iter().enumerate() {
        ep.send(&frame(MacAddr::BROADCAST, mac(i as u32 + 1), 60, i as u32))
            .unwrap();
    }
    drain_n(&mut a, 2);
    drain_n(&mut b, 2);
    drain_n(&mut c, 2);
    // a -> b unicast (b's MAC is mac(1)), in chunks b reads as they come.
    const N: usize = 300;
    for chunk in 0..(N / 50) {
        for i in 0..50 {
            a.send(&frame(mac(1), mac(3), 100, (chunk * 50 + i) as u32))
                .unwrap();
        }
        drain_n(&mut b, 50);
    }
    assert!(
        c.recv(QUIET).unwrap().is_none(),
        "a learned unicast reached c"
    );
    let sa = fx.wait_stats("a", |s| s.rx_frames == 1 + 1 + N as u64);
    let sb = fx.wait_stats("b", |s| s.tx_frames == 2 + N as u64);
    let sc = fx.stats("c");

    let e = api.scrape();
    // What the test sent, through the sockets.
    assert_eq!(port_value(&e, "rx_frames", "a"), 2 + N as u64);
    assert_eq!(port_value(&e, "rx_bytes", "a"), 60 + 60 + 100 * N as u64);
    assert_eq!(port_value(&e, "rx_drop_no_lan", "a"), 1);
    assert_eq!(port_value(&e, "rx_dropped", "a"), 1);
    assert_eq!(port_value(&e, "tx_frames", "a"), 2);
    assert_eq!(port_value(&e, "rx_frames", "b"), 1);
    assert_eq!(port_value(&e, "tx_frames", "b"), 2 + N as u64);
    assert_eq!(port_value(&e, "tx_bytes", "b"), 120 + 100 * N as u64);
    assert_eq!(port_value(&e, "rx_frames", "c"), 1);
    assert_eq!(port_value(&e, "tx_frames", "c"), 2);
    assert_eq!(port_value(&e, "tx_dropped", "b"), 0);
    // And every field equals the API's own stats.
    assert_counters(&e, "a", &sa);
    assert_counters(&e, "b", &sb);
    assert_counters(&e, "c", &sc);
    assert_counters(&e, "idle", &PortCounters::default());

    // Labels and port state.
    let up = |p: &str| e.value("ulan_port_up", &[("port", p)]);
    assert_eq!(
        e.value(
            "ulan_port_up",
            &[
                ("lab", "test"),
                ("port", "b"),
                ("kind", "stream"),
                ("lan", "l0")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(up("a"), Some(1.0));
    assert_eq!(
        e.value(
            "ulan_port_up",
            &[("port", "idle"), ("kind", "bess"), ("lan", "")]
        ),
        Some(0.0)
    );
    assert_eq!(e.get("ulan_port_up").count(), 4);

    // The MAC table: the three addresses taught, none on the quiet lan.
    let fdb = |l: &str| e.value("ulan_lan_fdb_entries", &[("lan", l)]);
    assert_eq!(fdb("l0"), Some(3.0));
    assert_eq!(fdb("quiet"), Some(0.0));
    assert_eq!(
        rt().block_on(fx.lab.fdb("l0")).unwrap().len(),
        3,
        "the API's own table"
    );
    assert_eq!(e.value("ulan_lan_ports", &[("lan", "l0")]), Some(3.0));

    // Families: every one has HELP and TYPE; every sample a TYPE (the
    // parser refuses samples without); counters end in _total.
    for (name, kind) in &e.types {
        assert!(e.help.get(name).is_some_and(|h| !h.is_empty()), "{name}");
        assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
    }
    for f in PortCounters::default().fields() {
        let name = format!("ulan_port_{}_total", f.name);
        assert_eq!(e.get(&name).count(), 4, "{name}");
    }

    // The data plane's load.
    let one = |n: &str| {
        let v: Vec<f64> = e.get(n).map(|s| s.value).collect();
        assert_eq!(v.len(), 1, "{n}: {v:?}");
        v[0]
    };
    let ratio = one("ulan_dataplane_busy_ratio");
    assert!((0.0..=1.0).contains(&ratio), "busy ratio {ratio}");
    assert!(one("ulan_dataplane_busy_seconds_total") > 0.0);
    assert!(one("ulan_dataplane_wait_seconds_total") > 0.0);
    assert!(one("ulan_dataplane_cpu_seconds_total") > 0.0);
    assert!(one("ulan_dataplane_rounds_total") >= one("ulan_dataplane_polls_total"));
    assert!(one("ulan_dataplane_polls_total") > 0.0);
    assert_eq!(
        e.value("ulan_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        Some(1.0)
    );
    assert!(one("ulan_uptime_seconds") > 0.0);

    // The content type of the format.
    let raw = api.raw();
    let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
}

#[test]
fn counters_only_grow_while_traffic_flows() {
    let fx = Fixture::new();
    fx.lan("l0");
    let mut a = fx.plug("a", PortKind::Dgram, Some("l0"));
    let mut b = fx.plug("b", PortKind::Vde, Some("l0"));
    let api = serve(&fx);
    b.send(&frame(MacAddr::BROADCAST, mac(2), 60, 0)).unwrap();
    drain_n(&mut a, 1);

    // a floods b (learned unicast) from a thread; b reads on another, so
    // some frames may be dropped when b falls behind: drops are counters
    // too and must grow as well.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let f = frame(mac(2), mac(1), 64, 7);
            while !stop.load(Ordering::Relaxed) {
                if a.try_send(&f).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            // Kept alive until the counts are read: a dgram port that
            // finds its client gone purges what the client left queued.
            a
        })
    };
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = b.recv(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t1 = Instant::now();
    let e1 = api.scrape();
    std::thread::sleep(Duration::from_millis(1500));
    let e2 = api.scrape();
    let dt = t1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _a = sender.join().unwrap();
    reader.join().unwrap();

    let key = |s: &ulan::metrics::Sample| format!("{}{:?}", s.name, s.labels);
    let before: BTreeMap<String, f64> = e1
        .samples
        .iter()
        .filter(|s| e1.types[&s.name] == "counter")
        .map(|s| (key(s), s.value))
        .collect();
    let mut compared = 0;
    for s in e2.samples.iter().filter(|s| e2.types[&s.name] == "counter") {
        let old = before[&key(s)];
        assert!(s.value >= old, "{} went from {old} to {}", key(s), s.value);
        compared += 1;
    }
    assert_eq!(compared, before.len());
    let grew =
        |field: &str, port: &str| port_value(&e2, field, port) - port_value(&e1, field, port);
    assert!(grew("rx_frames", "a") > 0, "no traffic counted");
    assert!(grew("tx_frames", "b") + grew("tx_dropped", "b") > 0);
    // Everything a sent is counted once it is published.
    let total = sent.load(Ordering::Relaxed);
    // (a's first frame, from the plug, came while it was on no lan.)
    let st = fx.wait_stats("a", |s| s.rx_frames == 1 + total);
    assert_eq!(st.rx_frames, 1 + total);
    let sb = fx.wait_stats("b", |s| s.tx_frames + s.tx_dropped == total);
    assert_eq!(sb.tx_frames + sb.tx_dropped, total);

    // Time working plus time waiting is the data plane's wall time: no
    // more than the interval between the scrapes (it is summed when a
    // wait ends, so at most a tick less).
    let d = |n: &str| e2.get(n).next().unwrap().value - e1.get(n).next().unwrap().value;
    let busy = d("ulan_dataplane_busy_seconds_total");
    let wait = d("ulan_dataplane_wait_seconds_total");
    assert!(busy > 0.0 && wait >= 0.0, "busy {busy} wait {wait}");
    assert!(busy + wait <= dt + 0.3, "busy {busy} + wait {wait} > {dt}");
    assert!(busy + wait >= dt - 1.1, "busy {busy} + wait {wait} << {dt}");
    let cpu = d("ulan_dataplane_cpu_seconds_total");
    assert!(cpu > 0.0 && cpu <= dt + 0.05, "cpu {cpu} in {dt} s");
    let ratio = e2.get("ulan_dataplane_busy_ratio").next().unwrap().value;
    assert!(
        (0.0..=1.0).contains(&ratio) && ratio > 0.0,
        "busy ratio {ratio}"
    );
    assert!(d("ulan_dataplane_rounds_total") > 0.0);
}
