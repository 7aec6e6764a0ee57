//! Resource limits (memory.max, cpu.max, pids.max) need a cgroup v2 the
//! user may write: a delegated subtree, which a systemd user session gives
//! (user@UID.service with Delegate=yes). Where there is none the node runs
//! all the same, and its warning says the limits were not applied and why.

use std::path::Path;

/// Why limits cannot be applied here, or `None` when a delegated cgroup
/// v2 exists for this process.
pub fn no_delegation_reason() -> Option<String> {
    if super::holder::hybrid_cgroups() {
        return Some(
            "this host mounts cgroup v1 at /sys/fs/cgroup (hybrid mode, cgroup2 at \
             /sys/fs/cgroup/unified holds no memory, cpu or pids controller): cgroup v2 delegation is impossible"
                .into(),
        );
    }
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Some("no cgroup v2 hierarchy (/proc/self/cgroup has no 0:: line)".into());
    };
    let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = ["memory", "cpu", "pids"]
        .into_iter()
        .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "the cgroup {path} lacks the {} controller(s)",
            missing.join(", ")
        ));
    }
    // SAFETY: access(2) on a NUL-terminated path.
    let writable = std::ffi::CString::new(
        dir.join("cgroup.subtree_control")
            .to_string_lossy()
            .as_bytes(),
    )
    .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
    .unwrap_or(false);
    if !writable {
        return Some(format!("the cgroup {path} is not delegated to this user"));
    }
    // Delegated: but applying limits there is not implemented yet.
    Some(format!(
        "cgroup {path} is delegated, but this ulan does not apply container limits yet"
    ))
}

/// The node's warning when it has limits that were not applied.
pub fn warning() -> Option<String> {
    no_delegation_reason().map(|why| {
        format!(
            "memory/cpu/pids limits not applied: {why}; see `ulan doctor` for how to get a \
             delegated cgroup v2"
        )
    })
}
