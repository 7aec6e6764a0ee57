//! The data-plane thread: an epoll loop (mio) over every port's fds that
//! receives in batches, decides with the [`Forwarder`], queues copies on the
//! egress ports and flushes each touched port once per batch.
//!
//! The control side never touches frames: it publishes topology snapshots
//! (read here at batch boundaries, lock-free) and sends commands over a
//! channel plus a waker. Nothing in the loop waits for the control side.
//! Counters are summed per batch and added to the shared atomics once.

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mio::{Events, Poll, Token, Waker};
use tokio::sync::oneshot;

use crate::ports::{PortCx, PortIo, RxBatch, RxState, PROBE_MS, TOKENS_PER_PORT};
use crate::switch::capture::CaptureTap;
use crate::switch::fdb::Learned;
use crate::switch::forward::{Decision, FdbRow, Forwarder};
use crate::switch::impair::{Impairer, Verdict};
use crate::switch::stats::{DataPlaneStats, LoadMeter, PortCounters, PortShared};
use crate::switch::topology::Snapshot;
use crate::switch::{LanId, PortId};
use crate::wire::offload::{Offload, OffloadError, Segmenter, Segments};
use crate::wire::pcapng::Direction;
use crate::wire::EthernetFrame;

const WAKER: Token = Token(usize::MAX);
/// Batches one port may read in a row before others get a turn.
const RX_BUDGET: usize = 2;
const TICK_MS: u64 = 1000;
/// While ports keep the thread busy, epoll is asked every this many rounds.
const POLL_EVERY: u32 = 8;
/// Retry interval for output that is backed up and has no wakeup of its own.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);

pub enum Command {
    AddPort {
        id: PortId,
        io: Box<dyn PortIo>,
        shared: Arc<PortShared>,
    },
    /// Removes and drops the port (its socket files go with it).
    RemovePort {
        id: PortId,
        done: oneshot::Sender<()>,
    },
    Fdb {
        lan: LanId,
        reply: oneshot::Sender<Vec<FdbRow>>,
    },
    /// New impairments for a port (built on the control side, so the data
    /// plane allocates nothing); `None` clears a direction. Frames waiting
    /// under the old settings keep their place.
    SetImpairments {
        id: PortId,
        ingress: Option<Box<Impairer>>,
        egress: Option<Box<Impairer>>,
    },
    /// Administrative link state: a down port forwards nothing either way.
    SetLink {
        id: PortId,
        up: bool,
    },
    /// Starts a capture of a port (both ways) or of a lan (every frame
    /// that enters it, once).
    AddCapture {
        target: CaptureTarget,
        tap: CaptureTap,
    },
    /// Stops a capture: its tap is dropped and its writer finishes.
    RemoveCapture {
        id: u64,
    },
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureTarget {
    Port(PortId),
    Lan(LanId),
}

#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    pub aging_ms: u64,
    pub fdb_capacity: usize,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            aging_ms: 300_000,
            fdb_capacity: crate::switch::fdb::DEFAULT_FDB_CAPACITY,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the data-plane thread has stopped")]
pub struct DataPlaneGone;

/// The control side's handle on the data-plane thread.
pub struct DataPlaneHandle {
    tx: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    stats: Arc<DataPlaneStats>,
}

impl DataPlaneHandle {
    pub fn spawn(
        snapshot: Arc<ArcSwap<Snapshot>>,
        config: DataPlaneConfig,
    ) -> io::Result<DataPlaneHandle> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel();
        let initial = snapshot.load_full();
        let stats = Arc::new(DataPlaneStats::default());
        let mut dp = DataPlane {
            poll,
            ports: Vec::new(),
            dirty: Vec::new(),
            backlog: Vec::new(),
            rx_pending: Vec::new(),
            touched: Vec::new(),
            probing: 0,
            forwarder: Forwarder::new(config.aging_ms, config.fdb_capacity),
            snapshot: initial,
            published: snapshot,
            batch: Some(Box::new(RxBatch::new())),
            round_ns: 0,
            segmenter: Segmenter::new(),
            egress: Vec::with_capacity(64),
            timed: Vec::new(),
            lan_taps: Vec::new(),
            commands: rx,
            epoch: Instant::now(),
            wall0_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ulan-dataplane".into())
            .spawn(move || dp.run())?;
        Ok(DataPlaneHandle {
            tx,
            waker,
            thread: std::sync::Mutex::new(Some(thread)),
            stats,
        })
    }

    /// How busy the thread is (read by `/metrics`).
    pub fn stats(&self) -> &Arc<DataPlaneStats> {
        &self.stats
    }

    pub fn send(&self, cmd: Command) -> Result<(), DataPlaneGone> {
        self.tx.send(cmd).map_err(|_| DataPlaneGone)?;
        self.waker.wake().map_err(|_| DataPlaneGone)
    }

    /// A handle that only sends commands, for threads that outlive a
    /// request (a capture's writer stops its own tap).
    pub fn commander(&self) -> Commander {
        Commander {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Tells the thread a new snapshot is out (it would notice at its next
    /// wakeup anyway; this makes table purges prompt).
    pub fn nudge(&self) {
        let _ = self.waker.wake();
    }

    /// Stops the thread and waits for it; every port is closed.
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
        let thread = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

#[derive(Clone)]
pub struct Commander {
    tx: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

impl Commander {
    pub fn send(&self, cmd: Command) -> Result<(), DataPlaneGone> {
        self.tx.send(cmd).map_err(|_| DataPlaneGone)?;
        self.waker.wake().map_err(|_| DataPlaneGone)
    }
}

impl Drop for DataPlaneHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Slot {
    io: Box<dyn PortIo>,
    shared: Arc<PortShared>,
    counters: PortCounters,
    dirty: bool,
    touched: bool,
    /// Up state last seen here, see [`note_link_state`].
    was_up: bool,
    /// Set down by the API: nothing in or out.
    admin_down: bool,
    /// Impairments of frames from the client.
    ingress: Option<Box<Impairer>>,
    /// Impairments of frames to the client.
    egress: Option<Box<Impairer>>,
    /// Captures of this port.
    taps: Vec<CaptureTap>,
    /// On [`DataPlane::timed`].
    timed: bool,
}

struct DataPlane {
    poll: Poll,
    ports: Vec<Option<Slot>>,
    /// Ports with frames queued in this round.
    dirty: Vec<PortId>,
    /// Ports whose backed-up output epoll will not announce: retried
    /// every round, and at least every [`BACKLOG_RETRY`].
    backlog: Vec<PortId>,
    /// (port, sub) that stopped reading on budget, not on an empty socket.
    rx_pending: Vec<(PortId, usize)>,
    /// Ports whose counters changed this round.
    touched: Vec<PortId>,
    /// Ports that want [`PortIo::probe`] calls; while there are any, the
    /// loop wakes every [`PROBE_MS`].
    probing: usize,
    forwarder: Forwarder,
    snapshot: Arc<Snapshot>,
    published: Arc<ArcSwap<Snapshot>>,
    /// Taken while a batch is forwarded (the forwarding code needs all
    /// of `self`).
    batch: Option<Box<RxBatch>>,
    /// The loop's clock at the start of this round, in nanoseconds.
    round_ns: u64,
    /// Scratch space for frames finished in software (allocated once).
    segmenter: Segmenter,
    /// The ports one frame goes to (kept, so no allocation per frame).
    egress: Vec<PortId>,
    /// Ports with impaired frames waiting for their time.
    timed: Vec<PortId>,
    /// Lan captures.
    lan_taps: Vec<(LanId, CaptureTap)>,
    commands: mpsc::Receiver<Command>,
    epoch: Instant,
    /// Wall clock at `epoch`, for capture timestamps.
    wall0_ns: u64,
    stats: Arc<DataPlaneStats>,
}

fn cx<'a>(
    registry: &'a mio::Registry,
    id: PortId,
    counters: &'a mut PortCounters,
    now_ms: u64,
) -> PortCx<'a> {
    PortCx {
        registry,
        token: id as usize * TOKENS_PER_PORT,
        counters,
        now_ms,
        read_to_end: true,
    }
}

impl DataPlane {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut last_tick = 0u64;
        let mut last_probe = 0u64;
        let mut busy_rounds = 0u32;
        // Time in epoll against time outside it: one more clock read per
        // round that polls, summed here, stored once per round.
        let mut meter = LoadMeter::default();
        let mut poll_end = Instant::now();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.stats
            .tid
            .store(tid as u64, std::sync::atomic::Ordering::Relaxed);
        loop {
            // Ports with more to read (a polled vhost-user ring, a full
            // batch) are served again at once. Asking epoll about the others
            // costs a system call, so while such ports keep the thread
            // busy it asks only every few rounds (a round is a few µs).
            if !self.rx_pending.is_empty() && busy_rounds % POLL_EVERY != 0 {
                busy_rounds += 1;
                events.clear();
            } else {
                busy_rounds = 1;
            }
            let timeout = if busy_rounds != 1 {
                None
            } else if !self.rx_pending.is_empty() {
                Some(Duration::ZERO)
            } else if !self.backlog.is_empty() {
                Some(BACKLOG_RETRY)
            } else if self.probing > 0 {
                Some(Duration::from_millis(PROBE_MS))
            } else {
                Some(Duration::from_millis(TICK_MS))
            };
            // Impaired frames waiting: wake when the first is due (epoll
            // counts in whole milliseconds, rounded up; the last 200 µs are
            // not worth a sleep).
            let timeout = match (timeout, self.next_due_ns()) {
                (Some(t), Some(due)) => {
                    let wait = due.saturating_sub(self.epoch.elapsed().as_nanos() as u64);
                    let wait = if wait < 200_000 {
                        Duration::ZERO
                    } else {
                        Duration::from_nanos(wait)
                    };
                    Some(t.min(wait))
                }
                (t, _) => t,
            };
            let mut woke = None;
            let polled = match timeout {
                None => {
                    meter.round(None);
                    Ok(())
                }
                Some(t) => {
                    let start = Instant::now();
                    let r = self.poll.poll(&mut events, Some(t));
                    let end = Instant::now();
                    meter.round(Some((nanos(start - poll_end), nanos(end - start))));
                    poll_end = end;
                    woke = Some(end);
                    r
                }
            };
            if let Err(e) = polled {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("data plane poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            let woke_ns = woke.map_or_else(
                || self.epoch.elapsed().as_nanos() as u64,
                |t| nanos(t - self.epoch),
            );
            self.round_ns = woke_ns;
            let now = woke_ns / 1_000_000;
            if !self.apply_commands(now) {
                break;
            }
            self.reload_snapshot(now);

            let pending = std::mem::take(&mut self.rx_pending);
            for (id, sub) in pending {
                self.service(id, sub, true, false, true, now);
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                let t = ev.token().0;
                let id = (t / TOKENS_PER_PORT) as PortId;
                let sub = t % TOKENS_PER_PORT;
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let closed = ev.is_read_closed() || ev.is_error();
                self.service(id, sub, readable, ev.is_writable(), closed, now);
            }
            self.release_due(now);
            self.flush_all(now);
            if self.probing > 0 && now.saturating_sub(last_probe) >= PROBE_MS {
                last_probe = now;
                self.probe(now);
            }
            if now.saturating_sub(last_tick) >= TICK_MS {
                last_tick = now;
                self.tick(now);
                meter.tick(&self.stats);
            }
            self.publish_counters();
            meter.publish(&self.stats);
        }
        self.close_all();
    }

    /// Returns false on shutdown.
    fn apply_commands(&mut self, now: u64) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::AddPort { id, mut io, shared }) => {
                    let i = id as usize;
                    if self.ports.len() <= i {
                        self.ports.resize_with(i + 1, || None);
                    }
                    let mut counters = PortCounters::default();
                    let registry = self.poll.registry();
                    if let Err(e) = io.register(&mut cx(registry, id, &mut counters, now)) {
                        tracing::error!(port = id, "cannot poll port: {e}");
                    }
                    if io.wants_probe() {
                        self.probing += 1;
                    }
                    self.ports[i] = Some(Slot {
                        io,
                        shared,
                        counters,
                        dirty: false,
                        touched: false,
                        was_up: false,
                        admin_down: false,
                        ingress: None,
                        egress: None,
                        taps: Vec::new(),
                        timed: false,
                    });
                }
                Ok(Command::RemovePort { id, done }) => {
                    if let Some(mut slot) = self.ports.get_mut(id as usize).and_then(Option::take) {
                        if slot.io.wants_probe() {
                            self.probing -= 1;
                        }
                        slot.io.deregister(self.poll.registry());
                        slot.shared.counters.add(&slot.counters);
                        slot.shared.set_up(false);
                    }
                    self.forwarder.forget_port(id);
                    self.timed.retain(|&p| p != id);
                    let _ = done.send(());
                }
                Ok(Command::SetImpairments {
                    id,
                    ingress,
                    egress,
                }) => {
                    let Some(Some(slot)) = self.ports.get_mut(id as usize) else {
                        continue;
                    };
                    for (dir, new) in [(&mut slot.ingress, ingress), (&mut slot.egress, egress)] {
                        let old = dir.take();
                        *dir = match (new, old) {
                            (Some(mut n), Some(o)) => {
                                n.inherit(*o);
                                Some(n)
                            }
                            (Some(n), None) => Some(n),
                            // Cleared: frames that wait still go, in order;
                            // the direction is dropped once they are out.
                            (None, Some(o)) if o.held() > 0 => {
                                let mut n = Box::new(Impairer::new(&Default::default(), 1));
                                n.inherit(*o);
                                Some(n)
                            }
                            (None, _) => None,
                        };
                    }
                    let waiting = slot.ingress.as_ref().is_some_and(|i| i.held() > 0)
                        || slot.egress.as_ref().is_some_and(|i| i.held() > 0);
                    if waiting {
                        mark(&mut self.timed, &mut slot.timed, id);
                    }
                }
                Ok(Command::SetLink { id, up }) => {
                    if let Some(Some(slot)) = self.ports.get_mut(id as usize) {
                        slot.admin_down = !up;
                        if !up {
                            // As a pulled cable: the port's addresses go.
                            self.forwarder.forget_port(id);
                        }
                    }
                }
                Ok(Command::AddCapture { target, tap }) => match target {
                    CaptureTarget::Port(id) => {
                        if let Some(Some(slot)) = self.ports.get_mut(id as usize) {
                            slot.taps.push(tap);
                        }
                    }
                    CaptureTarget::Lan(lan) => self.lan_taps.push((lan, tap)),
                },
                Ok(Command::RemoveCapture { id }) => {
                    self.lan_taps.retain(|(_, t)| t.id() != id);
                    for slot in self.ports.iter_mut().flatten() {
                        slot.taps.retain(|t| t.id() != id);
                    }
                }
                Ok(Command::Fdb { lan, reply }) => {
                    // A topology change published before this question
                    // must show in the answer.
                    self.reload_snapshot(now);
                    let _ = reply.send(self.forwarder.rows(lan, now));
                }
                Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    fn reload_snapshot(&mut self, now: u64) {
        if self.published.load().generation != self.snapshot.generation {
            let new = self.published.load_full();
            self.forwarder.sync(&self.snapshot, &new);
            // Frames queued for a lan a port has left stay on that lan.
            let registry = self.poll.registry();
            let n = self.snapshot.port_lan.len();
            for port in 0..n as PortId {
                let old_lan = self.snapshot.lan_of(port);
                if old_lan.is_some() && new.lan_of(port) != old_lan {
                    if let Some(Some(slot)) = self.ports.get_mut(port as usize) {
                        slot.io
                            .discard_queued(&mut cx(registry, port, &mut slot.counters, now));
                        if let Some(i) = slot.egress.as_deref_mut() {
                            let n = i.discard() as u64;
                            slot.counters.tx_drop_moved += n;
                            slot.counters.tx_dropped += n;
                        }
                        if let Some(i) = slot.ingress.as_deref_mut() {
                            let n = i.discard() as u64;
                            slot.counters.rx_drop_moved += n;
                            slot.counters.rx_dropped += n;
                        }
                        mark(&mut self.touched, &mut slot.touched, port);
                    }
                }
            }
            // A lan capture ends with its lan.
            self.lan_taps.retain(|(lan, _)| new.lan_exists(*lan));
            self.snapshot = new;
        }
    }

    /// Handles readiness on one port fd, forwarding what it receives, up to
    /// the budget.
    /// `read_to_end`: see [`PortCx::read_to_end`].
    fn service(
        &mut self,
        id: PortId,
        sub: usize,
        readable: bool,
        writable: bool,
        read_to_end: bool,
        now: u64,
    ) {
        for _ in 0..RX_BUDGET {
            let Some(slot) = self.ports.get_mut(id as usize).and_then(Option::as_mut) else {
                return;
            };
            let Some(mut batch) = self.batch.take() else {
                return;
            };
            batch.clear();
            let registry = self.poll.registry();
            let mut port_cx = cx(registry, id, &mut slot.counters, now);
            port_cx.read_to_end = read_to_end;
            let state = slot
                .io
                .on_ready(sub, readable, writable, &mut port_cx, &mut batch);
            mark(&mut self.touched, &mut slot.touched, id);
            self.forward_batch(&batch, id, now);
            self.batch = Some(batch);
            // After forwarding: a client's last frames and its leaving in
            // one call must not leave addresses learned on a port that is
            // down.
            if let Some(Some(slot)) = self.ports.get_mut(id as usize) {
                note_link_state(&mut self.forwarder, slot, id);
            }
            // Flush after every batch, not once per round: output queues
            // stay short, so a burst of RX_BUDGET batches cannot overrun a
            // queue that a fast client is draining.
            self.flush_dirty(now);
            if state == RxState::Drained {
                return;
            }
        }
        self.rx_pending.push((id, sub));
    }

    fn forward_batch(&mut self, batch: &RxBatch, ingress: PortId, now: u64) {
        let now_ns = self.round_ns;
        for i in 0..batch.len() {
            let bytes = batch.frame(i);
            let offload = *batch.offload(i);
            let Some(Some(slot)) = self.ports.get_mut(ingress as usize) else {
                return;
            };
            if slot.admin_down {
                slot.counters.rx_drop_link_down += 1;
                slot.counters.rx_dropped += 1;
                continue;
            }
            if !slot.taps.is_empty() {
                let ts = self.wall0_ns + now_ns;
                for tap in &mut slot.taps {
                    if !tap.record(ts, ingress, Direction::Inbound, bytes) {
                        slot.counters.capture_dropped += 1;
                    }
                }
            }
            if let Some(imp) = slot.ingress.as_deref_mut() {
                match imp.admit(bytes, offload, now_ns) {
                    Verdict::Pass => {}
                    Verdict::Lost => {
                        slot.counters.rx_drop_impair_loss += 1;
                        slot.counters.rx_dropped += 1;
                        continue;
                    }
                    Verdict::QueueFull => {
                        slot.counters.rx_drop_impair_queue += 1;
                        slot.counters.rx_dropped += 1;
                        continue;
                    }
                    Verdict::Held => {
                        mark(&mut self.timed, &mut slot.timed, ingress);
                        continue;
                    }
                }
            }
            self.forward_one(ingress, bytes, offload, now);
        }
    }

    /// Decides where one frame from `ingress` goes and hands it to every
    /// egress port (through their egress impairments and captures).
    fn forward_one(&mut self, ingress: PortId, bytes: &[u8], offload: Offload, now: u64) {
        let registry = self.poll.registry();
        let snap = &*self.snapshot;
        let segmenter = &mut self.segmenter;
        let now_ns = self.round_ns;
        let ts = self.wall0_ns + now_ns;
        let Ok(frame) = EthernetFrame::new_checked(bytes) else {
            return; // ports only hand over checked frames
        };
        let (decision, learned) = self.forwarder.decide(snap, ingress, &frame, now);
        if let Some(Some(slot)) = self.ports.get_mut(ingress as usize) {
            let c = &mut slot.counters;
            c.rx_frames += 1;
            c.rx_bytes += bytes.len() as u64;
            if learned == Learned::TableFull {
                c.fdb_full += 1;
            }
            match decision {
                Decision::NoLan => {
                    c.rx_drop_no_lan += 1;
                    c.rx_dropped += 1;
                }
                Decision::Filtered => {
                    c.rx_drop_filtered += 1;
                    c.rx_dropped += 1;
                }
                _ => {}
            }
        }
        if !self.lan_taps.is_empty() {
            if let Some(lan) = snap.lan_of(ingress) {
                let mut lost = 0;
                for (l, tap) in self.lan_taps.iter_mut().filter(|(l, _)| *l == lan) {
                    let _ = l;
                    if !tap.record(ts, ingress, Direction::Inbound, bytes) {
                        lost += 1;
                    }
                }
                if lost > 0 {
                    if let Some(Some(slot)) = self.ports.get_mut(ingress as usize) {
                        slot.counters.capture_dropped += lost;
                    }
                }
            }
        }
        let egress = &mut self.egress;
        egress.clear();
        match decision {
            Decision::Unicast(p) => egress.push(p),
            Decision::Flood(lan) => {
                egress.extend(snap.ports_of(lan).iter().filter(|&&p| p != ingress))
            }
            Decision::NoLan | Decision::Filtered => {}
        }
        // The frame finished in software, made at most once per frame
        // and only if some egress port cannot take its offloads.
        let mut finished: Option<Result<Segments<'_>, OffloadError>> = None;
        let mut bad_offload = false;
        for &p in egress.iter() {
            let Some(Some(slot)) = self.ports.get_mut(p as usize) else {
                continue;
            };
            if slot.admin_down {
                slot.counters.tx_drop_link_down += 1;
                slot.counters.tx_dropped += 1;
                mark(&mut self.touched, &mut slot.touched, p);
                continue;
            }
            let mut pcx = cx(registry, p, &mut slot.counters, now);
            let mut out = Out {
                io: &mut *slot.io,
                egress: slot.egress.as_deref_mut(),
                taps: &mut slot.taps,
                pcx: &mut pcx,
                id: p,
                now_ns,
                ts,
                held: false,
            };
            if offload.is_none() || offload.fits(out.io.accepts()) {
                out.send(bytes, offload);
            } else {
                if finished.is_none() {
                    finished = Some(segmenter.finish(bytes, &offload));
                }
                match &finished {
                    Some(Ok(segments)) => {
                        for seg in segments.clone() {
                            out.send(seg, Offload::default());
                        }
                    }
                    _ => {
                        bad_offload = true;
                        continue;
                    }
                }
            }
            if out.held {
                mark(&mut self.timed, &mut slot.timed, p);
            }
            mark(&mut self.dirty, &mut slot.dirty, p);
            mark(&mut self.touched, &mut slot.touched, p);
        }
        if bad_offload {
            // The guest asked for work its frame does not allow: the
            // ports that needed it finished got nothing; counted once.
            if let Some(Some(slot)) = self.ports.get_mut(ingress as usize) {
                slot.counters.rx_drop_bad_offload += 1;
                slot.counters.rx_dropped += 1;
            }
        }
    }

    /// Hands out the impaired frames whose time has come: those from a
    /// client are forwarded, those to a client are queued on its port.
    fn release_due(&mut self, now: u64) {
        if self.timed.is_empty() {
            return;
        }
        let now_ns = self.round_ns;
        let ts = self.wall0_ns + now_ns;
        let timed = std::mem::take(&mut self.timed);
        let mut keep = Vec::new();
        for &id in &timed {
            // From the client: forwarded as if it arrived now.
            while let Some(h) = self
                .ports
                .get_mut(id as usize)
                .and_then(Option::as_mut)
                .and_then(|slot| slot.ingress.as_deref_mut())
                .and_then(|i| i.pop_due(now_ns))
            {
                self.forward_one(id, &h.buf, h.offload, now);
                if let Some(Some(slot)) = self.ports.get_mut(id as usize) {
                    if let Some(i) = slot.ingress.as_deref_mut() {
                        i.recycle(h.buf);
                    }
                }
            }
            let registry = self.poll.registry();
            let Some(Some(slot)) = self.ports.get_mut(id as usize) else {
                continue;
            };
            // To the client.
            if let Some(imp) = slot.egress.as_deref_mut() {
                let mut sent = false;
                while let Some(h) = imp.pop_due(now_ns) {
                    let c = &mut slot.counters;
                    if slot.admin_down {
                        c.tx_drop_link_down += 1;
                        c.tx_dropped += 1;
                    } else {
                        let mut pcx = cx(registry, id, c, now);
                        deliver(
                            &mut *slot.io,
                            &mut slot.taps,
                            &mut pcx,
                            id,
                            ts,
                            &h.buf,
                            h.offload,
                        );
                        sent = true;
                    }
                    imp.recycle(h.buf);
                }
                if sent {
                    mark(&mut self.dirty, &mut slot.dirty, id);
                }
            }
            mark(&mut self.touched, &mut slot.touched, id);
            let waiting = slot.ingress.as_ref().is_some_and(|i| i.held() > 0)
                || slot.egress.as_ref().is_some_and(|i| i.held() > 0);
            // A cleared direction lives on only while its frames wait.
            for dir in [&mut slot.ingress, &mut slot.egress] {
                if dir
                    .as_ref()
                    .is_some_and(|i| i.held() == 0 && i.spec().is_empty())
                {
                    *dir = None;
                }
            }
            slot.timed = waiting;
            if waiting {
                keep.push(id);
            }
        }
        let mut timed = timed;
        timed.clear();
        timed.extend(keep);
        // Frames released to a client made their ports dirty.
        self.timed = timed;
        self.flush_dirty(now);
    }

    /// Nanoseconds (on the loop's clock) until the next impaired frame is
    /// due, if any waits.
    fn next_due_ns(&self) -> Option<u64> {
        self.timed
            .iter()
            .filter_map(|&id| self.ports.get(id as usize)?.as_ref())
            .flat_map(|s| {
                [
                    s.ingress.as_ref().and_then(|i| i.next_due()),
                    s.egress.as_ref().and_then(|i| i.next_due()),
                ]
            })
            .flatten()
            .min()
    }

    /// Flushes the ports that got frames since the last flush.
    fn flush_dirty(&mut self, now: u64) {
        let dirty = std::mem::take(&mut self.dirty);
        self.flush_list(&dirty, now);
        let mut dirty = dirty;
        dirty.clear();
        self.dirty = dirty;
    }

    /// Flushes every port that got frames, and retries those that were
    /// backed up.
    fn flush_all(&mut self, now: u64) {
        self.flush_dirty(now);
        let backlog = std::mem::take(&mut self.backlog);
        self.flush_list(&backlog, now);
    }

    /// Flushes `ids`; those still backed up go (once) on the backlog list.
    fn flush_list(&mut self, ids: &[PortId], now: u64) {
        let registry = self.poll.registry();
        for id in ids {
            let Some(Some(slot)) = self.ports.get_mut(*id as usize) else {
                continue;
            };
            slot.dirty = false;
            let backed_up = slot
                .io
                .flush(&mut cx(registry, *id, &mut slot.counters, now));
            mark(&mut self.touched, &mut slot.touched, *id);
            note_link_state(&mut self.forwarder, slot, *id);
            if backed_up && slot.io.needs_retry_timer() && !self.backlog.contains(id) {
                self.backlog.push(*id);
            }
        }
    }

    fn tick(&mut self, now: u64) {
        self.forwarder.age(now);
        let registry = self.poll.registry();
        for (i, slot) in self.ports.iter_mut().enumerate() {
            if let Some(slot) = slot {
                slot.io
                    .tick(&mut cx(registry, i as PortId, &mut slot.counters, now));
                mark(&mut self.touched, &mut slot.touched, i as PortId);
                note_link_state(&mut self.forwarder, slot, i as PortId);
            }
        }
    }

    fn probe(&mut self, now: u64) {
        let registry = self.poll.registry();
        for (i, slot) in self.ports.iter_mut().enumerate() {
            if let Some(slot) = slot.as_mut().filter(|s| s.io.wants_probe()) {
                slot.io
                    .probe(&mut cx(registry, i as PortId, &mut slot.counters, now));
                mark(&mut self.touched, &mut slot.touched, i as PortId);
                note_link_state(&mut self.forwarder, slot, i as PortId);
            }
        }
    }

    fn publish_counters(&mut self) {
        for id in self.touched.drain(..) {
            if let Some(Some(slot)) = self.ports.get_mut(id as usize) {
                slot.touched = false;
                if let Some(i) = slot.ingress.as_deref_mut() {
                    let e = std::mem::take(&mut i.events);
                    slot.counters.rx_impair_duplicated += e.duplicated;
                    slot.counters.rx_impair_corrupted += e.corrupted;
                    slot.counters.rx_impair_reordered += e.reordered;
                }
                if let Some(i) = slot.egress.as_deref_mut() {
                    let e = std::mem::take(&mut i.events);
                    slot.counters.tx_impair_duplicated += e.duplicated;
                    slot.counters.tx_impair_corrupted += e.corrupted;
                    slot.counters.tx_impair_reordered += e.reordered;
                }
                if !slot.counters.is_zero() {
                    slot.shared.counters.add(&slot.counters);
                    slot.counters = PortCounters::default();
                }
            }
        }
    }

    fn close_all(&mut self) {
        self.publish_counters();
        let registry = self.poll.registry();
        for slot in self.ports.iter_mut().filter_map(Option::take) {
            let mut slot = slot;
            slot.io.deregister(registry);
            slot.shared.set_up(false);
        }
    }
}

/// One egress port's view while a frame goes out.
struct Out<'a, 'c> {
    io: &'a mut dyn PortIo,
    egress: Option<&'a mut Impairer>,
    taps: &'a mut Vec<CaptureTap>,
    pcx: &'a mut PortCx<'c>,
    id: PortId,
    now_ns: u64,
    ts: u64,
    /// A frame went into the egress impairment's queue.
    held: bool,
}

impl Out<'_, '_> {
    fn send(&mut self, bytes: &[u8], offload: Offload) {
        if let Some(imp) = self.egress.as_deref_mut() {
            match imp.admit(bytes, offload, self.now_ns) {
                Verdict::Pass => {}
                Verdict::Lost => {
                    self.pcx.counters.tx_drop_impair_loss += 1;
                    self.pcx.counters.tx_dropped += 1;
                    return;
                }
                Verdict::QueueFull => {
                    self.pcx.counters.tx_drop_impair_queue += 1;
                    self.pcx.counters.tx_dropped += 1;
                    return;
                }
                Verdict::Held => {
                    self.held = true;
                    return;
                }
            }
        }
        deliver(
            self.io, self.taps, self.pcx, self.id, self.ts, bytes, offload,
        );
    }
}

/// Queues a frame on a port and shows it to the port's captures.
fn deliver(
    io: &mut dyn PortIo,
    taps: &mut [CaptureTap],
    pcx: &mut PortCx<'_>,
    id: PortId,
    ts: u64,
    bytes: &[u8],
    offload: Offload,
) {
    if offload.is_none() {
        io.enqueue(bytes, pcx);
    } else {
        io.enqueue_offload(bytes, &offload, pcx);
    }
    for tap in taps.iter_mut() {
        if !tap.record(ts, id, Direction::Outbound, bytes) {
            pcx.counters.capture_dropped += 1;
        }
    }
}

/// A port whose client went away forgets its learned addresses, as a
/// hardware switch flushes a port on link down.
fn note_link_state(forwarder: &mut Forwarder, slot: &mut Slot, id: PortId) {
    let up = slot.shared.is_up();
    if slot.was_up && !up {
        forwarder.forget_port(id);
    }
    slot.was_up = up;
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Adds `id` to `list` once per round.
fn mark(list: &mut Vec<PortId>, flag: &mut bool, id: PortId) {
    if !*flag {
        *flag = true;
        list.push(id);
    }
}
