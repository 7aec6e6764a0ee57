//! The OCI runtime config (`config.json`) crun runs a node from, made with
//! the `oci-spec` crate's types.
//!
//! The container shares the user namespace of its holder (where the user
//! is root, see holder.rs) and joins the holder's network namespace (where
//! its NICs are); it gets its own mount, pid, uts and ipc namespaces.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    get_rootless_mounts, Capability, Linux, LinuxCapabilities, LinuxNamespace, LinuxNamespaceType,
    Process, Root, Spec, User,
};

/// Docker's default set, plus NET_ADMIN: lab nodes are routers that set
/// their own addresses and routes, and ping needs NET_RAW. All of them
/// only count inside the node's own (user) namespaces.
const CAPABILITIES: &[Capability] = &[
    Capability::AuditWrite,
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Mknod,
    Capability::NetAdmin,
    Capability::NetBindService,
    Capability::NetRaw,
    Capability::Setfcap,
    Capability::Setgid,
    Capability::Setpcap,
    Capability::Setuid,
    Capability::SysChroot,
];

use super::ContainerError;

/// What goes into one node's config.json.
#[derive(Debug, Clone)]
pub struct BundleInput {
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    /// The holder's network namespace (`/proc/PID/ns/net`); none shares
    /// crun's, which is the holder's too.
    pub netns: Option<PathBuf>,
    /// A terminal for the process (crun sends its master to the daemon's
    /// console socket), like `docker run -it`.
    pub terminal: bool,
}

fn ns(typ: LinuxNamespaceType, path: Option<PathBuf>) -> LinuxNamespace {
    let mut n = LinuxNamespace::default();
    n.set_typ(typ);
    n.set_path(path);
    n
}

pub fn make_spec(input: &BundleInput) -> Spec {
    let mut user = User::default();
    user.set_uid(0);
    user.set_gid(0);
    let mut process = Process::default();
    process.set_terminal(Some(input.terminal));
    process.set_user(user);
    process.set_args(Some(input.args.clone()));
    process.set_env(Some(input.env.clone()));
    process.set_cwd(PathBuf::from(&input.cwd));
    let caps: std::collections::HashSet<Capability> = CAPABILITIES.iter().copied().collect();
    let mut c = LinuxCapabilities::default();
    c.set_bounding(Some(caps.clone()));
    c.set_effective(Some(caps.clone()));
    c.set_permitted(Some(caps));
    c.set_inheritable(None);
    c.set_ambient(None);
    process.set_capabilities(Some(c));
    let mut root = Root::default();
    root.set_path(input.rootfs.clone());
    root.set_readonly(Some(false));
    let mut linux = Linux::default();
    // No cgroup resources here: the daemon makes the node's cgroups with
    // its limits and the holder joins them before it becomes crun (see
    // limits.rs); crun runs with its cgroup manager off.
    linux.set_resources(None);
    linux.set_namespaces(Some(vec![
        ns(LinuxNamespaceType::Pid, None),
        ns(LinuxNamespaceType::Ipc, None),
        ns(LinuxNamespaceType::Uts, None),
        ns(LinuxNamespaceType::Mount, None),
        ns(LinuxNamespaceType::Network, input.netns.clone()),
    ]));
    let mut spec = Spec::default();
    spec.set_version("1.0.2".into());
    spec.set_process(Some(process));
    spec.set_root(Some(root));
    spec.set_hostname(Some(input.hostname.clone()));
    // /sys bound from the host rather than a new sysfs; /dev/pts without
    // gid=5 (that group is not mapped).
    spec.set_mounts(Some(get_rootless_mounts()));
    spec.set_linux(Some(linux));
    spec
}

/// Writes `config.json` into `bundle`.
pub fn write_bundle(bundle: &Path, input: &BundleInput) -> Result<(), ContainerError> {
    let spec = make_spec(input);
    let path = bundle.join("config.json");
    let text = serde_json::to_vec_pretty(&spec).map_err(|e| ContainerError::Files {
        message: format!("config.json: {e}"),
    })?;
    std::fs::write(&path, text).map_err(|e| ContainerError::Files {
        message: format!("{}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_has_the_namespaces_and_process_asked_for() {
        let spec = make_spec(&BundleInput {
            rootfs: "/run/x/merged".into(),
            args: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            hostname: "c1".into(),
            netns: Some("/proc/42/ns/net".into()),
            terminal: true,
        });
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v["process"]["args"][2], "echo hi");
        assert_eq!(v["process"]["user"]["uid"], 0);
        assert_eq!(v["process"]["terminal"], true);
        assert_eq!(v["root"]["path"], "/run/x/merged");
        assert_eq!(v["hostname"], "c1");
        let nss: Vec<(String, Option<String>)> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["type"].as_str().unwrap().to_string(),
                    n["path"].as_str().map(str::to_string),
                )
            })
            .collect();
        for t in ["pid", "ipc", "uts", "mount"] {
            assert!(nss.contains(&(t.to_string(), None)), "{t}: {nss:?}");
        }
        assert!(nss.contains(&("network".into(), Some("/proc/42/ns/net".into()))));
        // The holder's user namespace is shared, not a new one.
        assert!(!nss.iter().any(|(t, _)| t == "user"), "{nss:?}");
        assert!(v["linux"].get("resources").is_none());
        let bounding = v["process"]["capabilities"]["bounding"].to_string();
        assert!(bounding.contains("CAP_NET_ADMIN") && bounding.contains("CAP_NET_RAW"));
        assert!(!bounding.contains("CAP_SYS_ADMIN"), "{bounding}");
    }
}
