//! `ulan top --once` and `GET /metrics` against a real daemon binary, with
//! frames sent through its port sockets while `top` samples.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, Endpoint};
use ulan::wire::MacAddr;

const BIN: &str = env!("CARGO_BIN_EXE_ulan");

struct Env {
    xdg: tempfile::TempDir,
}

impl Env {
    fn cmd(&self, lab: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env("XDG_RUNTIME_DIR", self.xdg.path())
            .env("XDG_DATA_HOME", self.xdg.path().join("data"))
            .env("ULAN_LAB", lab)
            .env_remove("RUST_LOG");
        c
    }

    fn run_dir(&self, lab: &str) -> PathBuf {
        self.xdg.path().join("ulan").join(lab)
    }

    fn ulan(&self, lab: &str, args: &[&str]) -> Output {
        self.cmd(lab).args(args).output().unwrap()
    }

    fn ok(&self, lab: &str, args: &[&str]) -> String {
        let o = self.ulan(lab, args);
        assert!(
            o.status.success(),
            "ulan {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn daemon(&self, lab: &str) -> Child {
        let child = self
            .cmd(lab)
            .args(["daemon"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ulan(lab, &["lab"]).status.success() {
            assert!(Instant::now() < deadline, "daemon never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }
}

#[test]
fn top_once_shows_every_port_with_its_rates() {
    let env = Env {
        xdg: tempfile::tempdir().unwrap(),
    };
    let scratch = env.xdg.path().join("clients");
    std::fs::create_dir(&scratch).unwrap();
    // No daemon: one line saying how to start it, and a failure.
    let o = env.ulan("top", &["top", "--once"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ulan daemon --lab top"), "{err}");

    let mut d = env.daemon("top");
    env.ok("top", &["lan", "add", "l0"]);
    env.ok(
        "top",
        &["port", "add", "src", "--kind", "stream", "--lan", "l0"],
    );
    env.ok(
        "top",
        &["port", "add", "dst", "--kind", "vde", "--lan", "l0"],
    );
    env.ok("top", &["port", "add", "spare", "--kind", "dgram"]);
    let ports = env.run_dir("top").join("ports");
    let mut src = Endpoint::connect(PortKind::Stream, &ports.join("src"), &scratch).unwrap();
    let mut dst = Endpoint::connect(PortKind::Vde, &ports.join("dst"), &scratch).unwrap();
    dst.send(&frame(MacAddr::BROADCAST, mac(2), 60, 0)).unwrap();
    assert!(src.recv(Duration::from_secs(5)).unwrap().is_some());

    // src sends to dst, about 2000 frames a second, while top samples.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let f = frame(mac(2), mac(1), 1000, 1);
            while !stop.load(Ordering::Relaxed) {
                src.send(&f).unwrap();
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(_)) = dst.recv(Duration::from_millis(20)) {
                    n += 1;
                }
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let table = env.ok("top", &["top", "--once", "--interval", "500ms"]);
    let json: serde_json::Value =
        serde_json::from_str(&env.ok("top", &["--json", "top", "--once", "--interval", "0.5"]))
            .unwrap();
    let metrics = {
        // The same numbers are in /metrics, read with curl-like raw HTTP.
        use std::io::{Read, Write};
        let mut s =
            std::os::unix::net::UnixStream::connect(env.run_dir("top").join("api.sock")).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let received = reader.join().unwrap();
    assert!(received > 100, "only {received} frames crossed");

    // The table: a header, the lan line, and a row per port.
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ulan top  lab top"), "{table}");
    assert!(lines[0].contains("data plane busy"), "{table}");
    assert!(
        table.contains("l0 2 ports 2 MACs"),
        "lan line missing: {table}"
    );
    let row = |name: &str| -> Vec<&str> {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {table}"))
            .split_whitespace()
            .collect()
    };
    assert_eq!(row("src")[..4], ["src", "stream", "l0", "up"]);
    assert_eq!(row("dst")[..4], ["dst", "vde", "l0", "up"]);
    assert_eq!(row("spare")[..4], ["spare", "dgram", "-", "down"]);
    let rx: f64 = row("src")[4].trim_end_matches('k').parse().unwrap();
    assert!(rx > 100.0, "src rx/s {rx}: {table}");
    let tx: f64 = row("dst")[5].trim_end_matches('k').parse().unwrap();
    assert!(tx > 100.0, "dst tx/s {tx}: {table}");
    assert_eq!(row("spare")[4..], ["0", "0", "0.00", "0.00", "0", "0"]);

    // The JSON: rates that agree with the frames' size.
    let p = |name: &str| {
        json["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {json}"))
            .clone()
    };
    let src_row = p("src");
    let fps = src_row["rx_fps"].as_f64().unwrap();
    let mbps = src_row["rx_mbps"].as_f64().unwrap();
    assert!(fps > 100.0 && fps < 20_000.0, "{src_row}");
    assert!((mbps - fps * 1000.0 * 8.0 / 1e6).abs() < 1e-6, "{src_row}");
    assert_eq!(p("dst")["lan"], "l0");
    assert_eq!(p("spare")["lan"], serde_json::Value::Null);
    let busy = json["busy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&busy), "{json}");
    assert_eq!(json["lans"][0]["macs"], 2);

    let head = metrics
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let body = metrics.split("\r\n\r\n").nth(1).unwrap_or("");
    // (hyper may send it chunked; the parser is checked on the body in
    // tests/metrics.rs, here only that the daemon serves it.)
    assert!(
        body.contains("ulan_port_rx_frames_total{lab=\"top\",port=\"src\""),
        "{body}"
    );

    env.ok("top", &["stop"]);
    assert!(d.wait().unwrap().success());
}
