//! The control side of one lab: the authoritative topology (lans, ports and
//! their names), id allocation, snapshot publishing and the commands that
//! hand ports to the data plane. Nothing here touches frames.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::events::{Event, EventSink};
use crate::names::{check_name, NameError};
use crate::ports::{self, PortError, PortKind, PortLink, PortOptions};
use crate::switch::dataplane::{Command, DataPlaneConfig, DataPlaneGone, DataPlaneHandle};
use crate::switch::stats::{PortCounters, PortShared};
use crate::switch::topology::Snapshot;
use crate::switch::{LanId, PortId};
use crate::vmlaunch::node::{NodeConfig, NodeError, NodeTable};

mod instruments;
pub use instruments::{CaptureError, CaptureInfo, CaptureRequest, LinkState};
mod metrics;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("no {what} named {name:?}")]
    NotFound { what: &'static str, name: String },
    #[error("a {what} named {name:?} already exists")]
    Exists { what: &'static str, name: String },
    #[error("lan {lan:?} still has ports ({}); move or remove them first", ports.join(", "))]
    LanNotEmpty { lan: String, ports: Vec<String> },
    #[error("invalid {what} name: {source}")]
    InvalidName {
        what: &'static str,
        #[source]
        source: NameError,
    },
    #[error("{0}")]
    Port(#[from] PortError),
    #[error("{0}")]
    DataPlane(#[from] DataPlaneGone),
    #[error("{0}")]
    Node(#[from] NodeError),
    #[error("{0}")]
    Impairment(#[from] crate::switch::impair::ImpairError),
    #[error("{0}")]
    Capture(#[from] instruments::CaptureError),
}

#[derive(Debug, Clone)]
pub struct LabConfig {
    pub name: String,
    pub run_dir: PathBuf,
    pub aging_secs: u64,
    pub nodes: NodeConfig,
}

impl LabConfig {
    /// Defaults: 300 s MAC aging, the user's image store and data dir.
    pub fn new(name: &str, run_dir: &Path) -> LabConfig {
        LabConfig {
            name: name.into(),
            run_dir: run_dir.to_path_buf(),
            aging_secs: 300,
            nodes: NodeConfig::for_lab(name),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LanInfo {
    pub name: String,
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub kind: PortKind,
    pub lan: Option<String>,
    /// What a client connects to: a socket, or for `vde` a directory.
    pub path: String,
    /// A client is attached.
    pub up: bool,
    /// Set by the API: a down port forwards nothing either way.
    pub link: LinkState,
    /// Whether the port has impairments (see its `/impairments`).
    pub impaired: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PortStats {
    pub name: String,
    pub up: bool,
    #[serde(flatten)]
    pub counters: PortCounters,
}

#[derive(Debug, Clone, Serialize)]
pub struct FdbEntryInfo {
    pub mac: String,
    pub port: String,
    /// Seconds since the address was last seen.
    pub age_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabInfo {
    pub name: String,
    pub version: &'static str,
    pub pid: u32,
    pub run_dir: String,
    pub api_socket: String,
    pub uptime_s: u64,
    pub aging_s: u64,
    pub lans: usize,
    pub ports: usize,
    pub ports_up: usize,
}

struct LanEntry {
    id: LanId,
}

struct PortEntry {
    id: PortId,
    kind: PortKind,
    lan: Option<String>,
    path: PathBuf,
    shared: Arc<PortShared>,
    link: LinkState,
    impairments: crate::switch::impair::ImpairSpec,
}

/// Small-integer ids with reuse, so snapshots index by id.
#[derive(Default)]
struct IdPool {
    next: u32,
    free: Vec<u32>,
}

impl IdPool {
    fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }
    fn give(&mut self, id: u32) {
        self.free.push(id);
    }
}

#[derive(Default)]
struct State {
    lans: BTreeMap<String, LanEntry>,
    ports: BTreeMap<String, PortEntry>,
    lan_ids: IdPool,
    port_ids: IdPool,
    generation: u64,
}

impl State {
    fn lan_info(&self, name: &str) -> LanInfo {
        LanInfo {
            name: name.to_string(),
            ports: self
                .ports
                .iter()
                .filter(|(_, p)| p.lan.as_deref() == Some(name))
                .map(|(n, _)| n.clone())
                .collect(),
        }
    }

    fn port_info(name: &str, p: &PortEntry) -> PortInfo {
        PortInfo {
            name: name.to_string(),
            kind: p.kind,
            lan: p.lan.clone(),
            path: p.path.display().to_string(),
            up: p.shared.is_up(),
            link: p.link,
            impaired: !p.impairments.is_empty(),
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        self.generation += 1;
        let mut snap = Snapshot {
            generation: self.generation,
            port_lan: vec![None; self.port_ids.next as usize],
            lan_ports: vec![None; self.lan_ids.next as usize],
        };
        for lan in self.lans.values() {
            snap.lan_ports[lan.id as usize] = Some(Vec::new());
        }
        for p in self.ports.values() {
            if let Some(lan) = p.lan.as_ref().and_then(|l| self.lans.get(l)) {
                snap.port_lan[p.id as usize] = Some(lan.id);
                if let Some(list) = &mut snap.lan_ports[lan.id as usize] {
                    list.push(p.id);
                }
            }
        }
        snap
    }
}

pub struct Lab {
    config: LabConfig,
    ports_dir: PathBuf,
    started: Instant,
    state: Mutex<State>,
    published: Arc<ArcSwap<Snapshot>>,
    dataplane: DataPlaneHandle,
    events: Arc<EventSink>,
    nodes: NodeTable,
    /// Writes the lab's desired state to disk (the daemon's labs only).
    persister: std::sync::OnceLock<Arc<crate::persist::Persister>>,
    captures: Mutex<instruments::Captures>,
}

impl Lab {
    /// Starts the data plane. `config.run_dir` must exist; port sockets go
    /// in its `ports/` subdirectory.
    pub fn start(config: LabConfig) -> std::io::Result<Arc<Lab>> {
        use std::os::unix::fs::DirBuilderExt;
        let ports_dir = config.run_dir.join("ports");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&ports_dir)?;
        // Before any node can start and make a root of the same name.
        crate::vmlaunch::node::sweep_stale_snapshots(&config.nodes);
        let published = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let dataplane = DataPlaneHandle::spawn(
            published.clone(),
            DataPlaneConfig {
                aging_ms: config.aging_secs.saturating_mul(1000),
                ..DataPlaneConfig::default()
            },
        )?;
        Ok(Arc::new(Lab {
            config,
            ports_dir,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            published,
            dataplane,
            events: Arc::new(EventSink::new()),
            nodes: NodeTable::default(),
            persister: std::sync::OnceLock::new(),
            captures: Mutex::new(instruments::Captures::default()),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not wedge the API: the state is still
        // consistent because every change is made before publishing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, st: &mut State) {
        self.published.store(Arc::new(st.snapshot()));
        self.dataplane.nudge();
    }

    pub fn events(&self) -> &Arc<EventSink> {
        &self.events
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn run_dir(&self) -> &Path {
        &self.config.run_dir
    }

    pub fn info(&self) -> LabInfo {
        let st = self.state();
        LabInfo {
            name: self.config.name.clone(),
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            run_dir: self.config.run_dir.display().to_string(),
            api_socket: self.config.run_dir.join("api.sock").display().to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            aging_s: self.config.aging_secs,
            lans: st.lans.len(),
            ports: st.ports.len(),
            ports_up: st.ports.values().filter(|p| p.shared.is_up()).count(),
        }
    }

    pub fn lans(&self) -> Vec<LanInfo> {
        let st = self.state();
        st.lans.keys().map(|n| st.lan_info(n)).collect()
    }

    pub fn lan(&self, name: &str) -> Result<LanInfo, LabError> {
        let st = self.state();
        if !st.lans.contains_key(name) {
            return Err(not_found("lan", name));
        }
        Ok(st.lan_info(name))
    }

    pub fn add_lan(&self, name: &str) -> Result<LanInfo, LabError> {
        check_name(name).map_err(|source| LabError::InvalidName {
            what: "lan",
            source,
        })?;
        let mut st = self.state();
        if st.lans.contains_key(name) {
            return Err(LabError::Exists {
                what: "lan",
                name: name.into(),
            });
        }
        let id = st.lan_ids.take();
        st.lans.insert(name.to_string(), LanEntry { id });
        self.publish(&mut st);
        tracing::info!(lan = name, "lan added");
        self.events.emit(Event::LanAdded { lan: name.into() });
        Ok(st.lan_info(name))
    }

    pub fn remove_lan(&self, name: &str) -> Result<(), LabError> {
        let mut st = self.state();
        if !st.lans.contains_key(name) {
            return Err(not_found("lan", name));
        }
        let info = st.lan_info(name);
        if !info.ports.is_empty() {
            return Err(LabError::LanNotEmpty {
                lan: name.into(),
                ports: info.ports,
            });
        }
        self.end_captures_of("lan", name);
        let entry = st.lans.remove(name).expect("checked above");
        st.lan_ids.give(entry.id);
        self.publish(&mut st);
        tracing::info!(lan = name, "lan removed");
        self.events.emit(Event::LanRemoved { lan: name.into() });
        Ok(())
    }

    pub async fn fdb(&self, lan: &str) -> Result<Vec<FdbEntryInfo>, LabError> {
        let id = {
            let st = self.state();
            st.lans.get(lan).ok_or_else(|| not_found("lan", lan))?.id
        };
        let (reply, rx) = oneshot::channel();
        self.dataplane.send(Command::Fdb { lan: id, reply })?;
        let rows = rx.await.map_err(|_| DataPlaneGone)?;
        let st = self.state();
        let by_id: BTreeMap<PortId, &str> =
            st.ports.iter().map(|(n, p)| (p.id, n.as_str())).collect();
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(FdbEntryInfo {
                    mac: r.mac.to_string(),
                    port: by_id.get(&r.port)?.to_string(),
                    age_s: r.age_ms as f64 / 1000.0,
                })
            })
            .collect())
    }

    pub fn ports(&self) -> Vec<PortInfo> {
        let st = self.state();
        st.ports
            .iter()
            .map(|(n, p)| State::port_info(n, p))
            .collect()
    }

    pub fn port(&self, name: &str) -> Result<PortInfo, LabError> {
        let st = self.state();
        let p = st.ports.get(name).ok_or_else(|| not_found("port", name))?;
        Ok(State::port_info(name, p))
    }

    pub fn add_port(
        &self,
        name: &str,
        kind: PortKind,
        lan: Option<&str>,
    ) -> Result<PortInfo, LabError> {
        self.add_port_with(name, kind, lan, &PortOptions::default())
    }

    pub fn add_port_with(
        &self,
        name: &str,
        kind: PortKind,
        lan: Option<&str>,
        options: &PortOptions,
    ) -> Result<PortInfo, LabError> {
        check_name(name).map_err(|source| LabError::InvalidName {
            what: "port",
            source,
        })?;
        let mut st = self.state();
        if st.ports.contains_key(name) {
            return Err(LabError::Exists {
                what: "port",
                name: name.into(),
            });
        }
        if let Some(l) = lan {
            if !st.lans.contains_key(l) {
                return Err(not_found("lan", l));
            }
        }
        let path = self.ports_dir.join(name);
        let shared = Arc::new(PortShared::default());
        let link = PortLink::new(name, shared.clone(), self.events.clone());
        let io = ports::open(kind, &path, link, options)?;
        let id = st.port_ids.take();
        if let Err(e) = self.dataplane.send(Command::AddPort {
            id,
            io,
            shared: shared.clone(),
        }) {
            st.port_ids.give(id);
            return Err(e.into());
        }
        st.ports.insert(
            name.to_string(),
            PortEntry {
                id,
                kind,
                lan: lan.map(str::to_string),
                path: path.clone(),
                shared,
                link: LinkState::Up,
                impairments: Default::default(),
            },
        );
        self.publish(&mut st);
        tracing::info!(port = name, kind = kind.as_str(), lan = lan.unwrap_or("-"), path = %path.display(), "port added");
        self.events.emit(Event::PortAdded {
            port: name.into(),
            kind,
            lan: lan.map(str::to_string),
            path: path.display().to_string(),
        });
        Ok(State::port_info(name, &st.ports[name]))
    }

    /// Removes a port; returns once its sockets are closed and gone.
    pub async fn remove_port(&self, name: &str) -> Result<(), LabError> {
        let (id, done_rx) = {
            let mut st = self.state();
            let entry = st
                .ports
                .remove(name)
                .ok_or_else(|| not_found("port", name))?;
            self.end_captures_of("port", name);
            self.publish(&mut st);
            let (done, rx) = oneshot::channel();
            self.dataplane
                .send(Command::RemovePort { id: entry.id, done })?;
            (entry.id, rx)
        };
        let _ = done_rx.await;
        // Only now may the id be handed out again.
        self.state().port_ids.give(id);
        tracing::info!(port = name, "port removed");
        self.events.emit(Event::PortRemoved { port: name.into() });
        Ok(())
    }

    /// Puts a port on another lan (or none) at once; other ports are not
    /// touched.
    pub fn move_port(&self, name: &str, lan: Option<&str>) -> Result<PortInfo, LabError> {
        let mut st = self.state();
        if let Some(l) = lan {
            if !st.lans.contains_key(l) {
                return Err(not_found("lan", l));
            }
        }
        let entry = st
            .ports
            .get_mut(name)
            .ok_or_else(|| not_found("port", name))?;
        let from = entry.lan.clone();
        let to = lan.map(str::to_string);
        if from != to {
            entry.lan = to.clone();
            self.publish(&mut st);
            tracing::info!(
                port = name,
                from = from.as_deref().unwrap_or("-"),
                to = to.as_deref().unwrap_or("-"),
                "port moved"
            );
            self.events.emit(Event::PortMoved {
                port: name.into(),
                from,
                to,
            });
        }
        Ok(State::port_info(name, &st.ports[name]))
    }

    pub fn port_stats(&self, name: &str) -> Result<PortStats, LabError> {
        let st = self.state();
        let p = st.ports.get(name).ok_or_else(|| not_found("port", name))?;
        Ok(PortStats {
            name: name.into(),
            up: p.shared.is_up(),
            counters: p.shared.counters.load(),
        })
    }

    /// Stops the data plane; every port socket is closed and removed.
    pub fn shutdown(&self) {
        // Guests first: normally already stopped by `stop_all_nodes`.
        self.nodes.kill_all();
        self.dataplane.shutdown();
        let mut st = self.state();
        st.ports.clear();
    }

    /// Gives the lab the persister that keeps its state file; once.
    pub fn set_persister(&self, p: Arc<crate::persist::Persister>) {
        let _ = self.persister.set(p);
    }

    pub fn persister(&self) -> Option<&Arc<crate::persist::Persister>> {
        self.persister.get()
    }

    pub(crate) fn node_table(&self) -> &NodeTable {
        &self.nodes
    }

    pub fn node_config(&self) -> &NodeConfig {
        &self.config.nodes
    }

    pub fn ports_dir(&self) -> &Path {
        &self.ports_dir
    }

    /// Wall-clock start, for the lab info (not used on any frame path).
    pub fn started_at(&self) -> SystemTime {
        SystemTime::now() - self.started.elapsed()
    }
}

fn not_found(what: &'static str, name: &str) -> LabError {
    LabError::NotFound {
        what,
        name: name.chars().take(64).collect(),
    }
}
