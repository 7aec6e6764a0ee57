//! The driver side of a split virtqueue (virtio 1.x, 2.7): what a guest's
//! virtio-net driver does, over memory this process shares with the
//! device (the vhost-user backend, another thread or process).
//!
//! The ring only moves descriptor indexes; which buffer a descriptor points
//! at is the caller's business (the frontend gives every descriptor one
//! buffer for life). Indexes and ring entries live in shared memory the
//! device writes too, so every access goes through raw pointers with
//! atomics or volatile reads, never through references.

use std::sync::atomic::{fence, AtomicU16, Ordering};

/// Descriptor flag: the buffer continues in `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (RX).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Avail ring flag: the driver does not want used-buffer notifications.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device does not want available-buffer notifications.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// The largest queue this ring supports (virtio-net's usual maximum).
pub const MAX_QUEUE_SIZE: u16 = 1024;

const PAGE: usize = 4096;

/// Where one queue's three areas lie, as offsets from the start of guest
/// memory (which is also their guest physical address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    /// First byte after the used ring, page aligned.
    pub end: usize,
}

fn page_up(n: usize) -> usize {
    n.div_ceil(PAGE) * PAGE
}

impl RingLayout {
    /// Lays out a queue of `size` entries from `start` (each area page
    /// aligned, more than the spec's 16/2/4 bytes). `size` must be valid
    /// (see [`valid_size`]).
    pub fn at(start: usize, size: u16) -> RingLayout {
        let n = size as usize;
        let desc = page_up(start);
        let avail = page_up(desc + 16 * n);
        let used = page_up(avail + 6 + 2 * n);
        let end = page_up(used + 6 + 8 * n);
        RingLayout {
            size,
            desc,
            avail,
            used,
            end,
        }
    }
}

/// Split rings need a power of two (virtio 1.x 2.7).
pub fn valid_size(size: u16) -> bool {
    size.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(&size)
}

/// `vring_need_event` of the spec (2.7.10): whether moving an index from
/// `old` to `new` passes `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver's view of one split virtqueue.
pub struct DriverRing {
    size: u16,
    mask: u16,
    event_idx: bool,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    /// Our copy of avail->idx: entries are written ahead of it, then
    /// published at once.
    next_avail: u16,
    /// avail->idx at the last notification decision.
    notified_avail: u16,
    /// The next used entry we have not consumed.
    last_used: u16,
}

// SAFETY: the ring points into memory owned by the frontend that owns the
// ring; it moves between threads with it, and is used by one at a time.
unsafe impl Send for DriverRing {}

impl DriverRing {
    /// A ring over `layout` in the memory at `base`, zeroed (no entries,
    /// indexes 0).
    ///
    /// # Safety
    /// `base` must point at writable memory covering `layout.end` bytes
    /// that outlives the ring, and `layout.size` must be valid.
    pub unsafe fn new(base: *mut u8, layout: RingLayout, event_idx: bool) -> DriverRing {
        // SAFETY: the caller guarantees the areas are inside the memory.
        let (desc, avail, used) = unsafe {
            std::ptr::write_bytes(base.add(layout.desc), 0, layout.end - layout.desc);
            (
                base.add(layout.desc),
                base.add(layout.avail),
                base.add(layout.used),
            )
        };
        DriverRing {
            size: layout.size,
            mask: layout.size - 1,
            event_idx,
            desc,
            avail,
            used,
            next_avail: 0,
            notified_avail: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    fn atomic(&self, p: *mut u8) -> &AtomicU16 {
        // SAFETY: p is a 2-aligned u16 inside the ring's memory, which
        // lives as long as self; AtomicU16 has u16's layout.
        unsafe { &*(p as *const AtomicU16) }
    }

    /// Writes descriptor `id` (`id < size`, not currently available).
    pub fn set_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16) {
        debug_assert!(id < self.size);
        let id = (id & self.mask) as usize;
        // SAFETY: id < size, so the 16 bytes are inside the table.
        unsafe {
            let d = self.desc.add(16 * id);
            std::ptr::write_volatile(d as *mut u64, addr.to_le());
            std::ptr::write_volatile(d.add(8) as *mut u32, len.to_le());
            std::ptr::write_volatile(d.add(12) as *mut u16, flags.to_le());
            std::ptr::write_volatile(d.add(14) as *mut u16, 0);
        }
    }

    /// Writes descriptor `id` with any `next` (hostile-driver tests: the
    /// device must refuse loops and out-of-range links).
    pub fn set_desc_raw(&mut self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.set_desc(id, addr, len, flags);
        let id = (id & self.mask) as usize;
        // SAFETY: as in set_desc.
        unsafe { std::ptr::write_volatile(self.desc.add(16 * id + 14) as *mut u16, next.to_le()) }
    }

    /// Changes only the length of descriptor `id`.
    pub fn set_desc_len(&mut self, id: u16, len: u32) {
        let id = (id & self.mask) as usize;
        // SAFETY: as in set_desc.
        unsafe { std::ptr::write_volatile(self.desc.add(16 * id + 8) as *mut u32, len.to_le()) }
    }

    /// Puts descriptor chain head `id` in the avail ring, not yet visible.
    pub fn push(&mut self, id: u16) {
        let slot = (self.next_avail & self.mask) as usize;
        // SAFETY: slot < size: inside avail->ring.
        unsafe { std::ptr::write_volatile(self.avail.add(4 + 2 * slot) as *mut u16, id.to_le()) }
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes the pushed entries visible to the device (one store).
    pub fn publish(&mut self) {
        // SAFETY: avail + 2 is avail->idx.
        let idx = unsafe { self.avail.add(2) };
        self.atomic(idx)
            .store(self.next_avail.to_le(), Ordering::Release);
    }

    /// Whether the device wants a kick for what was published since the
    /// last call: with EVENT_IDX against its avail_event, without it
    /// unless it set VRING_USED_F_NO_NOTIFY.
    pub fn needs_kick(&mut self) -> bool {
        let (old, new) = (self.notified_avail, self.next_avail);
        if old == new {
            return false;
        }
        self.notified_avail = new;
        // The device reads our idx, then writes its flags/event, then
        // checks idx again: order our idx store before our read.
        fence(Ordering::SeqCst);
        if self.event_idx {
            // SAFETY: used + 4 + 8 * size is used->avail_event.
            let p = unsafe { self.used.add(4 + 8 * self.size as usize) };
            let event = u16::from_le(self.atomic(p).load(Ordering::Relaxed));
            need_event(event, new, old)
        } else {
            let flags = u16::from_le(self.atomic(self.used).load(Ordering::Relaxed));
            flags & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// How many used entries wait to be consumed (acquire: their contents
    /// are visible afterwards).
    pub fn used_pending(&self) -> u16 {
        // SAFETY: used + 2 is used->idx.
        let p = unsafe { self.used.add(2) };
        u16::from_le(self.atomic(p).load(Ordering::Acquire)).wrapping_sub(self.last_used)
    }

    /// The `n`th unconsumed used entry (`n < used_pending()`): (id, len).
    /// The id is the device's word: check it before use.
    pub fn used_at(&self, n: u16) -> (u32, u32) {
        let slot = (self.last_used.wrapping_add(n) & self.mask) as usize;
        // SAFETY: slot < size: inside used->ring.
        unsafe {
            let e = self.used.add(4 + 8 * slot);
            (
                u32::from_le(std::ptr::read_volatile(e as *const u32)),
                u32::from_le(std::ptr::read_volatile(e.add(4) as *const u32)),
            )
        }
    }

    /// Marks `n` used entries consumed.
    pub fn consume(&mut self, n: u16) {
        self.last_used = self.last_used.wrapping_add(n);
    }

    /// Asks for (or stops asking for) a call when the device adds used
    /// entries: with EVENT_IDX, used_event = the next entry we expect;
    /// without, the NO_INTERRUPT flag. Callers re-check `used_pending`
    /// after enabling (the device may have added entries meanwhile).
    pub fn set_interrupts(&mut self, on: bool) {
        if self.event_idx {
            if on {
                // SAFETY: avail + 4 + 2 * size is avail->used_event.
                let p = unsafe { self.avail.add(4 + 2 * self.size as usize) };
                self.atomic(p)
                    .store(self.last_used.to_le(), Ordering::Relaxed);
            }
            // Off: leave used_event behind; the device passes it again
            // only after 65536 more entries.
        } else {
            let flags = if on { 0 } else { VRING_AVAIL_F_NO_INTERRUPT };
            self.atomic(self.avail)
                .store(flags.to_le(), Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
    }

    /// avail->idx as published.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    const SIZE: u16 = 8;

    /// Anonymous guest memory with our ring at 0, and a device-side
    /// virtio-queue `Queue` configured over it.
    fn setup(event_idx: bool) -> (GuestMemoryMmap, DriverRing, Queue, RingLayout) {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
        let layout = RingLayout::at(0, SIZE);
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        // SAFETY: 1 MiB mapped, far more than the layout needs.
        let ring = unsafe { DriverRing::new(host, layout, event_idx) };
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(layout.desc as u32), Some(0));
        q.set_avail_ring_address(Some(layout.avail as u32), Some(0));
        q.set_used_ring_address(Some(layout.used as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(&mem));
        (mem, ring, q, layout)
    }

    #[test]
    fn layout_is_aligned_and_disjoint() {
        let l = RingLayout::at(1, 1024);
        assert_eq!(l.desc % 4096, 0);
        assert!(l.avail >= l.desc + 16 * 1024);
        assert!(l.used >= l.avail + 6 + 2 * 1024);
        assert!(l.end >= l.used + 6 + 8 * 1024);
        assert!(valid_size(256) && valid_size(1024) && valid_size(2));
        assert!(!valid_size(0) && !valid_size(1) && !valid_size(100) && !valid_size(2048));
    }

    #[test]
    fn need_event_matches_spec_examples() {
        // Device wants a kick once idx passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(5, 5, 0));
        assert!(!need_event(5, 9, 6));
        // Across the wrap.
        assert!(need_event(65535, 2, 65530));
        assert!(!need_event(3, 2, 65530));
    }

    #[test]
    fn device_pops_what_the_driver_posts_and_the_driver_sees_used() {
        let (mem, mut ring, mut q, _) = setup(false);
        for id in 0..3u16 {
            ring.set_desc(id, 0x10000 + 0x800 * id as u64, 100 + id as u32, 0);
            ring.push(id);
        }
        // Unpublished entries are invisible to the device.
        assert!(q.pop_descriptor_chain(&mem).is_none());
        ring.publish();
        let mut seen = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let d: Vec<_> = chain.collect();
            assert_eq!(d.len(), 1);
            seen.push((head, d[0].addr().0, d[0].len(), d[0].is_write_only()));
        }
        assert_eq!(
            seen,
            vec![
                (0, 0x10000, 100, false),
                (1, 0x10800, 101, false),
                (2, 0x11000, 102, false)
            ]
        );
        assert_eq!(ring.used_pending(), 0);
        q.add_used(&mem, 1, 7).unwrap();
        q.add_used(&mem, 0, 9).unwrap();
        assert_eq!(ring.used_pending(), 2);
        assert_eq!(ring.used_at(0), (1, 7));
        assert_eq!(ring.used_at(1), (0, 9));
        ring.consume(2);
        assert_eq!(ring.used_pending(), 0);
    }

    #[test]
    fn write_flag_reaches_the_device() {
        let (mem, mut ring, mut q, _) = setup(false);
        ring.set_desc(5, 0x20000, 2048, VIRTQ_DESC_F_WRITE);
        ring.push(5);
        ring.publish();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(chain.head_index(), 5);
        let d: Vec<_> = chain.collect();
        assert!(d[0].is_write_only());
        assert_eq!(d[0].len(), 2048);
    }

    #[test]
    fn indexes_wrap_past_u16() {
        let (mem, mut ring, mut q, _) = setup(false);
        for id in 0..SIZE {
            ring.set_desc(id, 0x10000 + 64 * id as u64, 60, 0);
        }
        // 70000 round trips: both sides' u16 indexes wrap.
        let mut next = 0u16;
        for round in 0..70000u32 {
            ring.push(next);
            ring.publish();
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            assert_eq!(chain.head_index(), next);
            q.add_used(&mem, next, round).unwrap();
            assert_eq!(ring.used_pending(), 1);
            assert_eq!(ring.used_at(0), (next as u32, round));
            ring.consume(1);
            next = (next + 1) % SIZE;
        }
    }

    #[test]
    fn kicks_follow_no_notify_without_event_idx() {
        let (mem, mut ring, mut q, _) = setup(false);
        ring.set_desc(0, 0x10000, 60, 0);
        ring.push(0);
        ring.publish();
        assert!(ring.needs_kick(), "flags clear: kick");
        // Nothing new published: no kick.
        assert!(!ring.needs_kick());
        q.disable_notification(&mem).unwrap();
        let _ = q.pop_descriptor_chain(&mem).unwrap();
        q.add_used(&mem, 0, 0).unwrap();
        ring.consume(1);
        ring.push(0);
        ring.publish();
        assert!(!ring.needs_kick(), "device set NO_NOTIFY");
        q.enable_notification(&mem).unwrap();
        let _ = q.pop_descriptor_chain(&mem).unwrap();
        q.add_used(&mem, 0, 0).unwrap();
        ring.consume(1);
        ring.push(0);
        ring.publish();
        assert!(ring.needs_kick(), "device cleared NO_NOTIFY");
    }

    #[test]
    fn kicks_follow_avail_event_with_event_idx() {
        let (mem, mut ring, mut q, _) = setup(true);
        for id in 0..SIZE {
            ring.set_desc(id, 0x10000 + 64 * id as u64, 60, 0);
        }
        // The device has not set avail_event (0): the first entry passes it.
        ring.push(0);
        ring.publish();
        assert!(ring.needs_kick());
        // The device drains and asks for a kick on the next entry.
        let _ = q.pop_descriptor_chain(&mem).unwrap();
        q.enable_notification(&mem).unwrap();
        ring.push(1);
        ring.push(2);
        ring.publish();
        assert!(ring.needs_kick(), "avail_event 1 passed");
        // The device has not caught up: avail_event still 1, no kick.
        ring.push(3);
        ring.publish();
        assert!(!ring.needs_kick());
    }

    #[test]
    fn used_event_reaches_the_device_with_event_idx() {
        let (mem, mut ring, mut q, _) = setup(true);
        for id in 0..SIZE {
            ring.set_desc(id, 0x10000 + 64 * id as u64, 60, VIRTQ_DESC_F_WRITE);
            ring.push(id);
        }
        ring.publish();
        ring.set_interrupts(false);
        // used_event starts at 0: the first entry passes it once.
        let c = q.pop_descriptor_chain(&mem).unwrap();
        q.add_used(&mem, c.head_index(), 10).unwrap();
        assert!(q.needs_notification(&mem).unwrap());
        ring.consume(1);
        let c = q.pop_descriptor_chain(&mem).unwrap();
        q.add_used(&mem, c.head_index(), 10).unwrap();
        assert!(!q.needs_notification(&mem).unwrap(), "suppressed");
        ring.consume(1);
        ring.set_interrupts(true);
        let c = q.pop_descriptor_chain(&mem).unwrap();
        q.add_used(&mem, c.head_index(), 10).unwrap();
        assert!(q.needs_notification(&mem).unwrap(), "asked for a call");
    }

    #[test]
    fn no_interrupt_flag_without_event_idx() {
        // virtio-queue ignores the flag; read it where a device would.
        let (mem, mut ring, _q, layout) = setup(false);
        let flags = |mem: &GuestMemoryMmap| {
            vm_memory::Bytes::read_obj::<u16>(mem, GuestAddress(layout.avail as u64)).unwrap()
        };
        ring.set_interrupts(false);
        assert_eq!(flags(&mem), VRING_AVAIL_F_NO_INTERRUPT);
        ring.set_interrupts(true);
        assert_eq!(flags(&mem), 0);
    }
}
