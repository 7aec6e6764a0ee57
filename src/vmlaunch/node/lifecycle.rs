//! Adding, starting, stopping and removing nodes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::*;

impl Lab {
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

    pub(super) async fn make_node_files(
        &self,
        spec: &NodeSpec,
        dir: &Path,
    ) -> Result<(), LabError> {
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

    pub(super) async fn unmake_node(&self, name: &str, spec: &NodeSpec, dir: &Path) {
        for i in 0..spec.nics.len() {
            let _ = self.remove_port(&spec.port_name(i)).await;
        }
        container::remove_tree(dir);
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

    pub(super) fn emit_state(&self, name: &str, state: NodeState, reason: Option<String>) {
        self.events().emit(Event::NodeState {
            node: name.into(),
            state: state.as_str(),
            reason,
        });
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

    pub(super) async fn stop_locked(&self, name: &str, runtime: &Arc<Runtime>, grace: Duration) {
        self.stop_process_locked(name, runtime, grace).await;
        // Also after a crash: a node that is not live any more.
        self.drop_container_root(name).await;
    }

    async fn stop_process_locked(&self, name: &str, runtime: &Arc<Runtime>, grace: Duration) {
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
                    let is_container = {
                        let table = self.node_table().lock();
                        table
                            .get(name)
                            .is_some_and(|e| e.spec.kind == NodeKind::Container)
                    };
                    if is_container {
                        // To the container's init, not to crun.
                        if let Err(e) = self.signal_container_now(name).await {
                            tracing::warn!(node = name, "SIGTERM to the container failed: {e}");
                        }
                    } else {
                        kill(pid, libc::SIGTERM);
                    }
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
}
