//! Container nodes: OCI containers run by crun, rootless, with a
//! copy-on-write root filesystem over an image that is never written.
//!
//! - spec.rs: the container fields of a node spec.
//! - rootfs.rs: container images (the built-in one), paths inside a root.
//! - bundle.rs: the OCI runtime config crun reads.
//! - holder.rs: the per-node process that makes the namespaces, mounts the
//!   root (overlay or Btrfs snapshot) and becomes `crun run`.
//! - btrfs.rs: subvolumes and snapshots, the root where the store is on
//!   Btrfs.
//! - import/: `ulan image import` (OCI layout, OCI or docker archive);
//!   unpack.rs applies its layers without trusting their paths.
//! - limits.rs: the node's cgroups and their limits, in a cgroup v2 or
//!   v1 delegation, and what to say where there is none.
//! - console.rs: the container's terminal (the pty master crun sends).
//! - commit.rs: a stopped node's layers merged into a new root filesystem.

pub mod btrfs;
pub mod bundle;
pub mod commit;
pub mod console;
pub mod holder;
pub mod import;
pub mod limits;
pub mod rootfs;
pub mod spec;
pub mod unpack;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::vmlaunch::image::{ImageError, ImageStore};
use crate::vmlaunch::spec::NodeSpec;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("image {path:?}: {message}")]
    ImageDir { path: String, message: String },
    #[error("image {0:?} is not a container image (it has no root filesystem)")]
    NotContainerImage(String),
    #[error("cmd: {program:?} does not exist in the image (or is not an executable file)")]
    NoSuchCommand { program: String },
    #[error("crun is not installed (apt-get install crun): container nodes need it")]
    NoCrun,
    #[error("{tool} is not installed (apt-get install {package})")]
    NoTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{message}")]
    Files { message: String },
    #[error("container {node:?} is not running")]
    NotRunning { node: String },
    #[error("crun exec: {0}")]
    Exec(String),
}

/// What a container node runs, resolved before anything is made.
#[derive(Debug, Clone)]
pub struct ContainerPlan {
    /// The image's root filesystem (the overlay's lower layer, or the
    /// subvolume a Btrfs snapshot is made of).
    pub lower: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
}

/// Where a container node's image is and how it runs, as the image says.
#[derive(Debug, Clone)]
pub struct ImageSource {
    /// The image's root filesystem (the overlay's lower layer).
    pub lower: PathBuf,
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
}

/// Finds `spec`'s image: the built-in container image, a store name or a
/// directory holding a root filesystem.
pub fn source(spec: &NodeSpec, store: &ImageStore) -> Result<ImageSource, ContainerError> {
    let from = |img: crate::vmlaunch::image::Image, name: &str| {
        let c = img
            .manifest
            .container
            .clone()
            .ok_or_else(|| ContainerError::NotContainerImage(name.into()))?;
        Ok(ImageSource {
            lower: img.dir.join(&c.rootfs),
            entrypoint: c.entrypoint,
            env: c.env,
            workdir: c.workdir,
        })
    };
    match spec.image.as_deref() {
        None => from(
            rootfs::ensure_builtin_container(store)?,
            rootfs::BUILTIN_CONTAINER,
        ),
        Some(path) if path.starts_with('/') => {
            let p = Path::new(path);
            if !p.is_dir() {
                return Err(ContainerError::ImageDir {
                    path: path.into(),
                    message: "does not exist or is not a directory holding a root filesystem"
                        .into(),
                });
            }
            if p.join("oci-layout").is_file() {
                return Err(ContainerError::ImageDir {
                    path: path.into(),
                    message: "is an OCI image layout, not a root filesystem: \
                              `ulan image import DIR NAME` makes an image of it"
                        .into(),
                });
            }
            rootfs::readable_dir(p).map_err(|e| ContainerError::ImageDir {
                path: path.into(),
                message: format!("cannot be read: {e}"),
            })?;
            Ok(ImageSource {
                lower: p.to_path_buf(),
                entrypoint: Vec::new(),
                env: Vec::new(),
                workdir: None,
            })
        }
        Some(name) => from(store.get(name)?, name),
    }
}

/// Resolves `spec`'s image (see [`source`]) and its command.
pub fn resolve(spec: &NodeSpec, store: &ImageStore) -> Result<ContainerPlan, ContainerError> {
    let ImageSource {
        lower,
        entrypoint: entry,
        mut env,
        workdir,
    } = source(spec, store)?;
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    env.push(format!(
        "HOSTNAME={}",
        spec.hostname.as_deref().unwrap_or(&spec.name)
    ));
    env.extend(spec.env.iter().cloned());
    let args = if !spec.cmd.is_empty() {
        spec.cmd.clone()
    } else if !entry.is_empty() {
        entry
    } else {
        vec!["/bin/sh".into()]
    };
    if rootfs::find_program(&lower, &args[0], &env).is_none() {
        return Err(ContainerError::NoSuchCommand {
            program: args[0].chars().take(80).collect(),
        });
    }
    let cwd = spec
        .workdir
        .clone()
        .or(workdir)
        .unwrap_or_else(|| "/".into());
    Ok(ContainerPlan {
        lower,
        args,
        env,
        cwd,
    })
}

/// A node's container files, in its run dir (and its data dir when
/// persistent).
#[derive(Debug, Clone)]
pub struct ContainerPaths {
    pub bundle: PathBuf,
    pub state_root: PathBuf,
    pub pid_file: PathBuf,
    pub crun_pid_file: PathBuf,
    pub holder_config: PathBuf,
    /// Where crun sends the terminal's pty master (`--console-socket`).
    pub pty_socket: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
}

impl ContainerPaths {
    /// `layer_dir` holds the upper layer: the run dir, or the data dir for
    /// a persistent node. The overlay's work dir must be on the same file
    /// system as the upper dir, so it lives beside it.
    pub fn new(run_dir: &Path, layer_dir: &Path) -> ContainerPaths {
        ContainerPaths {
            bundle: run_dir.join("bundle"),
            state_root: run_dir.join("crun"),
            pid_file: run_dir.join("container.pid"),
            crun_pid_file: run_dir.join("crun.pid"),
            holder_config: run_dir.join("holder.json"),
            pty_socket: run_dir.join("pty.sock"),
            upper: layer_dir.join("upper"),
            work: layer_dir.join("work"),
            merged: run_dir.join("bundle/rootfs"),
        }
    }
}

/// crun's name for a node's container: unique per lab.
pub fn container_id(lab: &str, node: &str) -> String {
    format!("ulan-{lab}-{node}")
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

pub fn find_crun() -> Result<PathBuf, ContainerError> {
    find_tool("crun").ok_or(ContainerError::NoCrun)
}

/// The user's subordinate id range from `/etc/subuid`-style text: the
/// first line naming the user (by name or uid). Bad lines are skipped.
pub fn parse_subid(text: &str, user: &str, id: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        if f.next().is_some() || (who != user && who != id.to_string()) {
            return None;
        }
        let (start, count) = (start.parse().ok()?, count.parse::<u32>().ok()?);
        (count > 0).then_some((start, count))
    })
}

/// A subordinate id range: (first id, count).
pub type IdRange = (u32, u32);

/// This user's subordinate uid and gid ranges, when both exist and the
/// newuidmap/newgidmap helpers are installed.
pub fn subordinate_ids() -> (Option<IdRange>, Option<IdRange>) {
    if find_tool("newuidmap").is_none() || find_tool("newgidmap").is_none() {
        return (None, None);
    }
    // SAFETY: getuid/getgid/getpwuid; the passwd entry is copied at once.
    let (uid, gid, name) = unsafe {
        let uid = libc::getuid();
        let pw = libc::getpwuid(uid);
        let name = if pw.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned()
        };
        (uid, libc::getgid(), name)
    };
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let u = parse_subid(&read("/etc/subuid"), &name, uid);
    let g = parse_subid(&read("/etc/subgid"), &name, gid);
    match (u, g) {
        (Some(u), Some(g)) => (Some(u), Some(g)),
        _ => (None, None),
    }
}

/// crun's pid (host numbering) as its holder wrote it in `run_dir`.
pub fn crun_pid(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(ContainerPaths::new(run_dir, run_dir).crun_pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs `crun ARGS` in crun's user, mount and pid namespaces (where its
/// state, the container's root and its pids are), as root there.
pub fn crun_in_holder(
    crun_pid: u32,
    state_root: &Path,
    args: &[String],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("nsenter");
    cmd.arg(format!("--target={crun_pid}"))
        // Keep our ids (root inside through the map): the holder's user
        // namespace denies setgroups.
        .args(["--user", "--mount", "--pid", "--preserve-credentials", "--"])
        .arg(find_tool("crun").unwrap_or_else(|| "crun".into()))
        .arg("--root")
        .arg(state_root)
        .arg("--cgroup-manager=disabled")
        .args(args);
    cmd
}

/// Sends `signal` (a name: TERM, KILL) to the container's init.
pub async fn kill_container(
    crun_pid: u32,
    state_root: &Path,
    id: &str,
    signal: &str,
) -> Result<(), String> {
    let out = crun_in_holder(
        crun_pid,
        state_root,
        &["kill".into(), "--".into(), id.into(), signal.into()],
    )
    .stdin(std::process::Stdio::null())
    .output();
    match tokio::time::timeout(Duration::from_secs(5), out).await {
        Ok(Ok(o)) if o.status.success() => Ok(()),
        Ok(Ok(o)) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("crun kill got no answer in 5 s".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_are_read_for_the_user() {
        let text = "alice:100000:65536\n# x\nbob:200000:0\n1001:300000:1000\nbad line\n";
        assert_eq!(parse_subid(text, "alice", 1000), Some((100000, 65536)));
        assert_eq!(parse_subid(text, "bob", 1), None, "empty range");
        assert_eq!(parse_subid(text, "carol", 1001), Some((300000, 1000)));
        assert_eq!(parse_subid(text, "dave", 5), None);
        assert_eq!(parse_subid("x:1:2:3\n", "x", 0), None);
    }
}
