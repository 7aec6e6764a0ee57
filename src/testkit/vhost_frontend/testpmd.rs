//! DPDK's `dpdk-testpmd` as a reference vhost-user backend: two vhost PMD
//! ports (`net_vhost0` at `<dir>/s0`, `net_vhost1` at `<dir>/s1`) with io
//! forwarding, which pairs port 0 with port 1: frames a frontend sends
//! into s0 come out at s1, and back.
//!
//! It runs without hugepages (`--no-huge`) and without PCI, with the main
//! lcore and one forwarding lcore both on one CPU
//! (`--lcores=(0,1)@<cpu>`; testpmd refuses to forward with one lcore).
//! Non-interactive testpmd forwards until its stdin ends, which we hold.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Debian 12 ships it in `dpdk-dev`.
pub const TESTPMD: &str = "dpdk-testpmd";

#[derive(Debug, thiserror::Error)]
pub enum TestpmdError {
    #[error("cannot start {TESTPMD}: {0} (apt-get install dpdk-dev)")]
    Spawn(io::Error),
    #[error("{TESTPMD} exited ({status}) before its vhost sockets appeared; its log: {log}")]
    Exited { status: String, log: String },
    #[error("{TESTPMD}'s vhost sockets did not appear within {0:?}; its log: {1}")]
    Timeout(Duration, String),
    #[error("log file: {0}")]
    Log(io::Error),
}

/// Whether `dpdk-testpmd` is on PATH.
pub fn available() -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(TESTPMD);
            f.is_file()
        })
    })
}

/// A running testpmd; dropped, it is stopped (SIGTERM, then SIGKILL).
pub struct Testpmd {
    child: Child,
    _stdin: ChildStdin,
    dir: PathBuf,
    log: PathBuf,
}

impl Testpmd {
    /// Starts testpmd with its sockets and log in `dir`, on CPU `cpu`
    /// (any CPU if None).
    pub fn start(dir: &Path, cpu: Option<usize>) -> Result<Testpmd, TestpmdError> {
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let log = dir.join("testpmd.log");
        let out = File::create(&log).map_err(TestpmdError::Log)?;
        let err = out.try_clone().map_err(TestpmdError::Log)?;
        let (s0, s1) = (dir.join("s0"), dir.join("s1"));
        let lcores = match cpu {
            Some(c) => format!("(0,1)@{c}"),
            None => "0,1".into(),
        };
        let mut child = Command::new(TESTPMD)
            .arg(format!("--lcores={lcores}"))
            .args(["--no-pci", "--no-huge", "-m", "1024", "--no-telemetry"])
            .arg(format!("--file-prefix=ulanbench{}-{n}", std::process::id()))
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={},queues=1", s0.display()))
            .arg("--vdev")
            .arg(format!("net_vhost1,iface={},queues=1", s1.display()))
            .arg("--")
            .args(["--forward-mode=io", "--stats-period=0", "--nb-cores=1"])
            // Links are down until frontends connect: do not wait 9 s.
            .arg("--disable-link-check")
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(TestpmdError::Spawn)?;
        let stdin = match child.stdin.take() {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TestpmdError::Spawn(io::Error::other("no stdin pipe")));
            }
        };
        let t = Testpmd {
            child,
            _stdin: stdin,
            dir: dir.to_path_buf(),
            log,
        };
        let limit = Duration::from_secs(20);
        let deadline = Instant::now() + limit;
        let mut t = t;
        loop {
            if let Ok(Some(status)) = t.child.try_wait() {
                return Err(TestpmdError::Exited {
                    status: status.to_string(),
                    log: t.log_text(),
                });
            }
            // The sockets exist once the ports are configured; forwarding
            // starts right after (its stdout is block-buffered in a file,
            // so its log says so only later). Frames a frontend posts
            // meanwhile wait in the rings.
            if s0.exists() && s1.exists() {
                return Ok(t);
            }
            if Instant::now() > deadline {
                return Err(TestpmdError::Timeout(limit, t.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port-0 socket (frames sent in here leave at [`Self::s1`]).
    pub fn s0(&self) -> PathBuf {
        self.dir.join("s0")
    }

    pub fn s1(&self) -> PathBuf {
        self.dir.join("s1")
    }

    /// What testpmd printed so far (the last 4 KiB).
    pub fn log_text(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let cut = s.len().saturating_sub(4096);
        let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s[cut..].to_string()
    }

    /// The forwarding lcore's thread (DPDK 22.11 names it `rte-worker-1`,
    /// older releases `lcore-worker-1`): the one that moves frames.
    pub fn forwarding_thread(&self) -> Option<u32> {
        let dir = std::fs::read_dir(format!("/proc/{}/task", self.pid())).ok()?;
        dir.flatten().find_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let c = comm.trim();
            if c.contains("worker") {
                e.file_name().to_str()?.parse().ok()
            } else {
                None
            }
        })
    }

    /// Stops testpmd and returns its log (with its final port counters).
    pub fn stop(mut self) -> String {
        self.terminate();
        self.log_text()
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
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

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.terminate();
    }
}
