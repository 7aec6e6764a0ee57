//! What a guest boots: its boot plan resolved against the image store and
//! the file system, its accelerator, its disk overlay.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use super::*;

/// What the guest boots, resolved against the image store and the file
/// system. Checked before anything is made, so a bad spec makes nothing.
#[derive(Debug, Clone)]
pub(super) struct BootPlan {
    pub(super) kernel: Option<PathBuf>,
    pub(super) initrd: Option<PathBuf>,
    /// Disk base and its format, for the overlay.
    pub(super) base: Option<(PathBuf, String)>,
    pub(super) image_append: Option<String>,
    pub(super) agent: bool,
    /// The built-in image's init configures the guest from the cmdline.
    pub(super) builtin: bool,
    /// A container node: its root filesystem and command.
    pub(super) container: Option<crate::vmlaunch::container::ContainerPlan>,
}

pub(super) fn existing_file(what: &'static str, path: &Path) -> Result<PathBuf, NodeError> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(NodeError::MissingFile {
            what,
            path: path.display().to_string(),
        })
    }
}

pub(super) fn disk_format(path: &Path) -> Result<String, NodeError> {
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
pub(super) fn find_binary(name: &Path) -> Option<PathBuf> {
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
pub(super) async fn resolve_boot_blocking(
    spec: &NodeSpec,
    images_dir: &Path,
) -> Result<BootPlan, NodeError> {
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

pub(super) fn resolve_boot(spec: &NodeSpec, store: &ImageStore) -> Result<BootPlan, NodeError> {
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
        container: None,
    };
    if spec.kind == NodeKind::Container {
        use crate::vmlaunch::container;
        container::find_crun()?;
        if container::find_tool("nsenter").is_none() {
            return Err(container::ContainerError::NoTool {
                tool: "nsenter",
                package: "util-linux",
            }
            .into());
        }
        plan.container = Some(container::resolve(spec, store)?);
        // Exec works in every container (crun exec), no agent needed.
        plan.agent = true;
        return Ok(plan);
    }
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

pub(super) async fn run_qemu_img(args: Vec<OsString>, what: String) -> Result<(), NodeError> {
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
pub(super) const KVM_UNUSABLE_TTL: Duration = Duration::from_secs(60);

/// The KVM probe costs seconds, so answers are kept per (QEMU binary,
/// kernel) in memory, and the probe itself caches conclusive ones on disk
/// across daemons.
pub(super) fn kvm_status(qemu: &Path, kernel: Option<&Path>) -> KvmStatus {
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

pub(super) fn newest_boot_kernel() -> Option<PathBuf> {
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

pub(super) fn overlay_path(spec: &NodeSpec, dir: &Path, cfg: &NodeConfig) -> PathBuf {
    let file = match spec.kind {
        NodeKind::Qemu => "disk.qcow2",
        NodeKind::Uml => "disk.cow",
        // The overlay's upper and work dirs live in this one.
        NodeKind::Container => "layer",
    };
    if spec.persistent {
        cfg.data_dir.join(&spec.name).join(file)
    } else {
        dir.join(file)
    }
}

impl Lab {
    pub(super) async fn choose_accel(
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
    pub(super) async fn prepare_disk(
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
}
