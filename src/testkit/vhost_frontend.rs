//! A vhost-user *frontend* (the part QEMU plays) for tests and benchmarks:
//! it connects to a vhost-user net backend (ulan's vhost-user port, DPDK's
//! vhost PMD), hands it guest memory of its own and drives queue 0 (RX,
//! device to driver) and queue 1 (TX, driver to device) as a virtio-net
//! driver would, so frame rates can be measured without booting guests.
//!
//! The protocol is the `vhost` crate's frontend; the rings are ours
//! ([`ring`]), laid out in a sealed memfd shared with the backend. Every
//! descriptor owns one buffer for life, so the hot paths write lengths and
//! ring entries only, allocate nothing and make no syscall unless the
//! backend asks for a kick.
//!
//! ```no_run
//! # use ulan::testkit::vhost_frontend::VhostFrontend;
//! let mut tx = VhostFrontend::builder("/run/ulan/p0.sock").connect()?;
//! let mut rx = VhostFrontend::builder("/run/ulan/p1.sock").connect()?;
//! let frame = [0u8; 60];
//! tx.send(&[&frame[..]]);
//! rx.wait_rx(std::time::Duration::from_secs(1))?;
//! rx.recv(|f| assert_eq!(f.len(), 60));
//! # Ok::<(), ulan::testkit::vhost_frontend::VhostFrontendError>(())
//! ```

pub mod ring;
pub mod testpmd;
pub mod traffic;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use ring::{DriverRing, RingLayout, VIRTQ_DESC_F_WRITE};

/// virtio-net feature bits (virtio 1.x 5.1.3) and vhost-user's own.
pub mod features {
    pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
    pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
    pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
    pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
    pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
    pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
    pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
    pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
    pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
    pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
    pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
    pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
    pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
    pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
}
use features::*;

/// The virtio-net header's size with VERSION_1 (virtio 1.x 5.1.6).
pub const NET_HDR_LEN: usize = 12;
/// The RX queue's index (device to driver).
pub const RX_QUEUE: usize = 0;
/// The TX queue's index (driver to device).
pub const TX_QUEUE: usize = 1;
/// RX re-posts buffers in steps of this many within one `recv`.
const RX_PUBLISH_EVERY: usize = 64;
/// Buffer size per descriptor in the default mode.
pub const SMALL_BUFFER: usize = 2048;
/// Buffer size per descriptor with [`VhostFrontendBuilder::big_frames`]:
/// a 64 KiB frame and its header.
pub const BIG_BUFFER: usize = 65536 + NET_HDR_LEN;

/// Everything that can go wrong; nothing in this module panics.
#[derive(Debug, thiserror::Error)]
pub enum VhostFrontendError {
    #[error("cannot connect to the vhost-user backend at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("vhost-user {step} failed: {source} (is the backend alive and a virtio-net device?)")]
    Protocol {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("the backend does not offer {0}, which this frontend needs")]
    MissingFeature(&'static str),
    #[error("guest memory: {op} failed: {source}")]
    Memory { op: &'static str, source: io::Error },
    #[error(
        "guest memory of {have} bytes is too small: rings and buffers need {need} \
         (raise memory_size or lower queue_size)"
    )]
    MemoryTooSmall { need: usize, have: usize },
    #[error("queue size {0} is invalid: it must be a power of two from 2 to 1024")]
    QueueSize(u16),
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("waiting on a call eventfd: {0}")]
    Wait(io::Error),
    #[error("a frame of {len} bytes does not fit a descriptor's {cap}-byte buffer")]
    FrameTooBig { len: usize, cap: usize },
}

type Result<T> = std::result::Result<T, VhostFrontendError>;

fn proto(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostFrontendError {
    move |source| VhostFrontendError::Protocol { step, source }
}

/// The virtio-net header (VERSION_1 layout, little endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHeader {
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// VIRTIO_NET_HDR_F_DATA_VALID.
    pub const F_DATA_VALID: u8 = 2;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_ECN: u8 = 0x80;

    pub fn to_bytes(&self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; NET_HDR_LEN]) -> NetHeader {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }
}

/// What was offered and agreed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// GET_FEATURES' answer.
    pub backend_features: u64,
    /// What SET_FEATURES acked (the intersection with what we asked for).
    pub features: u64,
    /// GET_PROTOCOL_FEATURES' answer (0 without PROTOCOL_FEATURES).
    pub backend_protocol_features: u64,
    /// What SET_PROTOCOL_FEATURES acked.
    pub protocol_features: u64,
    pub event_idx: bool,
    pub mrg_rxbuf: bool,
    pub reply_ack: bool,
    /// Queue size of both queues.
    pub queue_size: u16,
    /// Bytes per RX buffer (header included).
    pub rx_buffer: usize,
    /// Bytes per TX buffer (header included).
    pub tx_buffer: usize,
}

impl Negotiated {
    pub fn has(&self, feature: u64) -> bool {
        self.features & feature == feature
    }
}

/// Counters of one frontend (ours, not the backend's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendStats {
    /// Frames posted on TX (send and blast).
    pub tx_frames: u64,
    /// Frame bytes posted on TX (headers excluded).
    pub tx_bytes: u64,
    /// TX descriptors the device gave back.
    pub tx_completed: u64,
    /// Kicks (eventfd writes) on TX.
    pub tx_kicks: u64,
    /// Frames `send` dropped because they do not fit a TX buffer.
    pub tx_oversize: u64,
    /// Frames received (handed to the callback).
    pub rx_frames: u64,
    /// Frame bytes received (headers excluded).
    pub rx_bytes: u64,
    /// Kicks on RX (after re-posting buffers).
    pub rx_kicks: u64,
    /// Used entries with an id that is not ours or not outstanding, or a
    /// length beyond the buffer, on either queue.
    pub bad_used: u64,
    /// Received frames dropped as malformed: shorter than the header, or
    /// a num_buffers of 0 or more than the ring holds.
    pub rx_malformed: u64,
}

/// How to connect. Defaults: 64 MiB of memory, queues of 256, EVENT_IDX
/// and MRG_RXBUF if the backend offers them, 2 KiB buffers.
#[derive(Clone, Debug)]
pub struct VhostFrontendBuilder {
    path: PathBuf,
    memory_size: usize,
    queue_size: u16,
    event_idx: bool,
    mrg_rxbuf: bool,
    big_frames: bool,
    extra_features: u64,
    timeout: Duration,
}

impl VhostFrontendBuilder {
    /// Guest memory size in bytes (rounded up to a page).
    pub fn memory_size(mut self, bytes: usize) -> Self {
        self.memory_size = bytes;
        self
    }

    /// Size of both queues: a power of two from 2 to 1024.
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = n;
        self
    }

    /// Ask for VIRTIO_RING_F_EVENT_IDX (default true; used if offered).
    pub fn event_idx(mut self, on: bool) -> Self {
        self.event_idx = on;
        self
    }

    /// Ask for VIRTIO_NET_F_MRG_RXBUF (default true; used if offered).
    pub fn mrg_rxbuf(mut self, on: bool) -> Self {
        self.mrg_rxbuf = on;
        self
    }

    /// 64 KiB + header buffers instead of 2 KiB: TX can send frames up to
    /// 64 KiB (e.g. GSO), and RX takes them whole when MRG_RXBUF is off.
    pub fn big_frames(mut self, on: bool) -> Self {
        self.big_frames = on;
        self
    }

    /// More virtio feature bits to ask for (offloads, for offload tests);
    /// only what the backend offers is acked.
    pub fn features(mut self, bits: u64) -> Self {
        self.extra_features = bits;
        self
    }

    /// How long to retry connecting, and to wait for each reply.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn connect(self) -> Result<VhostFrontend> {
        VhostFrontend::connect_with(self)
    }
}

/// A memfd mapped shared, sealed against resizing.
struct GuestMemory {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and freed once, in Drop.
unsafe impl Send for GuestMemory {}

impl GuestMemory {
    fn new(len: usize) -> Result<GuestMemory> {
        let mem_err = |op| move |source| VhostFrontendError::Memory { op, source };
        let len = len.div_ceil(4096).max(1) * 4096;
        // SAFETY: a valid C string; the fd is ours when non-negative.
        let raw = unsafe {
            libc::memfd_create(
                c"ulan-vhost-frontend".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(mem_err("memfd_create")(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscalls on our fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(mem_err("ftruncate")(io::Error::last_os_error()));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(mem_err("sealing the memfd")(io::Error::last_os_error()));
        }
        // SAFETY: a new shared mapping of the whole file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(mem_err("mmap")(io::Error::last_os_error()));
        }
        Ok(GuestMemory {
            fd,
            base: p.cast(),
            len,
        })
    }

    /// The bytes at guest physical address `gpa` (= offset).
    ///
    /// # Safety
    /// The range must be inside the memory and not be written by the
    /// device while the slice lives.
    unsafe fn slice(&self, gpa: usize, len: usize) -> &[u8] {
        debug_assert!(gpa + len <= self.len);
        // SAFETY: per the caller.
        unsafe { std::slice::from_raw_parts(self.base.add(gpa), len) }
    }

    /// # Safety
    /// As [`GuestMemory::slice`], and not read by the device either.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, gpa: usize, len: usize) -> &mut [u8] {
        debug_assert!(gpa + len <= self.len);
        // SAFETY: per the caller.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(gpa), len) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once; the rings that point into it
        // are dropped before (field order of VhostFrontend).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// One queue: its ring, its buffers (descriptor `i` owns buffer `i`), its
/// eventfds and which descriptors the device holds.
struct Queue {
    ring: DriverRing,
    buf_base: usize,
    buf_stride: usize,
    buf_len: usize,
    kick: EventFd,
    call: EventFd,
    /// Descriptor ids the driver holds (TX: free; RX: unused, all posted).
    free: Vec<u16>,
    /// Whether the device holds descriptor `i`.
    outstanding: Vec<bool>,
}

impl Queue {
    fn buf_gpa(&self, id: u16) -> usize {
        self.buf_base + id as usize * self.buf_stride
    }

    /// Kicks if the device asked for it; returns whether it did.
    fn kick_if_needed(&mut self) -> bool {
        if self.ring.needs_kick() {
            // A full eventfd counter (it cannot be, we write 1s) or a
            // closed backend: the next poll notices either way.
            let _ = self.kick.write(1);
            return true;
        }
        false
    }
}

/// One descriptor as [`VhostFrontend::post_raw`] writes it, unchecked.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawDesc {
    pub id: u16,
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A vhost-user net frontend with its own guest memory, RX and TX queues.
/// Dropping it closes the socket (the backend sees the session end), the
/// eventfds and the memory.
pub struct VhostFrontend {
    // Field order is drop order: the session first, the memory last.
    frontend: Frontend,
    rx: Queue,
    tx: Queue,
    mem: GuestMemory,
    negotiated: Negotiated,
    stats: FrontendStats,
    /// RX: frames spanning several buffers are gathered here.
    scratch: Vec<u8>,
    /// Blast mode: the frame every TX buffer holds, and which buffers
    /// must have it written again (send overwrote them, or the device held
    /// them when blast_prepare ran).
    template: Option<Vec<u8>>,
    stale: Vec<bool>,
    socket: RawFd,
}

impl VhostFrontend {
    /// Starts a builder for the backend listening at `path`.
    pub fn builder(path: impl AsRef<Path>) -> VhostFrontendBuilder {
        VhostFrontendBuilder {
            path: path.as_ref().to_path_buf(),
            memory_size: 64 << 20,
            queue_size: 256,
            event_idx: true,
            mrg_rxbuf: true,
            big_frames: false,
            extra_features: 0,
            timeout: Duration::from_secs(5),
        }
    }

    /// Connects with the defaults.
    pub fn connect(path: impl AsRef<Path>) -> Result<VhostFrontend> {
        Self::builder(path).connect()
    }

    fn connect_with(b: VhostFrontendBuilder) -> Result<VhostFrontend> {
        if !ring::valid_size(b.queue_size) {
            return Err(VhostFrontendError::QueueSize(b.queue_size));
        }
        let stream = connect_retry(&b.path, b.timeout)?;
        let socket = stream.as_raw_fd();
        let mut fe = Frontend::from_stream(stream, 2);

        // Features: always VERSION_1 and PROTOCOL_FEATURES; the options if
        // offered; whatever else the caller asked for if offered.
        let offered = fe.get_features().map_err(proto("GET_FEATURES"))?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostFrontendError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let mut want = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | b.extra_features;
        if b.event_idx {
            want |= VIRTIO_RING_F_EVENT_IDX;
        }
        if b.mrg_rxbuf {
            want |= VIRTIO_NET_F_MRG_RXBUF;
        }
        let acked = offered & want;

        let (mut offered_p, mut acked_p) = (0, 0);
        if acked & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let p = fe
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            offered_p = p.bits();
            let ours = p & VhostUserProtocolFeatures::REPLY_ACK;
            fe.set_protocol_features(ours)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            acked_p = ours.bits();
        }
        let reply_ack = acked_p & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        if reply_ack {
            // Every later message asks for an ack, so a refusal is an
            // error here, not a silent stall.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        fe.set_owner().map_err(proto("SET_OWNER"))?;
        fe.set_features(acked).map_err(proto("SET_FEATURES"))?;

        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
        let mrg_rxbuf = acked & VIRTIO_NET_F_MRG_RXBUF != 0;
        let size = b.queue_size;
        let n = size as usize;
        let buf_len = if b.big_frames {
            BIG_BUFFER
        } else {
            SMALL_BUFFER
        };
        // Mergeable RX buffers stay small (frames span several).
        let rx_len = if mrg_rxbuf { SMALL_BUFFER } else { buf_len };
        let stride = |len: usize| len.div_ceil(64) * 64;
        let rx_layout = RingLayout::at(0, size);
        let tx_layout = RingLayout::at(rx_layout.end, size);
        let rx_bufs = tx_layout.end;
        let tx_bufs = rx_bufs + n * stride(rx_len);
        let need = tx_bufs + n * stride(buf_len);
        if need > b.memory_size {
            return Err(VhostFrontendError::MemoryTooSmall {
                need,
                have: b.memory_size,
            });
        }
        let mem = GuestMemory::new(b.memory_size)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.len as u64,
            userspace_addr: mem.base as u64,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        };
        fe.set_mem_table(&[region])
            .map_err(proto("SET_MEM_TABLE"))?;

        let new_queue = |layout: RingLayout, base: usize, len: usize| -> Result<Queue> {
            Ok(Queue {
                // SAFETY: need <= memory size, so the layout is inside the
                // mapping, which outlives the ring (drop order).
                ring: unsafe { DriverRing::new(mem.base, layout, event_idx) },
                buf_base: base,
                buf_stride: stride(len),
                buf_len: len,
                kick: EventFd::new(EFD_NONBLOCK).map_err(VhostFrontendError::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(VhostFrontendError::EventFd)?,
                free: Vec::with_capacity(n),
                outstanding: vec![false; n],
            })
        };
        let mut rx = new_queue(rx_layout, rx_bufs, rx_len)?;
        let mut tx = new_queue(tx_layout, tx_bufs, buf_len)?;
        // Polling mode: no calls until wait_rx/wait_tx ask for one.
        rx.ring.set_interrupts(false);
        tx.ring.set_interrupts(false);
        for id in 0..size {
            let gpa = rx.buf_gpa(id) as u64;
            rx.ring
                .set_desc(id, gpa, rx.buf_len as u32, VIRTQ_DESC_F_WRITE);
            let gpa = tx.buf_gpa(id) as u64;
            tx.ring.set_desc(id, gpa, 0, 0);
            tx.free.push(size - 1 - id);
        }
        for (index, q, layout) in [(RX_QUEUE, &rx, rx_layout), (TX_QUEUE, &tx, tx_layout)] {
            let base = mem.base as u64;
            fe.set_vring_num(index, size)
                .map_err(proto("SET_VRING_NUM"))?;
            fe.set_vring_base(index, 0)
                .map_err(proto("SET_VRING_BASE"))?;
            let addr = VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: base + layout.desc as u64,
                used_ring_addr: base + layout.used as u64,
                avail_ring_addr: base + layout.avail as u64,
                log_addr: None,
            };
            fe.set_vring_addr(index, &addr)
                .map_err(proto("SET_VRING_ADDR"))?;
            fe.set_vring_call(index, &q.call)
                .map_err(proto("SET_VRING_CALL"))?;
            fe.set_vring_kick(index, &q.kick)
                .map_err(proto("SET_VRING_KICK"))?;
        }
        if acked & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            for index in [RX_QUEUE, TX_QUEUE] {
                fe.set_vring_enable(index, true)
                    .map_err(proto("SET_VRING_ENABLE"))?;
            }
        }
        // Fill RX and kick both rings once: a ring starts on its first kick.
        for id in 0..size {
            rx.ring.push(id);
            rx.outstanding[id as usize] = true;
        }
        rx.ring.publish();
        rx.ring.needs_kick();
        let _ = rx.kick.write(1);
        let _ = tx.kick.write(1);

        let negotiated = Negotiated {
            backend_features: offered,
            features: acked,
            backend_protocol_features: offered_p,
            protocol_features: acked_p,
            event_idx,
            mrg_rxbuf,
            reply_ack,
            queue_size: size,
            rx_buffer: rx_len,
            tx_buffer: buf_len,
        };
        Ok(VhostFrontend {
            frontend: fe,
            rx,
            tx,
            mem,
            negotiated,
            stats: FrontendStats::default(),
            scratch: Vec::with_capacity(if mrg_rxbuf { BIG_BUFFER } else { 0 }),
            template: None,
            stale: vec![false; n],
            socket,
        })
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Our counters so far.
    pub fn stats(&self) -> FrontendStats {
        self.stats
    }

    /// The largest frame `send` takes (TX buffer minus the header).
    pub fn max_tx_frame(&self) -> usize {
        self.tx.buf_len - NET_HDR_LEN
    }

    /// TX descriptors the driver holds right now (without reclaiming).
    pub fn tx_free(&self) -> usize {
        self.tx.free.len()
    }

    /// Whether the backend still holds the session: false once it closed
    /// the socket (or wrote to it, which a net backend does not do unless
    /// asked).
    pub fn is_connected(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.socket,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the fd lives as long as the frontend.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r == 0
    }

    /// The raw vhost-user session, for protocol tests (e.g. GET_VRING_BASE
    /// to stop a ring). Using it to change memory or rings under the
    /// frontend breaks the frontend.
    pub fn session(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Bytes of guest memory: guest physical addresses `0..memory_len()`
    /// are inside it, anything else is outside.
    pub fn memory_len(&self) -> usize {
        self.mem.len
    }

    /// **Hostile-frontend tests only; the frontend is broken afterwards**
    /// (drop it). Overwrites descriptors of `queue` ([`RX_QUEUE`] or
    /// [`TX_QUEUE`]) with `descs`, writes `heads` into the next available
    /// slots (any value, in range or not), moves the available index by
    /// `heads.len() + extra` (an `extra` past the ring size is a lie) and
    /// kicks the queue. Descriptor ids are taken modulo the queue size.
    pub fn post_raw(&mut self, queue: usize, descs: &[RawDesc], heads: &[u16], extra: u16) {
        let q = if queue == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        for d in descs {
            q.ring.set_desc_raw(d.id, d.addr, d.len, d.flags, d.next);
        }
        for &h in heads {
            q.ring.push(h);
        }
        for _ in 0..extra {
            q.ring.push(0);
        }
        q.ring.publish();
        let _ = q.kick.write(1);
    }

    /// Takes back the TX descriptors the device is done with.
    fn reclaim_tx(&mut self) {
        let n = self.tx.ring.used_pending();
        if n == 0 {
            return;
        }
        let size = self.tx.ring.size() as u32;
        for i in 0..n {
            let (id, _len) = self.tx.ring.used_at(i);
            if id < size && self.tx.outstanding[id as usize] {
                self.tx.outstanding[id as usize] = false;
                self.tx.free.push(id as u16);
            } else {
                self.stats.bad_used += 1;
            }
        }
        self.tx.ring.consume(n);
        self.stats.tx_completed += n as u64;
    }

    fn finish_tx(&mut self, posted: usize) {
        if posted == 0 {
            return;
        }
        self.tx.ring.publish();
        if self.tx.kick_if_needed() {
            self.stats.tx_kicks += 1;
        }
    }

    /// Sends frames with an all-zero header; returns how many were taken
    /// from the front of `frames` (posted, or dropped and counted in
    /// `tx_oversize` when larger than [`Self::max_tx_frame`]). Fewer than
    /// all means the TX ring is full: call again (or [`Self::wait_tx`]).
    pub fn send(&mut self, frames: &[&[u8]]) -> usize {
        self.send_inner(frames.len(), |i| (NetHeader::default(), frames[i]))
    }

    /// Like [`Self::send`] with a header per frame (offload tests).
    pub fn send_with_header(&mut self, frames: &[(NetHeader, &[u8])]) -> usize {
        self.send_inner(frames.len(), |i| frames[i])
    }

    fn send_inner<'a>(
        &mut self,
        count: usize,
        frame: impl Fn(usize) -> (NetHeader, &'a [u8]),
    ) -> usize {
        self.reclaim_tx();
        let max = self.max_tx_frame();
        let mut taken = 0;
        let mut posted = 0;
        while taken < count {
            let (hdr, f) = frame(taken);
            if f.len() > max {
                self.stats.tx_oversize += 1;
                taken += 1;
                continue;
            }
            let Some(id) = self.tx.free.pop() else { break };
            let gpa = self.tx.buf_gpa(id);
            // SAFETY: a free buffer: the device does not touch it; inside
            // the memory by layout.
            let buf = unsafe { self.mem.slice_mut(gpa, NET_HDR_LEN + f.len()) };
            buf[..NET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
            buf[NET_HDR_LEN..].copy_from_slice(f);
            self.stale[id as usize] = true;
            self.tx
                .ring
                .set_desc_len(id, (NET_HDR_LEN + f.len()) as u32);
            self.tx.outstanding[id as usize] = true;
            self.tx.ring.push(id);
            self.stats.tx_frames += 1;
            self.stats.tx_bytes += f.len() as u64;
            taken += 1;
            posted += 1;
        }
        self.finish_tx(posted);
        taken
    }

    /// Blast mode, step 1: every TX buffer gets `frame` (after a zero
    /// header), so [`Self::blast`] only patches bytes in place. Buffers the
    /// device holds now get it when they come back.
    pub fn blast_prepare(&mut self, frame: &[u8]) -> Result<()> {
        if frame.len() > self.max_tx_frame() {
            return Err(VhostFrontendError::FrameTooBig {
                len: frame.len(),
                cap: self.max_tx_frame(),
            });
        }
        let mut t = vec![0u8; NET_HDR_LEN + frame.len()];
        t[NET_HDR_LEN..].copy_from_slice(frame);
        self.reclaim_tx();
        for id in 0..self.tx.ring.size() {
            self.stale[id as usize] = true;
        }
        for i in 0..self.tx.free.len() {
            let id = self.tx.free[i];
            self.write_template(id, &t);
        }
        self.template = Some(t);
        Ok(())
    }

    fn write_template(&mut self, id: u16, t: &[u8]) {
        let gpa = self.tx.buf_gpa(id);
        // SAFETY: a free buffer, inside the memory (checked length).
        let buf = unsafe { self.mem.slice_mut(gpa, t.len()) };
        buf.copy_from_slice(t);
        self.tx.ring.set_desc_len(id, t.len() as u32);
        self.stale[id as usize] = false;
    }

    /// Blast mode, step 2: posts up to `max` copies of the prepared frame,
    /// calling `patch` on each (the frame bytes in guest memory, header
    /// excluded) to rewrite e.g. a sequence number. Returns how many were
    /// posted (0 without [`Self::blast_prepare`]).
    pub fn blast(&mut self, max: usize, mut patch: impl FnMut(&mut [u8])) -> usize {
        let Some(t) = self.template.take() else {
            return 0;
        };
        self.reclaim_tx();
        let flen = t.len() - NET_HDR_LEN;
        let mut posted = 0;
        while posted < max {
            let Some(id) = self.tx.free.pop() else { break };
            if self.stale[id as usize] {
                self.write_template(id, &t);
            }
            let gpa = self.tx.buf_gpa(id) + NET_HDR_LEN;
            // SAFETY: a free buffer, inside the memory.
            patch(unsafe { self.mem.slice_mut(gpa, flen) });
            self.tx.outstanding[id as usize] = true;
            self.tx.ring.push(id);
            posted += 1;
        }
        self.stats.tx_frames += posted as u64;
        self.stats.tx_bytes += (posted * flen) as u64;
        self.template = Some(t);
        self.finish_tx(posted);
        posted
    }

    /// Hands every received frame (header stripped) to `f`, re-posts the
    /// buffers; returns the number of frames.
    pub fn recv(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        self.recv_with_header(|_, frame| f(frame))
    }

    /// Like [`Self::recv`], with each frame's virtio-net header (for a
    /// frame spanning several buffers, the first one's).
    pub fn recv_with_header(&mut self, mut f: impl FnMut(&NetHeader, &[u8])) -> usize {
        let pending = self.rx.ring.used_pending();
        if pending == 0 {
            return 0;
        }
        let size = self.rx.ring.size();
        let cap = self.rx.buf_len as u32;
        let mut i = 0u16;
        let mut frames = 0usize;
        let mut reposted = 0usize;
        let mut published = 0usize;
        'entries: while i < pending {
            // Hand buffers back as we go, so a long batch does not leave
            // the device without room.
            if reposted - published >= RX_PUBLISH_EVERY {
                self.rx.ring.publish();
                published = reposted;
            }
            let (id, len) = self.rx.ring.used_at(i);
            if id >= size as u32 || !self.rx.outstanding[id as usize] {
                // Not ours: nothing to re-post.
                self.stats.bad_used += 1;
                i += 1;
                continue;
            }
            let id = id as u16;
            if len > cap {
                self.stats.bad_used += 1;
                self.repost_rx(id);
                reposted += 1;
                i += 1;
                continue;
            }
            let gpa = self.rx.buf_gpa(id);
            // SAFETY: the device gave this buffer back; len <= buffer.
            let first = unsafe { self.mem.slice(gpa, len as usize) };
            let Some(hdr_bytes) = first.first_chunk::<NET_HDR_LEN>() else {
                self.stats.rx_malformed += 1;
                self.repost_rx(id);
                reposted += 1;
                i += 1;
                continue;
            };
            let hdr = NetHeader::from_bytes(hdr_bytes);
            let nbufs = if self.negotiated.mrg_rxbuf {
                hdr.num_buffers
            } else {
                1
            };
            if nbufs == 0 || nbufs > size {
                self.stats.rx_malformed += 1;
                self.repost_rx(id);
                reposted += 1;
                i += 1;
                continue;
            }
            if nbufs > pending - i {
                // The rest of this frame is not published yet.
                break;
            }
            if nbufs == 1 {
                let frame = &first[NET_HDR_LEN..];
                self.stats.rx_bytes += frame.len() as u64;
                f(&hdr, frame);
                self.repost_rx(id);
                reposted += 1;
                i += 1;
            } else {
                self.scratch.clear();
                self.scratch.extend_from_slice(&first[NET_HDR_LEN..]);
                self.repost_rx(id);
                reposted += 1;
                for k in 1..nbufs {
                    let (id, len) = self.rx.ring.used_at(i + k);
                    if id >= size as u32 || !self.rx.outstanding[id as usize] || len > cap {
                        self.stats.bad_used += 1;
                        self.stats.rx_malformed += 1;
                        if id < size as u32 && self.rx.outstanding[id as usize] {
                            self.repost_rx(id as u16);
                            reposted += 1;
                        }
                        i += k + 1;
                        continue 'entries;
                    }
                    let gpa = self.rx.buf_gpa(id as u16);
                    // SAFETY: as above.
                    let part = unsafe { self.mem.slice(gpa, len as usize) };
                    self.scratch.extend_from_slice(part);
                    self.repost_rx(id as u16);
                    reposted += 1;
                }
                self.stats.rx_bytes += self.scratch.len() as u64;
                f(&hdr, &self.scratch);
                i += nbufs;
            }
            frames += 1;
        }
        self.rx.ring.consume(i);
        self.stats.rx_frames += frames as u64;
        if reposted > 0 {
            self.rx.ring.publish();
            if self.rx.kick_if_needed() {
                self.stats.rx_kicks += 1;
            }
        }
        frames
    }

    /// Gives RX buffer `id` back to the device (visible at the next
    /// publish). The buffer's contents are not read after this within a
    /// batch: the device cannot see it before publish.
    fn repost_rx(&mut self, id: u16) {
        self.rx.ring.push(id);
    }

    /// Whether received frames wait (no syscall).
    pub fn rx_pending(&self) -> bool {
        self.rx.ring.used_pending() > 0
    }

    /// Waits until a frame arrives or `timeout` passes; returns whether one
    /// waits. Sleeps on the RX call eventfd (poll(2)) only when nothing is
    /// pending.
    pub fn wait_rx(&mut self, timeout: Duration) -> Result<bool> {
        wait_queue(&mut self.rx, timeout, |q| q.ring.used_pending() > 0)
    }

    /// Waits until the device gives back a TX descriptor (or one is free
    /// already), up to `timeout`; returns whether one is free.
    pub fn wait_tx(&mut self, timeout: Duration) -> Result<bool> {
        if !self.tx.free.is_empty() {
            return Ok(true);
        }
        let ok = wait_queue(&mut self.tx, timeout, |q| q.ring.used_pending() > 0)?;
        self.reclaim_tx();
        Ok(ok && !self.tx.free.is_empty())
    }

    /// Waits until the device has given back every TX descriptor (all sent
    /// frames were consumed), up to `timeout`.
    pub fn flush_tx(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reclaim_tx();
            if self.tx.free.len() == self.tx.ring.size() as usize {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            wait_queue(
                &mut self.tx,
                (deadline - now).min(Duration::from_millis(10)),
                |q| q.ring.used_pending() > 0,
            )?;
        }
    }
}

/// Asks for a call, re-checks, sleeps on the call eventfd, stops asking.
fn wait_queue(q: &mut Queue, timeout: Duration, ready: impl Fn(&Queue) -> bool) -> Result<bool> {
    if ready(q) {
        return Ok(true);
    }
    let deadline = Instant::now() + timeout;
    q.ring.set_interrupts(true);
    let result = loop {
        if ready(q) {
            break Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            break Ok(false);
        }
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd: q.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                break Err(VhostFrontendError::Wait(e));
            }
        }
        // Non-blocking: EAGAIN when it was not signalled.
        let _ = q.call.read();
    };
    q.ring.set_interrupts(false);
    result
}

/// Connects, retrying while the socket is missing or refuses (the backend
/// may be starting), with replies bounded by `timeout`.
fn connect_retry(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(timeout))
                    .and_then(|_| s.set_write_timeout(Some(timeout)))
                    .map_err(|source| VhostFrontendError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })?;
                return Ok(s);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(VhostFrontendError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontend_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<VhostFrontend>();
    }

    #[test]
    fn net_header_round_trips_little_endian() {
        let h = NetHeader {
            flags: NetHeader::F_NEEDS_CSUM,
            gso_type: NetHeader::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(&b[4..6], &1448u16.to_le_bytes());
        assert_eq!(&b[10..12], &[3, 0]);
        assert_eq!(NetHeader::from_bytes(&b), h);
    }

    #[test]
    fn guest_memory_is_sealed_and_shared() {
        let m = GuestMemory::new(1 << 20).unwrap();
        // SAFETY: plain fcntl on our fd.
        let seals = unsafe { libc::fcntl(m.fd.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
        // SAFETY: plain ftruncate: it must be refused.
        assert_ne!(unsafe { libc::ftruncate(m.fd.as_raw_fd(), 4096) }, 0);
        // A second mapping of the fd sees our writes (what the backend does).
        // SAFETY: inside the memory; nothing else uses it.
        unsafe { m.slice_mut(4096, 4) }.copy_from_slice(b"ulan");
        let mut got = [0u8; 4];
        // SAFETY: pread into a local buffer.
        let r = unsafe { libc::pread(m.fd.as_raw_fd(), got.as_mut_ptr().cast(), 4, 4096) };
        assert_eq!(r, 4);
        assert_eq!(&got, b"ulan");
    }

    #[test]
    fn bad_queue_size_and_missing_socket_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = VhostFrontend::builder(dir.path().join("nope"))
            .queue_size(100)
            .connect()
            .err()
            .unwrap();
        assert!(matches!(e, VhostFrontendError::QueueSize(100)), "{e}");
        let e = VhostFrontend::builder(dir.path().join("nope"))
            .timeout(Duration::from_millis(50))
            .connect()
            .err()
            .unwrap();
        assert!(matches!(e, VhostFrontendError::Connect { .. }), "{e}");
    }
}
