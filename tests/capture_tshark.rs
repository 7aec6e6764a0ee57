//! Captures read back by tshark: a port capture (both directions) and a
//! lan capture written by the daemon, and `ulan capture -w -` piped into
//! `tshark -r -` and ended by Ctrl-C (SIGINT) with a valid file. Every
//! frame is checked: length, direction, interface and payload tag.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ulan::lab::CaptureRequest;
use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, skipped, Endpoint};

fn have_tshark() -> bool {
    Command::new("tshark")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// (length, direction 1 in / 2 out, interface name, tag) of every frame.
fn tshark_rows(args: &[&str], stdin: Option<&[u8]>) -> Vec<(usize, u32, String, u32)> {
    let mut c = Command::new("tshark");
    c.args(args)
        .args([
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "frame.len",
            "-e",
            "frame.packet_flags_direction",
            "-e",
            "frame.interface_name",
            "-e",
            "data.data",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            input.write_all(b).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            let flags = f[1].trim_start_matches("0x");
            let dir = u32::from_str_radix(flags, 16)
                .unwrap_or_else(|_| panic!("direction {flags:?} in {l}"))
                & 3;
            let tag = u32::from_str_radix(&f[3][..8], 16).unwrap();
            (f[0].parse().unwrap(), dir, f[2].to_string(), tag)
        })
        .collect()
}

fn read_file(path: &Path) -> Vec<(usize, u32, String, u32)> {
    tshark_rows(&["-r", path.to_str().unwrap()], None)
}

#[test]
fn port_and_lan_captures_hold_every_frame_for_tshark() {
    if !have_tshark() {
        skipped(format_args!(
            "tshark is not installed (scripts/setup-debian.sh installs it)"
        ));
        return;
    }
    let fx = Fixture::new();
    fx.lan("l");
    let mut a = fx.plug("a", PortKind::Dgram, Some("l"));
    let mut b = fx.plug("b", PortKind::Stream, Some("l"));
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("b.pcapng");
    let lan_file = dir.path().join("l.pcapng");
    let pc = fx
        .lab
        .start_capture(CaptureRequest {
            port: Some("b".into()),
            path: Some(port_file.display().to_string()),
            ..Default::default()
        })
        .unwrap();
    let lc = fx
        .lab
        .start_capture(CaptureRequest {
            lan: Some("l".into()),
            path: Some(lan_file.display().to_string()),
            snaplen: Some(128),
            ..Default::default()
        })
        .unwrap();
    let mut want = Vec::new();
    for i in 0..200u32 {
        let len = 60 + (i as usize * 37) % 1400;
        if i % 2 == 0 {
            a.send(&frame(mac(2), mac(1), len, i)).unwrap();
            b.recv(WAIT).unwrap().unwrap();
        } else {
            b.send(&frame(mac(1), mac(2), len, i)).unwrap();
            a.recv(WAIT).unwrap().unwrap();
        }
        want.push((len, i));
    }
    let rt = rt();
    let p = rt.block_on(fx.lab.stop_capture(&pc.id)).unwrap();
    let l = rt.block_on(fx.lab.stop_capture(&lc.id)).unwrap();
    assert_eq!((p.frames, p.dropped, l.frames, l.dropped), (200, 0, 200, 0));
    // The port capture: a's frames leave towards b's client (outbound),
    // b's come in (inbound), all on interface "b".
    let rows = read_file(&port_file);
    assert_eq!(rows.len(), 200);
    for (row, (len, tag)) in rows.iter().zip(&want) {
        let dir = if tag % 2 == 0 { 2 } else { 1 };
        assert_eq!(row, &(*len, dir, "b".to_string(), *tag));
    }
    // The lan capture: each frame once, inbound on the port it came from.
    let rows = read_file(&lan_file);
    assert_eq!(rows.len(), 200);
    for (row, (len, tag)) in rows.iter().zip(&want) {
        let from = if tag % 2 == 0 { "a" } else { "b" };
        assert_eq!(row, &(*len, 1, from.to_string(), *tag));
    }
    assert!(fx.lab.capture_list().is_empty());
}

const BIN: &str = env!("CARGO_BIN_EXE_ulan");

#[test]
fn ulan_capture_to_stdout_pipes_into_tshark_and_ctrl_c_ends_it_cleanly() {
    if !have_tshark() {
        skipped(format_args!(
            "tshark is not installed (scripts/setup-debian.sh installs it)"
        ));
        return;
    }
    let xdg = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.env("XDG_RUNTIME_DIR", xdg.path())
            .env("XDG_DATA_HOME", xdg.path().join("data"))
            .env("ULAN_LAB", "cap")
            .env_remove("RUST_LOG")
            .args(args);
        c
    };
    let ok = |args: &[&str]| {
        let o = cmd(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Daemon(
        cmd(&["daemon"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = xdg.path().join("ulan/cap/api.sock");
    let deadline = Instant::now() + WAIT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no daemon");
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(&["lan", "add", "l"]);
    ok(&["port", "add", "a", "--kind", "dgram", "--lan", "l"]);
    ok(&["port", "add", "b", "--kind", "dgram", "--lan", "l"]);
    let scratch = tempfile::tempdir().unwrap();
    let run = xdg.path().join("ulan/cap/ports");
    let mut a = Endpoint::connect(PortKind::Dgram, &run.join("a"), scratch.path()).unwrap();
    let mut b = Endpoint::connect(PortKind::Dgram, &run.join("b"), scratch.path()).unwrap();
    // Each dgram port learns its client from a first frame.
    a.send(&frame(mac(9), mac(1), 60, 0)).unwrap();
    b.send(&frame(mac(1), mac(2), 60, 0)).unwrap();
    a.recv(WAIT).unwrap().unwrap();
    a.send(&frame(mac(2), mac(1), 60, 0)).unwrap();
    b.recv(WAIT).unwrap().unwrap();

    // ulan capture l -w - | tshark -r -, then Ctrl-C to ulan capture.
    let mut capture = cmd(&["capture", "l", "-w", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = capture.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut bytes).unwrap();
        bytes
    });
    // Wait until the capture is listed, then send.
    let deadline = Instant::now() + WAIT;
    let captures = || {
        let o = Command::new("curl")
            .args([
                "-s",
                "--unix-socket",
                sock.to_str().unwrap(),
                "http://l/v1/captures",
            ])
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    while !captures().contains("running") {
        assert!(Instant::now() < deadline, "the capture never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 1..=100u32 {
        a.send(&frame(mac(2), mac(1), 100 + i as usize, i)).unwrap();
        b.recv(WAIT).unwrap().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(capture.id() as i32, libc::SIGINT) };
    let status = capture.wait().unwrap();
    let bytes = reader.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut capture.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "ulan capture: {status} {err}");
    assert!(err.contains("100 frames captured, 0 dropped"), "{err}");
    let rows = tshark_rows(&["-r", "-"], Some(&bytes));
    assert_eq!(rows.len(), 100, "{err}");
    for (i, row) in rows.iter().enumerate() {
        let i = i as u32 + 1;
        assert_eq!(row, &(100 + i as usize, 1, "a".to_string(), i));
    }
    // The capture is gone from the daemon.
    assert_eq!(captures().trim(), "[]");
    ok(&["stop"]);
}
