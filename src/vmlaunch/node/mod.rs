//! Nodes: a guest process, the switch ports of its NICs and its files.
//! Adding, starting, stopping, supervising, exec and commit. Control side
//! only (tokio tasks); the data plane only ever sees the NIC ports.
//!
//! A node's NIC ports live as long as the node: stopping the guest takes
//! them down (its client leaves), starting it again brings them up, and a
//! move of a NIC to another lan is the port move of the switch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::events::Event;
use crate::lab::{Lab, LabError};
use crate::ports::PortOptions;
use crate::vmlaunch::agent::{self, ExecOutput};
use crate::vmlaunch::image::{self, ImageStore};
use crate::vmlaunch::qemu::accel::{self, KvmStatus};
use crate::vmlaunch::qemu::qmp;
use crate::vmlaunch::qemu::{self, QemuBoot, QemuNic, QemuPaths};
use crate::vmlaunch::spec::{stable_mac, Accel, Cidr, NodeKind, NodeSpec, SpecError, Transport};
use crate::vmlaunch::uml;
use crate::wire::MacAddr;

mod boot;
mod container;
mod launch;
mod lifecycle;
mod ops;
mod supervise;

pub use boot::check_boot;
use boot::*;
pub use container::sweep_stale_snapshots;
use ops::*;
use supervise::*;

/// Where a lab's nodes find images and keep what outlives the daemon.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The image store (`ulan image build` writes the built-in image there).
    pub images_dir: PathBuf,
    /// Persistent disk overlays: `<data_dir>/<node>/disk.qcow2`.
    pub data_dir: PathBuf,
    pub qemu: PathBuf,
    pub uml: PathBuf,
    /// How long a guest gets to power off before QEMU is told to quit.
    pub stop_grace: Duration,
    /// How long a built-in-image guest may take to answer its agent.
    pub boot_timeout: Duration,
}

impl NodeConfig {
    /// Defaults for lab `lab`: the user's image store, persistent disks in
    /// `$XDG_DATA_HOME/ulan/labs/<lab>/nodes`.
    pub fn for_lab(lab: &str) -> NodeConfig {
        NodeConfig {
            images_dir: image::default_store_dir(),
            data_dir: data_home().join("ulan/labs").join(lab).join("nodes"),
            qemu: "qemu-system-x86_64".into(),
            uml: "linux.uml".into(),
            stop_grace: Duration::from_secs(10),
            boot_timeout: Duration::from_secs(300),
        }
    }
}

fn data_home() -> PathBuf {
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(".local/share"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Image(#[from] image::ImageError),
    #[error("{what} {path:?} does not exist or is not a file")]
    MissingFile { what: &'static str, path: String },
    #[error("node {node:?} is {state}; {hint}")]
    Busy {
        node: String,
        state: NodeState,
        hint: &'static str,
    },
    #[error("{0}")]
    Accel(#[from] accel::AccelError),
    #[error("{0}")]
    Qemu(#[from] qemu::QemuError),
    #[error("{0}")]
    Uml(#[from] uml::UmlError),
    #[error("cannot start {binary}: {source}")]
    Launch {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node {0:?} has no exec agent (only the built-in image has one)")]
    NoAgent(String),
    #[error("node {node:?}: {source}")]
    Agent {
        node: String,
        #[source]
        source: agent::AgentError,
    },
    #[error("node {0:?} has no disk to commit (it boots a kernel and initrd only)")]
    NoDisk(String),
    #[error(
        "container node {0:?} has nothing to commit: it has not run yet (what a run wrote is kept until the node starts again)"
    )]
    NoLayer(String),
    #[error("{what}: {message}")]
    Disk { what: String, message: String },
    #[error("node {node:?}: {message}")]
    Files { node: String, message: String },
    #[error("node {node:?}: {message}")]
    Link { node: String, message: String },
    #[error("{0}")]
    Container(#[from] crate::vmlaunch::container::ContainerError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// The process runs and the guest is not up yet.
    Starting,
    /// Up: QMP answers, and for the built-in image its agent too.
    Running,
    /// Asked to stop; waiting for the guest to power off.
    Stopping,
    Stopped,
    /// Ended without being asked to (killed, or QEMU failed).
    Crashed,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Running => "running",
            NodeState::Stopping => "stopping",
            NodeState::Stopped => "stopped",
            NodeState::Crashed => "crashed",
        }
    }

    fn is_live(self) -> bool {
        matches!(
            self,
            NodeState::Starting | NodeState::Running | NodeState::Stopping
        )
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NicInfo {
    pub index: usize,
    pub port: String,
    pub lan: Option<String>,
    pub mac: MacAddr,
    pub transport: Transport,
    pub ip: Vec<Cidr>,
    /// The guest's side of the port is attached.
    pub up: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub kind: NodeKind,
    pub state: NodeState,
    pub pid: Option<u32>,
    /// `kvm` or `tcg` while a QEMU guest runs.
    pub accel: Option<&'static str>,
    /// A container's root filesystem in its current or last run:
    /// `overlay` or `btrfs-snapshot`.
    pub rootfs: Option<&'static str>,
    /// The serial console's socket (`ulan console` connects to it).
    pub console: String,
    /// Everything the console printed, across restarts.
    pub console_log: String,
    /// The node's image has the exec agent.
    pub agent: bool,
    /// How the last run ended.
    pub exit: Option<String>,
    /// What is wrong with the running guest: it runs slower than it could
    /// (TCG, KVM unusable), or it runs but did not answer as it should
    /// (QMP, the exec agent).
    pub warning: Option<String>,
    /// Milliseconds since the Unix epoch of the last start.
    pub started_ms: Option<u64>,
    /// The cgroups a running container's limits apply in (one per cgroup
    /// v1 hierarchy, or one cgroup v2); empty where none were applied.
    pub cgroups: Vec<String>,
    pub nics: Vec<NicInfo>,
    pub spec: NodeSpec,
}

#[derive(Debug, Default)]
struct Status {
    state: Option<NodeState>,
    pid: Option<u32>,
    accel: Option<&'static str>,
    rootfs: Option<&'static str>,
    exit: Option<String>,
    started_ms: Option<u64>,
    stop_requested: bool,
    /// Why the guest runs slower than it could (TCG fallback).
    warning: Option<String>,
    /// A container run's cgroups (its limits); removed when dropped, once
    /// the run has ended.
    cgroup: Option<std::sync::Arc<crate::vmlaunch::container::limits::NodeCgroup>>,
    /// Increases at every start, so a late supervisor of an old run
    /// cannot overwrite a newer run's state.
    run: u64,
}

/// What a node's supervisor shares with the API side.
struct Runtime {
    status: Mutex<Status>,
    /// Bumped when a run's process has exited.
    exited: watch::Sender<u64>,
    /// One lifecycle operation (start, stop, remove, commit) at a time.
    op: tokio::sync::Mutex<()>,
    /// One agent conversation at a time.
    agent: tokio::sync::Mutex<()>,
}

impl Runtime {
    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct NodeEntry {
    spec: NodeSpec,
    macs: Vec<MacAddr>,
    dir: PathBuf,
    has_agent: bool,
    runtime: Arc<Runtime>,
}

/// The lab's nodes. Lives inside [`Lab`].
#[derive(Default)]
pub struct NodeTable {
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
}

impl NodeTable {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, NodeEntry>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGKILLs every guest still running: the last resort when the lab
    /// goes away without [`Lab::stop_all_nodes`].
    pub fn kill_all(&self) {
        for n in self.lock().values() {
            if let Some(pid) = n.runtime.status().pid {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for NodeTable {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Signals the guest's process group (each guest leads its own: UML
/// forks helpers that must go with it).
fn kill(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(-pid, sig) };
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn node_not_found(name: &str) -> LabError {
    LabError::NotFound {
        what: "node",
        name: name.chars().take(64).collect(),
    }
}

pub(super) struct NodePaths {
    pub(super) qmp: PathBuf,
    pub(super) console: PathBuf,
    pub(super) console_log: PathBuf,
    pub(super) agent: PathBuf,
    pub(super) log: PathBuf,
}

impl NodePaths {
    fn new(dir: &Path) -> NodePaths {
        NodePaths {
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.sock"),
            console_log: dir.join("console.log"),
            agent: dir.join("agent.sock"),
            log: dir.join("emulator.log"),
        }
    }
}

pub(super) fn dgram_local(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("eth{index}.sock"))
}

impl Lab {
    fn node_entry_info(&self, name: &str, n: &NodeEntry) -> NodeInfo {
        let st = n.runtime.status();
        let paths = NodePaths::new(&n.dir);
        let nics = n
            .spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, nic)| {
                let port = n.spec.port_name(i);
                let p = self.port(&port).ok();
                NicInfo {
                    index: i,
                    lan: p.as_ref().map_or(nic.lan.clone(), |p| p.lan.clone()),
                    up: p.is_some_and(|p| p.up),
                    port,
                    mac: n.macs[i],
                    transport: n.spec.transport(i),
                    ip: nic.ip.clone(),
                }
            })
            .collect();
        NodeInfo {
            name: name.into(),
            kind: n.spec.kind,
            state: st.state.unwrap_or(NodeState::Stopped),
            pid: st.pid,
            accel: st.accel,
            rootfs: st.rootfs,
            console: paths.console.display().to_string(),
            console_log: paths.console_log.display().to_string(),
            agent: n.has_agent,
            exit: st.exit.clone(),
            warning: st.warning.clone(),
            started_ms: st.started_ms,
            cgroups: st
                .cgroup
                .iter()
                .flat_map(|c| c.dirs())
                .map(|d| d.display().to_string())
                .collect(),
            nics,
            spec: n.spec.clone(),
        }
    }

    /// The node whose NIC `port` is, if any.
    pub fn port_node(&self, port: &str) -> Option<String> {
        let table = self.node_table().lock();
        table
            .iter()
            .find(|(_, e)| (0..e.spec.nics.len()).any(|i| e.spec.port_name(i) == port))
            .map(|(n, _)| n.clone())
    }

    /// The node and NIC index whose NIC `port` is, if any.
    pub fn port_nic(&self, port: &str) -> Option<(String, usize)> {
        let table = self.node_table().lock();
        table.iter().find_map(|(n, e)| {
            (0..e.spec.nics.len())
                .find(|&i| e.spec.port_name(i) == port)
                .map(|i| (n.clone(), i))
        })
    }

    /// The running lab as a lab file: lans, node specs with their NICs'
    /// lans as they are now, and the ports that are not NICs.
    pub fn spec(&self) -> crate::labfile::LabFile {
        let ports = self.ports();
        let settings = self.port_settings();
        let setting = |name: &str| settings.get(name).cloned().unwrap_or_default();
        let lan_of = |name: &str| {
            ports
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| p.lan.clone())
        };
        let nodes: Vec<NodeSpec> = {
            let table = self.node_table().lock();
            table
                .values()
                .map(|e| {
                    let mut spec = e.spec.clone();
                    for i in 0..spec.nics.len() {
                        let port = spec.port_name(i);
                        spec.nics[i].lan = lan_of(&port);
                        (spec.nics[i].link, spec.nics[i].impairments) = setting(&port);
                    }
                    spec
                })
                .collect()
        };
        let nic_ports: std::collections::HashSet<String> = nodes
            .iter()
            .flat_map(|n| (0..n.nics.len()).map(|i| n.port_name(i)))
            .collect();
        crate::labfile::LabFile {
            name: Some(self.name().to_string()),
            lans: self.lans().into_iter().map(|l| l.name).collect(),
            nodes,
            ports: ports
                .into_iter()
                .filter(|p| !nic_ports.contains(&p.name))
                .map(|p| {
                    let (link, impairments) = setting(&p.name);
                    crate::labfile::PortSpec {
                        name: p.name,
                        kind: p.kind,
                        lan: p.lan,
                        link,
                        impairments,
                    }
                })
                .collect(),
        }
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        let table = self.node_table().lock();
        table
            .iter()
            .map(|(n, e)| self.node_entry_info(n, e))
            .collect()
    }

    pub fn node(&self, name: &str) -> Result<NodeInfo, LabError> {
        let table = self.node_table().lock();
        let e = table.get(name).ok_or_else(|| node_not_found(name))?;
        Ok(self.node_entry_info(name, e))
    }

    fn runtime(&self, name: &str) -> Result<Arc<Runtime>, LabError> {
        let table = self.node_table().lock();
        Ok(table
            .get(name)
            .ok_or_else(|| node_not_found(name))?
            .runtime
            .clone())
    }

    /// After waiting for a node's op lock: is `runtime` still the node's?
    /// A remove (and even a new node of the same name) may have gone first.
    fn still_current(&self, name: &str, runtime: &Arc<Runtime>) -> Result<(), LabError> {
        let table = self.node_table().lock();
        match table.get(name) {
            Some(e) if Arc::ptr_eq(&e.runtime, runtime) => Ok(()),
            _ => Err(node_not_found(name)),
        }
    }
}
