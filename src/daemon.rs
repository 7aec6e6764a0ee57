//! The daemon process: its run directory, the lock that keeps one daemon
//! per lab, stale-socket recovery, signals, and detaching.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::lab::{Lab, LabConfig};
use crate::names::{check_name, NameError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid lab name: {0}")]
    LabName(#[from] NameError),
    #[error("run directory {path}: {source}")]
    RunDir { path: PathBuf, source: io::Error },
    #[error(
        "run directory {0} is not a directory owned by you with mode 0700; remove it or fix it"
    )]
    UnsafeRunDir(PathBuf),
    #[error("lab {lab:?} already has a daemon{} holding {lock}; stop it first or use another --lab", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning {
        lab: String,
        pid: Option<u32>,
        lock: PathBuf,
    },
    #[error("API socket {path}: {source}")]
    ApiSocket { path: PathBuf, source: io::Error },
    #[error("cannot start the switch: {0}")]
    Start(io::Error),
    #[error("the detached daemon did not come up within 10 s; see {log}")]
    DetachTimeout { log: PathBuf },
    #[error("cannot start the detached daemon: {0}")]
    Spawn(io::Error),
    #[error("no daemon is running for lab {lab:?}")]
    NotRunning { lab: String },
    #[error("the daemon (pid {pid}) did not stop within {} s", STOP_WAIT.as_secs())]
    StopTimeout { pid: u32 },
}

fn run_dir_err(path: &Path) -> impl FnOnce(io::Error) -> DaemonError + '_ {
    move |source| DaemonError::RunDir {
        path: path.to_path_buf(),
        source,
    }
}

/// `$XDG_RUNTIME_DIR/ulan`, or `/tmp/ulan-$UID` without one.
pub fn base_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() && Path::new(&d).is_dir() => PathBuf::from(d).join("ulan"),
        // SAFETY: getuid cannot fail.
        _ => PathBuf::from(format!("/tmp/ulan-{}", unsafe { libc::getuid() })),
    }
}

/// Where lab `lab` keeps its sockets.
pub fn run_dir(lab: &str) -> PathBuf {
    base_dir().join(lab)
}

pub fn api_socket(lab: &str) -> PathBuf {
    run_dir(lab).join("api.sock")
}

/// Makes `dir` (mode 0700) and checks nobody else owns or can enter it:
/// under /tmp someone could have made it first.
fn make_private_dir(dir: &Path) -> Result<(), DaemonError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(run_dir_err(dir)(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(run_dir_err(dir))?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || meta.uid() != uid {
        return Err(DaemonError::UnsafeRunDir(dir.to_path_buf()));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(run_dir_err(dir))?;
    }
    Ok(())
}

/// Holds the lab's lock file for the daemon's lifetime.
pub struct LabLock {
    file: File,
    /// Empty the file when let go (the daemon's own lock, not a probe).
    clear_on_drop: bool,
}

impl LabLock {
    /// Takes the lock or says who has it.
    pub fn acquire(lab: &str, dir: &Path) -> Result<LabLock, DaemonError> {
        let path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(run_dir_err(&path))?;
        if !crate::ports::sys::flock_exclusive(&file, false).unwrap_or(false) {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            return Err(DaemonError::AlreadyRunning {
                lab: lab.into(),
                pid: s.trim().parse().ok(),
                lock: path,
            });
        }
        file.set_len(0).map_err(run_dir_err(&path))?;
        file.rewind().map_err(run_dir_err(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(run_dir_err(&path))?;
        Ok(LabLock {
            file,
            clear_on_drop: true,
        })
    }
}

impl LabLock {
    /// Checks that nobody holds the lock, without keeping it.
    fn probe(lab: &str, dir: &Path) -> Result<(), DaemonError> {
        let mut lock = LabLock::acquire(lab, dir)?;
        // Leave the file for the daemon; only release the lock.
        let _ = lock.file.set_len(0);
        lock.clear_on_drop = false;
        Ok(())
    }
}

impl Drop for LabLock {
    /// The lock file stays (emptied): unlinking a file someone else may
    /// have just opened would let two daemons each lock a file of the same
    /// name, one of them no longer in the directory.
    fn drop(&mut self) {
        if self.clear_on_drop {
            let _ = self.file.set_len(0);
        }
    }
}

/// Opens (or makes, mode 0600) a file in the run directory for appending,
/// never through a symlink (`O_NOFOLLOW`), and only a plain file with one
/// name: a planted symlink or hard link must not make the daemon write to
/// the file it points at.
pub fn open_run_file_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a plain file of its own (a hard link or a special file); remove it",
                path.display()
            ),
        ));
    }
    Ok(file)
}

/// Everything left by a daemon that was killed: its API socket and port
/// sockets. Only called with the lock held, so nobody is using them.
fn remove_stale(dir: &Path) {
    let sock = dir.join("api.sock");
    if sock.symlink_metadata().is_ok() {
        tracing::warn!(socket = %sock.display(), "replacing a stale API socket left by a daemon that did not stop cleanly");
        let _ = std::fs::remove_file(&sock);
    }
    let ports = dir.join("ports");
    if ports.is_dir() {
        let _ = std::fs::remove_dir_all(&ports);
    }
    // Its guests died with it; their run files are made anew.
    let nodes = dir.join("nodes");
    if nodes.is_dir() {
        let _ = std::fs::remove_dir_all(&nodes);
    }
}

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub lab: String,
    pub aging_secs: u64,
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    check_name(&opts.lab)?;
    let base = base_dir();
    make_private_dir(&base)?;
    let dir = base.join(&opts.lab);
    make_private_dir(&dir)?;
    let lock = LabLock::acquire(&opts.lab, &dir)?;
    remove_stale(&dir);
    // Container limits: the daemon's delegated cgroup is made ready before
    // it has any child (cgroup v2 hands controllers down only from a
    // cgroup that holds no process).
    match crate::vmlaunch::container::limits::prepare_daemon() {
        Ok(d) => tracing::info!("container limits apply: {d:?}"),
        Err(e) => tracing::info!("container limits will not apply: {e}"),
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ulan-control")
        .enable_all()
        .build()
        .map_err(DaemonError::Start)?;
    let result = rt.block_on(serve_until_signal(&opts, &dir));
    drop(rt);
    drop(lock);
    result
}

/// How long a stop signal waits for guests to stop in order (a stop or
/// commit in progress holds a node); then they are killed. A second
/// signal kills them at once.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

async fn serve_until_signal(opts: &DaemonOptions, dir: &Path) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Signals first: a stop that comes while starting must not kill the
    // process with the default action, leaving its files behind.
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Start)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Start)?;
    let lab = Lab::start(LabConfig {
        aging_secs: opts.aging_secs,
        ..LabConfig::new(&opts.lab, dir)
    })
    .map_err(DaemonError::Start)?;
    // The lab as it was (after a crash, or a stop): lans, ports, nodes
    // (started once the API serves).
    let state_path = crate::persist::state_path(&lab.node_config().data_dir);
    let restored = crate::persist::restore(&lab, &state_path).await;
    let persister = crate::persist::Persister::new(&lab, state_path, restored.as_ref());
    lab.set_persister(persister.clone());
    // The socket last: once it answers (what `--detach` waits for), the
    // daemon is whole.
    let sock_path = dir.join("api.sock");
    let sock_err = |source| DaemonError::ApiSocket {
        path: sock_path.clone(),
        source,
    };
    let bound = tokio::net::UnixListener::bind(&sock_path).and_then(|l| {
        std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    });
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&sock_path);
            shutdown_lab(&lab, dir);
            return Err(sock_err(e));
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(crate::persist::keep(
        lab.clone(),
        persister,
        restored,
        stop_rx.clone(),
    ));
    let server = tokio::spawn(crate::api::serve(listener, lab.clone(), stop_rx));
    tracing::info!(lab = %opts.lab, socket = %sock_path.display(), pid = std::process::id(), "ulan daemon ready");
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{which}: stopping");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), keeper).await;
    tokio::select! {
        _ = tokio::time::timeout(SHUTDOWN_GRACE, lab.stop_all_nodes()) => {}
        _ = term.recv() => tracing::warn!("SIGTERM again: killing the guests"),
        _ = int.recv() => tracing::warn!("SIGINT again: killing the guests"),
    }
    shutdown_lab(&lab, dir);
    let _ = std::fs::remove_file(&sock_path);
    tracing::info!("stopped");
    Ok(())
}

fn shutdown_lab(lab: &Arc<Lab>, dir: &Path) {
    lab.shutdown();
    let _ = std::fs::remove_dir_all(dir.join("ports"));
    let _ = std::fs::remove_dir_all(dir.join("nodes"));
}

/// Starts the daemon in the background (a new session, output to
/// `daemon.log` in the run directory) and returns once its API answers.
pub fn detach(opts: &DaemonOptions) -> Result<u32, DaemonError> {
    use std::os::unix::process::CommandExt;
    check_name(&opts.lab)?;
    let base = base_dir();
    make_private_dir(&base)?;
    let dir = base.join(&opts.lab);
    make_private_dir(&dir)?;
    // Fail here, with the owner's pid, rather than start a child that
    // would only find the lock taken.
    LabLock::probe(&opts.lab, &dir)?;
    let log_path = dir.join("daemon.log");
    let log = open_run_file_append(&log_path).map_err(run_dir_err(&log_path))?;
    let exe = std::env::current_exe().map_err(DaemonError::Spawn)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["daemon", "--lab", &opts.lab])
        .args(["--aging", &opts.aging_secs.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(DaemonError::Spawn)?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(DaemonError::Spawn)?;
    let sock = dir.join("api.sock");
    for _ in 0..200 {
        if let Ok(Some(status)) = child.try_wait() {
            // It exited: most likely another daemon holds the lock.
            let mut s = String::new();
            let _ = File::open(&log_path).and_then(|mut f| f.read_to_string(&mut s));
            let last = s.lines().last().unwrap_or("").to_string();
            return Err(DaemonError::Spawn(io::Error::other(format!(
                "daemon exited ({status}): {last}"
            ))));
        }
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            return Ok(child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(DaemonError::DetachTimeout { log: log_path })
}

/// How long `stop` waits: the daemon's own shutdown grace, and a little.
const STOP_WAIT: Duration = Duration::from_secs(25);

/// Stops the lab's daemon (SIGTERM to the pid in its lock file) and waits
/// until it has exited (its lock is free).
pub fn stop(lab: &str) -> Result<u32, DaemonError> {
    check_name(lab)?;
    let dir = run_dir(lab);
    let lock = dir.join("lock");
    let pid: Option<i32> = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let not_running = || DaemonError::NotRunning {
        lab: lab.to_string(),
    };
    let pid = pid.filter(|&p| p > 0).ok_or_else(not_running)?;
    // Only signal a pid that still holds the lock: a stale file must not
    // make us kill an unrelated process.
    if LabLock::acquire(lab, &dir).is_ok() {
        return Err(not_running());
    }
    // SAFETY: plain kill(2) on a pid we read from our own lock file.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(not_running());
    }
    // Gone when its lock is free (the socket goes a little earlier): a
    // daemon started right after this returns finds the lab free.
    let deadline = std::time::Instant::now() + STOP_WAIT;
    while std::time::Instant::now() < deadline {
        if LabLock::probe(lab, &dir).is_ok() {
            return Ok(pid as u32);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(DaemonError::StopTimeout { pid: pid as u32 })
}
