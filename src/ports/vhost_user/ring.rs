//! A split virtqueue seen from the device side, over host pointers into
//! guest memory.
//!
//! Why not `virtio-queue`'s `Queue` on this path: measured, a frame cost
//! ulan's data plane about 280 ns with it, 40% of that in re-reading the
//! shared available index for every chain and in looking up the guest
//! region for every descriptor and ring field. Here the rings' places are
//! checked once when a ring starts (with vm-memory, which maps the
//! memory), the available index is read once per batch, used entries are
//! published once per batch, and a buffer's guest address is translated by
//! a scan of a handful of regions. Every value the guest wrote is read
//! once, volatile, and checked before it is used: indexes against the ring
//! size, descriptor addresses against the regions, chains against loops.

use std::ptr;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::device::RingError;

/// Descriptors one chain may have. The spec allows a chain as long as
/// the ring (up to 32768), which the shared data plane would walk for every
/// frame; Linux uses at most 19 and DPDK's vhost library caps chains at
/// 256 buffers too.
pub const MAX_CHAIN: u16 = 256;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Guest memory as host pointers, valid while `_mem` lives (the port holds
/// it; it is replaced only between batches, on the data-plane thread).
pub struct GuestMap {
    regions: Vec<(u64, u64, *mut u8)>,
    _mem: Arc<GuestMemoryMmap>,
}

// SAFETY: the pointers point into mappings owned by `_mem`, which is Send
// and Sync; GuestMap is used by one thread at a time.
unsafe impl Send for GuestMap {}

impl GuestMap {
    pub fn new(mem: Arc<GuestMemoryMmap>) -> GuestMap {
        let regions = mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some((r.start_addr().0, r.len(), host))
            })
            .collect();
        GuestMap { regions, _mem: mem }
    }

    /// The host address of `len` bytes at guest address `gpa`, if they lie
    /// in one region.
    #[inline]
    pub fn host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        for &(start, size, host) in &self.regions {
            let off = gpa.wrapping_sub(start);
            if gpa >= start && off <= size && len <= size - off {
                // SAFETY: off + len <= size: inside the mapping.
                return Some(unsafe { host.add(off as usize) });
            }
        }
        None
    }
}

/// One descriptor's buffer, already translated and bounds-checked.
#[derive(Clone, Copy)]
pub struct Seg {
    pub ptr: *mut u8,
    pub len: usize,
    pub write: bool,
}

pub struct SplitRing {
    size: u16,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    pub next_avail: u16,
    /// The guest's available index as last read.
    avail_idx: u16,
    pub next_used: u16,
    /// The used index the guest was last told about (or last published).
    signalled: u16,
    published: u16,
    event_idx: bool,
}

// SAFETY: raw pointers into guest memory owned by the port's GuestMap.
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// Checks the three parts lie in guest memory, aligned as the spec
    /// wants (the indexes are accessed atomically), and starts at `base`.
    pub fn new(
        map: &GuestMap,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        base: u16,
        event_idx: bool,
    ) -> Result<SplitRing, RingError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::RingOutsideMemory);
        }
        let n = u64::from(size);
        let (Some(d), Some(a), Some(u)) = (
            map.host(desc, 16 * n),
            map.host(avail, 6 + 2 * n),
            map.host(used, 6 + 8 * n),
        ) else {
            return Err(RingError::RingOutsideMemory);
        };
        if desc % 16 != 0 || avail % 2 != 0 || used % 4 != 0 {
            return Err(RingError::RingOutsideMemory);
        }
        let mut ring = SplitRing {
            size,
            desc: d,
            avail: a,
            used: u,
            next_avail: base,
            avail_idx: base,
            next_used: 0,
            signalled: 0,
            published: 0,
            event_idx,
        };
        // Carry on from the used index the guest last saw.
        let used_idx = ring.used_idx().load(Ordering::Acquire);
        ring.next_used = used_idx;
        ring.signalled = used_idx;
        ring.published = used_idx;
        Ok(ring)
    }

    fn avail_idx_ref(&self) -> &AtomicU16 {
        // SAFETY: checked in `new`: inside guest memory and 2-aligned.
        unsafe { &*(self.avail.add(2) as *const AtomicU16) }
    }

    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: checked in `new`: inside guest memory and 4-aligned.
        unsafe { &*(self.used.add(2) as *const AtomicU16) }
    }

    fn read_u16(&self, p: *mut u8) -> u16 {
        // SAFETY: callers pass pointers inside the checked ring areas.
        u16::from_le(unsafe { ptr::read_volatile(p as *const u16) })
    }

    fn write_u16(&self, p: *mut u8, v: u16) {
        // SAFETY: callers pass pointers inside the checked ring areas.
        unsafe { ptr::write_volatile(p as *mut u16, v.to_le()) }
    }

    /// Reads the guest's available index anew. Errors if it claims more
    /// entries than the ring holds.
    pub fn refresh(&mut self) -> Result<u16, RingError> {
        let idx = u16::from_le(self.avail_idx_ref().load(Ordering::Acquire));
        if idx.wrapping_sub(self.next_avail) > self.size {
            return Err(RingError::AvailIndex);
        }
        self.avail_idx = idx;
        Ok(idx.wrapping_sub(self.next_avail))
    }

    /// The next available chain's head, reading the guest's index only
    /// when what was seen last is used up.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<u16>, RingError> {
        if self.next_avail == self.avail_idx && self.refresh()? == 0 {
            return Ok(None);
        }
        let slot = u64::from(self.next_avail % self.size);
        // SAFETY: slot < size: inside the avail ring checked in `new`.
        let head = self.read_u16(unsafe { self.avail.add(4 + 2 * slot as usize) });
        if head >= self.size {
            return Err(RingError::BrokenChain);
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Puts the last `n` popped chains back.
    pub fn unpop(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_sub(n);
    }

    /// Walks the chain at `head`, handing each buffer to `f` until it
    /// returns false or the chain ends. A chain longer than the ring (a
    /// loop) or than [`MAX_CHAIN`], a next index out of range, an indirect descriptor (not
    /// offered) or a buffer outside guest memory is an error.
    #[inline]
    pub fn walk(
        &self,
        map: &GuestMap,
        head: u16,
        mut f: impl FnMut(Seg) -> Result<bool, RingError>,
    ) -> Result<(), RingError> {
        let mut idx = head;
        for _ in 0..self.size.min(MAX_CHAIN) {
            // SAFETY: idx < size: inside the descriptor table.
            let d = unsafe { self.desc.add(16 * idx as usize) };
            // SAFETY: 16 bytes inside the table, 16-aligned.
            let (addr, len, flags, next) = unsafe {
                (
                    u64::from_le(ptr::read_volatile(d as *const u64)),
                    u32::from_le(ptr::read_volatile(d.add(8) as *const u32)),
                    u16::from_le(ptr::read_volatile(d.add(12) as *const u16)),
                    u16::from_le(ptr::read_volatile(d.add(14) as *const u16)),
                )
            };
            if flags & DESC_F_INDIRECT != 0 {
                return Err(RingError::BrokenChain);
            }
            let ptr = map
                .host(addr, u64::from(len))
                .ok_or(RingError::OutsideMemory)?;
            let go_on = f(Seg {
                ptr,
                len: len as usize,
                write: flags & DESC_F_WRITE != 0,
            })?;
            if !go_on || flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            if next >= self.size {
                return Err(RingError::BrokenChain);
            }
            idx = next;
        }
        Err(RingError::BrokenChain)
    }

    /// Writes a used entry; the guest sees it at [`SplitRing::publish`].
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) {
        let slot = (self.next_used % self.size) as usize;
        // SAFETY: slot < size: inside the used ring checked in `new`.
        unsafe {
            let e = self.used.add(4 + 8 * slot);
            ptr::write_volatile(e as *mut u32, u32::from(head).to_le());
            ptr::write_volatile(e.add(4) as *mut u32, len.to_le());
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Makes the used entries visible; returns whether the guest wants to
    /// be signalled for them.
    pub fn publish(&mut self) -> bool {
        if self.next_used == self.published {
            return false;
        }
        fence(Ordering::Release);
        self.used_idx()
            .store(self.next_used.to_le(), Ordering::Release);
        self.published = self.next_used;
        // The guest's wish must be read after the index is out.
        fence(Ordering::SeqCst);
        let old = self.signalled;
        let new = self.next_used;
        self.signalled = new;
        if self.event_idx {
            // SAFETY: used_event sits right after the avail ring.
            let event = self.read_u16(unsafe { self.avail.add(4 + 2 * self.size as usize) });
            // vring_need_event: did `new` pass `event` since `old`?
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.read_u16(self.avail) & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the guest to kick on new entries (true) or not (false, while
    /// ulan polls). Turning kicks on returns whether entries came meanwhile.
    pub fn kicks(&mut self, on: bool) -> Result<bool, RingError> {
        if self.event_idx {
            if on {
                // SAFETY: avail_event sits right after the used ring.
                self.write_u16(
                    unsafe { self.used.add(4 + 8 * self.size as usize) },
                    self.next_avail,
                );
            }
            // Off: leave avail_event behind; the guest kicks at most once.
        } else {
            self.write_u16(self.used, if on { 0 } else { USED_F_NO_NOTIFY });
        }
        if !on {
            return Ok(false);
        }
        fence(Ordering::SeqCst);
        Ok(self.refresh()? > 0)
    }

    /// Whether the guest has made entries available that are not taken.
    pub fn has_avail(&mut self) -> bool {
        self.next_avail != self.avail_idx || self.refresh().is_ok_and(|n| n > 0)
    }
}
