//! Shared fixture: a lab started in-process, ports made through the same
//! `Lab` calls the API uses, and synthetic clients from `ulan::testkit`.
#![allow(dead_code)]

pub mod cli;
pub mod containers;
pub mod guests;
pub mod unprivileged;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ulan::lab::{Lab, LabConfig};
use ulan::ports::PortKind;
use ulan::switch::stats::PortCounters;
use ulan::testkit::{frame, Endpoint};
use ulan::wire::MacAddr;

pub const QUIET: Duration = Duration::from_millis(150);
pub const WAIT: Duration = Duration::from_secs(5);

pub struct Fixture {
    pub lab: Arc<Lab>,
    pub dir: tempfile::TempDir,
    pub scratch: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        Self::with_aging(300)
    }

    pub fn with_aging(aging_secs: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("clients");
        std::fs::create_dir(&scratch).unwrap();
        let lab = Lab::start(LabConfig {
            aging_secs,
            ..LabConfig::new("test", &dir.path().join("run"))
        })
        .unwrap();
        Fixture { lab, dir, scratch }
    }

    pub fn lan(&self, name: &str) {
        self.lab.add_lan(name).unwrap();
    }

    /// Makes a port, plugs a client in and waits until the switch sees it.
    /// A dgram port learns its client from a first frame, sent while the
    /// port is on no lan (so it shows up as rx_drop_no_lan).
    pub fn plug(&self, name: &str, kind: PortKind, lan: Option<&str>) -> Endpoint {
        let info = self.lab.add_port(name, kind, None).unwrap();
        let mut ep = Endpoint::connect(kind, info.path.as_ref(), &self.scratch).unwrap();
        if kind == PortKind::Dgram {
            ep.send(&frame(
                MacAddr::BROADCAST,
                MacAddr([2, 0xee, 0, 0, 0, 1]),
                60,
                0,
            ))
            .unwrap();
        }
        self.wait_up(name, true);
        self.lab.move_port(name, lan).unwrap();
        ep
    }

    pub fn wait_up(&self, port: &str, up: bool) {
        let deadline = Instant::now() + WAIT;
        while self.lab.port(port).unwrap().up != up {
            assert!(
                Instant::now() < deadline,
                "port {port} never became up={up}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self, port: &str) -> PortCounters {
        self.lab.port_stats(port).unwrap().counters
    }

    /// Waits until the data plane has published counters matching `pred`.
    pub fn wait_stats(&self, port: &str, pred: impl Fn(&PortCounters) -> bool) -> PortCounters {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stats(port);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "stats of {port} never matched: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The kinds a socket endpoint of the testkit can be a client of.
pub const ALL_KINDS: [PortKind; 4] = PortKind::SOCKETS;
