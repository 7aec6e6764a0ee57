//! What is done to a node that exists: its NICs' carrier, exec, commit,
//! and QMP commands.

use std::path::Path;
use std::time::Duration;

use super::*;

impl Lab {
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

    /// Runs `argv` in the guest through its exec agent (built-in image).
    pub async fn exec_node(
        &self,
        name: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, LabError> {
        let is_container = {
            let table = self.node_table().lock();
            let e = table.get(name).ok_or_else(|| node_not_found(name))?;
            e.spec.kind == NodeKind::Container
        };
        if is_container {
            return self.exec_container(name, argv, timeout).await;
        }
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
    /// `image` in the image store; for a container node, its root
    /// filesystem (image + upper layer) into a new container image.
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
        crate::names::check_name(image_name).map_err(|e| NodeError::Image(e.into()))?;
        if ImageStore::open(&cfg.images_dir)
            .dir()
            .join(image_name)
            .exists()
        {
            return Err(NodeError::Image(image::ImageError::Exists(image_name.into())).into());
        }
        if spec.kind == NodeKind::Container {
            return self.commit_container(&spec, &dir, image_name).await;
        }
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
pub(super) const RUNNING_AGENT_PATIENCE: Duration = Duration::from_secs(10);

/// How long one QMP command may take, connection included: a QEMU that
/// stalls after the handshake must not hold a stop (and its lock) forever.
pub(super) const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn qmp_command(sock: &Path, command: &str) -> Result<(), String> {
    qmp_command_with(sock, command, None).await
}

pub(super) async fn qmp_command_with(
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
