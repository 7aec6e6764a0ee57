//! The data-plane half of a vhost-user port: the guest's two virtqueues
//! (queue 0 receives frames from ulan, queue 1 sends frames to it) over
//! the guest memory the frontend shared. Everything the guest wrote is
//! untrusted: descriptors are walked with bounds checks ([`ring`]), a
//! chain that breaks off, points outside guest memory or has the wrong
//! direction is a [`RingError`], and the port stops serving that frontend.
//!
//! [`ring`]: super::ring

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::features;
use super::ring::{GuestMap, SplitRing};

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
    pub ring: Option<SplitRing>,
    pub kick: Option<File>,
    pub call: Option<File>,
    pub started: bool,
    pub enabled: bool,
    /// Where the next start begins (SET_VRING_BASE, or where it stopped).
    base: u16,
    setup: Option<(u16, u64, u64, u64)>,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            ring: None,
            kick: None,
            call: None,
            started: false,
            enabled: false,
            base: 0,
            setup: None,
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
    pub map: Option<GuestMap>,
    /// Features the frontend acked.
    pub features: u64,
    pub rings: [Ring; NUM_QUEUES],
    used: Vec<(u16, u32)>,
}

impl Default for Device {
    fn default() -> Self {
        Device {
            map: None,
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
        features::has(self.features, features::VIRTIO_NET_F_MRG_RXBUF)
    }

    pub fn event_idx(&self) -> bool {
        features::has(self.features, features::VIRTIO_RING_F_EVENT_IDX)
    }

    /// New guest memory. Running rings carry on at their indexes, at the
    /// addresses given (translated through the new table).
    pub fn set_memory(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        addrs: [Option<(u64, u64, u64)>; NUM_QUEUES],
    ) -> Result<(), RingError> {
        // Drop the old rings' pointers before the old map goes.
        let mut at = [None; NUM_QUEUES];
        for (i, r) in self.rings.iter_mut().enumerate() {
            if let Some(ring) = r.ring.take() {
                at[i] = Some(ring.next_avail);
            }
        }
        self.map = Some(GuestMap::new(mem));
        let event_idx = self.event_idx();
        for (i, r) in self.rings.iter_mut().enumerate() {
            let Some(next) = at[i] else { continue };
            let (size, ..) = r.setup.unwrap_or((256, 0, 0, 0));
            let (desc, avail, used) = match addrs[i] {
                Some(a) => a,
                None => match r.setup {
                    Some((_, d, a, u)) => (d, a, u),
                    None => continue,
                },
            };
            let map = self.map.as_ref().ok_or(RingError::RingOutsideMemory)?;
            r.ring = Some(SplitRing::new(
                map, size, desc, avail, used, next, event_idx,
            )?);
            r.setup = Some((size, desc, avail, used));
        }
        Ok(())
    }

    /// Starts (or restarts) ring `index` as set up.
    pub fn start(&mut self, index: usize, setup: RingSetup) -> Result<(), RingError> {
        let event_idx = self.event_idx();
        let map = self.map.as_ref().ok_or(RingError::RingOutsideMemory)?;
        let ring = SplitRing::new(
            map,
            setup.size,
            setup.desc,
            setup.avail,
            setup.used,
            setup.base,
            event_idx,
        )?;
        let r = &mut self.rings[index];
        r.ring = Some(ring);
        r.setup = Some((setup.size, setup.desc, setup.avail, setup.used));
        r.kick = Some(setup.kick);
        r.call = setup.call;
        r.started = true;
        r.base = setup.base;
        Ok(())
    }

    /// Stops ring `index`; returns where the guest's next available entry is.
    pub fn stop(&mut self, index: usize) -> u16 {
        let r = &mut self.rings[index];
        if let Some(mut ring) = r.ring.take() {
            // Anything taken is given back before the frontend reads.
            ring.publish();
            r.base = ring.next_avail;
        }
        r.started = false;
        r.kick = None;
        r.base
    }

    /// Puts every ring and the memory away (frontend gone or reset).
    pub fn reset(&mut self) {
        for i in 0..NUM_QUEUES {
            self.stop(i);
            let r = &mut self.rings[i];
            r.call = None;
            r.enabled = false;
            r.base = 0;
            r.setup = None;
        }
        self.map = None;
        self.features = 0;
    }

    /// Takes the next frame from the transmit ring into `out` (the frame
    /// without the virtio-net header). `Ok(None)`: the ring is empty.
    /// The chain is given back to the guest at once (the bytes are
    /// copied); the guest sees it at the next [`Device::signal`]. A frame
    /// larger than `out` comes back with a length over `out.len()`.
    pub fn pop_tx(&mut self, out: &mut [u8]) -> Result<Option<TxFrame>, RingError> {
        let hdr_len = self.hdr_len();
        let Some(map) = self.map.as_ref() else {
            return Ok(None);
        };
        let Some(ring) = self.rings[TX].ring.as_mut() else {
            return Ok(None);
        };
        let Some(head) = ring.pop()? else {
            return Ok(None);
        };
        let mut header = [0u8; features::NET_HDR_LEN];
        let mut hdr_got = 0;
        let mut len = 0usize;
        ring.walk(map, head, |seg| {
            if seg.write {
                return Err(RingError::WritableInTx);
            }
            let mut p = seg.ptr;
            let mut n = seg.len;
            if hdr_got < hdr_len {
                let take = n.min(hdr_len - hdr_got);
                // SAFETY: seg is `n` bytes of guest memory (checked by walk).
                unsafe {
                    std::ptr::copy_nonoverlapping(p, header.as_mut_ptr().add(hdr_got), take);
                    p = p.add(take);
                }
                hdr_got += take;
                n -= take;
            }
            if n > 0 {
                if len + n <= out.len() {
                    // SAFETY: as above; out has room for n more bytes.
                    unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().add(len), n) };
                }
                len = len.saturating_add(n);
            }
            Ok(true)
        })?;
        ring.add_used(head, 0);
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
        let Some(map) = self.map.as_ref() else {
            return Ok(Delivery::NoRoom);
        };
        let Some(ring) = self.rings[RX].ring.as_mut() else {
            return Ok(Delivery::NoRoom);
        };
        let total = hdr_len + frame.len();
        let mut written = 0usize;
        let mut first: Option<*mut u8> = None;
        self.used.clear();
        let outcome = loop {
            if written == total {
                break Delivery::Delivered;
            }
            if self.used.len() == MAX_BUFS_PER_FRAME || (!mergeable && !self.used.is_empty()) {
                break Delivery::TooBig;
            }
            let Some(head) = ring.pop()? else {
                break Delivery::NoRoom;
            };
            let mut in_chain = 0u32;
            ring.walk(map, head, |seg| {
                if !seg.write {
                    return Err(RingError::ReadableInRx);
                }
                if first.is_none() {
                    if seg.len < hdr_len {
                        return Err(RingError::TinyRxBuffer);
                    }
                    first = Some(seg.ptr);
                }
                let n = seg.len.min(total - written);
                copy_out(seg.ptr, header, hdr_len, frame, written, n);
                written += n;
                in_chain += n as u32;
                Ok(written < total)
            })?;
            self.used.push((head, in_chain));
        };
        if outcome != Delivery::Delivered {
            // Give the buffers back untouched: the guest sees nothing.
            ring.unpop(self.used.len() as u16);
            return Ok(outcome);
        }
        if hdr_len == features::NET_HDR_LEN {
            if let Some(p) = first {
                let n = (self.used.len() as u16).to_le_bytes();
                // SAFETY: the first buffer holds at least hdr_len (12) bytes.
                unsafe { std::ptr::copy_nonoverlapping(n.as_ptr(), p.add(10), 2) };
            }
        }
        for &(head, len) in &self.used {
            ring.add_used(head, len);
        }
        Ok(Delivery::Delivered)
    }

    /// Publishes ring `index`'s new used entries and signals the guest if
    /// it wants to hear of them: once per batch, not per frame.
    pub fn signal(&mut self, index: usize) -> Result<(), RingError> {
        let r = &mut self.rings[index];
        let Some(ring) = r.ring.as_mut() else {
            return Ok(());
        };
        if ring.publish() {
            if let Some(call) = &r.call {
                let _ = (&*call).write(&1u64.to_ne_bytes());
            }
        }
        Ok(())
    }

    /// Asks the guest to kick when it adds to ring `index` (true), or not
    /// to bother (false, while ulan polls it). Enabling returns whether
    /// entries arrived meanwhile, so nothing is missed.
    pub fn notifications(&mut self, index: usize, on: bool) -> Result<bool, RingError> {
        match self.rings[index].ring.as_mut() {
            Some(ring) => ring.kicks(on),
            None => Ok(false),
        }
    }

    /// Whether ring `index` has available entries not taken yet.
    pub fn has_avail(&mut self, index: usize) -> bool {
        self.rings[index]
            .ring
            .as_mut()
            .is_some_and(|r| r.has_avail())
    }
}

/// Writes bytes `[from, from + n)` of header ++ frame at `dst`.
fn copy_out(dst: *mut u8, header: &[u8], hdr_len: usize, frame: &[u8], from: usize, n: usize) {
    let mut dst = dst;
    let mut from = from;
    let mut n = n;
    if from < hdr_len {
        let take = n.min(hdr_len - from);
        // SAFETY: dst has room for n >= take bytes (a checked guest buffer).
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr().add(from), dst, take);
            dst = dst.add(take);
        }
        from += take;
        n -= take;
    }
    if n > 0 {
        let start = from - hdr_len;
        // SAFETY: as above; start + n <= frame.len() since from + n <= total.
        unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr().add(start), dst, n) };
    }
}
