//! The control half of a vhost-user port: one thread per port that
//! accepts the frontend on the port's socket and answers its protocol
//! messages (rust-vmm `vhost`), and tells the data plane what changed.
//!
//! Why a thread of its own: the protocol is blocking request/response with
//! file descriptors attached, and a frontend that sends half a message
//! must stall nobody but itself. The rings are never touched here; every
//! change that affects them is an [`Op`] the data plane applies between
//! batches, and this thread waits for its answer before replying to the
//! frontend (so GET_VRING_BASE returns a ring that has really stopped, and
//! old memory is out of use before SET_MEM_TABLE is acknowledged).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vm_memory::GuestMemoryMmap;

/// What the `vhost` crate expects back from memory messages (postcopy only).
type VhostUserMemoryRegionBase = u64;

use super::device::{RingSetup, MAX_QUEUE_SIZE, NUM_QUEUES};
use super::features;
use super::memory::{self, GuestMemory, RegionDesc};
use crate::ports::PortLink;
use crate::switch::stats::PortCounters;

/// How long the control thread waits for the data plane to apply a change.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// A change for the data plane.
pub enum Op {
    Features(u64),
    /// New guest memory, with the rings' addresses translated anew.
    Memory {
        mem: Arc<GuestMemoryMmap>,
        rings: [Option<RingAddrs>; NUM_QUEUES],
    },
    Start {
        index: usize,
        setup: RingSetup,
    },
    /// Stop a ring; the answer is its next available index.
    Stop {
        index: usize,
    },
    Call {
        index: usize,
        call: Option<File>,
    },
    Enable {
        index: usize,
        on: bool,
    },
    /// The frontend set protocol features: rings wait for SET_VRING_ENABLE.
    ProtocolInUse,
    /// The frontend is gone or reset the device.
    Reset,
}

#[derive(Debug, Clone, Copy)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

#[derive(Debug)]
pub enum Reply {
    Done,
    Base(u16),
    Refused(String),
}

/// What the control thread and the data plane share.
pub struct Shared {
    /// Control -> data plane: an [`Op`] is waiting.
    pub notify: File,
    /// Data plane -> control: close the connection (a ring error).
    pub kill: AtomicBool,
    /// Port removed: the thread ends.
    pub shutdown: AtomicBool,
    /// Wakes the thread's poll (shutdown, kill).
    pub wake: File,
    /// The live connection, to shut it down from the data plane.
    pub conn: Mutex<Option<UnixStream>>,
    /// Frontends refused (a second one while one is connected).
    pub refused: AtomicU64,
}

impl Shared {
    pub fn new() -> io::Result<Shared> {
        Ok(Shared {
            notify: eventfd()?,
            kill: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            wake: eventfd()?,
            conn: Mutex::new(None),
            refused: AtomicU64::new(0),
        })
    }

    /// Cuts the current frontend off (its messages stop being read).
    pub fn kill_connection(&self) {
        self.kill.store(true, Ordering::SeqCst);
        if let Ok(conn) = self.conn.lock() {
            if let Some(c) = conn.as_ref() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }

    pub fn stop_thread(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.kill_connection();
    }
}

/// Whether `f` is an eventfd. Kick and call fds are used on the data
/// plane; anything else could block it (a regular file on a filesystem
/// the frontend serves ignores O_NONBLOCK) or grow (a file written 8
/// bytes per signal). QEMU, DPDK and the testkit all send eventfds.
pub fn is_eventfd(f: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:[eventfd]")
}

pub fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: fd is new and ours.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The control thread's end of the op channel.
pub struct DeviceLink {
    pub ops: mpsc::Sender<(u64, Op)>,
    pub replies: mpsc::Receiver<(u64, Reply)>,
    pub shared: Arc<Shared>,
    seq: u64,
}

impl DeviceLink {
    pub fn new(
        ops: mpsc::Sender<(u64, Op)>,
        replies: mpsc::Receiver<(u64, Reply)>,
        shared: Arc<Shared>,
    ) -> Self {
        DeviceLink {
            ops,
            replies,
            shared,
            seq: 0,
        }
    }

    /// Hands `op` to the data plane and waits for its answer.
    fn call(&mut self, op: Op) -> Result<Reply, String> {
        self.seq += 1;
        let seq = self.seq;
        self.ops
            .send((seq, op))
            .map_err(|_| "the port is gone".to_string())?;
        let _ = (&self.shared.notify).write(&1u64.to_ne_bytes());
        let deadline = std::time::Instant::now() + OP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.replies.recv_timeout(left) {
                Ok((s, r)) if s == seq => return Ok(r),
                Ok(_) => continue, // an answer to an op that timed out earlier
                Err(_) => return Err("the data plane did not answer".to_string()),
            }
        }
    }
}

#[derive(Default)]
struct RingConfig {
    num: u16,
    /// The frontend's addresses: descriptor table, used ring, available ring.
    addrs: Option<(u64, u64, u64)>,
    base: u16,
    call: Option<File>,
    started: bool,
}

/// One frontend's session, as the `vhost` crate's request handler sees it.
pub struct Session {
    link: DeviceLink,
    log: PortLink,
    offered: u64,
    protocol: u64,
    regions: Vec<RegionDesc>,
    rings: [RingConfig; NUM_QUEUES],
}

fn refuse<T>(why: impl Into<String>) -> VuResult<T> {
    Err(VuError::ReqHandlerError(io::Error::other(why.into())))
}

impl Session {
    pub(super) fn new(link: DeviceLink, log: PortLink, offered: u64) -> Session {
        Session {
            link,
            log,
            offered,
            protocol: 0,
            regions: Vec::new(),
            rings: Default::default(),
        }
    }

    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = crate::ports::vhost_user::now_ms();
        self.log.warn(now, msg);
    }

    fn ring(&mut self, index: u32) -> VuResult<usize> {
        let i = index as usize;
        if i >= NUM_QUEUES {
            self.warn(format_args!(
                "the frontend named ring {index}; there are {NUM_QUEUES}"
            ));
            return refuse(format!("no ring {index}"));
        }
        Ok(i)
    }

    fn apply(&mut self, op: Op) -> VuResult<Reply> {
        match self.link.call(op) {
            Ok(Reply::Refused(why)) => {
                self.warn(format_args!("{why}"));
                refuse(why)
            }
            Ok(r) => Ok(r),
            Err(why) => refuse(why),
        }
    }

    fn ring_addrs(&self, i: usize) -> Option<RingAddrs> {
        let r = &self.rings[i];
        let (desc, used, avail) = r.addrs?;
        let n = u64::from(r.num.max(1));
        // Sizes of the split ring's three parts (event fields included).
        let desc = memory::translate(&self.regions, desc, 16 * n)?;
        let avail = memory::translate(&self.regions, avail, 6 + 2 * n)?;
        let used = memory::translate(&self.regions, used, 6 + 8 * n)?;
        Some(RingAddrs { desc, avail, used })
    }

    /// SET_VRING_ENABLE, answered here rather than by the `vhost` crate:
    /// the crate takes it only once PROTOCOL_FEATURES is acked in
    /// SET_FEATURES, which QEMU 7.2 never does (it treats the bit as
    /// negotiated once offered, as DPDK does), so the crate would drop
    /// every enable QEMU sends.
    fn enable_ring(&mut self, index: u32, num: u32) -> Result<(), String> {
        let i = index as usize;
        if i >= NUM_QUEUES || num > 1 {
            self.warn(format_args!("SET_VRING_ENABLE for ring {index} with {num}"));
            return Err("bad SET_VRING_ENABLE".into());
        }
        match self.apply(Op::Enable {
            index: i,
            on: num == 1,
        }) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn reply_ack(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// The data plane forgets this frontend.
    pub fn reset(&mut self) {
        let _ = self.link.call(Op::Reset);
        self.protocol = 0;
        self.regions.clear();
        self.rings = Default::default();
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered != 0 {
            self.warn(format_args!(
                "the frontend acked features {:#x} that were not offered",
                features & !self.offered
            ));
            return refuse("features not offered");
        }
        self.apply(Op::Features(features))?;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let table: Vec<RegionDesc> = ctx
            .iter()
            .map(|r| RegionDesc {
                guest_phys_addr: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        let mem = match GuestMemory::map(&table, files) {
            Ok(m) => m,
            Err(e) => {
                self.warn(format_args!("refused the memory table: {e}"));
                return refuse(e.to_string());
            }
        };
        self.regions = table;
        let mut rings = [None, None];
        for (i, slot) in rings.iter_mut().enumerate() {
            if self.rings[i].started {
                *slot = self.ring_addrs(i);
            }
        }
        tracing::debug!(port = %self.log.name, bytes = mem.mapped_bytes(), "guest memory mapped");
        self.apply(Op::Memory {
            mem: Arc::new(mem.mem),
            rings,
        })?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let i = self.ring(index)?;
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            self.warn(format_args!(
                "ring size {num} is not a power of two up to 32768"
            ));
            return refuse("bad ring size");
        }
        self.rings[i].num = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let i = self.ring(index)?;
        self.rings[i].addrs = Some((descriptor, used, available));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let i = self.ring(index)?;
        let Ok(base) = u16::try_from(base) else {
            return refuse("ring base over 65535");
        };
        self.rings[i].base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let i = self.ring(index)?;
        // Always answered: a frontend waits for this reply forever.
        let base = match self.apply(Op::Stop { index: i }) {
            Ok(Reply::Base(b)) => b,
            _ => self.rings[i].base,
        };
        self.rings[i].started = false;
        self.rings[i].base = base;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = self.ring(u32::from(index))?;
        let Some(kick) = fd else {
            self.warn(format_args!(
                "a ring without a kick eventfd (polling mode) is not supported"
            ));
            return refuse("no kick fd");
        };
        if !is_eventfd(&kick) {
            self.warn(format_args!("ring {i}'s kick fd is not an eventfd"));
            return refuse("kick fd not an eventfd");
        }
        if self.regions.is_empty() {
            return refuse("a ring was started before the memory table");
        }
        let Some(addrs) = self.ring_addrs(i) else {
            self.warn(format_args!(
                "ring {i}'s addresses are not in the memory table"
            ));
            return refuse("ring outside memory");
        };
        let r = &self.rings[i];
        let num = if r.num == 0 { 256 } else { r.num };
        let call = match &r.call {
            Some(c) => Some(c.try_clone().map_err(VuError::ReqHandlerError)?),
            None => None,
        };
        let setup = RingSetup {
            size: num,
            desc: addrs.desc,
            avail: addrs.avail,
            used: addrs.used,
            base: r.base,
            kick,
            call,
        };
        self.apply(Op::Start { index: i, setup })?;
        self.rings[i].started = true;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = self.ring(u32::from(index))?;
        if fd.as_ref().is_some_and(|f| !is_eventfd(f)) {
            self.warn(format_args!("ring {i}'s call fd is not an eventfd"));
            return refuse("call fd not an eventfd");
        }
        if self.rings[i].started {
            let call = match &fd {
                Some(c) => Some(c.try_clone().map_err(VuError::ReqHandlerError)?),
                None => None,
            };
            self.apply(Op::Call { index: i, call })?;
        }
        self.rings[i].call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.ring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(features::protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = features::protocol_features().bits();
        if features & !offered != 0 {
            self.warn(format_args!(
                "the frontend acked protocol features {:#x} that were not offered",
                features & !offered
            ));
            return refuse("protocol features not offered");
        }
        self.protocol = features;
        // With protocol features in use, rings start disabled until
        // SET_VRING_ENABLE (the frontend's reading of "negotiated").
        self.apply(Op::ProtocolInUse)?;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(1)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.enable_ring(index, u32::from(enable)).or_else(refuse)
    }

    fn get_config(&mut self, _o: u32, _s: u32, _f: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        refuse("CONFIG is not offered")
    }

    fn set_config(&mut self, _o: u32, _b: &[u8], _f: VhostUserConfigFlags) -> VuResult<()> {
        refuse("CONFIG is not offered")
    }

    fn set_gpu_socket(&mut self, _g: GpuBackend) -> VuResult<()> {
        refuse("not a GPU")
    }

    fn get_shared_object(&mut self, _u: VhostUserSharedMsg) -> VuResult<File> {
        refuse("SHARED_OBJECT is not offered")
    }

    fn get_inflight_fd(&mut self, _i: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        refuse("INFLIGHT_SHMFD is not offered")
    }

    fn set_inflight_fd(&mut self, _i: &VhostUserInflight, _f: File) -> VuResult<()> {
        refuse("INFLIGHT_SHMFD is not offered")
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(memory::MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        _r: &VhostUserSingleMemoryRegion,
        _f: File,
        _p: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        refuse("CONFIGURE_MEM_SLOTS is not offered")
    }

    fn remove_mem_region(&mut self, _r: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        refuse("CONFIGURE_MEM_SLOTS is not offered")
    }

    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _f: File,
    ) -> VuResult<Option<File>> {
        refuse("DEVICE_STATE is not offered")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        refuse("DEVICE_STATE is not offered")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        refuse("SHMEM is not offered")
    }

    fn set_log_base(&mut self, _l: &VhostUserLog, _f: File) -> VuResult<()> {
        refuse("LOG_SHMFD is not offered (no live migration)")
    }
}

/// Everything the control thread needs.
pub struct Control {
    pub listener: UnixListener,
    pub shared: Arc<Shared>,
    pub log: PortLink,
    pub offered: u64,
    pub ops: mpsc::Sender<(u64, Op)>,
    pub replies: mpsc::Receiver<(u64, Reply)>,
}

fn poll_fds(fds: &[&dyn AsFd], timeout_ms: i32) -> Vec<bool> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of pollfd.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r <= 0 {
        return vec![false; fds.len()];
    }
    p.iter().map(|x| x.revents != 0).collect()
}

impl Control {
    /// The thread's body: accept a frontend, serve it until it leaves or
    /// is cut off, forget it, wait for the next; until the port goes.
    pub fn run(self) {
        let Control {
            listener,
            shared,
            log,
            offered,
            ops,
            replies,
        } = self;
        let link = DeviceLink::new(ops, replies, shared.clone());
        let session = Arc::new(Mutex::new(Session::new(link, log, offered)));
        let _ = listener.set_nonblocking(true);
        while !shared.shutdown.load(Ordering::SeqCst) {
            let ready = poll_fds(&[&listener, &shared.wake], 1000);
            if ready[1] {
                super::device::drain_eventfd(&shared.wake);
            }
            if shared.shutdown.load(Ordering::SeqCst) {
                break;
            }
            let Ok((conn, _)) = listener.accept() else {
                continue;
            };
            let _ = conn.set_nonblocking(false);
            serve(conn, &listener, &shared, &session);
            if let Ok(mut s) = session.lock() {
                s.reset();
            }
        }
    }
}

/// Serves one frontend until it leaves or breaks the protocol.
fn serve(
    conn: UnixStream,
    listener: &UnixListener,
    shared: &Arc<Shared>,
    session: &Arc<Mutex<Session>>,
) {
    let peer = peer_pid(&conn);
    let Ok(clone) = conn.try_clone() else {
        return;
    };
    if let Ok(mut c) = shared.conn.lock() {
        *c = Some(clone);
    }
    shared.kill.store(false, Ordering::SeqCst);
    let mut handler = BackendReqHandler::from_stream(conn, session.clone());
    let watch = match handler.try_clone_connection() {
        Ok(w) => w,
        Err(_) => return,
    };
    let name = session
        .lock()
        .map(|s| s.log.name.clone())
        .unwrap_or_default();
    tracing::info!(port = %name, peer = peer.as_deref().unwrap_or("-"), "vhost-user frontend connected");
    loop {
        if shared.kill.load(Ordering::SeqCst) || shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let ready = poll_fds(&[&watch, listener, &shared.wake], 1000);
        if ready[2] {
            super::device::drain_eventfd(&shared.wake);
        }
        if ready[1] {
            refuse_others(listener, shared);
        }
        if !ready[0] {
            continue;
        }
        if !step(&mut handler, &watch, session, &name) {
            break;
        }
    }
    if let Ok(mut c) = shared.conn.lock() {
        *c = None;
    }
    let _ = watch.shutdown(std::net::Shutdown::Both);
}

/// Reads and answers one message; false when the session is over (the
/// frontend left, or broke the protocol and is cut off with a counted,
/// rate-limited warning).
pub(super) fn step(
    handler: &mut BackendReqHandler<Mutex<Session>>,
    watch: &UnixStream,
    session: &Mutex<Session>,
    name: &str,
) -> bool {
    let cut_off = |what: &dyn std::fmt::Display| {
        if let Ok(mut s) = session.lock() {
            s.warn(format_args!("vhost-user frontend cut off: {what}"));
            s.log.shared.counters.add(&PortCounters {
                protocol_errors: 1,
                ..Default::default()
            });
        }
    };
    match take_vring_enable(watch, session) {
        Ok(true) => return true,
        Ok(false) => {}
        Err(e) => {
            cut_off(&e);
            return false;
        }
    }
    match handler.handle_request() {
        Ok(()) => true,
        Err(VuError::Disconnected) => {
            tracing::info!(port = %name, "vhost-user frontend left");
            false
        }
        // The message was read whole and refused before it reached
        // ulan: the stream is still in step. QEMU sends
        // SET_VRING_ENABLE before it acks PROTOCOL_FEATURES (to
        // disable rings it does not use yet), which the crate refuses;
        // rings start disabled anyway, so nothing is lost.
        Err(e @ (VuError::InactiveFeature(_) | VuError::InactiveOperation(_))) => {
            tracing::debug!(port = %name, "vhost-user message ignored: {e}");
            true
        }
        // Anything else, a header cut short (PartialMessage) included:
        // the frontend broke the protocol.
        Err(e) => {
            cut_off(&e);
            false
        }
    }
}

const SET_VRING_ENABLE: u32 = 18;
const HDR_SIZE: usize = 12;

/// Handles the next message itself if it is SET_VRING_ENABLE (see
/// [`Session::enable_ring`]); leaves anything else to the crate.
fn take_vring_enable(conn: &UnixStream, session: &Mutex<Session>) -> io::Result<bool> {
    let mut hdr = [0u8; HDR_SIZE];
    // SAFETY: recv into a local buffer of the stated size.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            hdr.as_mut_ptr().cast(),
            HDR_SIZE,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != HDR_SIZE as isize {
        return Ok(false);
    }
    let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    tracing::trace!(request, flags, size, "vhost-user message");
    if request != SET_VRING_ENABLE || size != 8 {
        return Ok(false);
    }
    let mut msg = [0u8; HDR_SIZE + 8];
    use std::io::Read;
    (&*conn).read_exact(&mut msg)?;
    let index = u32::from_ne_bytes([msg[12], msg[13], msg[14], msg[15]]);
    let num = u32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
    let (result, ack) = match session.lock() {
        Ok(mut s) => (s.enable_ring(index, num), s.reply_ack()),
        Err(_) => return Err(io::Error::other("session lock poisoned")),
    };
    const NEED_REPLY: u32 = 1 << 3;
    if ack && flags & NEED_REPLY != 0 {
        let mut reply = [0u8; HDR_SIZE + 8];
        reply[0..4].copy_from_slice(&SET_VRING_ENABLE.to_ne_bytes());
        reply[4..8].copy_from_slice(&(0x1u32 | 0x4).to_ne_bytes());
        reply[8..12].copy_from_slice(&8u32.to_ne_bytes());
        reply[12..20].copy_from_slice(&u64::from(result.is_err()).to_ne_bytes());
        (&*conn).write_all(&reply)?;
    }
    Ok(true)
}

/// One frontend at a time: others are closed at once and counted.
fn refuse_others(listener: &UnixListener, shared: &Shared) {
    while let Ok((c, _)) = listener.accept() {
        drop(c);
        shared.refused.fetch_add(1, Ordering::Relaxed);
    }
}

fn peer_pid(conn: &UnixStream) -> Option<String> {
    let fd: &OwnedFd = &conn.as_fd().try_clone_to_owned().ok()?;
    let mut cred: libc::ucred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most len bytes into cred.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then(|| format!("pid {}", cred.pid))
}
