//! Nodes: a guest process, the switch ports of its NICs and its files.
//! Adding, starting, stopping, supervising, exec and commit. Control side
//! only (tokio tasks); the data plane only ever sees the NIC ports.
//!
//! A node's NIC ports live as long as the node: stopping the guest takes
//! them down (its client leaves), starting it again brings them up, and a
//! move of a NIC to another lan is the port move of the switch.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::events::Event;
use crate::lab::{Lab, LabError};
use crate::ports::PortOptions;
use crate::vmlaunch::accel::{self, KvmStatus};
use crate::vmlaunch::agent::{self, ExecOutput};
use crate::vmlaunch::image::{self, ImageStore};
use crate::vmlaunch::qemu::{self, QemuBoot, QemuNic, QemuPaths};
use crate::vmlaunch::spec::{stable_mac, Accel, Cidr, NodeKind, NodeSpec, SpecError, Transport};
use crate::vmlaunch::{qmp, uml};
use crate::wire::MacAddr;

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
    #[error("{what}: {message}")]
    Disk { what: String, message: String },
    #[error("node {node:?}: {message}")]
    Files { node: String, message: String },
    #[error("node {node:?}: {message}")]
    Link { node: String, message: String },
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
    pub nics: Vec<NicInfo>,
    pub spec: NodeSpec,
}

#[derive(Debug, Default)]
struct Status {
    state: Option<NodeState>,
    pid: Option<u32>,
    accel: Option<&'static str>,
    exit: Option<String>,
    started_ms: Option<u64>,
    stop_requested: bool,
    /// Why the guest runs slower than it could (TCG fallback).
    warning: Option<String>,
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

/// What the guest boots, resolved against the image store and the file
/// system. Checked before anything is made, so a bad spec makes nothing.
#[derive(Debug, Clone)]
struct BootPlan {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    /// Disk base and its format, for the overlay.
    base: Option<(PathBuf, String)>,
    image_append: Option<String>,
    agent: bool,
    /// The built-in image's init configures the guest from the cmdline.
    builtin: bool,
}

fn existing_file(what: &'static str, path: &Path) -> Result<PathBuf, NodeError> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(NodeError::MissingFile {
            what,
            path: path.display().to_string(),
        })
    }
}

fn disk_format(path: &Path) -> Result<String, NodeError> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .map_err(|e| NodeError::Disk {
            what: "qemu-img".into(),
            message: format!("cannot run qemu-img (apt-get install qemu-utils): {e}"),
        })?;
    if !out.status.success() {
        return Err(NodeError::Disk {
            what: path.display().to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| NodeError::Disk {
            what: path.display().to_string(),
            message: format!("qemu-img info: {e}"),
        })?;
    Ok(v.get("format")
        .and_then(|f| f.as_str())
        .unwrap_or("raw")
        .to_string())
}

/// A binary by path, or by name along `PATH`.
fn find_binary(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.components().count() > 1 {
        return runnable(name).then(|| name.to_path_buf());
    }
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| runnable(p))
        })
        .unwrap_or(None)
}

/// Checks that everything `spec` boots from is there (kernel, initrd,
/// image, emulator binary), as starting it would: for a client that must
/// know before it changes anything (`ulan apply` replacing a node).
pub fn check_boot(spec: &NodeSpec, images_dir: &Path) -> Result<(), NodeError> {
    resolve_boot(spec, &ImageStore::open(images_dir)).map(drop)
}

/// [`resolve_boot`] off the control side's worker: it may run `qemu-img
/// info` and read the image store.
async fn resolve_boot_blocking(spec: &NodeSpec, images_dir: &Path) -> Result<BootPlan, NodeError> {
    let node = spec.name.clone();
    let (spec, dir) = (spec.clone(), images_dir.to_path_buf());
    tokio::task::spawn_blocking(move || resolve_boot(&spec, &ImageStore::open(&dir)))
        .await
        .unwrap_or_else(|e| {
            Err(NodeError::Files {
                node,
                message: format!("boot plan: {e}"),
            })
        })
}

fn resolve_boot(spec: &NodeSpec, store: &ImageStore) -> Result<BootPlan, NodeError> {
    if let Some(b) = &spec.binary {
        if find_binary(Path::new(b)).is_none() {
            return Err(NodeError::MissingFile {
                what: "emulator binary",
                path: b.clone(),
            });
        }
    }
    let mut plan = BootPlan {
        kernel: None,
        initrd: None,
        base: None,
        image_append: None,
        agent: false,
        builtin: false,
    };
    match (&spec.image, spec.kind) {
        (None, NodeKind::Qemu) if spec.uses_builtin_image() => {
            let img = store.get(image::BUILTIN)?;
            plan.kernel = img.kernel_path();
            plan.initrd = img.initrd_path();
            plan.agent = img.manifest.agent;
            plan.image_append = img.manifest.append.clone();
            plan.builtin = true;
        }
        (None, NodeKind::Uml) if spec.uses_builtin_image() => {
            // The UML binary is the kernel; the image's initrd is its root.
            let img = store.get(image::BUILTIN)?;
            plan.initrd = img.initrd_path();
            plan.builtin = true;
        }
        (None, _) => {}
        (Some(path), _) if path.starts_with('/') => {
            let p = existing_file("image", Path::new(path))?;
            let fmt = disk_format(&p)?;
            plan.base = Some((p, fmt));
        }
        (Some(name), _) => {
            let img = store.get(name)?;
            plan.kernel = img.kernel_path();
            plan.initrd = img.initrd_path();
            plan.agent = img.manifest.agent;
            plan.image_append = img.manifest.append.clone();
            if let Some(disk) = img.disk_path() {
                let fmt = img
                    .manifest
                    .disk_format
                    .clone()
                    .unwrap_or_else(|| "qcow2".into());
                plan.base = Some((existing_file("image disk", &disk)?, fmt));
            }
        }
    }
    if let Some(k) = &spec.kernel {
        plan.kernel = Some(existing_file("kernel", Path::new(k))?);
        plan.agent = false;
    }
    if let Some(i) = &spec.initrd {
        plan.initrd = Some(existing_file("initrd", Path::new(i))?);
        plan.agent = false;
    }
    if let Some(k) = &plan.kernel {
        existing_file("image kernel", k)?;
    }
    if let Some(i) = &plan.initrd {
        existing_file("image initrd", i)?;
    }
    if spec.kind == NodeKind::Uml {
        plan.agent = false;
    }
    Ok(plan)
}

async fn run_qemu_img(args: Vec<OsString>, what: String) -> Result<(), NodeError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| NodeError::Disk {
            what: what.clone(),
            message: format!("cannot run qemu-img (apt-get install qemu-utils): {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NodeError::Disk {
            what,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// How long a "KVM unusable" answer is kept in memory: the cause may be
/// fixed meanwhile (QEMU installed, /dev/kvm permissions), and a usable
/// answer is kept for the daemon's life.
const KVM_UNUSABLE_TTL: Duration = Duration::from_secs(60);

/// The KVM probe costs seconds, so answers are kept per (QEMU binary,
/// kernel) in memory, and the probe itself caches conclusive ones on disk
/// across daemons.
fn kvm_status(qemu: &Path, kernel: Option<&Path>) -> KvmStatus {
    type Answers =
        std::collections::HashMap<(PathBuf, Option<PathBuf>), (KvmStatus, std::time::Instant)>;
    static ANSWERS: OnceLock<std::sync::Mutex<Answers>> = OnceLock::new();
    let answers = ANSWERS.get_or_init(Default::default);
    let key = (qemu.to_path_buf(), kernel.map(Path::to_path_buf));
    let known = answers
        .lock()
        .ok()
        .and_then(|a| a.get(&key).cloned())
        .filter(|(status, at)| status.is_usable() || at.elapsed() < KVM_UNUSABLE_TTL);
    if let Some((status, _)) = known {
        return status;
    }
    let status = match kernel.map(Path::to_path_buf).or_else(newest_boot_kernel) {
        Some(k) => accel::probe_kvm_cached(qemu, &k, Duration::from_secs(20)),
        None => KvmStatus::Unusable {
            reason: "no guest kernel to probe KVM with".into(),
        },
    };
    if let Ok(mut a) = answers.lock() {
        a.insert(key, (status.clone(), std::time::Instant::now()));
    }
    status
}

fn newest_boot_kernel() -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    v.sort();
    v.pop()
}

struct NodePaths {
    qmp: PathBuf,
    console: PathBuf,
    console_log: PathBuf,
    agent: PathBuf,
    log: PathBuf,
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

fn dgram_local(dir: &Path, index: usize) -> PathBuf {
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
            console: paths.console.display().to_string(),
            console_log: paths.console_log.display().to_string(),
            agent: n.has_agent,
            exit: st.exit.clone(),
            warning: st.warning.clone(),
            started_ms: st.started_ms,
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

    /// Checks the spec, makes the NIC ports and starts the guest. On any
    /// error nothing is left behind.
    pub async fn add_node(&self, spec: NodeSpec) -> Result<NodeInfo, LabError> {
        self.add_node_with(spec, true).await
    }

    /// [`Lab::add_node`]; with `start` false the node is made (NIC ports,
    /// files) and left stopped, as a restored lab brings its nodes back.
    pub async fn add_node_with(&self, spec: NodeSpec, start: bool) -> Result<NodeInfo, LabError> {
        spec.validate().map_err(NodeError::from)?;
        for (i, nic) in spec.nics.iter().enumerate() {
            if let Some(lan) = &nic.lan {
                self.lan(lan)?;
            }
            let port = spec.port_name(i);
            if self.port(&port).is_ok() {
                return Err(LabError::Exists {
                    what: "port",
                    name: port,
                });
            }
        }
        let plan = resolve_boot_blocking(&spec, &self.node_config().images_dir).await?;
        let name = spec.name.clone();
        let dir = self.run_dir().join("nodes").join(&name);
        let macs: Vec<MacAddr> = spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| n.mac.unwrap_or_else(|| stable_mac(self.name(), &name, i)))
            .collect();
        let runtime = Arc::new(Runtime {
            status: Mutex::new(Status::default()),
            exited: watch::channel(0).0,
            op: tokio::sync::Mutex::new(()),
            agent: tokio::sync::Mutex::new(()),
        });
        {
            let mut table = self.node_table().lock();
            if table.contains_key(&name) {
                return Err(LabError::Exists { what: "node", name });
            }
            table.insert(
                name.clone(),
                NodeEntry {
                    spec: spec.clone(),
                    macs,
                    dir: dir.clone(),
                    has_agent: plan.agent,
                    runtime: runtime.clone(),
                },
            );
        }
        let _op = runtime.op.lock().await;
        if let Err(e) = self.make_node_files(&spec, &dir).await {
            self.unmake_node(&name, &spec, &dir).await;
            self.node_table().lock().remove(&name);
            return Err(e);
        }
        // Announced before the guest runs, so that its state events (which
        // its supervisor sends on its own) come after this one.
        self.events().emit(Event::NodeAdded { node: name.clone() });
        if !start {
            tracing::info!(node = %name, "node added (not started)");
            return self.node(&name);
        }
        if let Err(e) = self.start_locked(&name, &runtime, Some(plan)).await {
            self.unmake_node(&name, &spec, &dir).await;
            self.node_table().lock().remove(&name);
            self.events()
                .emit(Event::NodeRemoved { node: name.clone() });
            return Err(e);
        }
        tracing::info!(node = %name, "node added");
        self.node(&name)
    }

    async fn make_node_files(&self, spec: &NodeSpec, dir: &Path) -> Result<(), LabError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
            .map_err(|e| NodeError::Files {
                node: spec.name.clone(),
                message: format!("cannot make {}: {e}", dir.display()),
            })?;
        for (i, nic) in spec.nics.iter().enumerate() {
            let transport = spec.transport(i);
            let options = PortOptions {
                dgram_peer: (transport == Transport::Dgram).then(|| dgram_local(dir, i)),
            };
            let port = spec.port_name(i);
            self.add_port_with(&port, transport.port_kind(), nic.lan.as_deref(), &options)?;
            self.apply_port_spec(&port, nic.link, &nic.impairments)?;
        }
        Ok(())
    }

    async fn unmake_node(&self, name: &str, spec: &NodeSpec, dir: &Path) {
        for i in 0..spec.nics.len() {
            let _ = self.remove_port(&spec.port_name(i)).await;
        }
        let _ = std::fs::remove_dir_all(dir);
        tracing::debug!(node = name, "node files removed");
    }

    pub async fn start_node(&self, name: &str) -> Result<NodeInfo, LabError> {
        let runtime = self.runtime(name)?;
        let _op = runtime.op.lock().await;
        self.still_current(name, &runtime)?;
        let state = runtime.status().state;
        if let Some(s) = state.filter(|s| s.is_live()) {
            if s == NodeState::Stopping {
                return Err(NodeError::Busy {
                    node: name.into(),
                    state: s,
                    hint: "wait until it has stopped",
                }
                .into());
            }
            return self.node(name); // already started
        }
        self.start_locked(name, &runtime, None).await?;
        self.node(name)
    }

    /// Starts the guest process; the caller holds the node's op lock.
    async fn start_locked(
        &self,
        name: &str,
        runtime: &Arc<Runtime>,
        plan: Option<BootPlan>,
    ) -> Result<(), LabError> {
        let cfg = self.node_config().clone();
        let (spec, macs, dir) = {
            let table = self.node_table().lock();
            let e = table.get(name).ok_or_else(|| node_not_found(name))?;
            (e.spec.clone(), e.macs.clone(), e.dir.clone())
        };
        let plan = match plan {
            Some(p) => p,
            None => resolve_boot_blocking(&spec, &cfg.images_dir).await?,
        };
        let paths = NodePaths::new(&dir);
        // Sockets of an earlier run: QEMU binds them anew.
        for p in [&paths.qmp, &paths.console, &paths.agent] {
            let _ = std::fs::remove_file(p);
        }
        for i in 0..spec.nics.len() {
            let _ = std::fs::remove_file(dgram_local(&dir, i));
        }
        let disk = self.prepare_disk(&spec, &plan, &dir, &cfg).await?;
        let mut accel_warning = None;
        let (binary, argv, accel_name) = match spec.kind {
            NodeKind::Qemu => {
                let binary = spec
                    .binary
                    .as_ref()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| cfg.qemu.clone());
                let (accel_args, accel_name, warning) =
                    self.choose_accel(&spec, &binary, &plan).await?;
                accel_warning = warning;
                let nics: Vec<QemuNic> = (0..spec.nics.len())
                    .map(|i| QemuNic {
                        mac: macs[i],
                        transport: spec.transport(i),
                        port_path: self.ports_dir().join(spec.port_name(i)),
                        local_path: (spec.transport(i) == Transport::Dgram)
                            .then(|| dgram_local(&dir, i)),
                    })
                    .collect();
                let mut cmdline = if plan.builtin {
                    qemu::builtin_cmdline(&spec, &macs)
                } else {
                    let mut c = "console=ttyS0".to_string();
                    if let Some(a) = &spec.append {
                        c.push(' ');
                        c.push_str(a);
                    }
                    c
                };
                if let Some(a) = &plan.image_append {
                    cmdline = format!("{a} {cmdline}");
                }
                let boot = QemuBoot {
                    kernel: plan.kernel.clone(),
                    initrd: plan.initrd.clone(),
                    cmdline,
                    disk: disk.clone(),
                };
                let qpaths = QemuPaths {
                    qmp: paths.qmp.clone(),
                    console: paths.console.clone(),
                    console_log: paths.console_log.clone(),
                    agent: plan.agent.then(|| paths.agent.clone()),
                };
                let argv = qemu::qemu_args(&spec, &nics, &boot, &qpaths, &accel_args)
                    .map_err(NodeError::from)?;
                (binary, argv, Some(accel_name))
            }
            NodeKind::Uml => {
                let binary = spec
                    .binary
                    .as_ref()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| cfg.uml.clone());
                let nics: Vec<uml::UmlNic> = (0..spec.nics.len())
                    .map(|i| uml::UmlNic {
                        index: i,
                        mac: macs[i],
                        transport: spec.transport(i),
                        port_path: self.ports_dir().join(spec.port_name(i)),
                    })
                    .collect();
                let mut upaths = uml::UmlPaths::new(&dir);
                upaths.console_log = paths.console_log.clone();
                upaths.cow = disk.clone();
                uml::prepare_run_dir(&upaths, &nics).map_err(|e| NodeError::Files {
                    node: name.into(),
                    message: e.to_string(),
                })?;
                let append = if plan.builtin {
                    qemu::builtin_cmdline(&spec, &macs)
                } else {
                    let mut a = plan.image_append.clone().unwrap_or_default();
                    if let Some(extra) = &spec.append {
                        a.push(' ');
                        a.push_str(extra);
                    }
                    a
                };
                let base = plan.base.as_ref().map(|(p, _)| p.as_path());
                // uml_argv takes the initrd from the spec: give it the plan's.
                let mut uspec = spec.clone();
                uspec.initrd = plan.initrd.as_ref().map(|p| p.display().to_string());
                let argv = uml::uml_argv(&uspec, &binary, &nics, base, &upaths, &append)
                    .map_err(NodeError::from)?;
                let argv = argv.into_iter().skip(1).collect();
                (binary, argv, None)
            }
        };
        let log =
            crate::daemon::open_run_file_append(&paths.log).map_err(|e| NodeError::Files {
                node: name.into(),
                message: format!("{}: {e}", paths.log.display()),
            })?;
        // Where this run's part of the log starts: a crash is explained by
        // what this run wrote, not by an earlier run's last words.
        let log_from = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log.try_clone().map_err(|e| NodeError::Files {
            node: name.into(),
            message: e.to_string(),
        })?;
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.args(&argv).current_dir(&dir);
        if spec.kind == NodeKind::Uml {
            // UML's console 0 is its stdin/stdout: output to the console
            // log, stdin held open by the supervisor (EOF would end it).
            let console = crate::daemon::open_run_file_append(&paths.console_log).map_err(|e| {
                NodeError::Files {
                    node: name.into(),
                    message: format!("{}: {e}", paths.console_log.display()),
                }
            })?;
            cmd.stdin(Stdio::piped()).stdout(console).stderr(log);
            drop(log2);
        } else {
            cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        }
        // The guest dies with the daemon, whatever kills the daemon; and
        // it is in its own process group, so a Ctrl-C at the daemon's
        // terminal reaches the daemon, which stops guests in order.
        // SAFETY: prctl and setpgid are async-signal-safe.
        unsafe {
            cmd.as_std_mut().pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| NodeError::Launch {
            binary: binary.display().to_string(),
            source,
        })?;
        let pid = child.id();
        let run = {
            let mut st = runtime.status();
            st.run += 1;
            st.state = Some(NodeState::Starting);
            st.pid = pid;
            st.accel = accel_name;
            st.warning = accel_warning;
            st.exit = None;
            st.stop_requested = false;
            st.started_ms = Some(now_ms());
            st.run
        };
        tracing::info!(node = name, pid = pid.unwrap_or(0), binary = %binary.display(), "node starting");
        self.emit_state(name, NodeState::Starting, None);
        // QEMU nodes' NICs follow their ports' link state (QMP set_link);
        // UML has no such control.
        let nics = if spec.kind == NodeKind::Qemu {
            (0..spec.nics.len())
                .filter_map(|index| {
                    let port = spec.port_name(index);
                    let shared = self.port_shared(&port)?;
                    Some(NicLink {
                        index,
                        port,
                        shared,
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let ready = Readiness {
            qmp: (spec.kind == NodeKind::Qemu).then(|| paths.qmp.clone()),
            nics,
            links_applied: Default::default(),
            agent: plan.agent.then(|| paths.agent.clone()),
            boot_timeout: cfg.boot_timeout,
            console: paths.console.clone(),
            console_log: paths.console_log.clone(),
        };
        tokio::spawn(supervise(
            name.to_string(),
            runtime.clone(),
            self.events().clone(),
            child,
            run,
            ready,
            (paths.log.clone(), log_from),
        ));
        Ok(())
    }

    async fn choose_accel(
        &self,
        spec: &NodeSpec,
        binary: &Path,
        plan: &BootPlan,
    ) -> Result<(Vec<String>, &'static str, Option<String>), LabError> {
        let qemu = binary.to_path_buf();
        let kernel = plan.kernel.clone();
        let requested = spec.accel;
        let choice = if requested == Accel::Tcg {
            accel::resolve(requested, || KvmStatus::Usable)
        } else {
            let status = tokio::task::spawn_blocking(move || kvm_status(&qemu, kernel.as_deref()))
                .await
                .unwrap_or_else(|e| KvmStatus::Unusable {
                    reason: format!("KVM probe failed: {e}"),
                });
            accel::resolve(requested, || status)
        }
        .map_err(NodeError::from)?;
        if let Some(w) = &choice.warning {
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("{w}");
            }
        }
        Ok((
            accel::qemu_accel_args(choice.kvm, spec.cpus),
            if choice.kvm { "kvm" } else { "tcg" },
            choice.warning,
        ))
    }

    /// The node's qcow2 overlay over its base: kept when persistent and
    /// present, otherwise made fresh for this run.
    async fn prepare_disk(
        &self,
        spec: &NodeSpec,
        plan: &BootPlan,
        dir: &Path,
        cfg: &NodeConfig,
    ) -> Result<Option<PathBuf>, LabError> {
        let Some((base, fmt)) = &plan.base else {
            return Ok(None);
        };
        let overlay = overlay_path(spec, dir, cfg);
        if spec.persistent && overlay.is_file() {
            return Ok(Some(overlay));
        }
        if spec.kind == NodeKind::Uml {
            // UML writes its own COW file (ubd0=COW,BASE), made when missing.
            if let Some(parent) = overlay.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::remove_file(&overlay);
            let _ = fmt;
            return Ok(Some(overlay));
        }
        if let Some(parent) = overlay.parent() {
            std::fs::create_dir_all(parent).map_err(|e| NodeError::Files {
                node: spec.name.clone(),
                message: format!("cannot make {}: {e}", parent.display()),
            })?;
        }
        let _ = std::fs::remove_file(&overlay);
        let args: Vec<OsString> = vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            fmt.into(),
            "-b".into(),
            base.into(),
            overlay.clone().into(),
        ];
        run_qemu_img(args, format!("overlay for node {}", spec.name)).await?;
        Ok(Some(overlay))
    }

    fn emit_state(&self, name: &str, state: NodeState, reason: Option<String>) {
        self.events().emit(Event::NodeState {
            node: name.into(),
            state: state.as_str(),
            reason,
        });
    }

    /// Sets the carrier the guest sees on NIC `index` (a pulled cable):
    /// QMP `set_link` on its netdev, which clears or sets virtio-net's
    /// LINK_UP status bit and raises a config interrupt. For a vhost-user
    /// NIC this is the only way under QEMU 7.2, which serves the device's
    /// config space itself. QEMU nodes that are running only.
    pub async fn set_nic_link(&self, name: &str, index: usize, up: bool) -> Result<(), LabError> {
        let (kind, nics, dir, state) = {
            let table = self.node_table().lock();
            let e = table.get(name).ok_or_else(|| node_not_found(name))?;
            let state = e.runtime.status().state;
            (e.spec.kind, e.spec.nics.len(), e.dir.clone(), state)
        };
        let err = |message: String| {
            LabError::from(NodeError::Link {
                node: name.to_string(),
                message,
            })
        };
        if kind != NodeKind::Qemu {
            return Err(err(
                "link state is set through QEMU; this is not a QEMU node".into(),
            ));
        }
        if index >= nics {
            return Err(err(format!("it has no NIC {index}")));
        }
        let starting = state == Some(NodeState::Starting);
        if state != Some(NodeState::Running) && !starting {
            let now = state.map_or("not started", NodeState::as_str);
            return Err(err(format!("it is {now}, not running")));
        }
        let args = serde_json::json!({ "name": format!("n{index}"), "up": up });
        match qmp_command_with(&NodePaths::new(&dir).qmp, "set_link", Some(args)).await {
            // A starting guest whose QMP does not answer yet gets the
            // port's link state from its supervisor once it does.
            Err(_) if starting => Ok(()),
            r => r.map_err(err),
        }
    }

    /// Stops the guest: ACPI power-off, then QMP `quit` after `grace`, then
    /// SIGKILL. Returns once the process is gone. Stopping a stopped node
    /// is not an error.
    pub async fn stop_node(
        &self,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<NodeInfo, LabError> {
        let runtime = self.runtime(name)?;
        let _op = runtime.op.lock().await;
        self.still_current(name, &runtime)?;
        let grace = grace.unwrap_or(self.node_config().stop_grace);
        self.stop_locked(name, &runtime, grace).await;
        self.node(name)
    }

    async fn stop_locked(&self, name: &str, runtime: &Arc<Runtime>, grace: Duration) {
        let (pid, run) = {
            let mut st = runtime.status();
            if !st.state.is_some_and(NodeState::is_live) {
                return;
            }
            st.stop_requested = true;
            st.state = Some(NodeState::Stopping);
            (st.pid, st.run)
        };
        self.emit_state(name, NodeState::Stopping, None);
        let mut exited = runtime.exited.subscribe();
        let gone = |rx: &watch::Receiver<u64>| *rx.borrow() >= run;
        // QEMU: QMP; UML (no monitor here): signals to its process group.
        let qmp_path = {
            let table = self.node_table().lock();
            table
                .get(name)
                .filter(|e| e.spec.kind == NodeKind::Qemu)
                .map(|e| NodePaths::new(&e.dir).qmp)
        };
        let wait = |rx: &mut watch::Receiver<u64>, t: Duration| {
            let mut rx = rx.clone();
            async move {
                let _ = tokio::time::timeout(t, rx.wait_for(|v| *v >= run)).await;
            }
        };
        if !grace.is_zero() {
            match (&qmp_path, pid) {
                (Some(q), _) => {
                    if let Err(e) = qmp_command(q, "system_powerdown").await {
                        // Waiting out the grace would only delay the quit.
                        tracing::warn!(node = name, "power-off request failed: {e}");
                    } else {
                        wait(&mut exited, grace).await;
                    }
                }
                (None, Some(pid)) => {
                    kill(pid, libc::SIGTERM);
                    wait(&mut exited, grace).await;
                }
                (None, None) => {}
            }
        }
        if !gone(&exited) {
            if let Some(q) = &qmp_path {
                if qmp_command(q, "quit").await.is_ok() {
                    wait(&mut exited, Duration::from_secs(3)).await;
                }
            }
        }
        if !gone(&exited) {
            if let Some(pid) = pid {
                if qmp_path.is_some() {
                    tracing::warn!(node = name, pid, "guest did not quit; killing it");
                }
                kill(pid, libc::SIGKILL);
            }
            wait(&mut exited, Duration::from_secs(5)).await;
            if !gone(&exited) {
                tracing::warn!(
                    node = name,
                    "guest process still not reaped 5 s after SIGKILL"
                );
            }
        }
    }

    /// Stops the guest at once (no power-off grace), removes its ports and
    /// its run files. Persistent disks stay (they are the point of being
    /// persistent); they live under the lab's data directory.
    pub async fn remove_node(&self, name: &str) -> Result<(), LabError> {
        let runtime = self.runtime(name)?;
        let _op = runtime.op.lock().await;
        self.still_current(name, &runtime)?;
        self.stop_locked(name, &runtime, Duration::ZERO).await;
        // Still this runtime's entry: no add can take a name in the table.
        let entry = self.node_table().lock().remove(name);
        if let Some(e) = entry {
            self.unmake_node(name, &e.spec, &e.dir).await;
        }
        tracing::info!(node = name, "node removed");
        self.events().emit(Event::NodeRemoved { node: name.into() });
        Ok(())
    }

    /// Stops every guest (quickly: QMP quit, then SIGKILL) and waits.
    pub async fn stop_all_nodes(&self) {
        let names: Vec<String> = self.node_table().lock().keys().cloned().collect();
        let mut tasks = Vec::new();
        for name in names {
            if let Ok(rt) = self.runtime(&name) {
                tasks.push(async move {
                    let _op = rt.op.lock().await;
                    self.stop_locked(&name, &rt, Duration::ZERO).await;
                });
            }
        }
        futures_util::future::join_all(tasks).await;
    }

    /// Runs `argv` in the guest through its exec agent (built-in image).
    pub async fn exec_node(
        &self,
        name: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, LabError> {
        let (runtime, sock, has_agent) = {
            let table = self.node_table().lock();
            let e = table.get(name).ok_or_else(|| node_not_found(name))?;
            (e.runtime.clone(), NodePaths::new(&e.dir).agent, e.has_agent)
        };
        if !has_agent {
            return Err(NodeError::NoAgent(name.into()).into());
        }
        let state = runtime.status().state.unwrap_or(NodeState::Stopped);
        if !matches!(state, NodeState::Running | NodeState::Starting) {
            return Err(NodeError::Busy {
                node: name.into(),
                state,
                hint: "start it first",
            }
            .into());
        }
        // One exec at a time per agent; waiting for another is bounded by
        // this one's own timeout.
        let Ok(_agent) = tokio::time::timeout(timeout, runtime.agent.lock()).await else {
            return Err(NodeError::Busy {
                node: name.into(),
                state,
                hint: "another command still runs in it through the agent; try again",
            }
            .into());
        };
        // Still booting: the agent answers once the guest is up. A running
        // guest's agent should answer at once: no boot-long wait for it.
        // Give up at once if the guest stops meanwhile.
        let patience = if state == NodeState::Running {
            RUNNING_AGENT_PATIENCE
        } else {
            self.node_config().boot_timeout
        };
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let state = runtime.status().state.unwrap_or(NodeState::Stopped);
            if !matches!(state, NodeState::Running | NodeState::Starting) {
                return Err(NodeError::Busy {
                    node: name.into(),
                    state,
                    hint: "it stopped before its agent answered",
                }
                .into());
            }
            match agent::ping(&sock, Duration::from_secs(2)).await {
                Ok(()) => break,
                Err(source) if tokio::time::Instant::now() >= deadline => {
                    return Err(NodeError::Agent {
                        node: name.into(),
                        source,
                    }
                    .into())
                }
                Err(agent::AgentError::Timeout(_)) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        agent::exec(&sock, argv, timeout).await.map_err(|source| {
            NodeError::Agent {
                node: name.into(),
                source,
            }
            .into()
        })
    }

    /// Turns a stopped node's disk (base + overlay) into a new base image
    /// `image` in the image store.
    pub async fn commit_node(
        &self,
        name: &str,
        image_name: &str,
    ) -> Result<image::Image, LabError> {
        let cfg = self.node_config().clone();
        let runtime = self.runtime(name)?;
        let _op = runtime.op.lock().await;
        self.still_current(name, &runtime)?;
        let state = runtime.status().state.unwrap_or(NodeState::Stopped);
        if state.is_live() {
            return Err(NodeError::Busy {
                node: name.into(),
                state,
                hint: "stop it first, so its disk is consistent",
            }
            .into());
        }
        let (spec, dir) = {
            let table = self.node_table().lock();
            let e = table.get(name).ok_or_else(|| node_not_found(name))?;
            (e.spec.clone(), e.dir.clone())
        };
        let overlay = overlay_path(&spec, &dir, &cfg);
        if !overlay.is_file() {
            return Err(NodeError::NoDisk(name.into()).into());
        }
        if spec.kind == NodeKind::Uml {
            return Err(NodeError::Disk {
                what: format!("commit of node {name}"),
                message: "commit works on QEMU nodes (UML keeps its own COW format)".into(),
            }
            .into());
        }
        let store = ImageStore::open(&cfg.images_dir);
        let boot_from = if spec.uses_builtin_image() {
            store.get(image::BUILTIN).ok()
        } else {
            spec.image
                .as_deref()
                .filter(|i| !i.starts_with('/'))
                .and_then(|i| store.get(i).ok())
        };
        let src = overlay.clone();
        let what = format!("commit of node {name}");
        let description = format!("committed from node {name}");
        let image_name = image_name.to_string();
        // The store's lock and the copy take as long as they take: not on
        // the control side's worker.
        let added = tokio::task::spawn_blocking(move || {
            store.add_disk(&image_name, &description, boot_from.as_ref(), |dst| {
                let out = std::process::Command::new("qemu-img")
                    .args(["convert", "-q", "-O", "qcow2"])
                    .arg(&src)
                    .arg(dst)
                    .output()
                    .map_err(|e| image::ImageError::Tool {
                        tool: "qemu-img".into(),
                        message: e.to_string(),
                    })?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(image::ImageError::Tool {
                        tool: "qemu-img convert".into(),
                        message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    })
                }
            })
        })
        .await;
        let img = match added {
            Ok(r) => r.map_err(|e| NodeError::Disk {
                what,
                message: e.to_string(),
            })?,
            Err(e) => {
                return Err(NodeError::Disk {
                    what,
                    message: format!("the copy did not finish: {e}"),
                }
                .into())
            }
        };
        Ok(img)
    }
}

/// How long exec waits for the agent of a node that is already running.
const RUNNING_AGENT_PATIENCE: Duration = Duration::from_secs(10);

/// How long one QMP command may take, connection included: a QEMU that
/// stalls after the handshake must not hold a stop (and its lock) forever.
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

async fn qmp_command(sock: &Path, command: &str) -> Result<(), String> {
    qmp_command_with(sock, command, None).await
}

async fn qmp_command_with(
    sock: &Path,
    command: &str,
    arguments: Option<serde_json::Value>,
) -> Result<(), String> {
    let run = async {
        let mut qmp = qmp::Qmp::connect(sock, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        qmp.execute_with(command, arguments)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    match tokio::time::timeout(QMP_COMMAND_TIMEOUT, run).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "QMP {command} got no answer in {QMP_COMMAND_TIMEOUT:?}"
        )),
    }
}

fn overlay_path(spec: &NodeSpec, dir: &Path, cfg: &NodeConfig) -> PathBuf {
    let file = match spec.kind {
        NodeKind::Qemu => "disk.qcow2",
        NodeKind::Uml => "disk.cow",
    };
    if spec.persistent {
        cfg.data_dir.join(&spec.name).join(file)
    } else {
        dir.join(file)
    }
}

/// A QEMU guest NIC whose carrier follows its port's link state.
struct NicLink {
    index: usize,
    port: String,
    shared: Arc<crate::switch::stats::PortShared>,
}

impl NicLink {
    fn is_down(&self) -> bool {
        self.shared
            .link_down
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_link_args(&self) -> serde_json::Value {
        serde_json::json!({ "name": format!("n{}", self.index), "up": false })
    }
}

/// Takes the carrier of NIC `nic` down in the background (QMP set_link),
/// for a guest whose QEMU brought it up by itself.
fn carrier_down(node: &str, qmp: &Path, nic: &NicLink) {
    let (node, qmp, port, args) = (
        node.to_string(),
        qmp.to_path_buf(),
        nic.port.clone(),
        nic.set_link_args(),
    );
    tokio::spawn(async move {
        match qmp_command_with(&qmp, "set_link", Some(args)).await {
            Ok(()) => {
                tracing::info!(node = %node, port = %port, "guest carrier set down again (its port is down)")
            }
            Err(e) => {
                tracing::warn!(node = %node, port = %port, "cannot set the guest's carrier down: {e}")
            }
        }
    });
}

struct Readiness {
    qmp: Option<PathBuf>,
    /// The NICs to set down once QMP answers (those whose port is down
    /// then), and again whenever their port comes up while down.
    nics: Vec<NicLink>,
    /// Set once QMP answered and `nics` were first applied.
    links_applied: std::sync::atomic::AtomicBool,
    agent: Option<PathBuf>,
    boot_timeout: Duration,
    console: PathBuf,
    console_log: PathBuf,
}

/// A UML guest's console on a Unix socket: what a client types goes to
/// the guest's stdin; what the guest prints (already going to the console
/// log) is followed from the log and sent to the client.
async fn serve_uml_console(sock: PathBuf, log: PathBuf, mut stdin: tokio::process::ChildStdin) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let _ = std::fs::remove_file(&sock);
    let listener = match tokio::net::UnixListener::bind(&sock) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("UML console socket {}: {e}", sock.display());
            // Keep the guest's stdin (ours until this task ends) open all
            // the same: EOF would end it. The supervisor aborts this task
            // when the guest ends.
            std::future::pending::<()>().await;
            return;
        }
    };
    let mut warned = false;
    loop {
        let client = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // EMFILE and the like pass; the guest's stdin stays open.
                if !warned {
                    tracing::warn!("UML console socket {}: accept: {e}", sock.display());
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (mut from_client, mut to_client) = client.into_split();
        let Ok(mut file) = tokio::fs::File::open(&log).await else {
            continue;
        };
        if file.seek(std::io::SeekFrom::End(0)).await.is_err() {
            continue;
        }
        let output = async {
            let mut buf = vec![0u8; 4096];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Ok(n) => {
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        };
        let input = async {
            let mut buf = vec![0u8; 4096];
            loop {
                match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stdin.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        // Until the client leaves (or the guest's stdin breaks).
        tokio::select! {
            _ = output => {}
            _ = input => {}
        }
    }
}

/// Waits until the guest is up: QMP answers, then (built-in image) its
/// agent answers.
async fn wait_up(r: &Readiness) -> Result<(), String> {
    if let Some(q) = &r.qmp {
        let mut qmp = qmp::connect_when_up(q, Duration::from_secs(30))
            .await
            .map_err(|e| format!("QEMU did not answer on QMP: {e}"))?;
        // QEMU starts every NIC with carrier; the guest's driver should
        // find it already down when its port is. Read now, not at launch:
        // the link may have been set meanwhile (see `set_nic_link`).
        for nic in r.nics.iter().filter(|n| n.is_down()) {
            let set = qmp.execute_with("set_link", Some(nic.set_link_args()));
            match tokio::time::timeout(QMP_COMMAND_TIMEOUT, set).await {
                Ok(Ok(_)) => tracing::debug!(port = %nic.port, "guest carrier starts down"),
                Ok(Err(e)) => {
                    tracing::warn!(port = %nic.port, "cannot set the guest's carrier down: {e}")
                }
                Err(_) => {
                    tracing::warn!(port = %nic.port, "cannot set the guest's carrier down: QMP set_link got no answer")
                }
            }
        }
        r.links_applied
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(a) = &r.agent {
        agent::wait_ready(a, tokio::time::Instant::now() + r.boot_timeout)
            .await
            .map_err(|e| format!("the guest's agent did not answer: {e}"))?;
    }
    Ok(())
}

fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited normally".into(),
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// The last non-empty line this run wrote to the emulator's log (from
/// byte `from` on), to say why it failed. Reads at most the last 4 KiB.
fn last_log_line(log: &Path, from: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    let start = from.max(len.saturating_sub(4096));
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = Vec::new();
    file.take(4096).read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().chars().take(200).collect())
}

async fn supervise(
    name: String,
    runtime: Arc<Runtime>,
    events: Arc<crate::events::EventSink>,
    mut child: tokio::process::Child,
    run: u64,
    ready: Readiness,
    (log, log_from): (PathBuf, u64),
) {
    // Known while the process lives; the group outlives it (see below).
    let pid = child.id();
    let emit = |state: NodeState, reason: Option<String>| {
        events.emit(Event::NodeState {
            node: name.clone(),
            state: state.as_str(),
            reason,
        })
    };
    // UML's console is its stdin/stdout: serve it on the console socket
    // as QEMU does (one client at a time), for the guest's life.
    let console = child.stdin.take().map(|stdin| {
        tokio::spawn(serve_uml_console(
            ready.console.clone(),
            ready.console_log.clone(),
            stdin,
        ))
    });
    // A NIC port that comes up while its link is down had its carrier
    // forced up by QEMU (a vhost-user frontend that reconnected does so).
    let mut port_events = events.subscribe();
    let mut follow_ports = ready.qmp.is_some() && !ready.nics.is_empty();
    let up = wait_up(&ready);
    tokio::pin!(up);
    let mut up_done = false;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            ev = port_events.recv(), if follow_ports => {
                let Some(qmp) = &ready.qmp else { continue };
                // Before that, wait_up applies the links itself.
                if !ready.links_applied.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                match ev {
                    Ok(rec) => {
                        if let Event::PortUp { port, .. } = &rec.event {
                            let nic = ready.nics.iter().find(|n| n.port == *port);
                            if let Some(nic) = nic.filter(|n| n.is_down()) {
                                carrier_down(&name, qmp, nic);
                            }
                        }
                    }
                    // Events were missed: set every down NIC again.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for nic in ready.nics.iter().filter(|n| n.is_down()) {
                            carrier_down(&name, qmp, nic);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => follow_ports = false,
                }
            }
            r = &mut up, if !up_done => {
                up_done = true;
                let mut st = runtime.status();
                if st.run != run || st.state != Some(NodeState::Starting) {
                    continue;
                }
                match r {
                    Ok(()) => {
                        st.state = Some(NodeState::Running);
                        drop(st);
                        tracing::info!(node = %name, "node running");
                        emit(NodeState::Running, None);
                    }
                    Err(why) => {
                        // The process lives on; say why it is not usable
                        // (a warning: `exit` is for how a run ended).
                        tracing::warn!(node = %name, "{why}");
                        st.state = Some(NodeState::Running);
                        st.warning = Some(match st.warning.take() {
                            Some(w) => format!("{why}; {w}"),
                            None => why.clone(),
                        });
                        drop(st);
                        emit(NodeState::Running, Some(why));
                    }
                }
            }
        }
    };
    // The leader is gone; what it started in its group (UML's helper
    // processes) goes with it.
    if let Some(pid) = pid {
        kill(pid, libc::SIGKILL);
    }
    if let Some(task) = console {
        task.abort();
        let _ = std::fs::remove_file(&ready.console);
    }
    let (state, reason) = {
        let mut st = runtime.status();
        if st.run != run {
            return;
        }
        let how = match &status {
            Ok(s) => describe_exit(s),
            Err(e) => format!("cannot wait for the process: {e}"),
        };
        let clean = status.as_ref().is_ok_and(|s| s.success());
        let state = if st.stop_requested || clean {
            NodeState::Stopped
        } else {
            NodeState::Crashed
        };
        let reason = if state == NodeState::Crashed {
            match last_log_line(&log, log_from) {
                Some(l) => format!("{how}: {l}"),
                None => how,
            }
        } else if st.stop_requested {
            "stopped".to_string()
        } else {
            // QEMU exits 0 when someone else sends it SIGTERM or SIGINT,
            // and says so in its log: that is no power-off.
            match last_log_line(&log, log_from).filter(|l| l.contains("terminating on signal")) {
                Some(l) => format!("ended from outside: {l}"),
                None => "the guest powered off".to_string(),
            }
        };
        st.state = Some(state);
        st.pid = None;
        st.accel = None;
        st.exit = Some(reason.clone());
        (state, reason)
    };
    if state == NodeState::Crashed {
        tracing::warn!(node = %name, "node crashed: {reason}");
    } else {
        tracing::info!(node = %name, "node stopped: {reason}");
    }
    emit(state, Some(reason));
    runtime.exited.send_replace(run);
}
