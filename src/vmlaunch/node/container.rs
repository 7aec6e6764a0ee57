//! Container nodes in the node table: their run files before a start,
//! exec through crun, and a stop through crun's kill.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::vmlaunch::container::{
    self, btrfs, bundle,
    holder::{HolderConfig, RootFs},
    ContainerPaths, ContainerPlan,
};

/// Removes a node's files, including what the container made with ids of
/// the user's subordinate range and the overlay's work dir (which the
/// kernel leaves mode 000): through the holder's namespaces when a plain
/// removal fails.
pub(super) fn remove_tree(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return;
    }
    if let Ok(exe) = std::env::current_exe() {
        let _ = std::process::Command::new(exe)
            .arg("container-holder")
            .arg("--rm")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    if dir.exists() {
        tracing::warn!("cannot remove {}", dir.display());
    }
}

/// Where a node's Btrfs snapshot root lives: beside a persistent node's
/// other kept files, else in the lab's `layers` dir next to them (on the
/// data dir's file system, like the store; the run dir is often tmpfs).
pub(super) fn snapshot_path(spec: &NodeSpec, cfg: &NodeConfig) -> PathBuf {
    if spec.persistent {
        cfg.data_dir.join(&spec.name).join("rootfs")
    } else {
        cfg.data_dir.with_file_name("layers").join(&spec.name)
    }
}

/// Deletes the snapshot roots plain nodes of an earlier daemon of this
/// lab left (it was killed before it could stop them): no node runs yet
/// when a lab starts, so every one there is stale. Persistent nodes' roots
/// live elsewhere (their data dir) and stay.
pub fn sweep_stale_snapshots(cfg: &NodeConfig) {
    let layers = cfg.data_dir.with_file_name("layers");
    let Ok(entries) = std::fs::read_dir(&layers) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        tracing::info!("removing the stale snapshot root {}", path.display());
        match entry.file_type() {
            // Never followed: a planted link goes, its target stays.
            Ok(t) if t.is_symlink() || t.is_file() => {
                let _ = std::fs::remove_file(&path);
            }
            _ => drop_snapshot(&path),
        }
    }
}

/// Deletes a node's snapshot root: by ioctl where the mount allows it
/// (`user_subvol_rm_allowed`), else emptied and removed with rmdir, through
/// the holder's id mapping when the container made files of subordinate
/// ids.
pub(super) fn drop_snapshot(path: &Path) {
    if std::fs::symlink_metadata(path).is_err() {
        return;
    }
    match btrfs::delete(path) {
        Ok(()) => tracing::debug!("snapshot {} deleted", path.display()),
        Err(e) => {
            tracing::debug!("{e}: emptying it and removing it instead");
            remove_tree(path);
        }
    }
}

/// The node's root for this start: its Btrfs snapshot of the image when
/// the image's root filesystem is a subvolume and the snapshot can be
/// made beside it (fresh each start, kept when persistent), else the
/// overlay. A persistent node that already has an overlay upper layer
/// keeps the overlay (its writes are there).
fn choose_root(
    spec: &NodeSpec,
    plan: &ContainerPlan,
    paths: &ContainerPaths,
    cfg: &NodeConfig,
) -> RootFs {
    let overlay = RootFs::Overlay {
        lower: plan.lower.clone(),
        upper: paths.upper.clone(),
        work: paths.work.clone(),
    };
    let snap = snapshot_path(spec, cfg);
    if spec.persistent {
        if paths.upper.is_dir() {
            return overlay;
        }
        if btrfs::is_subvolume(&snap) {
            return RootFs::BtrfsSnapshot { path: snap };
        }
    } else {
        // A snapshot of an earlier run the daemon did not get to delete.
        drop_snapshot(&snap);
    }
    let why = if !btrfs::on_btrfs(&plan.lower) {
        // The usual case: nothing to say above debug.
        tracing::debug!(node = %spec.name, "root: overlay (the image is not on Btrfs)");
        return overlay;
    } else if !btrfs::is_subvolume(&plan.lower) {
        format!(
            "the image's root filesystem {} is a plain directory, not a subvolume \
             (made before the store was on Btrfs: build or import it again)",
            plan.lower.display()
        )
    } else {
        let made = snap
            .parent()
            .ok_or_else(|| "no parent dir".to_string())
            .and_then(|d| mkdir(d).map(|()| d))
            .and_then(|d| {
                if btrfs::on_btrfs(d) {
                    btrfs::snapshot(&plan.lower, &snap).map_err(|e| e.to_string())
                } else {
                    Err(format!("{} is not on Btrfs", d.display()))
                }
            });
        match made {
            Ok(()) => {
                tracing::info!(node = %spec.name, "root: btrfs snapshot {}", snap.display());
                return RootFs::BtrfsSnapshot { path: snap };
            }
            Err(e) => e,
        }
    };
    tracing::info!(node = %spec.name, "root: overlay, no Btrfs snapshot: {why}");
    overlay
}

fn files_err(node: &str) -> impl Fn(String) -> NodeError + '_ {
    move |message| NodeError::Files {
        node: node.into(),
        message,
    }
}

fn mkdir(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(p)
        .map_err(|e| format!("cannot make {}: {e}", p.display()))
}

impl Lab {
    /// Makes a container node's run files for a start: its root (a fresh
    /// upper layer or Btrfs snapshot, kept when persistent), the bundle
    /// with config.json, the holder's config. Returns the holder config's
    /// path and the kind of root.
    pub(super) fn prepare_container(
        &self,
        spec: &NodeSpec,
        macs: &[crate::wire::MacAddr],
        plan: &ContainerPlan,
        dir: &Path,
        cfg: &NodeConfig,
    ) -> Result<(PathBuf, &'static str), NodeError> {
        let err = files_err(&spec.name);
        let layer = overlay_path(spec, dir, cfg);
        let paths = ContainerPaths::new(dir, &layer);
        if !(spec.persistent && paths.upper.is_dir()) {
            remove_tree(&layer);
        }
        // Work dir: the kernel's scratch, emptied at every mount anyway.
        remove_tree(&paths.work);
        for p in [&paths.bundle, &paths.state_root] {
            remove_tree(p);
        }
        let _ = std::fs::remove_file(&paths.pid_file);
        let _ = std::fs::remove_file(&paths.crun_pid_file);
        let _ = std::fs::remove_file(&paths.pty_socket);
        let root = choose_root(spec, plan, &paths, cfg);
        let fresh_upper = !paths.upper.is_dir();
        let mut dirs = vec![&paths.merged, &paths.state_root];
        if matches!(root, RootFs::Overlay { .. }) {
            dirs.extend([&paths.upper, &paths.work]);
        }
        for p in dirs {
            mkdir(p).map_err(&err)?;
        }
        if fresh_upper && matches!(root, RootFs::Overlay { .. }) {
            // The overlay's root directory has the upper dir's mode: the
            // image's, not 0700, or no uid but 0 could walk the container's
            // `/` (its privacy comes from the 0700 dir around it).
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&plan.lower)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o755);
            std::fs::set_permissions(&paths.upper, std::fs::Permissions::from_mode(mode))
                .map_err(|e| err(format!("{}: {e}", paths.upper.display())))?;
        }
        bundle::write_bundle(
            &paths.bundle,
            &bundle::BundleInput {
                rootfs: paths.merged.clone(),
                args: plan.args.clone(),
                env: plan.env.clone(),
                cwd: plan.cwd.clone(),
                hostname: spec.hostname.clone().unwrap_or_else(|| spec.name.clone()),
                // crun runs as the holder: its own net namespace is the
                // holder's, where the NICs are.
                netns: Some("/proc/self/ns/net".into()),
                terminal: true,
            },
        )?;
        let (subuid, subgid) = container::subordinate_ids();
        let holder = HolderConfig {
            id: container::container_id(self.name(), &spec.name),
            crun: container::find_crun()?,
            state_root: paths.state_root.clone(),
            bundle: paths.bundle.clone(),
            pid_file: paths.pid_file.clone(),
            crun_pid_file: paths.crun_pid_file.clone(),
            root: root.clone(),
            merged: paths.merged.clone(),
            console_socket: Some(paths.pty_socket.clone()),
            nics: (0..spec.nics.len())
                .map(|i| container::holder::HolderNic {
                    ifname: format!("eth{i}"),
                    mac: macs[i].to_string(),
                    socket: self.ports_dir().join(spec.port_name(i)),
                    ip: spec.nics[i].ip.iter().map(|c| c.to_string()).collect(),
                })
                .collect(),
            routes: spec
                .routes
                .iter()
                .map(|r| (r.to.clone(), r.via.to_string()))
                .collect(),
            forward: spec.forward,
            subuid,
            subgid,
        };
        let text = serde_json::to_vec_pretty(&holder).map_err(|e| err(e.to_string()))?;
        std::fs::write(&paths.holder_config, text)
            .map_err(|e| err(format!("{}: {e}", paths.holder_config.display())))?;
        Ok((paths.holder_config, root.kind()))
    }

    /// After a container node's run: a non-persistent node's snapshot
    /// root is deleted (a persistent node keeps its own).
    pub(super) async fn drop_container_root(&self, name: &str) {
        let snap = {
            let table = self.node_table().lock();
            table
                .get(name)
                .filter(|e| e.spec.kind == NodeKind::Container && !e.spec.persistent)
                .map(|e| snapshot_path(&e.spec, self.node_config()))
        };
        if let Some(snap) = snap {
            let _ = tokio::task::spawn_blocking(move || drop_snapshot(&snap)).await;
        }
    }

    /// A running container's crun pid, crun state dir, container id and
    /// the `cgroup.procs` files its processes belong in.
    pub(super) fn container_handle(
        &self,
        name: &str,
    ) -> Result<(u32, PathBuf, String, Vec<std::ffi::CString>), LabError> {
        let table = self.node_table().lock();
        let e = table.get(name).ok_or_else(|| node_not_found(name))?;
        let st = e.runtime.status();
        let state = st.state.unwrap_or(NodeState::Stopped);
        match (st.pid.and(container::crun_pid(&e.dir)), state) {
            (Some(pid), NodeState::Running | NodeState::Starting) => Ok((
                pid,
                ContainerPaths::new(&e.dir, &e.dir).state_root,
                container::container_id(self.name(), name),
                st.cgroup
                    .as_ref()
                    .map(|c| c.procs_files())
                    .unwrap_or_default(),
            )),
            _ => Err(NodeError::Busy {
                node: name.into(),
                state,
                hint: "start it first",
            }
            .into()),
        }
    }

    /// Runs `argv` in a container (crun exec), with its exit code and
    /// streams; 137 when killed at `timeout`, as the guest agent does.
    pub(super) async fn exec_container(
        &self,
        name: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, LabError> {
        let (pid, state_root, id, cgroup) = self.container_handle(name)?;
        // The container may still be on its way up.
        let pid_file = state_root
            .parent()
            .map(|d| d.join("container.pid"))
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&pid_file).is_ok_and(|p| !p.trim().is_empty()) {
            if tokio::time::Instant::now() >= deadline {
                return Err(NodeError::from(container::ContainerError::NotRunning {
                    node: name.into(),
                })
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut args: Vec<String> = vec!["exec".into(), "--".into(), id];
        args.extend(argv.iter().cloned());
        let mut cmd = container::crun_in_holder(pid, &state_root, &args);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // Under the node's limits, like everything else in it.
        use std::os::unix::process::CommandExt;
        // SAFETY: the join only opens, writes and closes paths made before
        // the fork.
        unsafe {
            cmd.as_std_mut()
                .pre_exec(move || container::limits::NodeCgroup::join(&cgroup));
        }
        let child = cmd.spawn().map_err(|e| {
            NodeError::from(container::ContainerError::Exec(format!(
                "cannot run nsenter: {e}"
            )))
        })?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => {
                use std::os::unix::process::ExitStatusExt;
                let code = out
                    .status
                    .code()
                    .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(9));
                Ok(ExecOutput {
                    exit_code: code,
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                })
            }
            Ok(Err(e)) => {
                Err(NodeError::from(container::ContainerError::Exec(e.to_string())).into())
            }
            // Dropped: nsenter and crun exec are killed; the command in the
            // container loses its parent and goes with it.
            Err(_) => Ok(ExecOutput {
                exit_code: 137,
                stdout: String::new(),
                stderr: format!("timed out after {} s", timeout.as_secs()),
            }),
        }
    }

    /// SIGTERM to a container's init through crun (`pid` is the holder's,
    /// which became crun), whatever state the node is in.
    pub(super) async fn signal_container_now(&self, name: &str) -> Result<(), String> {
        let dir = {
            let table = self.node_table().lock();
            table.get(name).map(|e| e.dir.clone())
        };
        let Some(dir) = dir else {
            return Err("no such node".into());
        };
        let state_root = ContainerPaths::new(&dir, &dir).state_root;
        let pid = container::crun_pid(&dir).ok_or("crun has not started")?;
        let id = container::container_id(self.name(), name);
        container::kill_container(pid, &state_root, &id, "TERM").await
    }

    /// Commit of a stopped container node (the caller holds its op lock
    /// and checked it is not live): its image's root filesystem with the
    /// upper layer its last run left applied, as a new container image
    /// that runs as the source image does (entrypoint, env, workdir).
    pub(super) async fn commit_container(
        &self,
        spec: &NodeSpec,
        dir: &Path,
        image_name: &str,
    ) -> Result<image::Image, LabError> {
        let cfg = self.node_config().clone();
        let upper = ContainerPaths::new(dir, &overlay_path(spec, dir, &cfg)).upper;
        // A node whose root was a Btrfs snapshot has its whole tree there
        // (a persistent one keeps it; a plain one until its next stop).
        let snapshot = Some(snapshot_path(spec, &cfg)).filter(|p| btrfs::is_subvolume(p));
        if snapshot.is_none() && !upper.is_dir() {
            return Err(NodeError::NoLayer(spec.name.clone()).into());
        }
        let exe = std::env::current_exe().map_err(|e| NodeError::Files {
            node: spec.name.clone(),
            message: format!("cannot find the ulan binary: {e}"),
        })?;
        let (spec, name) = (spec.clone(), image_name.to_string());
        // The store's lock and the copy take as long as they take: not on
        // the control side's worker.
        let done = tokio::task::spawn_blocking(move || -> Result<image::Image, NodeError> {
            let store = ImageStore::open(&cfg.images_dir);
            crate::names::check_name(&name).map_err(image::ImageError::from)?;
            let src = container::source(&spec, &store)?;
            let _lock = store.lock()?;
            if store.dir().join(&name).exists() {
                return Err(image::ImageError::Exists(name).into());
            }
            let tmp = store.scratch(&name)?;
            let what = format!("commit of node {}", spec.name);
            let result = (|| -> Result<image::Image, NodeError> {
                let rootfs = tmp.join("rootfs");
                // From a snapshot: a snapshot of it (a subvolume, so nodes
                // of the new image get snapshots too), else a copy of it
                // over an empty upper layer.
                let (lower, upper) = match &snapshot {
                    Some(snap) => match btrfs::snapshot(snap, &rootfs) {
                        Ok(()) => (None, None),
                        Err(e) => {
                            tracing::info!(
                                "commit of {}: copying, not snapshotting: {e}",
                                spec.name
                            );
                            let empty = tmp.join(".empty-upper");
                            std::fs::create_dir(&empty).map_err(|e| NodeError::Disk {
                                what: what.clone(),
                                message: format!("{}: {e}", empty.display()),
                            })?;
                            (Some(snap.clone()), Some(empty))
                        }
                    },
                    None => (Some(src.lower.clone()), Some(upper.clone())),
                };
                if let (Some(lower), Some(upper)) = (lower, upper) {
                    run_commit(&exe, &lower, &upper, &rootfs, &what)?;
                    if upper.starts_with(&tmp) {
                        let _ = std::fs::remove_dir(&upper);
                    }
                }
                let manifest = image::Manifest::container(
                    format!("committed from container node {}", spec.name),
                    container::rootfs::ContainerImage {
                        rootfs: "rootfs".into(),
                        entrypoint: src.entrypoint.clone(),
                        env: src.env.clone(),
                        workdir: src.workdir.clone(),
                    },
                );
                Ok(store.install(&tmp, &name, &manifest, false)?)
            })();
            // No half-made image: the scratch dir goes, with what the
            // copy made as subordinate ids.
            if result.is_err() && tmp.exists() {
                remove_tree(&tmp);
            }
            result
        });
        match done.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(NodeError::Disk {
                what: format!("commit of node {image_name}"),
                message: format!("the copy did not finish: {e}"),
            }
            .into()),
        }
    }
}

/// `ulan container-holder --commit LOWER UPPER DEST`: the merge, in the
/// holder's id mapping.
fn run_commit(
    exe: &Path,
    lower: &Path,
    upper: &Path,
    dest: &Path,
    what: &str,
) -> Result<(), NodeError> {
    let out = std::process::Command::new(exe)
        .arg("container-holder")
        .arg("--commit")
        .args([lower, upper, dest])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| NodeError::Disk {
            what: what.into(),
            message: format!("cannot run {}: {e}", exe.display()),
        })?;
    if !out.status.success() {
        return Err(NodeError::Disk {
            what: what.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
