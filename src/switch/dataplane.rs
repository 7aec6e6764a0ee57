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
use crate::switch::fdb::Learned;
use crate::switch::forward::{Decision, FdbRow, Forwarder};
use crate::switch::stats::{DataPlaneStats, LoadMeter, PortCounters, PortShared};
use crate::switch::topology::Snapshot;
use crate::switch::{LanId, PortId};
use crate::wire::offload::{OffloadError, Segmenter, Segments};
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
    Shutdown,
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
            batch: RxBatch::new(),
            segmenter: Segmenter::new(),
            egress: Vec::with_capacity(64),
            commands: rx,
            epoch: Instant::now(),
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
    batch: RxBatch,
    /// Scratch space for frames finished in software (allocated once).
    segmenter: Segmenter,
    /// The ports one frame goes to (kept, so no allocation per frame).
    egress: Vec<PortId>,
    commands: mpsc::Receiver<Command>,
    epoch: Instant,
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
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

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
            let now = woke.map_or_else(|| self.now_ms(), |t| millis(t - self.epoch));
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
                    let _ = done.send(());
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
                        mark(&mut self.touched, &mut slot.touched, port);
                    }
                }
            }
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
            self.batch.clear();
            let registry = self.poll.registry();
            let mut port_cx = cx(registry, id, &mut slot.counters, now);
            port_cx.read_to_end = read_to_end;
            let state = slot
                .io
                .on_ready(sub, readable, writable, &mut port_cx, &mut self.batch);
            mark(&mut self.touched, &mut slot.touched, id);
            self.forward_batch(id, now);
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

    fn forward_batch(&mut self, ingress: PortId, now: u64) {
        let registry = self.poll.registry();
        let snap = &*self.snapshot;
        let segmenter = &mut self.segmenter;
        for i in 0..self.batch.len() {
            let bytes = self.batch.frame(i);
            let offload = self.batch.offload(i);
            let Ok(frame) = EthernetFrame::new_checked(bytes) else {
                continue; // ports only hand over checked frames
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
                let mut pcx = cx(registry, p, &mut slot.counters, now);
                if offload.is_none() {
                    slot.io.enqueue(bytes, &mut pcx);
                } else if offload.fits(slot.io.accepts()) {
                    slot.io.enqueue_offload(bytes, offload, &mut pcx);
                } else {
                    if finished.is_none() {
                        finished = Some(segmenter.finish(bytes, offload));
                    }
                    match &finished {
                        Some(Ok(segments)) => {
                            for seg in segments.clone() {
                                slot.io.enqueue(seg, &mut pcx);
                            }
                        }
                        _ => {
                            bad_offload = true;
                            continue;
                        }
                    }
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

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Adds `id` to `list` once per round.
fn mark(list: &mut Vec<PortId>, flag: &mut bool, id: PortId) {
    if !*flag {
        *flag = true;
        list.push(id);
    }
}
