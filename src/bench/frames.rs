//! What a benchmark sends and how it counts what arrives.
//!
//! Frames follow the testkit traffic layout (stream id, sequence number,
//! check word: [`crate::testkit::vhost_frontend::traffic`]) and carry the
//! send time at bytes 30..38 (nanoseconds since the run's epoch, big
//! endian), so one thread can measure one-way latency with one clock.

use std::time::Instant;

use hdrhistogram::Histogram;

use super::BenchError;
use crate::testkit::vhost_frontend::traffic::{
    build_frame, parse, stamp, FrameSpec, Parsed, Verify,
};
use crate::wire::MacAddr;

/// RFC 2544 frame sizes count the Ethernet FCS, which no Unix-socket or
/// virtio transport carries: a 64-byte frame is 60 bytes on the port.
pub const FCS_LEN: usize = 4;
pub const MIN_SIZE: usize = 64;
/// Jumbo frames up to 9216 bytes (the largest MTU switches commonly take).
pub const MAX_SIZE: usize = 9216;
/// RFC 2544's sizes for Ethernet, plus 1280 (IPv6's minimum MTU).
pub const DEFAULT_SIZES: [usize; 7] = [64, 128, 256, 512, 1024, 1280, 1518];
const TIME: std::ops::Range<usize> = 30..38;

/// The generator's and the sink's addresses (the switch learns the sink's
/// before the first trial, so frames are unicast).
pub const GEN_MAC: MacAddr = MacAddr([0x02, 0x75, 0x6c, 0x62, 0x00, 0x01]);
pub const SINK_MAC: MacAddr = MacAddr([0x02, 0x75, 0x6c, 0x62, 0x00, 0x02]);

/// Bytes on the port for an RFC 2544 frame size.
pub fn port_len(size: usize) -> Result<usize, BenchError> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        return Err(BenchError::BadSize(size));
    }
    Ok(size - FCS_LEN)
}

/// Makes frames of one stream: a template, and per frame the sequence
/// number, check word and (optionally) the send time patched in place.
pub struct Generator {
    template: Vec<u8>,
    stream: u32,
    next_seq: u64,
    epoch: Instant,
    timestamps: bool,
}

impl Generator {
    /// Frames of `size` bytes on the port (no FCS) from `src` to `dst`.
    pub fn new(
        size: usize,
        dst: MacAddr,
        src: MacAddr,
        stream: u32,
        epoch: Instant,
        timestamps: bool,
    ) -> Result<Generator, BenchError> {
        if size < TIME.end + 1 {
            return Err(BenchError::BadSize(size + FCS_LEN));
        }
        let template = build_frame(
            &FrameSpec {
                size,
                dst,
                src,
                stream,
            },
            0,
        )?;
        Ok(Generator {
            template,
            stream,
            next_seq: 0,
            epoch,
            timestamps,
        })
    }

    /// The frame every send starts from.
    pub fn template(&self) -> &[u8] {
        &self.template
    }

    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// Frames committed as sent so far (= the next sequence number).
    pub fn sent(&self) -> u64 {
        self.next_seq
    }

    /// The time stamp for frames sent now (read the clock once per batch).
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Patches `frame` (a copy of the template) as the `i`th frame after
    /// the last one committed, sent at `now`.
    #[inline]
    pub fn stamp(&self, frame: &mut [u8], i: usize, now: u64) {
        stamp(frame, self.stream, self.next_seq + i as u64);
        if self.timestamps {
            if let Some(t) = frame.get_mut(TIME) {
                t.copy_from_slice(&now.to_be_bytes());
            }
        }
    }

    /// `n` stamped frames left for the path.
    pub fn commit(&mut self, n: usize) {
        self.next_seq += n as u64;
    }
}

/// One-way latency, in nanoseconds: 1 ns to 100 s, 3 significant digits.
pub type LatencyHistogram = Histogram<u64>;

/// Counts of a [`Meter`]. `lost` is a running count of gaps in the
/// sequence; the trial computes the final loss from what was sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeterCounts {
    /// Intact frames of the stream.
    pub frames: u64,
    pub bytes: u64,
    /// Frames older than one already seen.
    pub out_of_order: u64,
    /// Frames of the stream's ethertype that fail the checks.
    pub corrupt: u64,
    /// Intact frames of another stream (an earlier trial's stragglers).
    pub stale: u64,
    /// Frames that are not the generator's at all.
    pub foreign: u64,
}

/// Receives one stream's frames: counts, checks and times them.
pub struct Meter {
    stream: u32,
    epoch: Instant,
    next_seq: u64,
    counts: MeterCounts,
    latency: Option<LatencyHistogram>,
    now: u64,
}

impl Meter {
    /// With `latency`, every intact frame's one-way delay is recorded
    /// (the generator must stamp times, with the same `epoch`).
    pub fn new(stream: u32, epoch: Instant, latency: bool) -> Meter {
        Meter {
            stream,
            epoch,
            next_seq: 0,
            counts: MeterCounts::default(),
            latency: latency.then(|| {
                Histogram::new_with_bounds(1, 100_000_000_000, 3)
                    .expect("constant histogram bounds are valid")
            }),
            now: 0,
        }
    }

    /// Reads the clock for the frames of the next batch.
    pub fn tick(&mut self) {
        if self.latency.is_some() {
            self.now = self.epoch.elapsed().as_nanos() as u64;
        }
    }

    /// Checks and counts one frame.
    #[inline]
    pub fn frame(&mut self, frame: &[u8]) {
        match parse(frame, Verify::Header) {
            Parsed::Ok(stream, seq) if stream == self.stream => {
                if seq >= self.next_seq {
                    self.next_seq = seq + 1;
                } else {
                    self.counts.out_of_order += 1;
                }
                self.counts.frames += 1;
                self.counts.bytes += frame.len() as u64;
                if let (Some(h), Some(t)) = (self.latency.as_mut(), frame.get(TIME)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(t);
                    let sent = u64::from_be_bytes(b);
                    h.saturating_record(self.now.saturating_sub(sent).max(1));
                }
            }
            Parsed::Ok(..) => self.counts.stale += 1,
            Parsed::Corrupt => self.counts.corrupt += 1,
            Parsed::Foreign => self.counts.foreign += 1,
        }
    }

    pub fn counts(&self) -> MeterCounts {
        self.counts
    }

    pub fn latency(&self) -> Option<&LatencyHistogram> {
        self.latency.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn sizes_count_the_fcs_and_absurd_ones_are_refused() {
        assert_eq!(port_len(64).unwrap(), 60);
        assert_eq!(port_len(1518).unwrap(), 1514);
        assert_eq!(port_len(9216).unwrap(), 9212);
        for bad in [0, 63, 9217, usize::MAX] {
            let e = port_len(bad).unwrap_err().to_string();
            assert!(e.contains(&bad.to_string()) && e.contains("FCS"), "{e}");
        }
    }

    #[test]
    fn stamped_frames_are_counted_in_order_and_timed() {
        let epoch = Instant::now();
        let mut gen = Generator::new(60, mac(2), mac(1), 3, epoch, true).unwrap();
        let mut meter = Meter::new(3, epoch, true);
        let mut frames = Vec::new();
        let now = gen.now();
        for i in 0..4 {
            let mut f = gen.template().to_vec();
            gen.stamp(&mut f, i, now);
            frames.push(f);
        }
        gen.commit(4);
        assert_eq!(gen.sent(), 4);
        std::thread::sleep(Duration::from_millis(2));
        meter.tick();
        // 0, 2, 1 (late), 3; then a stray of another stream, a damaged
        // frame and someone else's.
        for i in [0, 2, 1, 3] {
            meter.frame(&frames[i]);
        }
        let other = Generator::new(60, mac(2), mac(1), 4, epoch, true).unwrap();
        meter.frame(other.template());
        let mut bad = frames[0].clone();
        bad[20] ^= 1;
        meter.frame(&bad);
        meter.frame(&[0u8; 60]);
        let c = meter.counts();
        assert_eq!(c.frames, 4);
        assert_eq!(c.bytes, 240);
        assert_eq!(c.out_of_order, 1);
        assert_eq!((c.stale, c.corrupt, c.foreign), (1, 1, 1));
        let h = meter.latency().unwrap();
        assert_eq!(h.len(), 4);
        // Sent before the 2 ms sleep, received after.
        assert!(h.min() >= 2_000_000, "min {} ns", h.min());
        assert!(h.max() < 10_000_000_000, "max {} ns", h.max());
    }

    #[test]
    fn hostile_frames_do_not_panic_the_meter() {
        let mut meter = Meter::new(0, Instant::now(), true);
        meter.tick();
        for len in 0..80 {
            meter.frame(&vec![0x88; len]);
            let mut f = vec![0u8; len];
            if len >= 14 {
                f[12] = 0x88;
                f[13] = 0xb5;
            }
            meter.frame(&f);
        }
        assert_eq!(meter.counts().frames, 0);
    }
}
