//! A frame generator and a checking sink over [`VhostFrontend`]s, for
//! tests and benchmarks. Both are plain state machines polled by the
//! caller, so one thread can drive a sending and a receiving frontend in
//! one loop ([`drive`]) and be pinned to one CPU.
//!
//! Frame layout (all after the 14-byte Ethernet header, ethertype
//! [`ETHERTYPE`]):
//!
//! | offset | bytes | what |
//! |--------|-------|------|
//! | 14 | 4 | stream id, big endian |
//! | 18 | 8 | sequence number, big endian, from 0 per stream |
//! | 26 | 4 | check word: a hash of stream, sequence and frame length |
//! | 30.. | rest | a byte pattern fixed per (stream, offset) |
//!
//! The blaster writes the frame once into every TX buffer and then only
//! rewrites bytes 18..30 per frame; the sink recomputes the check word and
//! (in [`Verify::Full`]) compares the whole pattern.

use std::time::{Duration, Instant};

use super::{VhostFrontend, VhostFrontendError};
use crate::wire::{write_header, MacAddr};

/// IEEE 802 local experimental ethertype 1.
pub const ETHERTYPE: u16 = 0x88b5;
/// The smallest frame that carries the fields above.
pub const MIN_FRAME: usize = 30;
const STREAM: usize = 14;
const SEQ: usize = 18;
const CHECK: usize = 26;
const PATTERN: usize = 30;
/// Stream ids the sink tracks (ids beyond count as foreign).
pub const MAX_STREAMS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("a frame of {0} bytes is too small: the generator needs at least {MIN_FRAME}")]
    FrameTooSmall(usize),
    #[error("stream id {0} is too large: the sink tracks ids below {MAX_STREAMS}")]
    StreamTooLarge(u32),
    #[error(transparent)]
    Frontend(#[from] VhostFrontendError),
}

/// What the generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    /// Frame length in bytes (no virtio header, no FCS).
    pub size: usize,
    pub dst: MacAddr,
    pub src: MacAddr,
    pub stream: u32,
}

fn check_word(stream: u32, seq: u64, len: usize) -> u32 {
    let mut h = seq
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(((stream as u64) << 32) | len as u64);
    h ^= h >> 29;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 32;
    h as u32
}

fn pattern_byte(stream: u32, offset: usize) -> u8 {
    (offset as u8).wrapping_mul(31) ^ (stream as u8) ^ 0x5a
}

/// Writes stream, sequence number and check word into a frame built by
/// [`build_frame`] (`frame.len() >= MIN_FRAME`; shorter frames are left
/// alone).
pub fn stamp(frame: &mut [u8], stream: u32, seq: u64) {
    let len = frame.len();
    let Some(fields) = frame.get_mut(STREAM..PATTERN) else {
        return;
    };
    fields[0..4].copy_from_slice(&stream.to_be_bytes());
    fields[4..12].copy_from_slice(&seq.to_be_bytes());
    fields[12..16].copy_from_slice(&check_word(stream, seq, len).to_be_bytes());
}

/// A whole frame of `spec` with sequence number `seq`.
pub fn build_frame(spec: &FrameSpec, seq: u64) -> Result<Vec<u8>, TrafficError> {
    if spec.size < MIN_FRAME {
        return Err(TrafficError::FrameTooSmall(spec.size));
    }
    let mut f = vec![0u8; spec.size];
    write_header(&mut f, spec.dst, spec.src, ETHERTYPE);
    for (i, b) in f.iter_mut().enumerate().skip(PATTERN) {
        *b = pattern_byte(spec.stream, i);
    }
    stamp(&mut f, spec.stream, seq);
    Ok(f)
}

/// What a frame is, as far as the sink can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Intact: (stream, seq).
    Ok(u32, u64),
    /// Ours (ethertype) but damaged.
    Corrupt,
    /// Not ours.
    Foreign,
}

/// How much of each frame the sink checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Every byte: header fields, check word and the whole pattern.
    Full,
    /// Header fields, check word and the pattern's last byte (touches two
    /// cache lines: for benchmarks at line rate).
    Header,
}

/// Parses and checks one frame.
pub fn parse(frame: &[u8], verify: Verify) -> Parsed {
    if frame.get(12..14) != Some(&ETHERTYPE.to_be_bytes()[..]) {
        return Parsed::Foreign;
    }
    let (Some(s), Some(q), Some(c)) = (
        frame.get(STREAM..SEQ),
        frame.get(SEQ..CHECK),
        frame.get(CHECK..PATTERN),
    ) else {
        return Parsed::Corrupt;
    };
    let stream = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
    let mut qb = [0u8; 8];
    qb.copy_from_slice(q);
    let seq = u64::from_be_bytes(qb);
    let check = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
    if check != check_word(stream, seq, frame.len()) {
        return Parsed::Corrupt;
    }
    let body = &frame[PATTERN..];
    let intact = match verify {
        Verify::Full => body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(stream, i + PATTERN)),
        Verify::Header => body
            .last()
            .map_or(true, |&b| b == pattern_byte(stream, frame.len() - 1)),
    };
    if intact {
        Parsed::Ok(stream, seq)
    } else {
        Parsed::Corrupt
    }
}

/// Sends frames of one [`FrameSpec`] with sequence numbers 0, 1, 2, ...
/// in blast mode (zero copy: only bytes 18..30 change per frame).
pub struct Blaster {
    spec: FrameSpec,
    next_seq: u64,
}

impl Blaster {
    pub fn new(spec: FrameSpec) -> Result<Blaster, TrafficError> {
        if spec.size < MIN_FRAME {
            return Err(TrafficError::FrameTooSmall(spec.size));
        }
        if spec.stream >= MAX_STREAMS {
            return Err(TrafficError::StreamTooLarge(spec.stream));
        }
        Ok(Blaster { spec, next_seq: 0 })
    }

    pub fn spec(&self) -> &FrameSpec {
        &self.spec
    }

    /// Writes the frame into `fe`'s TX buffers; call once before
    /// [`Blaster::pump`]. One blaster per frontend: the buffers hold one
    /// template (the frontend's `send` may be mixed in; blast writes the
    /// template back into the buffers it used).
    pub fn prepare(&self, fe: &mut VhostFrontend) -> Result<(), TrafficError> {
        fe.blast_prepare(&build_frame(&self.spec, 0)?)?;
        Ok(())
    }

    /// Posts up to `max` frames (as many as the TX ring takes); returns
    /// how many.
    pub fn pump(&mut self, fe: &mut VhostFrontend, max: usize) -> usize {
        let stream = self.spec.stream;
        let mut seq = self.next_seq;
        let n = fe.blast(max, |f| {
            stamp(f, stream, seq);
            seq += 1;
        });
        self.next_seq = seq;
        n
    }

    /// Frames posted so far (= the next sequence number).
    pub fn sent(&self) -> u64 {
        self.next_seq
    }
}

/// Counts of a sink. `lost` counts gaps in each stream's sequence (a late
/// frame fills its gap back), plus, after [`Sink::finish`], frames never
/// seen at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkReport {
    /// Intact frames of our streams.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    pub lost: u64,
    /// Frames older than one already seen in their stream.
    pub out_of_order: u64,
    /// Frames of our ethertype that fail the checks.
    pub corrupt: u64,
    /// Frames of another ethertype (or stream id beyond [`MAX_STREAMS`]).
    pub foreign: u64,
}

/// Receives and checks frames from the [`Blaster`]s' streams.
pub struct Sink {
    verify: Verify,
    /// Next expected sequence number per stream id.
    next: Vec<u64>,
    report: SinkReport,
}

impl Sink {
    pub fn new(verify: Verify) -> Sink {
        Sink {
            verify,
            next: Vec::new(),
            report: SinkReport::default(),
        }
    }

    /// Checks and counts one frame.
    pub fn check(&mut self, frame: &[u8]) {
        match parse(frame, self.verify) {
            Parsed::Ok(stream, seq) if stream < MAX_STREAMS => {
                let s = stream as usize;
                if s >= self.next.len() {
                    self.next.resize(s + 1, 0);
                }
                let next = &mut self.next[s];
                if seq >= *next {
                    self.report.lost += seq - *next;
                    *next = seq + 1;
                } else {
                    self.report.out_of_order += 1;
                    self.report.lost = self.report.lost.saturating_sub(1);
                }
                self.report.frames += 1;
                self.report.bytes += frame.len() as u64;
            }
            Parsed::Ok(..) | Parsed::Foreign => self.report.foreign += 1,
            Parsed::Corrupt => self.report.corrupt += 1,
        }
    }

    /// Receives what `fe` has (no waiting); returns the number of frames.
    pub fn poll(&mut self, fe: &mut VhostFrontend) -> usize {
        fe.recv(|f| self.check(f))
    }

    /// Receives until nothing arrived for `quiet` (sleeping on the call
    /// eventfd), or `limit` passed.
    pub fn drain(
        &mut self,
        fe: &mut VhostFrontend,
        quiet: Duration,
        limit: Duration,
    ) -> Result<(), VhostFrontendError> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.poll(fe) == 0 && !fe.wait_rx(quiet)? {
                break;
            }
        }
        Ok(())
    }

    /// Stream `stream` sent `sent` frames in all: the ones never seen
    /// after the last one seen count as lost too.
    pub fn finish(&mut self, stream: u32, sent: u64) {
        let s = stream as usize;
        if s >= self.next.len() {
            self.next.resize(s + 1, 0);
        }
        let next = &mut self.next[s];
        if sent > *next {
            self.report.lost += sent - *next;
            *next = sent;
        }
    }

    pub fn report(&self) -> SinkReport {
        self.report
    }
}

/// How one [`drive`] went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DriveStats {
    pub elapsed: Duration,
    /// Time spent in turns that moved at least one frame: the generator's
    /// own work. The rest of `elapsed` it waited for the backend (its
    /// rings were full or empty).
    pub busy: Duration,
    /// Frames the blaster posted during the drive.
    pub sent: u64,
    /// Frames the sink received during the drive.
    pub received: u64,
}

impl DriveStats {
    /// The generator's work per frame received, in ns: the inverse of
    /// the rate it could source and sink if the backend took no time.
    pub fn busy_ns_per_frame(&self) -> Option<f64> {
        (self.received > 0).then(|| self.busy.as_nanos() as f64 / self.received as f64)
    }
}

/// One thread sends and receives at full speed for `duration`: each turn
/// posts up to `batch` frames on `tx` and drains `rx`. Busy polling: no
/// sleep, no syscall except kicks the backends ask for (the clock is a
/// vDSO call, read once per turn).
pub fn drive(
    tx: &mut VhostFrontend,
    blaster: &mut Blaster,
    rx: &mut VhostFrontend,
    sink: &mut Sink,
    duration: Duration,
    batch: usize,
) -> DriveStats {
    let start = Instant::now();
    let (s0, r0) = (blaster.sent(), sink.report().frames);
    let mut busy = Duration::ZERO;
    let mut prev = start;
    loop {
        let moved = blaster.pump(tx, batch) + sink.poll(rx);
        let now = Instant::now();
        if moved > 0 {
            busy += now - prev;
        }
        prev = now;
        if now - start >= duration {
            break;
        }
    }
    DriveStats {
        elapsed: prev - start,
        busy,
        sent: blaster.sent() - s0,
        received: sink.report().frames - r0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: usize) -> FrameSpec {
        FrameSpec {
            size,
            dst: MacAddr([2, 0, 0, 0, 0, 2]),
            src: MacAddr([2, 0, 0, 0, 0, 1]),
            stream: 7,
        }
    }

    #[test]
    fn frames_parse_back_and_stamping_changes_only_the_fields() {
        for size in [MIN_FRAME, 60, 64, 1500, 9000] {
            let f = build_frame(&spec(size), 41).unwrap();
            assert_eq!(f.len(), size);
            assert_eq!(parse(&f, Verify::Full), Parsed::Ok(7, 41));
            let mut g = f.clone();
            stamp(&mut g, 7, 1 << 40);
            assert_eq!(parse(&g, Verify::Full), Parsed::Ok(7, 1 << 40));
            assert_eq!(f[..SEQ], g[..SEQ]);
            assert_eq!(f[PATTERN..], g[PATTERN..]);
        }
        assert!(matches!(
            build_frame(&spec(29), 0),
            Err(TrafficError::FrameTooSmall(29))
        ));
    }

    #[test]
    fn damage_is_caught() {
        let f = build_frame(&spec(200), 5).unwrap();
        for i in STREAM..200 {
            let mut g = f.clone();
            g[i] ^= 0x10;
            assert_eq!(parse(&g, Verify::Full), Parsed::Corrupt, "byte {i}");
        }
        // Truncation changes the length the check word covers.
        assert_eq!(parse(&f[..199], Verify::Header), Parsed::Corrupt);
        assert_eq!(parse(&f[..20], Verify::Full), Parsed::Corrupt);
        let mut other = f.clone();
        other[12] = 0x08;
        assert_eq!(parse(&other, Verify::Full), Parsed::Foreign);
        assert_eq!(parse(&[], Verify::Full), Parsed::Foreign);
    }

    #[test]
    fn sink_counts_loss_order_and_corruption() {
        let mut sink = Sink::new(Verify::Full);
        let s = spec(64);
        for seq in [0u64, 1, 2, 5, 4, 6] {
            sink.check(&build_frame(&s, seq).unwrap());
        }
        let mut bad = build_frame(&s, 7).unwrap();
        bad[40] ^= 1;
        sink.check(&bad);
        sink.check(&[0u8; 60]);
        sink.finish(7, 10);
        let r = sink.report();
        assert_eq!(r.frames, 6);
        assert_eq!(r.bytes, 6 * 64);
        assert_eq!(r.out_of_order, 1);
        // 3 (never seen), 7 (corrupt), 8, 9 (never sent... counted by finish).
        assert_eq!(r.lost, 4);
        assert_eq!(r.corrupt, 1);
        assert_eq!(r.foreign, 1);
    }
}
