//! The per-node holder: a small process (`ulan container-holder FILE`,
//! hidden) the daemon starts for each container run. It makes a user
//! namespace where the user is root (plus the user's subordinate range from
//! /etc/subuid when there is one, through newuidmap/newgidmap), a mount and
//! a network namespace; mounts the node's root filesystem there (kernel
//! overlayfs, allowed in a user namespace since Linux 5.11, or a bind
//! mount of the node's Btrfs snapshot); brings
//! up `lo` (and the NICs, once the tap port exists); then runs `crun run` as
//! init of a new pid namespace and exits with its status, so the daemon
//! supervises the holder and, through it, the container's init.
//!
//! Why a holder: rootless crun makes its own user namespace, mounts the
//! rootfs it is given and has no hook to open taps where the container's
//! network namespace is before the container's command starts. In the
//! holder's namespaces all of that is plain root work; crun, finding itself
//! root in a user namespace, runs in rootless mode there.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the daemon tells a holder (a JSON file in the node's run dir).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolderConfig {
    pub id: String,
    pub crun: PathBuf,
    /// crun's `--root` (its state directory).
    pub state_root: PathBuf,
    pub bundle: PathBuf,
    pub pid_file: PathBuf,
    /// Where the holder writes crun's pid (host numbering): exec and kill
    /// enter crun's pid namespace through it.
    pub crun_pid_file: PathBuf,
    /// What is mounted at `merged`, the container's root.
    pub root: RootFs,
    pub merged: PathBuf,
    /// crun's `--console-socket`: the daemon receives the terminal there.
    #[serde(default)]
    pub console_socket: Option<PathBuf>,
    /// The user's subordinate ids (start, count) from /etc/subuid and
    /// /etc/subgid, mapped from 1 inside.
    #[serde(default)]
    pub nics: Vec<HolderNic>,
    /// Static routes: (destination or `default`, gateway).
    #[serde(default)]
    pub routes: Vec<(String, String)>,
    #[serde(default)]
    pub forward: bool,
    #[serde(default)]
    pub subuid: Option<(u32, u32)>,
    #[serde(default)]
    pub subgid: Option<(u32, u32)>,
}

/// A container's root filesystem: the image is never written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RootFs {
    /// Kernel overlayfs: `lower` read-only (the image), `upper` the node's.
    Overlay {
        lower: PathBuf,
        upper: PathBuf,
        work: PathBuf,
    },
    /// The node's own Btrfs snapshot of the image (see btrfs.rs),
    /// bind-mounted.
    BtrfsSnapshot { path: PathBuf },
}

impl RootFs {
    /// How the node reports it (`rootfs` in its status).
    pub fn kind(&self) -> &'static str {
        match self {
            RootFs::Overlay { .. } => "overlay",
            RootFs::BtrfsSnapshot { .. } => "btrfs-snapshot",
        }
    }
}

/// One NIC: a tap `ifname` made in the holder's network namespace and
/// handed to the tap port at `socket`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolderNic {
    pub ifname: String,
    pub mac: String,
    pub socket: PathBuf,
    #[serde(default)]
    pub ip: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> HolderError {
    let what = what.into();
    move |source| HolderError::Sys { what, source }
}

fn check(r: libc::c_int, what: &str) -> Result<(), HolderError> {
    if r == 0 {
        Ok(())
    } else {
        Err(sys(what)(io::Error::last_os_error()))
    }
}

fn cstr(s: &str) -> Result<CString, HolderError> {
    CString::new(s).map_err(|_| HolderError::Other(format!("{s:?} contains a NUL byte")))
}

fn cpath(p: &Path) -> Result<CString, HolderError> {
    cstr(&p.to_string_lossy())
}

/// The holder's main: runs crun in the namespaces and exits with its
/// status.
pub fn run(config_file: &Path) -> Result<std::convert::Infallible, HolderError> {
    let text = std::fs::read(config_file).map_err(sys(config_file.display().to_string()))?;
    let cfg: HolderConfig = serde_json::from_slice(&text)
        .map_err(|e| HolderError::Other(format!("{}: {e}", config_file.display())))?;
    enter_namespaces(cfg.subuid.zip(cfg.subgid), 0)?;
    mount_root(&cfg)?;
    loopback_up()?;
    // Kept open until the holder ends (the daemon holds its own copies).
    let _taps = set_up_nics(&cfg)?;
    // crun runs as init of a new pid namespace: when it dies (it dies with
    // the holder), the kernel kills everything in it, the container too.
    // Without that, a container outlives a crun that was SIGKILLed.
    // Only now: the first child after this is the new namespace's init
    // (an `ip` run above would have been, and taken it down with it).
    // SAFETY: unshare has no memory effects.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) }, "unshare(pid)")?;
    // SAFETY: the holder is single-threaded; the child only execs.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(sys("fork")(io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: prctl with plain integers.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        // This pid namespace's own /proc: crun reads its children there.
        let r = mount("proc", Path::new("/proc"), "proc", 0, None).and_then(|()| exec_crun(&cfg));
        let Err(e) = r;
        eprintln!("container holder: {e}");
        // SAFETY: leaving the forked child.
        unsafe { libc::_exit(127) };
    }
    let _ = std::fs::write(&cfg.crun_pid_file, child.to_string());
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(sys("waitpid")(io::Error::last_os_error()));
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    std::process::exit(code)
}

/// Removes `dir` as root of the same user namespace a holder makes: the
/// files a container made with ids of the user's subordinate range, and
/// the overlay work dirs the kernel leaves mode 000, go too.
pub fn remove(dir: &Path) -> Result<(), HolderError> {
    let (u, g) = super::subordinate_ids();
    enter_namespaces(u.zip(g), 0)?;
    fn open_up(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.is_dir() {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    open_up(&e.path());
                }
            }
        }
    }
    open_up(dir);
    std::fs::remove_dir_all(dir).map_err(sys(format!("remove {}", dir.display())))
}

/// Makes `dest`, a committed root filesystem (`lower` with `upper`
/// applied, see commit.rs), as root of the same user namespace a holder
/// makes: files of the user's subordinate ids are read and made as such.
pub fn commit(lower: &Path, upper: &Path, dest: &Path) -> Result<(), HolderError> {
    let (u, g) = super::subordinate_ids();
    enter_namespaces(u.zip(g), 0)?;
    super::commit::merge(lower, upper, dest).map_err(|e| HolderError::Other(e.to_string()))
}

/// New user, mount and network namespaces, the user mapped to root.
fn enter_namespaces(
    ranges: Option<((u32, u32), (u32, u32))>,
    extra: libc::c_int,
) -> Result<(), HolderError> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // With a subordinate range, newuidmap (setuid root) writes the maps from
    // outside the new namespace: a child forked before unshare does it.
    let mut helper = None;
    if let Some(((su, sn), (sg, sgn))) = ranges {
        let me = std::process::id();
        let (r, w) = pipe()?;
        // SAFETY: fork in a single-threaded process (the holder has no
        // threads); the child only reads a pipe and execs.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(sys("fork")(io::Error::last_os_error()));
        }
        if pid == 0 {
            let mut b = [0u8; 1];
            // SAFETY: reading one byte into a local buffer.
            unsafe {
                libc::close(w);
                libc::read(r, b.as_mut_ptr().cast(), 1);
            }
            let ok = |prog: &str, id: u32, start: u32, n: u32| {
                std::process::Command::new(prog)
                    .args([me, 0, id, 1, 1, start, n].map(|v| v.to_string()))
                    .status()
                    .is_ok_and(|s| s.success())
            };
            let good = ok("newuidmap", uid, su, sn) && ok("newgidmap", gid, sg, sgn);
            // SAFETY: leaving the forked child without running destructors.
            unsafe { libc::_exit(if good { 0 } else { 1 }) };
        }
        // SAFETY: closing our copy of the read end.
        unsafe { libc::close(r) };
        helper = Some((pid, w));
    }
    // SAFETY: unshare has no memory effects.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET | extra) },
        "unshare(user, mount, net) (are unprivileged user namespaces allowed? sysctl user.max_user_namespaces)",
    )?;
    match helper {
        Some((pid, w)) => {
            // SAFETY: one byte to the helper, then wait for it.
            let status = unsafe {
                libc::write(w, [1u8].as_ptr().cast(), 1);
                libc::close(w);
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                status
            };
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                return Err(HolderError::Other(
                    "newuidmap/newgidmap failed to map the subordinate ids of /etc/subuid".into(),
                ));
            }
        }
        None => {
            write_file("/proc/self/setgroups", "deny")?;
            write_file("/proc/self/uid_map", &format!("0 {uid} 1"))?;
            write_file("/proc/self/gid_map", &format!("0 {gid} 1"))?;
        }
    }
    Ok(())
}

fn pipe() -> Result<(libc::c_int, libc::c_int), HolderError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe",
    )?;
    Ok((fds[0], fds[1]))
}

fn write_file(path: &str, text: &str) -> Result<(), HolderError> {
    std::fs::write(path, text).map_err(sys(format!("write {path}")))
}

fn mount(
    src: &str,
    dst: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), HolderError> {
    let (s, d, t) = (cstr(src)?, cpath(dst)?, cstr(fstype)?);
    let data = data.map(cstr).transpose()?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            t.as_ptr(),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    check(r, &format!("mount {fstype} on {}", dst.display()))
}

/// Whether this host mixes cgroup v1 controllers with a cgroup2 hierarchy
/// at /sys/fs/cgroup/unified (hybrid mode), which crun refuses outright.
pub fn hybrid_cgroups() -> bool {
    fn fs_type(p: &str) -> Option<i64> {
        let c = CString::new(p).ok()?;
        // SAFETY: statfs into a zeroed local.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
    }
    const TMPFS: i64 = 0x0102_1994;
    const CGROUP2: i64 = 0x6367_7270;
    fs_type("/sys/fs/cgroup") == Some(TMPFS) && fs_type("/sys/fs/cgroup/unified") == Some(CGROUP2)
}

fn mount_root(cfg: &HolderConfig) -> Result<(), HolderError> {
    // Nothing mounted here propagates back to the host.
    mount(
        "none",
        Path::new("/"),
        "none",
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    if hybrid_cgroups() {
        // crun refuses a hybrid host; with its cgroup manager off, an empty
        // /sys/fs/cgroup in this private mount namespace is what it needs.
        mount(
            "tmpfs",
            Path::new("/sys/fs/cgroup"),
            "tmpfs",
            0,
            Some("mode=755"),
        )?;
    }
    let (lower, upper, work) = match &cfg.root {
        RootFs::Overlay { lower, upper, work } => (lower, upper, work),
        RootFs::BtrfsSnapshot { path } => {
            let src = path.to_string_lossy();
            return mount(&src, &cfg.merged, "none", libc::MS_BIND, None);
        }
    };
    for p in [lower, upper, work, &cfg.merged] {
        let s = p.to_string_lossy();
        // overlayfs's option syntax has no escapes for these.
        if s.contains([',', ':', '\n']) {
            return Err(HolderError::Other(format!(
                "{s:?}: overlay paths must not contain ',' or ':'"
            )));
        }
    }
    // userxattr: in a user namespace overlayfs cannot set trusted.*
    // xattrs, and without them it cannot make a directory opaque: a
    // container's `rm -rf` of an image directory failed with EIO.
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount("overlay", &cfg.merged, "overlay", 0, Some(&opts))
}

fn loopback_up() -> Result<(), HolderError> {
    // SAFETY: a datagram socket for interface ioctls; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("socket")(io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain data; the name fits (2 bytes + NUL).
    let r = unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        libc::close(fd);
        r
    };
    check(r, "bring up lo")
}

/// The NICs, their addresses and the routes, before the container's
/// command starts: taps through the tap port's client, addresses with the
/// host's `ip` (visible here: the holder shares the host's files).
fn set_up_nics(cfg: &HolderConfig) -> Result<Vec<std::os::fd::OwnedFd>, HolderError> {
    use crate::ports::tap::client;
    use std::os::fd::AsFd;
    let mut taps = Vec::new();
    for nic in &cfg.nics {
        let mac = client::parse_mac(&nic.mac).map_err(HolderError::Other)?;
        let fd = client::create_tap(&nic.ifname, mac, None)
            .map_err(|e| HolderError::Other(format!("{}: {e}", nic.ifname)))?;
        client::hand_over(&nic.socket, fd.as_fd())
            .map_err(|e| HolderError::Other(format!("{}: {e}", nic.ifname)))?;
        for ip in &nic.ip {
            run_ip(&["addr", "add", ip, "dev", &nic.ifname])?;
        }
        run_ip(&["link", "set", &nic.ifname, "up"])?;
        taps.push(fd);
    }
    for (to, via) in &cfg.routes {
        run_ip(&["route", "add", to, "via", via])?;
    }
    if cfg.forward {
        write_file("/proc/sys/net/ipv4/ip_forward", "1")?;
    }
    Ok(taps)
}

fn run_ip(args: &[&str]) -> Result<(), HolderError> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            HolderError::Other(format!("cannot run ip (apt-get install iproute2): {e}"))
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HolderError::Other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn exec_crun(cfg: &HolderConfig) -> Result<std::convert::Infallible, HolderError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(&cfg.crun);
    cmd.arg("--root")
        .arg(&cfg.state_root)
        .arg("--cgroup-manager=disabled")
        .arg("run");
    if let Some(s) = &cfg.console_socket {
        cmd.arg("--console-socket").arg(s);
    }
    let err = cmd
        .arg("--bundle")
        .arg(&cfg.bundle)
        .arg("--pid-file")
        .arg(&cfg.pid_file)
        .arg("--")
        .arg(&cfg.id)
        .exec();
    Err(sys(format!("exec {}", cfg.crun.display()))(err))
}
