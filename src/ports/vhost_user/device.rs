//! The data-plane half of a vhost-user port: the guest's two virtqueues
//! (queue 0 receives frames from ulan, queue 1 sends frames to it) over
//! the guest memory the frontend shared. Everything the guest wrote is
//! untrusted: descriptors are walked with bounds checks (virtio-queue,
//! vm-memory), a chain that breaks off, points outside guest memory or has
//! the wrong direction is a [`RingError`], and the port stops serving that
//! frontend.

use std::fs::File;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::features;

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const NUM_QUEUES: usize = 2;
/// The largest ring the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Guest buffers one frame may take with mergeable RX buffers.
const MAX_BUFS_PER_FRAME: usize = 256;

/// Why a ring cannot be served any longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the available index moved further than the ring size")]
    AvailIndex,
    #[error("a descriptor chain is empty, breaks off, loops or is longer than the ring")]
    BrokenChain,
    #[error("a descriptor points outside guest memory")]
    OutsideMemory,
    #[error("a transmit descriptor is device-writable")]
    WritableInTx,
    #[error("a receive descriptor is device-readable")]
    ReadableInRx,
    #[error("a receive buffer is smaller than the virtio-net header")]
    TinyRxBuffer,
    #[error("the ring's addresses are not in guest memory")]
    RingOutsideMemory,
    #[error("the used ring cannot be written")]
    UsedRing,
}

/// What the frontend set up for one ring, in guest physical addresses.
#[derive(Debug)]
pub struct RingSetup {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where to start in the available ring (SET_VRING_BASE).
    pub base: u16,
    pub kick: File,
    pub call: Option<File>,
}

pub struct Ring {
    pub queue: Queue,
    pub kick: Option<File>,
    pub call: Option<File>,
    pub started: bool,
    pub enabled: bool,
    /// Used entries added since the guest was last signalled.
    pending_signal: bool,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            queue: Queue::new(MAX_QUEUE_SIZE).expect("32768 is a valid queue size"),
            kick: None,
            call: None,
            started: false,
            enabled: false,
            pending_signal: false,
        }
    }

    pub fn running(&self) -> bool {
        self.started && self.enabled
    }
}

/// How a frame handed to the guest fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// The guest has not posted enough receive buffers: try again later.
    NoRoom,
    /// It can never fit the buffers this guest posts (no mergeable
    /// buffers and a frame larger than one buffer).
    TooBig,
}

/// A frame taken from the transmit ring.
pub struct TxFrame {
    pub len: usize,
    pub header: [u8; features::NET_HDR_LEN],
}

pub struct Device {
    pub mem: Option<Arc<GuestMemoryMmap>>,
    /// Features the frontend acked.
    pub features: u64,
    pub rings: [Ring; NUM_QUEUES],
    used: Vec<(u16, u32)>,
}

impl Default for Device {
    fn default() -> Self {
        Device {
            mem: None,
            features: 0,
            rings: [Ring::new(), Ring::new()],
            used: Vec::with_capacity(MAX_BUFS_PER_FRAME),
        }
    }
}

/// Reads the eventfd (or whatever the frontend gave) to rearm it.
pub fn drain_eventfd(f: &File) {
    let mut buf = [0u8; 8];
    let _ = (&*f).read(&mut buf);
}

/// Makes a frontend's fd non-blocking: a pipe passed off as an eventfd
/// must not be able to block the data plane.
pub fn set_nonblocking(f: &File) -> io::Result<()> {
    // SAFETY: plain fcntl calls on an fd we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Device {
    pub fn hdr_len(&self) -> usize {
        features::hdr_len(self.features)
    }

    fn mergeable(&self) -> bool {
        self.features & (1 << features::VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    pub fn event_idx(&self) -> bool {
        self.features & (1 << features::VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// Starts (or restarts) ring `index` as set up.
    pub fn start(&mut self, index: usize, setup: RingSetup) -> Result<(), RingError> {
        let event_idx = self.event_idx();
        let mem = self.mem.clone().ok_or(RingError::RingOutsideMemory)?;
        let ring = &mut self.rings[index];
        let q = &mut ring.queue;
        q.reset();
        q.try_set_size(setup.size)
            .map_err(|_| RingError::RingOutsideMemory)?;
        q.try_set_desc_table_address(GuestAddress(setup.desc))
            .map_err(|_| RingError::RingOutsideMemory)?;
        q.try_set_avail_ring_address(GuestAddress(setup.avail))
            .map_err(|_| RingError::RingOutsideMemory)?;
        q.try_set_used_ring_address(GuestAddress(setup.used))
            .map_err(|_| RingError::RingOutsideMemory)?;
        q.set_event_idx(event_idx);
        q.set_next_avail(setup.base);
        // The used index continues from what the guest last saw.
        let used_idx = q
            .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|_| RingError::RingOutsideMemory)?;
        q.set_next_used(used_idx.0);
        q.set_ready(true);
        if !q.is_valid(&*mem) {
            q.set_ready(false);
            return Err(RingError::RingOutsideMemory);
        }
        ring.kick = Some(setup.kick);
        ring.call = setup.call;
        ring.started = true;
        ring.pending_signal = false;
        Ok(())
    }

    /// Stops ring `index`; returns where the guest's next available entry is.
    pub fn stop(&mut self, index: usize) -> u16 {
        let ring = &mut self.rings[index];
        let base = ring.queue.next_avail();
        ring.started = false;
        ring.queue.set_ready(false);
        ring.kick = None;
        base
    }

    /// Puts every ring and the memory away (frontend gone or reset).
    pub fn reset(&mut self) {
        for i in 0..NUM_QUEUES {
            self.stop(i);
            let r = &mut self.rings[i];
            r.call = None;
            r.enabled = false;
            r.queue.reset();
        }
        self.mem = None;
        self.features = 0;
    }

    /// Takes the next frame from the transmit ring into `out` (the frame
    /// without the virtio-net header). `Ok(None)`: the ring is empty.
    /// The descriptor chain is given back to the guest at once (the bytes
    /// are copied), a signal is owed until [`Device::signal`].
    pub fn pop_tx(&mut self, out: &mut [u8]) -> Result<Option<TxFrame>, RingError> {
        let hdr_len = self.hdr_len();
        let Some(mem) = self.mem.as_deref() else {
            return Ok(None);
        };
        let ring = &mut self.rings[TX];
        let next = ring
            .queue
            .iter(mem)
            .map_err(|_| RingError::AvailIndex)?
            .next();
        let Some(chain) = next else {
            return Ok(None);
        };
        let head = chain.head_index();
        let mut header = [0u8; features::NET_HDR_LEN];
        let mut hdr_got = 0;
        let mut len = 0usize;
        let mut overflow = false;
        let mut last = None;
        for desc in chain {
            if desc.is_write_only() {
                return Err(RingError::WritableInTx);
            }
            let mut addr = desc.addr().0;
            let mut dlen = desc.len() as usize;
            if hdr_got < hdr_len {
                let take = dlen.min(hdr_len - hdr_got);
                mem.read_slice(&mut header[hdr_got..hdr_got + take], GuestAddress(addr))
                    .map_err(|_| RingError::OutsideMemory)?;
                hdr_got += take;
                addr += take as u64;
                dlen -= take;
            }
            if dlen > 0 {
                if len + dlen > out.len() {
                    // Walk on to check the chain, but keep nothing.
                    overflow = true;
                } else {
                    mem.read_slice(&mut out[len..len + dlen], GuestAddress(addr))
                        .map_err(|_| RingError::OutsideMemory)?;
                }
                len += dlen;
            }
            last = Some(desc);
        }
        match last {
            Some(d) if !d.has_next() => {}
            _ => return Err(RingError::BrokenChain),
        }
        ring.queue
            .add_used(mem, head, 0)
            .map_err(|_| RingError::UsedRing)?;
        ring.pending_signal = true;
        if overflow {
            len = out.len() + 1;
        }
        Ok(Some(TxFrame { len, header }))
    }

    /// Copies `frame`, behind `header`, into the guest's receive buffers.
    pub fn push_rx(
        &mut self,
        header: &[u8; features::NET_HDR_LEN],
        frame: &[u8],
    ) -> Result<Delivery, RingError> {
        let hdr_len = self.hdr_len();
        let mergeable = self.mergeable();
        let Some(mem) = self.mem.as_deref() else {
            return Ok(Delivery::NoRoom);
        };
        let ring = &mut self.rings[RX];
        let total = hdr_len + frame.len();
        let mut written = 0usize;
        let mut first_buf: Option<u64> = None;
        self.used.clear();
        let outcome = {
            let mut iter = ring.queue.iter(mem).map_err(|_| RingError::AvailIndex)?;
            loop {
                if written == total {
                    break Delivery::Delivered;
                }
                if self.used.len() == MAX_BUFS_PER_FRAME || (!mergeable && !self.used.is_empty()) {
                    break Delivery::TooBig;
                }
                let Some(chain) = iter.next() else {
                    break Delivery::NoRoom;
                };
                let head = chain.head_index();
                let mut in_chain = 0u32;
                let mut last = None;
                for desc in chain {
                    if !desc.is_write_only() {
                        return Err(RingError::ReadableInRx);
                    }
                    let addr = desc.addr().0;
                    let room = desc.len() as usize;
                    if first_buf.is_none() {
                        if room < hdr_len {
                            return Err(RingError::TinyRxBuffer);
                        }
                        first_buf = Some(addr);
                    }
                    let n = room.min(total - written);
                    copy_out(mem, addr, header, hdr_len, frame, written, n)?;
                    written += n;
                    in_chain += n as u32;
                    let done = written == total;
                    last = Some(desc);
                    if done {
                        break;
                    }
                }
                match last {
                    None => return Err(RingError::BrokenChain),
                    Some(d) if written < total && d.has_next() => {
                        return Err(RingError::BrokenChain)
                    }
                    _ => {}
                }
                self.used.push((head, in_chain));
            }
        };
        if outcome != Delivery::Delivered {
            // Give the buffers back untouched: the guest sees nothing.
            let back = self.used.len() as u16;
            let q = &mut ring.queue;
            q.set_next_avail((Wrapping(q.next_avail()) - Wrapping(back)).0);
            return Ok(outcome);
        }
        if hdr_len == features::NET_HDR_LEN {
            if let Some(addr) = first_buf {
                let n = (self.used.len() as u16).to_le_bytes();
                mem.write_slice(&n, GuestAddress(addr + 10))
                    .map_err(|_| RingError::OutsideMemory)?;
            }
        }
        for &(head, len) in &self.used {
            ring.queue
                .add_used(mem, head, len)
                .map_err(|_| RingError::UsedRing)?;
        }
        ring.pending_signal = true;
        Ok(Delivery::Delivered)
    }

    /// Signals the guest for ring `index` if it has new used entries and
    /// wants to hear of them. One write per batch, not per frame.
    pub fn signal(&mut self, index: usize) -> Result<(), RingError> {
        let Some(mem) = self.mem.as_deref() else {
            return Ok(());
        };
        let ring = &mut self.rings[index];
        if !ring.pending_signal {
            return Ok(());
        }
        ring.pending_signal = false;
        let wanted = ring
            .queue
            .needs_notification(mem)
            .map_err(|_| RingError::UsedRing)?;
        if wanted {
            if let Some(call) = &ring.call {
                let _ = (&*call).write(&1u64.to_ne_bytes());
            }
        }
        Ok(())
    }

    /// Asks the guest to kick when it adds to ring `index` (true), or not
    /// to bother (false, while ulan polls it). Enabling returns whether
    /// entries arrived meanwhile, so nothing is missed.
    pub fn notifications(&mut self, index: usize, on: bool) -> Result<bool, RingError> {
        let Some(mem) = self.mem.as_deref() else {
            return Ok(false);
        };
        let q = &mut self.rings[index].queue;
        if on {
            q.enable_notification(mem).map_err(|_| RingError::UsedRing)
        } else {
            q.disable_notification(mem)
                .map_err(|_| RingError::UsedRing)?;
            Ok(false)
        }
    }

    /// Whether ring `index` has available entries not taken yet.
    pub fn has_avail(&self, index: usize) -> bool {
        let Some(mem) = self.mem.as_deref() else {
            return false;
        };
        let q = &self.rings[index].queue;
        match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) => idx.0 != q.next_avail(),
            Err(_) => false,
        }
    }
}

/// Writes bytes `[from, from + n)` of header ++ frame at guest `addr`.
fn copy_out(
    mem: &GuestMemoryMmap,
    addr: u64,
    header: &[u8],
    hdr_len: usize,
    frame: &[u8],
    from: usize,
    n: usize,
) -> Result<(), RingError> {
    let mut addr = addr;
    let mut from = from;
    let mut n = n;
    if from < hdr_len {
        let take = n.min(hdr_len - from);
        mem.write_slice(&header[from..from + take], GuestAddress(addr))
            .map_err(|_| RingError::OutsideMemory)?;
        addr += take as u64;
        from += take;
        n -= take;
    }
    if n > 0 {
        let start = from - hdr_len;
        mem.write_slice(&frame[start..start + n], GuestAddress(addr))
            .map_err(|_| RingError::OutsideMemory)?;
    }
    Ok(())
}
