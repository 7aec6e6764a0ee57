//! A node's supervisor: readiness (QMP, agent), NIC carriers that follow
//! their ports, the UML console, and how a run ended.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// A QEMU guest NIC whose carrier follows its port's link state.
pub(super) struct NicLink {
    pub(super) index: usize,
    pub(super) port: String,
    pub(super) shared: Arc<crate::switch::stats::PortShared>,
}

impl NicLink {
    pub(super) fn is_down(&self) -> bool {
        self.shared
            .link_down
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn set_link_args(&self) -> serde_json::Value {
        serde_json::json!({ "name": format!("n{}", self.index), "up": false })
    }
}

/// Takes the carrier of NIC `nic` down in the background (QMP set_link),
/// for a guest whose QEMU brought it up by itself.
pub(super) fn carrier_down(node: &str, qmp: &Path, nic: &NicLink) {
    let (node, qmp, port, args) = (
        node.to_string(),
        qmp.to_path_buf(),
        nic.port.clone(),
        nic.set_link_args(),
    );
    tokio::spawn(async move {
        match qmp_command_with(&qmp, "set_link", Some(args)).await {
            Ok(()) => {
                tracing::info!(node = %node, port = %port, "guest carrier set down again (its port is down)")
            }
            Err(e) => {
                tracing::warn!(node = %node, port = %port, "cannot set the guest's carrier down: {e}")
            }
        }
    });
}

pub(super) struct Readiness {
    pub(super) qmp: Option<PathBuf>,
    /// The NICs to set down once QMP answers (those whose port is down
    /// then), and again whenever their port comes up while down.
    pub(super) nics: Vec<NicLink>,
    /// Set once QMP answered and `nics` were first applied.
    pub(super) links_applied: std::sync::atomic::AtomicBool,
    pub(super) agent: Option<PathBuf>,
    pub(super) boot_timeout: Duration,
    pub(super) console: PathBuf,
    pub(super) console_log: PathBuf,
    /// A container is up once crun wrote its init's pid here.
    pub(super) pid_file: Option<PathBuf>,
    /// A container's terminal comes here (crun's `--console-socket`).
    pub(super) pty: Option<(tokio::net::UnixListener, PathBuf)>,
}

/// A UML guest's console on a Unix socket: what a client types goes to
/// the guest's stdin; what the guest prints (already going to the console
/// log) is followed from the log and sent to the client.
pub(super) async fn serve_uml_console(
    sock: PathBuf,
    log: PathBuf,
    stdin: tokio::process::ChildStdin,
) {
    match bind_console(&sock) {
        Some(listener) => serve_console(listener, &sock, &log, stdin).await,
        // Keep the guest's stdin (ours until this task ends) open all the
        // same: EOF would end it. The supervisor aborts this task when the
        // guest ends.
        None => std::future::pending::<()>().await,
    }
}

fn bind_console(sock: &Path) -> Option<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(sock);
    tokio::net::UnixListener::bind(sock)
        .map_err(|e| tracing::warn!("console socket {}: {e}", sock.display()))
        .ok()
}

/// Serves a console on `listener`, one client at a time: what it types
/// goes to `input`; the console log, followed from its end, goes to it.
async fn serve_console<W: tokio::io::AsyncWrite + Unpin>(
    listener: tokio::net::UnixListener,
    sock: &Path,
    log: &Path,
    mut input: W,
) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let mut warned = false;
    loop {
        let client = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // EMFILE and the like pass; the console's input stays open.
                if !warned {
                    tracing::warn!("console socket {}: accept: {e}", sock.display());
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (mut from_client, mut to_client) = client.into_split();
        let Ok(mut file) = tokio::fs::File::open(log).await else {
            continue;
        };
        if file.seek(std::io::SeekFrom::End(0)).await.is_err() {
            continue;
        }
        let output = async {
            let mut buf = vec![0u8; 4096];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Ok(n) => {
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        };
        let typed = async {
            let mut buf = vec![0u8; 4096];
            loop {
                match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if input.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        // Until the client leaves (or the console's input breaks).
        tokio::select! {
            _ = output => {}
            _ = typed => {}
        }
    }
}

/// A container's console: crun sends the terminal's pty master to
/// `pty_listener`; from then on its output is drained into the console
/// log whether or not anyone is attached (a container never blocks on a
/// full terminal), and the console socket is served as a UML guest's.
/// Ends when no process holds the terminal any more; `got_pty` says the
/// supervisor may wait for that last output.
pub(super) async fn serve_container_console(
    pty_listener: tokio::net::UnixListener,
    pty_socket: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    got_pty: Arc<std::sync::atomic::AtomicBool>,
) {
    use crate::vmlaunch::container::console;
    // Bound first: a client that comes early waits in the backlog.
    let listener = bind_console(&sock);
    let pty = loop {
        let Ok((conn, _)) = pty_listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match console::recv_fd(&conn).await.and_then(console::Pty::new) {
            Ok(p) => break p,
            Err(e) => tracing::warn!("container terminal from {}: {e}", pty_socket.display()),
        }
    };
    drop(pty_listener);
    let _ = std::fs::remove_file(&pty_socket);
    got_pty.store(true, std::sync::atomic::Ordering::Relaxed);
    let pump = async {
        use std::io::Write;
        let mut file = crate::daemon::open_run_file_append(&log)
            .map_err(|e| tracing::warn!("console log {}: {e}", log.display()))
            .ok();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match pty.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // A log that cannot be written is still drained.
                    if let Some(f) = &mut file {
                        if f.write_all(&buf[..n]).is_err() {
                            file = None;
                        }
                    }
                }
            }
        }
    };
    let serve = async {
        match listener {
            Some(l) => serve_console(l, &sock, &log, pty.clone()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = pump => {}
        _ = serve => {}
    }
}

/// Waits until the guest is up: QMP answers, then (built-in image) its
/// agent answers.
pub(super) async fn wait_up(r: &Readiness) -> Result<(), String> {
    if let Some(q) = &r.qmp {
        let mut qmp = qmp::connect_when_up(q, Duration::from_secs(30))
            .await
            .map_err(|e| format!("QEMU did not answer on QMP: {e}"))?;
        // QEMU starts every NIC with carrier; the guest's driver should
        // find it already down when its port is. Read now, not at launch:
        // the link may have been set meanwhile (see `set_nic_link`).
        for nic in r.nics.iter().filter(|n| n.is_down()) {
            let set = qmp.execute_with("set_link", Some(nic.set_link_args()));
            match tokio::time::timeout(QMP_COMMAND_TIMEOUT, set).await {
                Ok(Ok(_)) => tracing::debug!(port = %nic.port, "guest carrier starts down"),
                Ok(Err(e)) => {
                    tracing::warn!(port = %nic.port, "cannot set the guest's carrier down: {e}")
                }
                Err(_) => {
                    tracing::warn!(port = %nic.port, "cannot set the guest's carrier down: QMP set_link got no answer")
                }
            }
        }
        r.links_applied
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(p) = &r.pid_file {
        let deadline = tokio::time::Instant::now() + r.boot_timeout;
        loop {
            let pid = std::fs::read_to_string(p).unwrap_or_default();
            if pid.trim().parse::<u32>().is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("crun did not start the container".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if let Some(a) = &r.agent {
        agent::wait_ready(a, tokio::time::Instant::now() + r.boot_timeout)
            .await
            .map_err(|e| format!("the guest's agent did not answer: {e}"))?;
    }
    Ok(())
}

pub(super) fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited normally".into(),
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// The last non-empty line this run wrote to the emulator's log (from
/// byte `from` on), to say why it failed. Reads at most the last 4 KiB.
pub(super) fn last_log_line(log: &Path, from: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    let start = from.max(len.saturating_sub(4096));
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = Vec::new();
    file.take(4096).read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().chars().take(200).collect())
}

pub(super) async fn supervise(
    name: String,
    runtime: Arc<Runtime>,
    events: Arc<crate::events::EventSink>,
    mut child: tokio::process::Child,
    run: u64,
    mut ready: Readiness,
    (log, log_from): (PathBuf, u64),
) {
    // Known while the process lives; the group outlives it (see below).
    let pid = child.id();
    let emit = |state: NodeState, reason: Option<String>| {
        events.emit(Event::NodeState {
            node: name.clone(),
            state: state.as_str(),
            reason,
        })
    };
    // UML's console is its stdin/stdout, a container's its terminal:
    // serve it on the console socket as QEMU does (one client at a time),
    // for the node's life.
    let got_pty = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let console = match (ready.pty.take(), child.stdin.take()) {
        (Some((listener, pty_socket)), _) => Some(tokio::spawn(serve_container_console(
            listener,
            pty_socket,
            ready.console.clone(),
            ready.console_log.clone(),
            got_pty.clone(),
        ))),
        (None, Some(stdin)) => Some(tokio::spawn(serve_uml_console(
            ready.console.clone(),
            ready.console_log.clone(),
            stdin,
        ))),
        (None, None) => None,
    };
    // A NIC port that comes up while its link is down had its carrier
    // forced up by QEMU (a vhost-user frontend that reconnected does so).
    let mut port_events = events.subscribe();
    let mut follow_ports = ready.qmp.is_some() && !ready.nics.is_empty();
    let up = wait_up(&ready);
    tokio::pin!(up);
    let mut up_done = false;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            ev = port_events.recv(), if follow_ports => {
                let Some(qmp) = &ready.qmp else { continue };
                // Before that, wait_up applies the links itself.
                if !ready.links_applied.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                match ev {
                    Ok(rec) => {
                        if let Event::PortUp { port, .. } = &rec.event {
                            let nic = ready.nics.iter().find(|n| n.port == *port);
                            if let Some(nic) = nic.filter(|n| n.is_down()) {
                                carrier_down(&name, qmp, nic);
                            }
                        }
                    }
                    // Events were missed: set every down NIC again.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for nic in ready.nics.iter().filter(|n| n.is_down()) {
                            carrier_down(&name, qmp, nic);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => follow_ports = false,
                }
            }
            r = &mut up, if !up_done => {
                up_done = true;
                let mut st = runtime.status();
                if st.run != run || st.state != Some(NodeState::Starting) {
                    continue;
                }
                match r {
                    Ok(()) => {
                        st.state = Some(NodeState::Running);
                        drop(st);
                        tracing::info!(node = %name, "node running");
                        emit(NodeState::Running, None);
                    }
                    Err(why) => {
                        // The process lives on; say why it is not usable
                        // (a warning: `exit` is for how a run ended).
                        tracing::warn!(node = %name, "{why}");
                        st.state = Some(NodeState::Running);
                        st.warning = Some(match st.warning.take() {
                            Some(w) => format!("{why}; {w}"),
                            None => why.clone(),
                        });
                        drop(st);
                        emit(NodeState::Running, Some(why));
                    }
                }
            }
        }
    };
    // The leader is gone; what it started in its group (UML's helper
    // processes) goes with it.
    if let Some(pid) = pid {
        kill(pid, libc::SIGKILL);
    }
    if let Some(mut task) = console {
        // A container's last words are still in its terminal: the console
        // ends once they are in the log (the terminal's last holder is gone
        // with the holder's pid namespace).
        if got_pty.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut task).await;
        }
        task.abort();
        let _ = std::fs::remove_file(&ready.console);
    }
    let (state, reason, cgroup) = {
        let mut st = runtime.status();
        if st.run != run {
            return;
        }
        let how = match &status {
            Ok(s) => describe_exit(s),
            Err(e) => format!("cannot wait for the process: {e}"),
        };
        let clean = status.as_ref().is_ok_and(|s| s.success());
        let state = if st.stop_requested || clean {
            NodeState::Stopped
        } else {
            NodeState::Crashed
        };
        let reason = if state == NodeState::Crashed {
            match last_log_line(&log, log_from) {
                Some(l) => format!("{how}: {l}"),
                None => how,
            }
        } else if st.stop_requested {
            "stopped".to_string()
        } else {
            // QEMU exits 0 when someone else sends it SIGTERM or SIGINT,
            // and says so in its log: that is no power-off.
            match last_log_line(&log, log_from).filter(|l| l.contains("terminating on signal")) {
                Some(l) => format!("ended from outside: {l}"),
                None => "the guest powered off".to_string(),
            }
        };
        st.state = Some(state);
        st.pid = None;
        st.accel = None;
        st.exit = Some(reason.clone());
        (state, reason, st.cgroup.take())
    };
    // Its processes are gone with the holder: the cgroups go too (the
    // kernel may take a moment to let them, hence off the runtime), before
    // anyone waiting for the end is told.
    if let Some(c) = cgroup {
        let _ = tokio::task::spawn_blocking(move || drop(c)).await;
    }
    if state == NodeState::Crashed {
        tracing::warn!(node = %name, "node crashed: {reason}");
    } else {
        tracing::info!(node = %name, "node stopped: {reason}");
    }
    emit(state, Some(reason));
    runtime.exited.send_replace(run);
}
