//! `vhost-user` ports: ulan is the vhost-user backend of a guest's
//! virtio-net device. QEMU (the frontend) connects to the port's socket
//! and shares the guest's memory; ulan's data-plane thread then reads the
//! guest's transmit ring and writes its receive ring directly, with no
//! system call per frame: `-chardev socket,id=c0,path=PATH
//! -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0`
//! with `-object memory-backend-memfd,id=mem,size=<-m>,share=on
//! -numa node,memdev=mem`.
//!
//! Two halves: [`control`] runs the protocol on a thread of the port's own
//! (blocking messages with file descriptors, from a process ulan cannot
//! trust), [`device`] serves the rings on the data plane. They meet in an
//! op channel plus an eventfd that wakes the data plane, which applies
//! changes between batches and answers.
//!
//! While frames flow the port polls the guest's transmit ring instead of
//! waiting for kicks (the guest is told not to kick), and re-arms the
//! kick only after [`SPIN`] without work: a busy guest costs no wakeup per
//! frame, an idle one costs no CPU.

pub mod control;
pub mod device;
pub mod features;
pub mod fuzz;
pub mod memory;
pub mod ring;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use self::control::{Control, Op, Reply, Shared};
use self::device::{Delivery, Device, RingError, RX, TX};
use crate::ports::queue::FrameQueue;
use crate::ports::{
    count_tx_drop_full, count_tx_drop_no_peer, PortCx, PortIo, PortKind, PortLink, RxBatch, RxState,
};
use crate::wire::check_frame_len;
use crate::wire::offload::{self, Accepts, Offload, OffloadError};

/// The offload request in a virtio-net header from the guest.
fn offload_of(h: &[u8; features::NET_HDR_LEN]) -> Result<Offload, OffloadError> {
    let mut fields = [0u8; offload::VIRTIO_HDR_FIELDS_LEN];
    fields.copy_from_slice(&h[..offload::VIRTIO_HDR_FIELDS_LEN]);
    offload::offload_from_header(&fields)
}

/// The virtio-net header that hands `off` on to a guest (num_buffers is
/// filled in by the ring).
fn header_of(off: &Offload) -> [u8; features::NET_HDR_LEN] {
    let mut fields = [0u8; offload::VIRTIO_HDR_FIELDS_LEN];
    offload::write_header(off, &mut fields);
    let mut h = [0u8; features::NET_HDR_LEN];
    h[..offload::VIRTIO_HDR_FIELDS_LEN].copy_from_slice(&fields);
    h
}

const SUB_CTRL: usize = 0;
const SUB_RX_KICK: usize = 1;
const SUB_TX_KICK: usize = 2;

/// How long the port keeps polling an idle transmit ring before it asks
/// the guest to kick again.
const SPIN: Duration = Duration::from_micros(30);
/// Frames held for a guest that has no receive buffers posted.
const RX_BACKLOG: usize = 256;

/// Milliseconds on a process-wide clock (for rate-limited logs from the
/// control thread, which has no data-plane clock).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub struct VhostUserPort {
    link: PortLink,
    path: PathBuf,
    shared: Arc<Shared>,
    ops: mpsc::Receiver<(u64, Op)>,
    replies: mpsc::SyncSender<(u64, Reply)>,
    dev: Device,
    /// Frames for the guest waiting for receive buffers.
    backlog: FrameQueue,
    /// Transmit ring polled (kicks off) until this instant.
    polling_until: Option<Instant>,
    up: bool,
    /// The frontend set protocol features: rings start disabled.
    protocol_in_use: bool,
    refused_seen: u64,
    /// The socket file is the lab's own: no client may name it.
    _own: crate::ports::own::OwnSocket,
}

impl VhostUserPort {
    pub fn open(path: &Path, link: PortLink) -> io::Result<VhostUserPort> {
        let listener = UnixListener::bind(path)?;
        let shared = Arc::new(Shared::new()?);
        let (ops_tx, ops_rx) = mpsc::channel();
        let (rep_tx, rep_rx) = mpsc::sync_channel(16);
        let control = Control {
            listener,
            shared: shared.clone(),
            log: PortLink::new(&link.name, link.shared.clone(), link.events.clone()),
            offered: features::BASE_FEATURES | features::OFFLOAD_FEATURES,
            ops: ops_tx,
            replies: rep_rx,
        };
        let name: String = format!("vu-{}", link.name).chars().take(15).collect();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || control.run())?;
        Ok(VhostUserPort {
            link,
            path: path.to_path_buf(),
            shared,
            ops: ops_rx,
            replies: rep_tx,
            dev: Device::default(),
            backlog: FrameQueue::new(RX_BACKLOG),
            polling_until: None,
            up: false,
            protocol_in_use: false,
            refused_seen: 0,
            _own: crate::ports::own::OwnSocket::claim(path),
        })
    }

    /// Applies what the control thread sent, answering each.
    fn apply_ops(&mut self, cx: &mut PortCx<'_>) {
        device::drain_eventfd(&self.shared.notify);
        while let Ok((seq, op)) = self.ops.try_recv() {
            let reply = self.apply(op, cx);
            let _ = self.replies.try_send((seq, reply));
        }
        self.note_link(cx);
    }

    fn apply(&mut self, op: Op, cx: &mut PortCx<'_>) -> Reply {
        match op {
            Op::Features(f) => {
                self.dev.features = f;
                Reply::Done
            }
            Op::Memory { mem, rings } => {
                // Ring addresses in the new table; indexes carry on.
                let addrs = rings.map(|a| a.map(|a| (a.desc, a.avail, a.used)));
                match self.dev.set_memory(mem, addrs) {
                    Ok(()) => Reply::Done,
                    Err(e) => Reply::Refused(format!("new memory table: {e}")),
                }
            }
            Op::Start { index, setup } => {
                if let Err(e) = device::set_nonblocking(&setup.kick) {
                    return Reply::Refused(format!("ring {index}: kick fd: {e}"));
                }
                if let Some(c) = &setup.call {
                    if let Err(e) = device::set_nonblocking(c) {
                        return Reply::Refused(format!("ring {index}: call fd: {e}"));
                    }
                }
                self.unregister_kick(index, cx.registry);
                if let Err(e) = self.dev.start(index, setup) {
                    return Reply::Refused(format!("ring {index}: {e}"));
                }
                // Without protocol features a ring runs once started.
                if !self.protocol_in_use {
                    self.dev.rings[index].enabled = true;
                }
                if let Err(e) = self.register_kick(index, cx) {
                    self.dev.stop(index);
                    return Reply::Refused(format!("ring {index}: cannot poll its kick fd: {e}"));
                }
                if index == TX {
                    // Look at once: the guest may have queued frames already.
                    self.polling_until = Some(Instant::now() + SPIN);
                }
                Reply::Done
            }
            Op::Stop { index } => {
                self.unregister_kick(index, cx.registry);
                if index == RX {
                    self.drop_backlog(cx);
                }
                Reply::Base(self.dev.stop(index))
            }
            Op::Call { index, call } => {
                if let Some(c) = &call {
                    if let Err(e) = device::set_nonblocking(c) {
                        return Reply::Refused(format!("ring {index}: call fd: {e}"));
                    }
                }
                self.dev.rings[index].call = call;
                Reply::Done
            }
            Op::Enable { index, on } => {
                self.dev.rings[index].enabled = on;
                if index == TX && on {
                    self.polling_until = Some(Instant::now() + SPIN);
                }
                if index == RX && !on {
                    self.drop_backlog(cx);
                }
                Reply::Done
            }
            Op::ProtocolInUse => {
                self.protocol_in_use = true;
                Reply::Done
            }
            Op::Reset => {
                self.protocol_in_use = false;
                self.unregister_kick(RX, cx.registry);
                self.unregister_kick(TX, cx.registry);
                self.drop_backlog(cx);
                self.dev.reset();
                self.polling_until = None;
                Reply::Done
            }
        }
    }

    fn register_kick(&mut self, index: usize, cx: &mut PortCx<'_>) -> io::Result<()> {
        let sub = if index == RX {
            SUB_RX_KICK
        } else {
            SUB_TX_KICK
        };
        let Some(kick) = &self.dev.rings[index].kick else {
            return Ok(());
        };
        let raw = kick.as_raw_fd();
        cx.registry.register(
            &mut mio::unix::SourceFd(&raw),
            cx.token(sub),
            mio::Interest::READABLE,
        )
    }

    fn unregister_kick(&mut self, index: usize, registry: &mio::Registry) {
        if let Some(kick) = &self.dev.rings[index].kick {
            let raw = kick.as_raw_fd();
            let _ = registry.deregister(&mut mio::unix::SourceFd(&raw));
        }
    }

    fn drop_backlog(&mut self, cx: &mut PortCx<'_>) {
        let (frames, _) = self.backlog.clear();
        cx.counters.tx_drop_no_peer += frames;
        cx.counters.tx_dropped += frames;
    }

    /// The port is up while both rings run: the guest's driver is ready.
    fn note_link(&mut self, cx: &mut PortCx<'_>) {
        let up = self.dev.rings[RX].started && self.dev.rings[TX].started;
        if up != self.up {
            self.up = up;
            if up {
                self.link
                    .up(cx.counters, Some("vhost-user frontend".into()));
            } else {
                self.link.down(cx.counters, "vhost-user rings stopped");
            }
        }
        let refused = self
            .shared
            .refused
            .load(std::sync::atomic::Ordering::Relaxed);
        if refused != self.refused_seen {
            cx.counters.rejected_clients += refused - self.refused_seen;
            self.refused_seen = refused;
        }
    }

    /// A frontend broke its rings: stop serving it and cut it off.
    fn ring_error(&mut self, e: RingError, cx: &mut PortCx<'_>) {
        cx.counters.protocol_errors += 1;
        self.link
            .warn(cx.now_ms, format_args!("vhost-user frontend cut off: {e}"));
        self.unregister_kick(RX, cx.registry);
        self.unregister_kick(TX, cx.registry);
        self.drop_backlog(cx);
        self.dev.stop(RX);
        self.dev.stop(TX);
        self.polling_until = None;
        self.shared.kill_connection();
        self.note_link(cx);
    }

    /// Reads frames from the guest's transmit ring into `batch`.
    fn receive(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) -> RxState {
        if !self.dev.rings[TX].running() {
            return RxState::Drained;
        }
        let offloads_in = features::has(self.dev.features, features::VIRTIO_NET_F_CSUM);
        let mut got = 0;
        let mut state = RxState::Drained;
        loop {
            if batch.is_full() {
                state = RxState::More;
                break;
            }
            let buf = batch.next_buf();
            match self.dev.pop_tx(buf) {
                Ok(None) => break,
                Ok(Some(f)) => {
                    got += 1;
                    match check_frame_len(f.len) {
                        // Without CSUM acked the guest leaves no work in
                        // its frames: the header is not read.
                        Ok(()) if !offloads_in => batch.commit(f.len),
                        Ok(()) => match offload_of(&f.header) {
                            Ok(off) => batch.commit_with(f.len, off),
                            Err(e) => {
                                cx.counters.rx_drop_bad_offload += 1;
                                cx.counters.rx_dropped += 1;
                                self.link.warn(
                                    cx.now_ms,
                                    format_args!(
                                        "dropped a frame with a bad virtio-net header: {e}"
                                    ),
                                );
                            }
                        },
                        Err(crate::wire::FrameError::Runt(_)) => {
                            cx.counters.rx_drop_runt += 1;
                            cx.counters.rx_dropped += 1;
                        }
                        Err(crate::wire::FrameError::Oversized(_)) => {
                            cx.counters.rx_drop_oversized += 1;
                            cx.counters.rx_dropped += 1;
                        }
                    }
                }
                Err(e) => {
                    self.ring_error(e, cx);
                    return RxState::Drained;
                }
            }
        }
        if let Err(e) = self.dev.signal(TX) {
            self.ring_error(e, cx);
            return RxState::Drained;
        }
        let now = Instant::now();
        if got > 0 {
            if self.polling_until.is_none() {
                let _ = self.dev.notifications(TX, false);
            }
            self.polling_until = Some(now + SPIN);
            return RxState::More;
        }
        match self.polling_until {
            Some(t) if now < t => RxState::More,
            Some(_) => {
                // Idle long enough: ask for kicks again, and look once more
                // so a frame added meanwhile is not left waiting.
                self.polling_until = None;
                match self.dev.notifications(TX, true) {
                    Ok(true) => {
                        self.polling_until = Some(now + SPIN);
                        RxState::More
                    }
                    _ => state,
                }
            }
            None => state,
        }
    }

    /// Hands a frame to the guest, or holds it while the guest has no
    /// receive buffers posted.
    fn deliver(&mut self, header: &[u8; features::NET_HDR_LEN], frame: &[u8], cx: &mut PortCx<'_>) {
        if !self.dev.rings[RX].running() {
            count_tx_drop_no_peer(cx.counters);
            return;
        }
        if self.backlog.is_empty() {
            match self.dev.push_rx(header, frame) {
                Ok(Delivery::Delivered) => {
                    cx.counters.tx_frames += 1;
                    cx.counters.tx_bytes += frame.len() as u64;
                    return;
                }
                Ok(Delivery::TooBig) => {
                    cx.counters.tx_drop_error += 1;
                    cx.counters.tx_dropped += 1;
                    return;
                }
                Ok(Delivery::NoRoom) => {}
                Err(e) => {
                    self.ring_error(e, cx);
                    return;
                }
            }
        }
        if !self.backlog.push_parts(header, frame) {
            count_tx_drop_full(cx.counters);
        }
    }

    /// Moves held frames into the guest's receive buffers.
    fn drain_backlog(&mut self, cx: &mut PortCx<'_>) {
        while let Some(entry) = self.backlog.front() {
            // Entries are the virtio-net header, then the frame.
            let (h, frame) = entry.split_at(features::NET_HDR_LEN.min(entry.len()));
            let mut header = [0u8; features::NET_HDR_LEN];
            header[..h.len()].copy_from_slice(h);
            match self.dev.push_rx(&header, frame) {
                Ok(Delivery::Delivered) => {
                    cx.counters.tx_frames += 1;
                    cx.counters.tx_bytes += frame.len() as u64;
                    self.backlog.pop_front();
                }
                Ok(Delivery::TooBig) => {
                    cx.counters.tx_drop_error += 1;
                    cx.counters.tx_dropped += 1;
                    self.backlog.pop_front();
                }
                Ok(Delivery::NoRoom) => {
                    // Ask for a kick when buffers come, unless some already did.
                    if let Ok(true) = self.dev.notifications(RX, true) {
                        continue;
                    }
                    break;
                }
                Err(e) => {
                    self.ring_error(e, cx);
                    return;
                }
            }
        }
        if let Err(e) = self.dev.signal(RX) {
            self.ring_error(e, cx);
        }
    }
}

impl PortIo for VhostUserPort {
    fn kind(&self) -> PortKind {
        PortKind::VhostUser
    }

    fn register(&mut self, cx: &mut PortCx<'_>) -> io::Result<()> {
        let raw = self.shared.notify.as_raw_fd();
        cx.registry.register(
            &mut mio::unix::SourceFd(&raw),
            cx.token(SUB_CTRL),
            mio::Interest::READABLE,
        )?;
        Ok(())
    }

    fn on_ready(
        &mut self,
        sub: usize,
        _readable: bool,
        _writable: bool,
        cx: &mut PortCx<'_>,
        batch: &mut RxBatch,
    ) -> RxState {
        match sub {
            SUB_CTRL => {
                self.apply_ops(cx);
                self.receive(cx, batch)
            }
            SUB_RX_KICK => {
                if let Some(k) = &self.dev.rings[RX].kick {
                    device::drain_eventfd(k);
                }
                self.drain_backlog(cx);
                RxState::Drained
            }
            SUB_TX_KICK => {
                if let Some(k) = &self.dev.rings[TX].kick {
                    device::drain_eventfd(k);
                }
                self.receive(cx, batch)
            }
            _ => RxState::Drained,
        }
    }

    fn enqueue(&mut self, frame: &[u8], cx: &mut PortCx<'_>) {
        self.deliver(&[0u8; features::NET_HDR_LEN], frame, cx);
    }

    fn accepts(&self) -> Accepts {
        let f = self.dev.features;
        Accepts {
            csum: features::has(f, features::VIRTIO_NET_F_GUEST_CSUM),
            tso4: features::has(f, features::VIRTIO_NET_F_GUEST_TSO4),
            tso6: features::has(f, features::VIRTIO_NET_F_GUEST_TSO6),
            ecn: features::has(f, features::VIRTIO_NET_F_GUEST_ECN),
        }
    }

    fn enqueue_offload(&mut self, frame: &[u8], offload: &Offload, cx: &mut PortCx<'_>) {
        self.deliver(&header_of(offload), frame, cx);
    }

    fn flush(&mut self, cx: &mut PortCx<'_>) -> bool {
        if !self.backlog.is_empty() {
            self.drain_backlog(cx);
        } else if let Err(e) = self.dev.signal(RX) {
            self.ring_error(e, cx);
        }
        // Held frames are retried on the guest's kick, not on a timer.
        false
    }

    fn tick(&mut self, cx: &mut PortCx<'_>) {
        self.note_link(cx);
        // A kick lost to a misbehaving guest costs at most a second.
        if !self.backlog.is_empty() {
            self.drain_backlog(cx);
        }
    }

    fn discard_queued(&mut self, cx: &mut PortCx<'_>) {
        let moved = self.backlog.clear();
        crate::ports::count_moved(cx.counters, moved);
    }

    fn deregister(&mut self, registry: &mio::Registry) {
        self.unregister_kick(RX, registry);
        self.unregister_kick(TX, registry);
        // Harmless if it never got registered.
        let raw = self.shared.notify.as_raw_fd();
        let _ = registry.deregister(&mut mio::unix::SourceFd(&raw));
    }
}

impl Drop for VhostUserPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.shared.stop_thread();
        self.dev.reset();
    }
}
