//! "Rootless" proven, not assumed: the daemon, every port kind carrying
//! real traffic (`ulan bench`), a capture written to the user's own file,
//! and a lab of QEMU guests, all run as an unprivileged account (the
//! `ulan-test` system account when the tests run as root, as CI does).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::cli::{uid_of_pid, unprivileged_or_skip, Account, CliUser};
use common::guests::{skip_without_guests, test_store};
use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, Endpoint};

struct Lab {
    u: CliUser,
    lab: String,
}

impl Lab {
    fn start(lab: &str, account: Account) -> Lab {
        let u = CliUser::as_account(lab, account);
        u.ok(&["daemon", "--detach"]);
        Lab { u, lab: lab.into() }
    }

    fn account(&self) -> &Account {
        self.u.account().expect("an account")
    }

    /// The daemon's pid, from its lock file.
    fn daemon_pid(&self) -> u32 {
        let lock = self.u.run_dir().join("ulan").join(&self.lab).join("lock");
        let text =
            std::fs::read_to_string(&lock).unwrap_or_else(|e| panic!("{}: {e}", lock.display()));
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("lock says {text:?}"))
    }

    fn port_path(&self, name: &str) -> PathBuf {
        let ports = self.u.json(&["port", "ls"]);
        let p = ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no port {name} in {ports}"));
        PathBuf::from(p["path"].as_str().unwrap())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.u.ulan(&["down"]);
        let _ = self.u.ulan(&["stop"]);
    }
}

fn assert_owned_by(pid: u32, who: &Account, what: &str) {
    let uid = uid_of_pid(pid).unwrap_or_else(|| panic!("{what} (pid {pid}) is gone"));
    assert_eq!(uid, who.uid, "{what} runs as uid {uid}, not {}", who.uid);
    assert_ne!(uid, 0, "{what} runs as root");
}

#[test]
fn every_port_kind_and_a_capture_work_as_an_unprivileged_account() {
    let Some(account) = unprivileged_or_skip("rootless ports") else {
        return;
    };
    let lab = Lab::start("rootless", account);
    assert_owned_by(lab.daemon_pid(), lab.account(), "the daemon");

    // Real frames through every kind, vhost-user rings included, set up
    // and measured by the unprivileged CLI.
    for kind in ["dgram", "stream", "vde", "vhost-user"] {
        let r = lab.u.json(&[
            "bench",
            "--kind",
            kind,
            "--sizes",
            "64",
            "--duration",
            "0.3s",
            "--tests",
            "throughput",
        ]);
        let size = &r["paths"][0]["sizes"][0];
        let pps = size["throughput"]["pps"].as_f64().unwrap_or(0.0);
        assert!(pps > 1000.0, "{kind}: {r}");
    }

    // A capture into the account's own directory, read back with tshark.
    lab.u.ok(&["lan", "add", "cap"]);
    lab.u
        .ok(&["port", "add", "a", "--kind", "stream", "--lan", "cap"]);
    lab.u
        .ok(&["port", "add", "b", "--kind", "stream", "--lan", "cap"]);
    let file = lab.u.home().join("a.pcapng");
    let mut capture = lab
        .u
        .cmd(&["capture", "a", "-w", file.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open to the end: ulan capture reports on stderr as it stops.
    let mut stderr = std::io::BufReader::new(capture.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.starts_with("capturing port a"), "{line}");
    let mut a = Endpoint::connect(PortKind::Stream, &lab.port_path("a"), lab.u.home()).unwrap();
    let mut b = Endpoint::connect(PortKind::Stream, &lab.port_path("b"), lab.u.home()).unwrap();
    let (ma, mb) = (mac(1), mac(2));
    // b speaks first so the switch knows where it is.
    b.send(&frame(ma, mb, 60, u32::MAX)).unwrap();
    assert!(a.recv(Duration::from_secs(5)).unwrap().is_some());
    const N: u32 = 200;
    for i in 0..N {
        a.send(&frame(mb, ma, 60 + i as usize, i)).unwrap();
    }
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got < N && Instant::now() < deadline {
        if b.recv(Duration::from_millis(200)).unwrap().is_some() {
            got += 1;
        }
    }
    assert_eq!(got, N, "b received");
    // Ctrl-C ends the capture with a whole file.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(capture.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let st = capture.wait().unwrap();
    assert!(st.success(), "ulan capture: {st}: {rest}");
    let meta = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), lab.account().uid, "the capture file's owner");
    let out = std::process::Command::new("tshark")
        .args([
            "-r",
            file.to_str().unwrap(),
            "-T",
            "fields",
            "-e",
            "frame.len",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let lines = String::from_utf8_lossy(&o.stdout).lines().count() as u32;
            // b's first frame out to a, then a's own frames in.
            assert_eq!(lines, N + 1, "frames tshark read");
            let lens: Vec<u32> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().parse().unwrap())
                .collect();
            let want: Vec<u32> = std::iter::once(60).chain((0..N).map(|i| 60 + i)).collect();
            assert_eq!(lens, want);
        }
        Ok(o) => panic!("tshark failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "tshark: {e}");
            ulan::testkit::skipped(format_args!("rootless capture: no tshark ({e})"));
        }
    }
}

#[test]
fn a_guest_lab_runs_as_an_unprivileged_account() {
    if skip_without_guests("rootless guests") {
        return;
    }
    let Some(account) = unprivileged_or_skip("rootless guests") else {
        return;
    };
    let images = test_store();
    common::cli::give_read(&images);
    let u = CliUser::as_account("rootless-g", account).with_env("ULAN_IMAGES", &images);
    let lab = Lab {
        u,
        lab: "rootless-g".into(),
    };
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/two-node.yaml");
    lab.u.ok(&["up", example]);
    assert_owned_by(lab.daemon_pid(), lab.account(), "the daemon");
    let nodes = lab.u.json(&["node", "ls"]);
    for n in nodes.as_array().unwrap() {
        assert_eq!(n["state"], "running", "{n}");
        let pid = n["pid"].as_u64().unwrap() as u32;
        assert_owned_by(pid, lab.account(), "a QEMU guest");
    }
    let pinged = (0..5).any(|_| {
        lab.u
            .ulan(&["exec", "h1", "--", "ping", "-c", "1", "-W", "2", "10.0.0.2"])
            .status
            .success()
    });
    assert!(pinged, "h1 could not ping h2");
    lab.u.ok(&["down"]);
}
