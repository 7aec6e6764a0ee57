//! Bounded per-port output queues. Slots keep their allocation after use,
//! so a port in steady state allocates nothing per frame.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;

use crate::ports::sys::{self, UnixAddr, BATCH};
use crate::switch::stats::PortCounters;

/// Frames waiting to go out of a datagram-like port, oldest first.
pub struct FrameQueue {
    slots: Vec<Vec<u8>>,
    head: usize,
    len: usize,
}

/// Default output queue depth of a datagram-like port.
pub const FRAME_QUEUE_DEPTH: usize = 256;

impl FrameQueue {
    pub fn new(depth: usize) -> Self {
        FrameQueue {
            slots: (0..depth.max(1)).map(|_| Vec::new()).collect(),
            head: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `frame` in. False when full: the caller counts the drop.
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if self.len == self.slots.len() {
            return false;
        }
        let i = (self.head + self.len) % self.slots.len();
        let slot = &mut self.slots[i];
        slot.clear();
        slot.extend_from_slice(frame);
        self.len += 1;
        true
    }

    /// Copies `prefix` then `frame` in, as one entry. False when full.
    pub fn push_parts(&mut self, prefix: &[u8], frame: &[u8]) -> bool {
        if self.len == self.slots.len() {
            return false;
        }
        let i = (self.head + self.len) % self.slots.len();
        let slot = &mut self.slots[i];
        slot.clear();
        slot.extend_from_slice(prefix);
        slot.extend_from_slice(frame);
        self.len += 1;
        true
    }

    /// The oldest frame, if any.
    pub fn front(&self) -> Option<&[u8]> {
        (self.len > 0).then(|| &self.slots[self.head][..])
    }

    /// Forgets the oldest frame.
    pub fn pop_front(&mut self) {
        if self.len > 0 {
            self.head = (self.head + 1) % self.slots.len();
            self.len -= 1;
        }
    }

    /// Empties the queue; returns (frames, bytes) that were in it.
    pub fn clear(&mut self) -> (u64, u64) {
        let mut bytes = 0;
        for k in 0..self.len {
            bytes += self.slots[(self.head + k) % self.slots.len()].len() as u64;
        }
        let frames = self.len as u64;
        self.head = 0;
        self.len = 0;
        (frames, bytes)
    }

    /// Sends as much as the socket takes, in batches. `Ok(true)` when
    /// everything went, `Ok(false)` when the socket is full (try later).
    pub fn flush(
        &mut self,
        fd: &OwnedFd,
        dest: Option<&UnixAddr>,
        counters: &mut PortCounters,
    ) -> io::Result<bool> {
        while self.len > 0 {
            let cap = self.slots.len();
            let contiguous = (cap - self.head).min(self.len).min(BATCH);
            let mut refs: [&[u8]; BATCH] = [&[]; BATCH];
            for (k, r) in refs.iter_mut().enumerate().take(contiguous) {
                *r = &self.slots[self.head + k];
            }
            match sys::send_batch(fd, &refs[..contiguous], dest) {
                Ok(sent) => {
                    for r in &refs[..sent] {
                        counters.tx_frames += 1;
                        counters.tx_bytes += r.len() as u64;
                    }
                    self.head = (self.head + sent) % cap;
                    self.len -= sent;
                    if sent < contiguous {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.head = 0;
        Ok(true)
    }
}

/// Bytes waiting to go out of a stream port: each frame as a 4-byte
/// big-endian length and the frame. Bounded in bytes; frames are queued
/// whole or dropped whole, so the peer never sees a torn frame.
pub struct StreamQueue {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
    /// Record sizes (4 + frame) still in `buf`, for exact tx counters.
    records: VecDeque<u32>,
    /// Bytes of the first record already written.
    first_done: usize,
    limit: usize,
}

/// Default byte budget of a stream port's output queue.
pub const STREAM_QUEUE_BYTES: usize = 1 << 20;

impl StreamQueue {
    pub fn new(limit: usize) -> Self {
        StreamQueue {
            buf: Vec::new(),
            sent: 0,
            records: VecDeque::new(),
            first_done: 0,
            limit,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn push(&mut self, frame: &[u8]) -> bool {
        let pending = self.buf.len() - self.sent;
        if pending + 4 + frame.len() > self.limit {
            return false;
        }
        if self.sent > 0 && self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        }
        self.buf
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(frame);
        self.records.push_back(4 + frame.len() as u32);
        true
    }

    /// Frames still queued (including a partly written one).
    pub fn clear(&mut self) -> (u64, u64) {
        let frames = self.records.len() as u64;
        let bytes = self.records.iter().map(|&r| u64::from(r) - 4).sum();
        self.buf.clear();
        self.sent = 0;
        self.records.clear();
        self.first_done = 0;
        (frames, bytes)
    }

    /// Drops every record not yet started; one partly written is kept,
    /// so the peer never sees a torn record. Returns (frames, bytes)
    /// dropped.
    pub fn discard_unsent(&mut self) -> (u64, u64) {
        let keep = usize::from(self.first_done > 0);
        let (mut frames, mut bytes) = (0, 0);
        for record in self.records.drain(keep..) {
            frames += 1;
            bytes += u64::from(record) - 4;
        }
        let end = match self.records.front() {
            Some(&first) => self.sent - self.first_done + first as usize,
            None => self.sent,
        };
        self.buf.truncate(end);
        (frames, bytes)
    }

    pub fn flush(&mut self, fd: &OwnedFd, counters: &mut PortCounters) -> io::Result<bool> {
        while self.sent < self.buf.len() {
            match sys::write(fd, &self.buf[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.sent += n;
                    let mut n = n;
                    while let Some(&rec) = self.records.front() {
                        let left = rec as usize - self.first_done;
                        if n >= left {
                            n -= left;
                            self.first_done = 0;
                            self.records.pop_front();
                            counters.tx_frames += 1;
                            counters.tx_bytes += u64::from(rec) - 4;
                        } else {
                            self.first_done += n;
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Reclaim the written prefix so the buffer does not creep.
                    if self.sent > self.limit / 2 {
                        self.buf.drain(..self.sent);
                        self.sent = 0;
                    }
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.sent = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_queue_is_bounded_and_wraps() {
        let mut q = FrameQueue::new(3);
        assert!(q.push(&[1; 20]));
        assert!(q.push(&[2; 20]));
        assert!(q.push(&[3; 20]));
        assert!(!q.push(&[4; 20]));
        assert_eq!(q.clear(), (3, 60));
        assert!(q.is_empty());
    }

    #[test]
    fn stream_queue_discards_whole_records_and_finishes_a_started_one() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let a: OwnedFd = a.into();
        let mut q = StreamQueue::new(1 << 20);
        // Nothing written yet: everything goes.
        assert!(q.push(&[1; 30]));
        assert!(q.push(&[2; 30]));
        assert_eq!(q.discard_unsent(), (2, 60));
        assert!(q.is_empty());
        // Fill the socket so a record is left half written.
        sys::set_buffer_sizes(&a, 4096);
        let mut c = PortCounters::default();
        let mut n = 0u8;
        while q.flush(&a, &mut c).unwrap() {
            n = n.wrapping_add(1);
            assert!(q.push(&[n; 999]));
        }
        assert!(q.push(&[0xee; 999]));
        let (frames, _) = q.discard_unsent();
        assert!(frames >= 1);
        // What reaches the peer is whole records only.
        let mut peer = std::os::unix::net::UnixStream::from(OwnedFd::from(b));
        peer.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            use std::io::Read;
            match peer.read(&mut buf) {
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(_) => {
                    if q.flush(&a, &mut c).unwrap() {
                        if let Ok(k) = peer.read(&mut buf) {
                            got.extend_from_slice(&buf[..k]);
                            continue;
                        }
                        break;
                    }
                }
            }
        }
        let mut rest = &got[..];
        let mut records = 0;
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            assert_eq!(len, 999, "torn record");
            let body = &rest[4..4 + len];
            assert!(body.iter().all(|&x| x == body[0]));
            rest = &rest[4 + len..];
            records += 1;
        }
        assert_eq!(
            records, c.tx_frames,
            "counted as sent = whole records received"
        );
    }

    #[test]
    fn stream_queue_counts_whole_frames_only() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let a: OwnedFd = a.into();
        let mut q = StreamQueue::new(100);
        assert!(q.push(&[7; 40]));
        assert!(q.push(&[8; 40]));
        assert!(!q.push(&[9; 40]), "over the byte budget");
        let mut c = PortCounters::default();
        assert!(q.flush(&a, &mut c).unwrap());
        assert_eq!((c.tx_frames, c.tx_bytes), (2, 80));
        let mut got = vec![0u8; 88];
        use std::io::Read;
        (&b).read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &40u32.to_be_bytes());
        assert_eq!(got[4], 7);
        assert_eq!(&got[44..48], &40u32.to_be_bytes());
    }
}
