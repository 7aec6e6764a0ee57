//! Real guests for the tests: the built-in image (built once per target
//! dir and shared by every test binary) booted by an in-process lab.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ulan::lab::{Lab, LabConfig};
use ulan::vmlaunch::agent::ExecOutput;
use ulan::vmlaunch::image::{self, ImageStore};
use ulan::vmlaunch::node::{NodeConfig, NodeInfo, NodeState};
use ulan::vmlaunch::spec::{Accel, NodeSpec};

/// Several TCG guests booting at once on two cores take a while.
pub const BOOT: Duration = Duration::from_secs(400);

/// Why guests cannot run here, if they cannot.
pub fn guests_unusable() -> Option<String> {
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        return Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        );
    }
    let has_kernel = std::fs::read_dir("/boot").is_ok_and(|d| {
        d.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
    });
    if !has_kernel {
        return Some("no /boot/vmlinuz-* (apt-get install linux-image-amd64)".into());
    }
    if !std::path::Path::new("/bin/busybox").exists() {
        return Some("no /bin/busybox (apt-get install busybox-static)".into());
    }
    None
}

/// Skips the test (returns true) when guests cannot run, loudly; under CI
/// that is a failure, since CI installs everything.
pub fn skip_without_guests(test: &str) -> bool {
    match guests_unusable() {
        None => false,
        Some(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: guests cannot run under CI: {why}"
            );
            ulan::testkit::skipped(format_args!("{test}: {why}"));
            true
        }
    }
}

/// The image store the tests share, with the built-in image in it.
pub fn test_store() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ulan-images");
    let store = ImageStore::open(&dir);
    image::ensure_builtin(&store).expect("building the built-in image");
    dir
}

pub struct GuestLab {
    pub lab: Arc<Lab>,
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
}

impl GuestLab {
    pub fn new(name: &str) -> GuestLab {
        let images_dir = test_store();
        let dir = tempfile::Builder::new().prefix("ulan-g").tempdir().unwrap();
        let mut nodes = NodeConfig::for_lab(name);
        nodes.images_dir = images_dir;
        nodes.data_dir = dir.path().join("data");
        nodes.stop_grace = Duration::from_secs(5);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let lab = Lab::start(LabConfig {
            nodes,
            ..LabConfig::new(name, &dir.path().join("run"))
        })
        .unwrap();
        GuestLab { lab, rt, dir }
    }

    /// A built-in-image QEMU node under TCG with the given NICs' lans.
    pub fn spec(name: &str, lans: &[&str]) -> NodeSpec {
        let mut s = NodeSpec::new(name, lans);
        s.accel = Accel::Tcg;
        s.memory_mb = 192;
        s
    }

    pub fn add(&self, spec: NodeSpec) -> NodeInfo {
        let name = spec.name.clone();
        self.rt
            .block_on(self.lab.add_node(spec))
            .unwrap_or_else(|e| panic!("adding node {name}: {e}"))
    }

    pub fn state(&self, node: &str) -> NodeState {
        self.lab.node(node).unwrap().state
    }

    /// Waits until every node is running; panics with the console log's
    /// tail of any that crashed or took too long.
    pub fn wait_running(&self, nodes: &[&str]) {
        let deadline = Instant::now() + BOOT;
        loop {
            let mut all = true;
            for n in nodes {
                let info = self.lab.node(n).unwrap();
                match info.state {
                    NodeState::Running => {}
                    NodeState::Starting => all = false,
                    other => panic!(
                        "node {n} is {other}: {:?}\n{}",
                        info.exit,
                        self.console_tail(n)
                    ),
                }
            }
            if all {
                return;
            }
            if Instant::now() > deadline {
                let tails: Vec<String> = nodes.iter().map(|n| self.console_tail(n)).collect();
                panic!("nodes not running after {BOOT:?}:\n{}", tails.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn console_tail(&self, node: &str) -> String {
        let Ok(info) = self.lab.node(node) else {
            return format!("[{node}: gone]");
        };
        let text = std::fs::read(&info.console_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(1500)..]).to_string();
        format!("--- {node} console tail ---\n{text}")
    }

    pub fn exec(&self, node: &str, argv: &[&str]) -> ExecOutput {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        self.rt
            .block_on(self.lab.exec_node(node, &argv, Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("exec {argv:?} on {node}: {e}"))
    }

    /// One ping, up to `tries` times (the first may wait for ARP).
    pub fn ping(&self, from: &str, ip: &str, tries: usize) -> bool {
        (0..tries).any(|_| {
            self.exec(from, &["ping", "-c", "1", "-W", "2", ip])
                .exit_code
                == 0
        })
    }
}

impl Drop for GuestLab {
    fn drop(&mut self) {
        self.rt.block_on(self.lab.stop_all_nodes());
        self.lab.shutdown();
    }
}
