//! Resource limits (memory, cpu, pids) of container nodes, in cgroups the
//! user may write. Two kinds of delegation are used:
//!
//! - cgroup v2: the daemon's own cgroup is delegated to the user (a systemd
//!   user scope or unit with `Delegate=yes`). The daemon moves itself into
//!   a leaf `ulan-daemon` (v2 allows no processes in a cgroup whose
//!   controllers are handed down), turns memory, cpu and pids on for the
//!   subtree, and each node run gets `node-PID:LAB:NODE:RUN` beside that
//!   leaf, with
//!   `memory.max` (and `memory.swap.max` 0), `cpu.max`, `pids.max`.
//! - cgroup v1 (and hybrid hosts, where v2 has no controllers): in each of
//!   the memory, cpu and pids hierarchies the daemon's cgroup is owned by
//!   the user (an admin made it and chowned it, v1's only delegation). Each
//!   node run gets `ulan-PID/node-LAB:NODE:RUN` there, with
//!   `memory.limit_in_bytes`, `cpu.cfs_quota_us`, `pids.max`.
//!
//! The daemon writes the limits before the holder starts; the holder joins
//! the node's cgroups between fork and exec ([`NodeCgroup::join`]), so
//! crun, the container and all they fork are in them (crun runs with its
//! own cgroup manager off). `ulan exec` processes join the same way. Where
//! there is no delegation the node runs all the same, and its warning says
//! the limits were not applied and why.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// What a node asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpus: u32,
    pub pids_max: Option<u32>,
}

impl Limits {
    pub fn of(spec: &crate::vmlaunch::spec::NodeSpec) -> Limits {
        Limits {
            memory_bytes: u64::from(spec.memory_mb) << 20,
            cpus: spec.cpus,
            pids_max: spec.pids_max,
        }
    }
}

/// The CFS period the cpu limit is a quota of (100 ms, the kernel's
/// default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Where this process may make cgroups with the three controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delegation {
    /// The delegated cgroup v2 (the parent of the daemon's leaf once the
    /// daemon has moved there).
    V2 { base: PathBuf },
    /// The user's own cgroup in each v1 hierarchy.
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// No delegated cgroup: why.
    #[error("{0}")]
    NotDelegated(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LimitsError + 'a {
    move |source| LimitsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The leaf the daemon moves itself into on a v2 delegation.
const DAEMON_LEAF: &str = "ulan-daemon";
/// The controllers a node's limits need.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

fn writable(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) on a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// A cgroup file system mounted in this mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// cgroup2 (else a v1 hierarchy).
    pub v2: bool,
    /// A v1 hierarchy's controllers (of those limits need).
    pub controllers: Vec<String>,
    /// The cgroup mounted there (not `/` inside a container without a
    /// cgroup namespace).
    pub root: String,
    pub point: PathBuf,
}

impl CgroupMount {
    /// The directory of the cgroup at `path` (as /proc/self/cgroup names
    /// it) under this mount, or None if the mount does not reach it.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path
        } else {
            let rest = path.strip_prefix(self.root.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest
        };
        Some(self.point.join(rel.trim_start_matches('/')))
    }
}

/// The cgroup file systems in /proc/self/mountinfo text.
fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post = post.split_whitespace();
        let v2 = match post.next() {
            Some("cgroup") => false,
            Some("cgroup2") => true,
            _ => continue,
        };
        let opts = post.nth(1).unwrap_or("");
        let mut pre = pre.split_whitespace();
        let (Some(root), Some(point)) = (pre.nth(3), pre.next()) else {
            continue;
        };
        let controllers: Vec<String> = opts
            .split(',')
            .filter(|o| CONTROLLERS.contains(o))
            .map(String::from)
            .collect();
        if !v2 && controllers.is_empty() {
            continue;
        }
        out.push(CgroupMount {
            v2,
            controllers,
            root: unescape_mount(root),
            point: PathBuf::from(unescape_mount(point)),
        });
    }
    out
}

/// Where cgroup2 is mounted here: /sys/fs/cgroup on a v2 host,
/// /sys/fs/cgroup/unified on a hybrid one.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup_mounts(&text)
        .into_iter()
        .find(|m| m.v2)
        .map(|m| m.point)
}

/// Mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A process's cgroup path per v1 controller, and its v2 path, from
/// /proc/self/cgroup text.
fn own_paths(cgroup: &str) -> (Vec<(String, String)>, Option<String>) {
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else {
            for c in ctrls.split(',') {
                v1.push((c.to_string(), path.to_string()));
            }
        }
    }
    (v1, v2)
}

/// Finds this process's delegation, read-only: `Err` says why there is
/// none. (`ulan doctor` asks for its own process, which is where a daemon
/// started from the same shell would be.)
pub fn probe() -> Result<Delegation, String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    probe_in(&cgroup, &mountinfo)
}

fn probe_in(cgroup: &str, mountinfo: &str) -> Result<Delegation, String> {
    let (v1, v2) = own_paths(cgroup);
    let mounts = cgroup_mounts(mountinfo);
    if !mounts.iter().any(|m| !m.v2) {
        let Some(m) = mounts.iter().find(|m| m.v2) else {
            return Err("no cgroup file system is mounted".into());
        };
        return probe_v2(m, v2.as_deref());
    }
    let mut dirs = Vec::new();
    let mut missing = Vec::new();
    for c in CONTROLLERS {
        let mount = mounts.iter().find(|m| m.controllers.iter().any(|x| x == c));
        let own = v1.iter().find(|(m, _)| m == c).map(|(_, p)| p);
        match (mount, own) {
            (Some(m), Some(p)) => match m.dir_of(p) {
                Some(d) => dirs.push((c, d)),
                None => missing.push(c),
            },
            _ => missing.push(c),
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "cgroup v1 is mounted, but this process's cgroup of the {} controller(s) is not \
             reachable here",
            missing.join(", ")
        ));
    }
    let not_ours: Vec<String> = dirs
        .iter()
        .filter(|(_, d)| !(writable(d) && writable(&d.join("cgroup.procs"))))
        .map(|(c, d)| format!("{c} ({})", d.display()))
        .collect();
    if !not_ours.is_empty() {
        return Err(format!(
            "this host uses cgroup v1 (cgroup v2 holds no memory, cpu or pids controller), \
             and this user's cgroups are not delegated to it: {} not writable",
            not_ours.join(", ")
        ));
    }
    let get = |c: &str| {
        dirs.iter()
            .find(|(m, _)| *m == c)
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    };
    Ok(Delegation::V1 {
        memory: get("memory"),
        cpu: get("cpu"),
        pids: get("pids"),
    })
}

fn probe_v2(mount: &CgroupMount, path: Option<&str>) -> Result<Delegation, String> {
    let Some(path) = path else {
        return Err("no cgroup v2 hierarchy (/proc/self/cgroup has no 0:: line)".into());
    };
    let Some(mut dir) = mount.dir_of(path) else {
        return Err(format!(
            "this process's cgroup {path} is outside the cgroup2 mounted at {}",
            mount.point.display()
        ));
    };
    // A daemon that has moved into its leaf: the delegation is the parent.
    if dir.file_name().is_some_and(|n| n == DAEMON_LEAF) {
        dir.pop();
    }
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the cgroup {path} lacks the {} controller(s)",
            missing.join(", ")
        ));
    }
    for f in ["cgroup.subtree_control", "cgroup.procs"] {
        if !writable(&dir.join(f)) {
            return Err(format!("the cgroup {path} is not delegated to this user"));
        }
    }
    Ok(Delegation::V2 { base: dir })
}

/// The node's warning when its limits were not applied.
pub fn warning(why: &LimitsError) -> String {
    format!(
        "memory/cpu/pids limits not applied: {why}; see `ulan doctor` for how to get a \
         delegated cgroup"
    )
}

/// The daemon's delegation, made ready once: on v2 the daemon moves into
/// its leaf and hands the controllers down; stale node cgroups an earlier
/// daemon left are removed. `ulan daemon` calls it at start, before it
/// starts any guest (a child left in the delegated cgroup would make v2
/// refuse the hand-down); a node start only reads the result.
pub fn prepare_daemon() -> Result<&'static Delegation, LimitsError> {
    static READY: OnceLock<Result<Delegation, String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let d = probe()?;
            prepare(&d).map_err(|e| e.to_string())?;
            Ok(d)
        })
        .as_ref()
        .map_err(|e| LimitsError::NotDelegated(e.clone()))
}

fn prepare(d: &Delegation) -> Result<(), LimitsError> {
    match d {
        Delegation::V2 { base } => {
            hand_down(base, &CONTROLLERS)?;
            // Node cgroups of daemons that are gone (`node-PID:...`).
            sweep(base, |rest| {
                rest.split_once(':')
                    .and_then(|(pid, _)| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !alive(pid))
            });
        }
        Delegation::V1 { memory, cpu, pids } => {
            for root in [memory, cpu, pids] {
                sweep_v1(root);
            }
        }
    }
    Ok(())
}

/// Makes `dir`; one that is there already is fine.
fn ensure_dir(dir: &Path) -> Result<(), LimitsError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err("cannot make", dir)(e)),
        _ => Ok(()),
    }
}

/// cgroup v2: moves this process into the leaf `ulan-daemon` of `base`
/// and turns `controllers` on for `base`'s children (v2 refuses that while
/// `base` itself holds processes). Where that is refused, the process goes
/// back to `base` and the leaf is removed: nothing of ours is left in a
/// cgroup that is not ours alone.
pub fn hand_down(base: &Path, controllers: &[&str]) -> Result<(), LimitsError> {
    let leaf = base.join(DAEMON_LEAF);
    ensure_dir(&leaf)?;
    let procs = leaf.join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(io_err("cannot move the daemon into", &procs))?;
    let control = base.join("cgroup.subtree_control");
    let on: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
    std::fs::write(&control, on.join(" ")).map_err(|e| {
        let _ = std::fs::write(base.join("cgroup.procs"), "0");
        let _ = std::fs::remove_dir(&leaf);
        LimitsError::NotDelegated(format!(
            "cannot hand the {} controllers down in {} ({e}): other processes share the \
             daemon's cgroup; start the daemon in a cgroup of its own",
            controllers.join(", "),
            base.display()
        ))
    })
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the empty `node-*` cgroups in `dir` whose rest of the name
/// `stale` says is stale.
fn sweep(dir: &Path, stale: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_prefix("node-").is_some_and(&stale) {
            // A populated one refuses (EBUSY) and stays.
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// v1: the `ulan-PID` dirs of daemons that are gone.
fn sweep_v1(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("ulan-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        sweep(&e.path(), |_| true);
        let _ = std::fs::remove_dir(e.path());
    }
}

/// One node run's cgroups (one per v1 hierarchy, or one v2 cgroup), made
/// with its limits; removed when dropped (after the run has ended).
#[derive(Debug)]
pub struct NodeCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each dir, ready for [`NodeCgroup::join`] between
    /// fork and exec (no allocation there).
    procs: Vec<CString>,
}

impl NodeCgroup {
    /// Makes the cgroups of a run of `lab`'s `node` in this daemon's
    /// delegation and writes `limits`. `Err(NotDelegated)` where there is
    /// no delegation.
    pub fn create(lab: &str, node: &str, limits: &Limits) -> Result<NodeCgroup, LimitsError> {
        Self::create_in(prepare_daemon()?, lab, node, limits)
    }

    /// Each run's cgroups have a name of their own
    /// (`LAB:NODE:SEQUENCE`; names cannot hold a colon): a run starting
    /// while the last one's cgroups are still going away never meets them,
    /// nor do two labs of one process.
    pub fn create_in(
        d: &Delegation,
        lab: &str,
        node: &str,
        limits: &Limits,
    ) -> Result<NodeCgroup, LimitsError> {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let quota = u64::from(limits.cpus) * CPU_PERIOD_US;
        let pids = limits
            .pids_max
            .map_or_else(|| "max".to_string(), |p| p.to_string());
        let mut made = NodeCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        match d {
            Delegation::V2 { base } => {
                // Beside the daemon's leaf; the pid tells two daemons
                // sharing a delegation apart.
                let dir = made.make(base.join(format!("node-{pid}:{lab}:{node}:{run}")), false)?;
                write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
                // No swap beyond the limit: over it, the kernel's OOM killer
                // acts, as it would on a machine of that size without swap.
                write_if_there(&dir, "memory.swap.max", "0")?;
                write(&dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir, "pids.max", &pids)?;
            }
            Delegation::V1 {
                memory,
                cpu,
                pids: p,
            } => {
                let own = format!("ulan-{pid}");
                let leaf = format!("node-{lab}:{node}:{run}");
                let m = made.make(memory.join(&own).join(&leaf), true)?;
                write(
                    &m,
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?;
                write_if_there(
                    &m,
                    "memory.memsw.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?;
                let c = made.make(cpu.join(&own).join(&leaf), true)?;
                write(&c, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write(&c, "cpu.cfs_quota_us", &quota.to_string())?;
                let p = made.make(p.join(&own).join(&leaf), true)?;
                write(&p, "pids.max", &pids)?;
            }
        }
        Ok(made)
    }

    /// Makes `dir` (and its parent, the daemon's `ulan-PID` on v1, which
    /// another node's end may remove meanwhile: made again then).
    fn make(&mut self, dir: PathBuf, with_parent: bool) -> Result<PathBuf, LimitsError> {
        let mut tries = 0;
        loop {
            if let Some(parent) = dir.parent().filter(|_| with_parent) {
                ensure_dir(parent)?;
            }
            match std::fs::create_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound && with_parent && tries < 3 => {
                    tries += 1
                }
                Err(e) => return Err(io_err("cannot make", &dir)(e)),
            }
        }
        let procs = dir.join("cgroup.procs");
        self.procs.push(
            CString::new(procs.as_os_str().as_bytes())
                .map_err(|_| io_err("bad path", &procs)(io::ErrorKind::InvalidInput.into()))?,
        );
        self.dirs.push(dir.clone());
        Ok(dir)
    }

    /// The cgroup dirs, for the node's status.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files a child process writes itself into.
    pub fn procs_files(&self) -> Vec<CString> {
        self.procs.clone()
    }

    /// Moves the calling process into the cgroups of `procs`: for a child
    /// between fork and exec (only open, write and close).
    pub fn join(procs: &[CString]) -> io::Result<()> {
        for p in procs {
            // SAFETY: open/write/close are async-signal-safe; `p` is a
            // NUL-terminated path made before the fork.
            unsafe {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
        }
        Ok(())
    }
}

impl Drop for NodeCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // The run's processes are gone once its holder was reaped, but
            // the kernel may take a moment to let their cgroup go.
            let mut tries = 0;
            while let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() == io::ErrorKind::NotFound {
                    break;
                }
                tries += 1;
                if tries == 50 {
                    tracing::warn!("cannot remove the cgroup {}: {e}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // v1: the daemon's `ulan-PID` dir once it is empty.
            let own = format!("ulan-{}", std::process::id());
            if let Some(parent) = dir.parent().filter(|p| p.file_name() == Some(own.as_ref())) {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

fn write(dir: &Path, file: &'static str, value: &str) -> Result<(), LimitsError> {
    let p = dir.join(file);
    std::fs::write(&p, value).map_err(|e| LimitsError::Io {
        what: "cannot write",
        path: p,
        source: e,
    })
}

fn write_if_there(dir: &Path, file: &'static str, value: &str) -> Result<(), LimitsError> {
    if dir.join(file).exists() {
        write(dir, file, value)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/pids\\040here rw,relatime - cgroup cgroup rw,pids
29 25 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
30 25 0:27 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
";

    #[test]
    fn v1_hierarchies_and_own_paths_are_read_from_proc() {
        let m = cgroup_mounts(MOUNTINFO);
        let v1: Vec<(Vec<String>, PathBuf)> = m
            .iter()
            .filter(|m| !m.v2)
            .map(|m| (m.controllers.clone(), m.point.clone()))
            .collect();
        assert_eq!(
            v1,
            vec![
                (vec!["cpu".into()], PathBuf::from("/sys/fs/cgroup/cpu")),
                (
                    vec!["memory".into()],
                    PathBuf::from("/sys/fs/cgroup/memory")
                ),
                (
                    vec!["pids".into()],
                    PathBuf::from("/sys/fs/cgroup/pids here")
                ),
            ]
        );
        assert_eq!(
            m.iter().find(|m| m.v2).map(|m| m.point.clone()),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let (v1, v2) = own_paths("4:memory:/a/b\n2:cpu,cpuacct:/\n9:name=systemd:/\n0::/u\n");
        assert!(v1.contains(&("memory".into(), "/a/b".into())));
        assert!(v1.contains(&("cpu".into(), "/".into())));
        assert!(v1.contains(&("cpuacct".into(), "/".into())));
        assert_eq!(v2.as_deref(), Some("/u"));
    }

    /// Inside a container without a cgroup namespace a hierarchy is
    /// mounted from the container's cgroup: its path is not joined twice.
    #[test]
    fn a_mount_of_a_cgroup_below_the_root_is_taken_into_account() {
        let m = CgroupMount {
            v2: false,
            controllers: vec!["memory".into()],
            root: "/docker/abc".into(),
            point: "/sys/fs/cgroup/memory".into(),
        };
        assert_eq!(
            m.dir_of("/docker/abc"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            m.dir_of("/docker/abc/x"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/x"))
        );
        assert_eq!(m.dir_of("/docker/abcd"), None);
        assert_eq!(m.dir_of("/other"), None);
        // A hierarchy that does not reach this process's cgroup is a
        // reason, not a wrong path.
        let info = "1 0 0:1 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                    2 0 0:2 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                    3 0 0:3 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let e = probe_in("4:memory:/elsewhere\n2:cpu:/\n3:pids:/\n", info).unwrap_err();
        assert!(e.contains("memory"), "{e}");
        let e = probe_in("0::/u\n", "").unwrap_err();
        assert!(e.contains("no cgroup"), "{e}");
    }

    #[test]
    fn hostile_proc_text_is_skipped_not_a_panic() {
        for text in [
            "",
            "\n\n",
            " - ",
            "1 2 3 - cgroup",
            "1 - cgroup cgroup memory",
            "x x x x /m\\7 x - cgroup c memory",
            "x x x x /m\\ - cgroup c memory",
            "x x x x /\\999\\é - cgroup c pids",
            "a:b",
            ":::",
            "0::",
        ] {
            let _ = cgroup_mounts(text);
            let _ = probe_in(text, text);
            let _ = own_paths(text);
            let _ = unescape_mount(text);
        }
        assert_eq!(unescape_mount("a\\040b\\134c\\0"), "a b\\c\\0");
    }

    /// The files a node's limits are written to, on plain directories
    /// standing in for the cgroup file systems (the kernel's own are
    /// tested in tests/containers_limits.rs).
    #[test]
    fn limits_are_written_where_each_cgroup_version_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            memory_bytes: 64 << 20,
            cpus: 2,
            pids_max: Some(40),
        };
        let base = dir.path().join("v2");
        std::fs::create_dir(&base).unwrap();
        let v2 =
            NodeCgroup::create_in(&Delegation::V2 { base: base.clone() }, "lab", "r1", &limits)
                .unwrap();
        let d = &v2.dirs()[0].clone();
        assert_eq!(d.parent(), Some(base.as_path()));
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("node-{}:lab:r1:", std::process::id())),
            "{name}"
        );
        // The next run of the node has cgroups of its own, while the last
        // run's may still be going away.
        let next =
            NodeCgroup::create_in(&Delegation::V2 { base: base.clone() }, "lab", "r1", &limits)
                .unwrap();
        assert_ne!(next.dirs()[0], *d);
        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(read(d, "memory.max"), (64u64 << 20).to_string());
        assert_eq!(read(d, "cpu.max"), "200000 100000");
        assert_eq!(read(d, "pids.max"), "40");
        assert!(!d.join("memory.swap.max").exists(), "written where absent");
        assert_eq!(
            v2.procs_files()[0].to_str().unwrap(),
            d.join("cgroup.procs").to_str().unwrap()
        );

        let roots: Vec<PathBuf> = ["memory", "cpu", "pids"]
            .iter()
            .map(|c| dir.path().join(c))
            .collect();
        for r in &roots {
            std::fs::create_dir(r).unwrap();
        }
        let unlimited = Limits {
            pids_max: None,
            ..limits
        };
        let v1 = NodeCgroup::create_in(
            &Delegation::V1 {
                memory: roots[0].clone(),
                cpu: roots[1].clone(),
                pids: roots[2].clone(),
            },
            "lab",
            "r1",
            &unlimited,
        )
        .unwrap();
        let own = format!("ulan-{}", std::process::id());
        let dirs: Vec<PathBuf> = v1.dirs().to_vec();
        assert_eq!(dirs.len(), 3);
        for (d, r) in dirs.iter().zip(&roots) {
            assert_eq!(d.parent(), Some(r.join(&own).as_path()));
            let name = d.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("node-lab:r1:"), "{name}");
        }

        assert_eq!(
            read(&dirs[0], "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read(&dirs[1], "cpu.cfs_quota_us"), "200000");
        assert_eq!(read(&dirs[1], "cpu.cfs_period_us"), "100000");
        assert_eq!(read(&dirs[2], "pids.max"), "max");
        // Plain directories keep their files: emptied so the drop can
        // remove them, as the kernel's own would be.
        for c in [&v2.dirs, &v1.dirs, &next.dirs] {
            for d in c.iter() {
                for f in std::fs::read_dir(d).unwrap() {
                    std::fs::remove_file(f.unwrap().path()).unwrap();
                }
            }
        }
        drop((v1, v2, next));
        for d in dirs.iter().chain([d]) {
            assert!(!d.exists(), "{} left", d.display());
        }
        assert!(!roots[0].join(&own).exists(), "the daemon's v1 dir left");
    }

    #[test]
    fn a_node_cgroup_that_cannot_be_made_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("missing");
        let e = NodeCgroup::create_in(
            &Delegation::V2 { base: base.clone() },
            "lab",
            "n",
            &Limits {
                memory_bytes: 1 << 30,
                cpus: 1,
                pids_max: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
