//! Container root filesystems: the image manifest's container part, the
//! built-in container image (made offline from this host's busybox-static,
//! iperf3 and iproute2's `ip` with their shared libraries, like the
//! built-in guest image), and paths looked up inside a root without
//! leaving it.

use std::io;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::btrfs;
use crate::vmlaunch::image::{self, io_err, Image, ImageError, ImageStore, Manifest};

/// The store name of the built-in container image.
pub const BUILTIN_CONTAINER: &str = "builtin-container";

/// Bumped whenever what goes into the built-in container image changes,
/// so an image made by an older ulan is rebuilt.
const RECIPE: &str = "container-1";

/// Programs copied from the host with their libraries, and where.
const HOST_PROGRAMS: &[(&str, &str)] = &[("/usr/bin/iperf3", "bin/iperf3"), ("/bin/ip", "bin/ip")];

/// How a container image runs and where its root filesystem is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerImage {
    /// The root filesystem: a directory inside the image's directory.
    pub rootfs: String,
    /// The image's entrypoint and cmd, joined (OCI Entrypoint + Cmd).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

/// The built-in container image, made when missing or older than this
/// ulan's recipe. Built on first use by a container node without an image
/// (and by `ulan image build --container`).
///
/// Where the store is on Btrfs its rootfs is a subvolume, so nodes get
/// snapshots of it; one made as a plain directory (before the store moved
/// to Btrfs) is rebuilt as a subvolume, once per process at most (should
/// that not give a subvolume, nodes use the overlay and nothing loops).
pub fn ensure_builtin_container(store: &ImageStore) -> Result<Image, ImageError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static CONVERTED: AtomicBool = AtomicBool::new(false);
    let current = |img: &Image| {
        let plain_on_btrfs = || {
            let root = img.dir.join("rootfs");
            btrfs::on_btrfs(&root) && !btrfs::is_subvolume(&root)
        };
        img.manifest.recipe.as_deref() == Some(RECIPE)
            && (CONVERTED.load(Ordering::Relaxed) || !plain_on_btrfs())
    };
    if let Ok(img) = store.get(BUILTIN_CONTAINER) {
        if current(&img) {
            return Ok(img);
        }
    }
    let _lock = store.lock()?;
    if let Ok(img) = store.get(BUILTIN_CONTAINER) {
        if current(&img) {
            return Ok(img);
        }
    }
    CONVERTED.store(true, Ordering::Relaxed);
    let tmp = store.scratch(BUILTIN_CONTAINER)?;
    let result = build_rootfs(&tmp.join("rootfs")).and_then(|()| {
        let manifest = Manifest {
            recipe: Some(RECIPE.into()),
            ..Manifest::container(
                "ulan built-in container image (busybox, iperf3, ip)".into(),
                ContainerImage {
                    rootfs: "rootfs".into(),
                    entrypoint: vec!["/bin/sh".into()],
                    env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
                    workdir: None,
                },
            )
        };
        store.install(&tmp, BUILTIN_CONTAINER, &manifest, true)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn build_rootfs(root: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    btrfs::make_root_dir(root).map_err(io_err(root))?;
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
        "var/tmp",
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(io_err(&p))?;
    }
    for d in ["tmp", "var/tmp"] {
        let p = root.join(d);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o1777))
            .map_err(io_err(&p))?;
    }
    let busybox = Path::new("/bin/busybox");
    if !crate::vmlaunch::uml::is_static_elf(busybox).unwrap_or(false) {
        return Err(ImageError::Build(
            "/bin/busybox is missing or not statically linked; apt-get install busybox-static"
                .into(),
        ));
    }
    let bb = root.join("bin/busybox");
    std::fs::copy(busybox, &bb).map_err(io_err(&bb))?;
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| ImageError::Tool {
            tool: "busybox --list".into(),
            message: e.to_string(),
        })?;
    let own: Vec<&str> = HOST_PROGRAMS
        .iter()
        .filter_map(|(_, to)| to.strip_prefix("bin/"))
        .collect();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        // Plain names only: the list comes from a host binary, still a
        // file name must not walk out of bin/.
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        if own.contains(&applet) && HOST_PROGRAMS.iter().any(|(f, _)| Path::new(f).exists()) {
            continue;
        }
        let link = root.join("bin").join(applet);
        std::os::unix::fs::symlink("busybox", &link).map_err(io_err(&link))?;
    }
    for (from, to) in HOST_PROGRAMS {
        if !Path::new(from).exists() {
            return Err(ImageError::Build(format!(
                "{from} is missing (apt-get install iperf3 iproute2)"
            )));
        }
        let dest = root.join(to);
        let _ = std::fs::remove_file(&dest);
        std::fs::copy(from, &dest).map_err(io_err(&dest))?;
        for lib in image::shared_libraries(from)? {
            let rel = lib.strip_prefix("/").unwrap_or(&lib);
            let dest = root.join(rel);
            if dest.exists() {
                continue;
            }
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            // The library's content, not a symlink to the host's.
            std::fs::copy(&lib, &dest).map_err(io_err(&lib))?;
        }
    }
    for (file, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1 localhost\n"),
    ] {
        let p = root.join(file);
        std::fs::write(&p, text).map_err(io_err(&p))?;
    }
    Ok(())
}

/// `path` looked up inside `root` as the container will see it: symlinks
/// are followed relative to `root` and `..` stops at it, so an image's
/// symlink can never name a host file. `None` when it does not exist.
pub fn lookup_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut hops = 0;
    let mut pending: Vec<String> = split(path).into_iter().rev().collect();
    let mut at: Vec<String> = Vec::new();
    while let Some(c) = pending.pop() {
        match c.as_str() {
            "." => {}
            ".." => {
                at.pop();
            }
            _ => {
                let mut here = root.to_path_buf();
                here.extend(&at);
                here.push(&c);
                let meta = std::fs::symlink_metadata(&here).ok()?;
                if meta.file_type().is_symlink() {
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    let target = std::fs::read_link(&here).ok()?;
                    let target = target.to_string_lossy().into_owned();
                    if target.starts_with('/') {
                        at.clear();
                    }
                    pending.extend(split(&target).into_iter().rev());
                } else {
                    at.push(c);
                }
            }
        }
    }
    let mut p = root.to_path_buf();
    p.extend(&at);
    p.exists().then_some(p)
}

fn split(p: &str) -> Vec<String> {
    Path::new(p)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// Finds `program` as the container's exec would: a path inside `root`, or
/// a name along `PATH` (from `env`, default the usual one). Returns the
/// host path of an executable regular file.
pub fn find_program(root: &Path, program: &str, env: &[String]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: PathBuf| {
        std::fs::metadata(&p)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .then_some(p)
    };
    if program.contains('/') {
        return lookup_in_root(root, program).and_then(runnable);
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .find_map(|d| lookup_in_root(root, &format!("{d}/{program}")).and_then(runnable))
}

/// Whether a directory can be read (an image given as a path).
pub fn readable_dir(p: &Path) -> io::Result<()> {
    std::fs::read_dir(p).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_stays_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/prog"), "x").unwrap();
        std::os::unix::fs::symlink("/bin/prog", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc/passwd", root.join("bin/up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(lookup_in_root(&root, "/abs"), Some(root.join("bin/prog")));
        assert_eq!(
            lookup_in_root(&root, "/../../bin/prog"),
            Some(root.join("bin/prog"))
        );
        // The host's /etc/passwd exists; inside this root it does not.
        assert_eq!(lookup_in_root(&root, "/bin/up"), None);
        assert_eq!(lookup_in_root(&root, "/loop"), None);
        assert_eq!(lookup_in_root(&root, "/nope"), None);
    }

    #[test]
    fn programs_are_found_along_path_inside_the_root() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        let p = root.join("usr/bin/tool");
        std::fs::write(&p, "x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("usr/bin/data"), "x").unwrap();
        assert_eq!(find_program(root, "tool", &[]), Some(p.clone()));
        assert_eq!(find_program(root, "/usr/bin/tool", &[]), Some(p));
        assert_eq!(find_program(root, "data", &[]), None, "not executable");
        assert_eq!(find_program(root, "tool", &["PATH=/bin".into()]), None);
        assert_eq!(find_program(root, "sh", &[]), None, "not the host's sh");
    }
}
