//! A single-producer, single-consumer byte ring for variable-length
//! records: the data plane writes a record in place and publishes it with
//! one release store; the writer thread reads records in place and hands
//! back their space with another. Nothing allocates or locks after
//! creation, and a full ring refuses a record instead of waiting.
//!
//! Records are whole multiples of 4 bytes and start with a nonzero u32
//! tag and a u32 length (a pcapng block does). A record never straddles
//! the end of the ring: when it would, the producer writes a zero tag
//! there (the wrap mark) and starts the record at offset 0.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Keeps the producer's and the consumer's positions on separate cache
/// lines, so publishing one does not stall the other's core.
#[repr(align(64))]
struct Padded<T>(T);

struct Shared {
    buf: NonNull<u8>,
    cap: usize,
    /// Bytes ever published (producer-owned).
    head: Padded<AtomicUsize>,
    /// Bytes ever consumed (consumer-owned).
    tail: Padded<AtomicUsize>,
    /// The producer is gone: nothing more will be published.
    closed: AtomicBool,
}

// SAFETY: the buffer is only reached through `Producer` (bytes in
// [head, tail + cap)) and `Consumer` (bytes in [tail, head)); the two ranges
// never overlap, and the acquire/release pairs on `head` and `tail` order
// the writes to a range before the other side reads it.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: `buf` came from `Box::into_raw` of a `cap`-byte slice in
        // `ring` and is freed once, here, when both ends are gone.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.buf.as_ptr(),
                self.cap,
            )))
        };
    }
}

/// A new ring of `cap` bytes (a multiple of 4, at least 64).
pub fn ring(cap: usize) -> (Producer, Consumer) {
    assert!(cap >= 64 && cap % 4 == 0, "ring size {cap}");
    let buf: Box<[u8]> = vec![0u8; cap].into_boxed_slice();
    let buf = NonNull::new(Box::into_raw(buf) as *mut u8).expect("boxed slice is non-null");
    let shared = Arc::new(Shared {
        buf,
        cap,
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
        closed: AtomicBool::new(false),
    });
    (
        Producer {
            shared: shared.clone(),
            head: 0,
            tail: 0,
        },
        Consumer { shared, tail: 0 },
    )
}

/// The writing end (the data plane's).
pub struct Producer {
    shared: Arc<Shared>,
    /// Our head, ahead of the published one by what is not committed.
    head: usize,
    /// The consumer's tail as last seen: reloaded only when the ring looks
    /// full, so a record costs no shared cache-line read.
    tail: usize,
}

impl Producer {
    /// The largest record the ring takes.
    pub fn max_record(&self) -> usize {
        self.shared.cap / 2
    }

    /// Space for a `len`-byte record (a multiple of 4, at most
    /// [`Producer::max_record`]), or `None` if the ring is too full. The
    /// record is not seen by the consumer until [`Producer::commit`].
    pub fn reserve(&mut self, len: usize) -> Option<&mut [u8]> {
        if len == 0 || len % 4 != 0 || len > self.max_record() {
            return None;
        }
        let cap = self.shared.cap;
        let off = self.head % cap;
        let to_end = cap - off;
        let need = if to_end < len { to_end + len } else { len };
        if cap - (self.head - self.tail) < need {
            self.tail = self.shared.tail.0.load(Ordering::Acquire);
            if cap - (self.head - self.tail) < need {
                return None;
            }
        }
        let base = self.shared.buf.as_ptr();
        let off = if to_end < len {
            // SAFETY: [off, off + 4) is free (checked above) and ours; a
            // record is 4-aligned so at least 4 bytes remain before the end.
            unsafe { base.add(off).cast::<[u8; 4]>().write_unaligned([0; 4]) };
            self.head += to_end;
            0
        } else {
            off
        };
        self.head += len;
        // SAFETY: [off, off + len) is inside the buffer, free (checked
        // above) and not visible to the consumer until `commit`.
        Some(unsafe { std::slice::from_raw_parts_mut(base.add(off), len) })
    }

    /// Publishes every record reserved so far.
    pub fn commit(&mut self) {
        self.shared.head.0.store(self.head, Ordering::Release);
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.commit();
        self.shared.closed.store(true, Ordering::Release);
    }
}

/// The reading end (the capture writer's).
pub struct Consumer {
    shared: Arc<Shared>,
    tail: usize,
}

/// What [`Consumer::next`] found.
pub enum Next<'a> {
    /// A record, in place; the consumer may rewrite it before releasing.
    Record(&'a mut [u8]),
    /// Nothing more published yet.
    Empty,
}

impl Consumer {
    /// The record after the last one taken. Its space stays the
    /// consumer's until [`Consumer::release`].
    pub fn next(&mut self, published: usize) -> Next<'_> {
        let cap = self.shared.cap;
        loop {
            if self.tail >= published {
                return Next::Empty;
            }
            let off = self.tail % cap;
            let base = self.shared.buf.as_ptr();
            // SAFETY: [tail, published) was written and released by the
            // producer (acquire in `published`), and stays ours until
            // `release`.
            let head = unsafe { base.add(off).cast::<[u8; 8]>().read_unaligned() };
            let tag = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            if tag == 0 {
                self.tail += cap - off; // the wrap mark
                continue;
            }
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            // A record the producer wrote is always whole and in bounds;
            // refuse to go past what was published whatever the bytes say.
            // (Both bounds are multiples of 4 and at least 4.)
            let len = (len & !3)
                .min((published - self.tail).min(cap - off))
                .max(4);
            self.tail += len;
            // SAFETY: as above; [off, off + len) is within the buffer.
            return Next::Record(unsafe { std::slice::from_raw_parts_mut(base.add(off), len) });
        }
    }

    /// How far the producer has published (acquire: its records are
    /// visible after this).
    pub fn published(&self) -> usize {
        self.shared.head.0.load(Ordering::Acquire)
    }

    /// True once the producer is gone (check [`Consumer::published`]
    /// after this to drain what it left).
    pub fn closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Hands the space of every record taken so far back to the producer.
    pub fn release(&mut self) {
        self.shared.tail.0.store(self.tail, Ordering::Release);
    }

    /// Bytes held between consumed and published.
    pub fn pending(&self) -> usize {
        self.published() - self.tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(p: &mut Producer, len: usize, fill: u8) -> bool {
        match p.reserve(len) {
            Some(b) => {
                b[0..4].copy_from_slice(&1u32.to_le_bytes());
                b[4..8].copy_from_slice(&(len as u32).to_le_bytes());
                b[8..].fill(fill);
                true
            }
            None => false,
        }
    }

    fn take(c: &mut Consumer) -> Vec<(usize, u8)> {
        let published = c.published();
        let mut got = Vec::new();
        while let Next::Record(r) = c.next(published) {
            got.push((r.len(), r.get(8).copied().unwrap_or(0)));
        }
        c.release();
        got
    }

    #[test]
    fn records_come_out_in_order_across_the_wrap() {
        let (mut p, mut c) = ring(256);
        let mut want = Vec::new();
        let mut got = Vec::new();
        for i in 0..500usize {
            let len = 12 + (i % 7) * 4;
            let fill = i as u8;
            while !put(&mut p, len, fill) {
                p.commit();
                got.extend(take(&mut c));
            }
            want.push((len, fill));
            if i % 3 == 0 {
                p.commit();
            }
        }
        p.commit();
        got.extend(take(&mut c));
        assert_eq!(got, want);
    }

    #[test]
    fn uncommitted_records_are_not_seen_and_a_full_ring_refuses() {
        let (mut p, mut c) = ring(128);
        assert!(put(&mut p, 64, 1));
        assert!(matches!(c.next(c.published()), Next::Empty));
        p.commit();
        assert!(put(&mut p, 64, 2));
        assert!(!put(&mut p, 4, 3), "full");
        p.commit();
        assert_eq!(take(&mut c), vec![(64, 1), (64, 2)]);
        assert!(put(&mut p, 64, 4), "space came back");
        assert!(p.reserve(0).is_none());
        assert!(p.reserve(6).is_none(), "not a multiple of 4");
        assert!(p.reserve(65).is_none(), "over half the ring");
        assert!(!c.closed());
        drop(p);
        assert!(c.closed());
        assert_eq!(take(&mut c), vec![(64, 4)], "drop publishes what was left");
    }

    #[test]
    fn two_threads_move_every_record_intact() {
        let (mut p, mut c) = ring(4096);
        const N: u32 = 200_000;
        let writer = std::thread::spawn(move || {
            let mut i = 0u32;
            while i < N {
                let len = 12 + (i as usize % 13) * 4;
                if let Some(b) = p.reserve(len) {
                    b[0..4].copy_from_slice(&1u32.to_le_bytes());
                    b[4..8].copy_from_slice(&(len as u32).to_le_bytes());
                    b[8..12].copy_from_slice(&i.to_le_bytes());
                    i += 1;
                    p.commit();
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let mut next = 0u32;
        loop {
            let closed = c.closed();
            let published = c.published();
            while let Next::Record(r) = c.next(published) {
                let i = u32::from_le_bytes(r[8..12].try_into().unwrap());
                assert_eq!(i, next);
                assert_eq!(r.len(), 12 + (i as usize % 13) * 4);
                next += 1;
            }
            c.release();
            if closed && c.pending() == 0 {
                break;
            }
            std::thread::yield_now();
        }
        writer.join().unwrap();
        assert_eq!(next, N);
    }
}
