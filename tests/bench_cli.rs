//! `ulan bench` through the real binary and daemon: every test and port
//! kind, `--compare vde_switch`, bad arguments, Ctrl-C; the temporary lan
//! and ports are gone afterwards every time.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::CliUser;
use serde_json::Value;

struct User(CliUser);

impl std::ops::Deref for User {
    type Target = CliUser;
    fn deref(&self) -> &CliUser {
        &self.0
    }
}

impl User {
    fn new() -> User {
        User(CliUser::new("bench"))
    }

    fn start(&self) {
        self.ok(&["daemon", "--detach"]);
    }

    /// No lan or port of a bench left behind.
    fn assert_clean(&self) {
        let ports = self.json(&["port", "ls"]);
        let lans = self.json(&["lan", "ls"]);
        assert!(
            !ports.to_string().contains("bench-") && !lans.to_string().contains("bench-"),
            "left behind: {ports} {lans}"
        );
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn every_test_runs_on_dgram_ports_and_cleans_up() {
    let u = User::new();
    u.start();
    let r = u.json(&[
        "bench",
        "--kind",
        "dgram",
        "--sizes",
        "64,1518",
        "--duration",
        "0.2",
        "--max-burst",
        "2000",
    ]);
    assert_eq!(r["kind"], "dgram");
    let path = &r["paths"][0];
    assert_eq!(path["path"], "ulan dgram");
    let sizes = path["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 2);
    for s in sizes {
        let t = &s["throughput"];
        assert!(f(&t["pps"]) > 1000.0, "{s}");
        assert!(f(&t["pps"]) <= f(&s["max_pps"]) * 1.0001, "{s}");
        let size = f(&s["size"]);
        assert!((f(&t["mbit_s"]) - f(&t["pps"]) * size * 8.0 / 1e6).abs() < 1e-6 * f(&t["mbit_s"]));
        let l = &s["latency"];
        assert!(f(&l["frames"]) > 0.0, "{s}");
        assert!(f(&l["p50_us"]) > 0.0);
        assert!(f(&l["p50_us"]) <= f(&l["p99_us"]) && f(&l["p99_us"]) <= f(&l["p999_us"]));
        assert!(f(&l["p999_us"]) <= f(&l["max_us"]));
        let loss = s["loss"].as_array().unwrap();
        assert_eq!(loss.len(), 4, "{s}");
        for p in loss {
            assert!(f(&p["sent"]) > 0.0 && f(&p["lost"]) <= f(&p["sent"]), "{p}");
        }
        assert_eq!(loss[0]["rate"]["percent"], 100.0);
        let b = &s["back_to_back"];
        assert!(f(&b["frames"]) >= 1.0 && f(&b["frames"]) <= 2000.0, "{b}");
    }
    u.assert_clean();
}

#[test]
fn stream_vde_and_vhost_user_ports_and_jumbo_frames() {
    let u = User::new();
    u.start();
    for (kind, sizes) in [
        ("stream", "64,9018"),
        ("vde", "64"),
        ("vhost-user", "64,1518,9018"),
    ] {
        let r = u.json(&[
            "bench",
            "--kind",
            kind,
            "--sizes",
            sizes,
            "--duration",
            "0.2",
            "--tests",
            "throughput",
        ]);
        let path = &r["paths"][0];
        assert_eq!(path["path"], format!("ulan {kind}"));
        let got = path["sizes"].as_array().unwrap();
        assert_eq!(got.len(), sizes.split(',').count(), "{r}");
        for s in got {
            assert!(f(&s["throughput"]["pps"]) > 100.0, "{kind}: {s}");
            assert!(s.get("latency").is_none() && s.get("back_to_back").is_none());
        }
    }
    u.assert_clean();
}

#[test]
fn compare_runs_the_same_tests_through_vde_switch() {
    let have = Command::new("sh")
        .args(["-c", "command -v vde_switch"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        if std::env::var_os("CI").is_some() {
            panic!("vde_switch is not installed (scripts/setup-debian.sh installs vde2)");
        }
        eprintln!("SKIPPED: vde_switch is not installed (apt-get install vde2)");
        return;
    }
    let u = User::new();
    u.start();
    let args = [
        "bench",
        "--kind",
        "vde",
        "--sizes",
        "64",
        "--duration",
        "0.2",
        "--tests",
        "throughput,burst",
        "--max-burst",
        "500",
        "--compare",
        "vde_switch",
    ];
    let r = u.json(&args);
    let names: Vec<_> = r["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].clone())
        .collect();
    assert_eq!(names, ["ulan vde", "vde_switch"]);
    for p in r["paths"].as_array().unwrap() {
        assert!(f(&p["sizes"][0]["throughput"]["pps"]) > 100.0, "{p}");
        assert!(p["sizes"][0]["back_to_back"]["frames"].is_u64(), "{p}");
    }
    // The table puts both side by side with a ratio.
    let table = u.ok(&args[..]);
    assert!(
        table.contains("ulan vde") && table.contains("vde_switch"),
        "{table}"
    );
    assert!(
        table.contains("VS VDE_SWITCH") && table.contains("1.00x"),
        "{table}"
    );
    assert!(
        table.contains("throughput") && table.contains("back-to-back"),
        "{table}"
    );
    u.assert_clean();
}

#[test]
fn bad_arguments_are_refused_before_anything_is_made() {
    let u = User::new();
    // Refused without a daemon: nothing to make or clean.
    for (args, says) in [
        (vec!["--sizes", "63"], "FCS"),
        (vec!["--sizes", "9217"], "9216"),
        (vec!["--kind", "bess"], "bess"),
        (vec!["--kind", "carrier-pigeon"], "carrier-pigeon"),
        (vec!["--tests", "speed"], "speed"),
        (vec!["--loss-at", "0%"], "0%"),
        (vec!["--latency-load", "fast"], "fast"),
        (vec!["--duration", "0"], "duration"),
        (vec!["--loss-tolerance", "150%"], "150"),
        (vec!["--max-burst", "0"], "max-burst"),
        (vec!["--compare", "ovs"], "ovs"),
    ] {
        let mut a = vec!["bench"];
        a.extend(args.iter().copied());
        let out = u.ulan(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{a:?} passed");
        assert!(err.contains(says), "{a:?}: {err}");
    }
    // Good arguments, no daemon: a clear word about it.
    let out = u.ulan(&["bench", "--sizes", "64"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("daemon"), "{err}");
}

#[test]
fn ctrl_c_stops_the_bench_and_removes_its_ports() {
    let u = User::new();
    u.start();
    let mut child = u
        .cmd(&[
            "bench",
            "--sizes",
            "64",
            "--duration",
            "30s",
            "--tests",
            "throughput",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until its ports exist, then interrupt.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !u.json(&["port", "ls"]).to_string().contains("bench-") {
        assert!(Instant::now() < deadline, "the bench never made its ports");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "ulan bench did not stop at Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("interrupted"), "{err}");
    u.assert_clean();
}
