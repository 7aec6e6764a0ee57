//! Port kinds: how frames get in and out of the switch. One module per
//! kind; each knows its sockets, not MAC tables. Adding a kind means a new
//! module and one line in [`open`].
//!
//! A port is something the data plane polls and hands frames to. Socket
//! ports register fds with the data plane's poll; a vhost-user port will
//! register its kick eventfds the same way and copy between rings in
//! `on_ready`/`flush`, so the data plane does not care what is behind it.

pub mod bess;
pub mod dgram;
pub mod own;
pub mod queue;
pub mod stream;
pub mod sys;
pub mod tap;
pub mod vde;
pub mod vhost_user;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::events::{Event, EventSink};
use crate::switch::stats::{PortCounters, PortShared};
use crate::wire::offload::{Accepts, Offload};
pub use sys::RxBatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortKind {
    Stream,
    Dgram,
    Vde,
    Bess,
    #[serde(rename = "vhost-user")]
    VhostUser,
    /// A Linux tap device's fd, handed over on the port's socket.
    Tap,
}

impl PortKind {
    pub const ALL: [PortKind; 6] = [
        PortKind::Stream,
        PortKind::Dgram,
        PortKind::Vde,
        PortKind::Bess,
        PortKind::VhostUser,
        PortKind::Tap,
    ];

    /// The kinds whose clients speak over plain sockets (no shared memory).
    pub const SOCKETS: [PortKind; 4] = [
        PortKind::Stream,
        PortKind::Dgram,
        PortKind::Vde,
        PortKind::Bess,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PortKind::Stream => "stream",
            PortKind::Dgram => "dgram",
            PortKind::Vde => "vde",
            PortKind::Bess => "bess",
            PortKind::VhostUser => "vhost-user",
            PortKind::Tap => "tap",
        }
    }
}

impl std::str::FromStr for PortKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PortKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown port kind {s:?} (stream, dgram, vde, bess, vhost-user, tap)")
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("cannot create the socket at {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("{path} already exists")]
    PathTaken { path: PathBuf },
}

/// What a port gets from the data plane on each call.
pub struct PortCx<'a> {
    pub registry: &'a mio::Registry,
    /// First token of this port; a port uses `token + sub` for its fds.
    pub token: usize,
    pub counters: &'a mut PortCounters,
    pub now_ms: u64,
    /// The event that brought this call may carry the peer's close (or is
    /// a retry): read to the end, take no short-read shortcut, or the
    /// close is never seen (no new edge follows it).
    pub read_to_end: bool,
}

impl PortCx<'_> {
    pub fn token(&self, sub: usize) -> mio::Token {
        mio::Token(self.token + sub)
    }
}

/// Whether a port stopped reading because the batch filled up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// Read until the socket was empty.
    Drained,
    /// The batch is full and there may be more: call again after forwarding.
    More,
}

/// How often ports that ask for it check on their clients.
pub const PROBE_MS: u64 = 50;

/// How many fds (sub-tokens) a port may use.
pub const TOKENS_PER_PORT: usize = 4;

pub trait PortIo: Send {
    fn kind(&self) -> PortKind;

    /// Registers the port's fds. Called once, on the data-plane thread.
    fn register(&mut self, cx: &mut PortCx<'_>) -> io::Result<()>;

    /// Readiness on one of the port's fds. Receives into `batch` (frames
    /// already length-checked; bad ones counted and dropped), accepts or
    /// rejects clients, and flushes output when writable.
    fn on_ready(
        &mut self,
        sub: usize,
        readable: bool,
        writable: bool,
        cx: &mut PortCx<'_>,
        batch: &mut RxBatch,
    ) -> RxState;

    /// Queues a copy of `frame` (a complete frame) for the client, or
    /// counts why not.
    fn enqueue(&mut self, frame: &[u8], cx: &mut PortCx<'_>);

    /// The offloads the client takes (a vhost-user guest with GUEST_CSUM,
    /// GUEST_TSO4/6): frames whose work fits are handed over with it
    /// through [`PortIo::enqueue_offload`], others are finished in software
    /// first. Socket clients take complete frames only.
    fn accepts(&self) -> Accepts {
        Accepts::NONE
    }

    /// Queues `frame` with work left in it that [`PortIo::accepts`] said
    /// the client takes.
    fn enqueue_offload(&mut self, frame: &[u8], _offload: &Offload, cx: &mut PortCx<'_>) {
        self.enqueue(frame, cx);
    }

    /// Sends what is queued. Returns true while output is backed up.
    fn flush(&mut self, cx: &mut PortCx<'_>) -> bool;

    /// Backed-up output that epoll will not announce: the data plane
    /// retries it on a short timer. Others are flushed when their fd turns
    /// writable. (No port kind needs it at present: dgram ports send on a
    /// socket connected to their client.)
    fn needs_retry_timer(&self) -> bool {
        false
    }

    /// Called about once a second: timeouts of half-open clients.
    fn tick(&mut self, _cx: &mut PortCx<'_>) {}

    /// Whether the port wants [`PortIo::probe`] calls: a client it cannot
    /// see leave (a datagram peer) is checked on every [`PROBE_MS`].
    fn wants_probe(&self) -> bool {
        false
    }

    /// Called about every [`PROBE_MS`] when [`PortIo::wants_probe`]:
    /// checks that the client is still there.
    fn probe(&mut self, _cx: &mut PortCx<'_>) {}

    /// The port left its lan: drops what is queued for the client and not
    /// yet handed to the kernel (a stream record already partly written is
    /// finished, so the stream stays whole), counted as `tx_drop_moved`.
    fn discard_queued(&mut self, cx: &mut PortCx<'_>);

    /// Removes the port's fds from the poll before it is dropped.
    fn deregister(&mut self, registry: &mio::Registry);
}

/// What every port kind shares: its name, shared state and event sink,
/// and a rate limit on log lines a client can trigger.
pub struct PortLink {
    pub name: String,
    pub shared: Arc<PortShared>,
    pub events: Arc<EventSink>,
    last_warn_ms: Option<u64>,
    suppressed: u64,
}

/// At most one client-triggered warning per port per this many ms.
const WARN_INTERVAL_MS: u64 = 10_000;

impl PortLink {
    pub fn new(name: &str, shared: Arc<PortShared>, events: Arc<EventSink>) -> Self {
        PortLink {
            name: name.to_string(),
            shared,
            events,
            last_warn_ms: None,
            suppressed: 0,
        }
    }

    pub fn up(&self, counters: &mut PortCounters, peer: Option<String>) {
        counters.connects += 1;
        self.shared.set_up(true);
        tracing::info!(port = %self.name, peer = peer.as_deref().unwrap_or("-"), "port up");
        self.events.emit(Event::PortUp {
            port: self.name.clone(),
            peer,
        });
    }

    pub fn down(&self, counters: &mut PortCounters, reason: &str) {
        counters.disconnects += 1;
        self.shared.set_up(false);
        tracing::info!(port = %self.name, reason, "port down");
        self.events.emit(Event::PortDown {
            port: self.name.clone(),
            reason: reason.to_string(),
        });
    }

    /// Logs a warning a client can cause, at most once per interval.
    pub fn warn(&mut self, now_ms: u64, msg: std::fmt::Arguments<'_>) {
        match self.last_warn_ms {
            Some(t) if now_ms.saturating_sub(t) < WARN_INTERVAL_MS => self.suppressed += 1,
            _ => {
                if self.suppressed > 0 {
                    tracing::warn!(port = %self.name, suppressed = self.suppressed, "{msg} (and similar lines suppressed)");
                } else {
                    tracing::warn!(port = %self.name, "{msg}");
                }
                self.last_warn_ms = Some(now_ms);
                self.suppressed = 0;
            }
        }
    }
}

/// Creates a port of `kind` at `path` (a socket, or for vde a directory).
/// The path is made here, on the control side, so errors reach the caller.
/// Per-port settings beyond the kind.
#[derive(Debug, Clone, Default)]
pub struct PortOptions {
    /// `dgram`: the client's socket path, when ulan started the client.
    pub dgram_peer: Option<PathBuf>,
}

pub fn open(
    kind: PortKind,
    path: &Path,
    link: PortLink,
    options: &PortOptions,
) -> Result<Box<dyn PortIo>, PortError> {
    if path.symlink_metadata().is_ok() {
        return Err(PortError::PathTaken {
            path: path.to_path_buf(),
        });
    }
    let wrap = |source| PortError::Socket {
        path: path.to_path_buf(),
        source,
    };
    Ok(match kind {
        PortKind::Stream => Box::new(stream::StreamPort::open(path, link).map_err(wrap)?),
        PortKind::Dgram => Box::new(
            dgram::DgramPort::open(path, link, options.dgram_peer.as_deref()).map_err(wrap)?,
        ),
        PortKind::Vde => Box::new(vde::VdePort::open(path, link).map_err(wrap)?),
        PortKind::Bess => Box::new(bess::BessPort::open(path, link).map_err(wrap)?),
        PortKind::VhostUser => Box::new(vhost_user::VhostUserPort::open(path, link).map_err(wrap)?),
        PortKind::Tap => Box::new(tap::TapPort::open(path, link).map_err(wrap)?),
    })
}

/// Registers or re-registers an fd with the poll.
pub(crate) fn set_interest(
    registry: &mio::Registry,
    fd: &std::os::fd::OwnedFd,
    token: mio::Token,
    writable: bool,
    first: bool,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let mut src = mio::unix::SourceFd(&raw);
    let interest = if writable {
        mio::Interest::READABLE | mio::Interest::WRITABLE
    } else {
        mio::Interest::READABLE
    };
    if first {
        registry.register(&mut src, token, interest)
    } else {
        registry.reregister(&mut src, token, interest)
    }
}

pub(crate) fn deregister_fd(registry: &mio::Registry, fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let _ = registry.deregister(&mut mio::unix::SourceFd(&raw));
}

/// The counters a dropped client's queued frames go to.
pub(crate) fn count_lost(counters: &mut PortCounters, (frames, _bytes): (u64, u64)) {
    counters.tx_drop_error += frames;
    counters.tx_dropped += frames;
}

pub(crate) fn count_moved(counters: &mut PortCounters, (frames, _bytes): (u64, u64)) {
    counters.tx_drop_moved += frames;
    counters.tx_dropped += frames;
}

pub(crate) fn count_tx_drop_full(counters: &mut PortCounters) {
    counters.tx_drop_queue_full += 1;
    counters.tx_dropped += 1;
}

pub(crate) fn count_tx_drop_no_peer(counters: &mut PortCounters) {
    counters.tx_drop_no_peer += 1;
    counters.tx_dropped += 1;
}

/// Counts rejected datagrams; zero-length ones count as runts (callers on
/// SOCK_SEQPACKET handle those as a close first).
pub(crate) fn count_rx_rejects(counters: &mut PortCounters, r: &sys::RxRejects) {
    let runt = r.runt + r.zero_len;
    counters.rx_drop_runt += runt;
    counters.rx_drop_oversized += r.oversized;
    counters.rx_dropped += runt + r.oversized;
}

/// What [`accept_single`] did.
pub(crate) enum Accepted {
    /// Took this client; call again for any others (return `More`).
    Client(std::os::fd::OwnedFd),
    /// Refused [`MAX_REFUSALS`] in a row and more may wait: return `More`,
    /// so other ports get a turn before the rest.
    Busy,
    /// Nobody else is waiting.
    Done,
}

/// Connections one [`accept_single`] call refuses before giving others a
/// turn: a client connecting in a loop cannot hold the data plane.
const MAX_REFUSALS: usize = 64;

/// Accepts waiting connections on `listener`. When the port has no client
/// it takes the first one and stops, so the caller can look at it before
/// deciding about the rest. When it has one, waiting connections are
/// closed at once and counted: these ports take one client at a time.
pub(crate) fn accept_single(
    listener: &std::os::fd::OwnedFd,
    occupied: bool,
    link: &mut PortLink,
    cx: &mut PortCx<'_>,
) -> Accepted {
    for _ in 0..MAX_REFUSALS {
        match sys::accept(listener) {
            Ok(Some(fd)) if !occupied => return Accepted::Client(fd),
            Ok(Some(_refused)) => {
                cx.counters.rejected_clients += 1;
                link.warn(
                    cx.now_ms,
                    format_args!("refused a second client: this port takes one at a time"),
                );
            }
            Ok(None) => return Accepted::Done,
            Err(e) => {
                link.warn(cx.now_ms, format_args!("accept failed: {e}"));
                return Accepted::Done;
            }
        }
    }
    Accepted::Busy
}

/// How a run of datagram receives ended.
pub(crate) struct DatagramRx {
    pub state: RxState,
    /// A zero-length message on SOCK_SEQPACKET: the peer closed.
    pub eof: bool,
    /// The error that stopped reading, other than "nothing more to read".
    pub error: Option<io::Error>,
}

/// recvmmsg calls one [`receive_datagrams`] may make: rejected messages
/// (runts, oversized) never fill the batch, and a client spraying them
/// must not keep the data plane in one port.
const MAX_RECV_CALLS: usize = 8;

/// Receives datagrams (or seqpacket messages) into `batch` until the
/// socket is empty or the batch is full, as edge-triggered polling needs,
/// or [`MAX_RECV_CALLS`] calls were made (then it says `More`). Rejected
/// frames are counted and logged (rate-limited) here. With `names`, the
/// batch keeps each frame's sender ([`RxBatch::sender`]).
pub(crate) fn receive_datagrams(
    fd: &std::os::fd::OwnedFd,
    batch: &mut RxBatch,
    link: &mut PortLink,
    cx: &mut PortCx<'_>,
    names: bool,
    seqpacket: bool,
) -> DatagramRx {
    let mut rejects = sys::RxRejects::default();
    let mut out = DatagramRx {
        state: RxState::Drained,
        eof: false,
        error: None,
    };
    let mut calls = 0;
    loop {
        if batch.is_full() || calls == MAX_RECV_CALLS {
            out.state = RxState::More;
            break;
        }
        calls += 1;
        let room = sys::BATCH - batch.len();
        match sys::recv_batch(fd, batch, &mut rejects, names) {
            Ok(_) if seqpacket && rejects.zero_len > 0 => {
                rejects.zero_len = 0;
                out.eof = true;
                break;
            }
            // Fewer than asked for: the queue was empty. Edge-triggered
            // polling needs no EAGAIN to prove it; the next datagram is a
            // new edge. Saves a syscall per wakeup.
            Ok(n) if n < room && !cx.read_to_end => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    let runts = rejects.runt + rejects.zero_len;
    if runts + rejects.oversized > 0 {
        count_rx_rejects(cx.counters, &rejects);
        link.warn(
            cx.now_ms,
            format_args!(
                "dropped {runts} runt and {} oversized frames",
                rejects.oversized
            ),
        );
    }
    out
}

/// After a flush: asks epoll for writability while output is backed up
/// (`done` false) and stops asking once it has drained.
pub(crate) fn track_backlog(
    cx: &mut PortCx<'_>,
    fd: &std::os::fd::OwnedFd,
    sub: usize,
    want_write: &mut bool,
    done: bool,
) {
    if done == *want_write {
        *want_write = !done;
        let _ = set_interest(cx.registry, fd, cx.token(sub), !done, false);
    }
}
