//! Starting a node's process: the emulator's argv, its files, its log.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use super::*;

impl Lab {
    /// Starts the guest process; the caller holds the node's op lock.
    pub(super) async fn start_locked(
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
        let mut rootfs = None;
        // A container's cgroups with its limits, joined by the holder.
        let mut cgroup = None;
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
            NodeKind::Container => {
                let plan = plan.container.as_ref().ok_or_else(|| NodeError::Files {
                    node: name.into(),
                    message: "container node without a container plan".into(),
                })?;
                let (holder, root) = self.prepare_container(&spec, &macs, plan, &dir, &cfg)?;
                rootfs = Some(root);
                let exe = std::env::current_exe().map_err(|e| NodeError::Files {
                    node: name.into(),
                    message: format!("cannot find the ulan binary for the holder: {e}"),
                })?;
                use crate::vmlaunch::container::limits;
                match limits::NodeCgroup::create(self.name(), name, &limits::Limits::of(&spec)) {
                    Ok(c) => cgroup = Some(std::sync::Arc::new(c)),
                    Err(e) => {
                        tracing::warn!(node = name, "container limits not applied: {e}");
                        accel_warning = Some(limits::warning(&e));
                    }
                }
                (exe, vec!["container-holder".into(), holder.into()], None)
            }
        };
        // A container's own output and crun's are its console log, and
        // explain how it ended.
        let log_path = if spec.kind == NodeKind::Container {
            &paths.console_log
        } else {
            &paths.log
        };
        let log = crate::daemon::open_run_file_append(log_path).map_err(|e| NodeError::Files {
            node: name.into(),
            message: format!("{}: {e}", log_path.display()),
        })?;
        // Where this run's part of the log starts: a crash is explained by
        // what this run wrote, not by an earlier run's last words.
        let log_from = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log.try_clone().map_err(|e| NodeError::Files {
            node: name.into(),
            message: e.to_string(),
        })?;
        // A container's terminal: crun sends its master here (see
        // supervise.rs); bound before the holder starts.
        let pty = if spec.kind == NodeKind::Container {
            let p = crate::vmlaunch::container::ContainerPaths::new(&dir, &dir).pty_socket;
            let _ = std::fs::remove_file(&p);
            let l = tokio::net::UnixListener::bind(&p).map_err(|e| NodeError::Files {
                node: name.into(),
                message: format!("{}: {e}", p.display()),
            })?;
            Some((l, p))
        } else {
            None
        };
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
        // A container's holder joins the node's cgroups before it execs,
        // so everything it starts is under the node's limits.
        let join = cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default();
        // SAFETY: prctl and setpgid are async-signal-safe; so is the join
        // (open, write, close of paths made before the fork).
        unsafe {
            cmd.as_std_mut().pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                libc::setpgid(0, 0);
                crate::vmlaunch::container::limits::NodeCgroup::join(&join)
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
            st.rootfs = rootfs;
            st.warning = accel_warning;
            st.cgroup = cgroup;
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
            agent: (plan.agent && spec.kind != NodeKind::Container).then(|| paths.agent.clone()),
            boot_timeout: cfg.boot_timeout,
            console: paths.console.clone(),
            console_log: paths.console_log.clone(),
            pid_file: (spec.kind == NodeKind::Container)
                .then(|| crate::vmlaunch::container::ContainerPaths::new(&dir, &dir).pid_file),
            pty,
        };
        tokio::spawn(supervise(
            name.to_string(),
            runtime.clone(),
            self.events().clone(),
            child,
            run,
            ready,
            (log_path.clone(), log_from),
        ));
        Ok(())
    }
}
