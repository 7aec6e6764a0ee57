//! Link impairments in user space (what `tc netem` and `tbf` do to a
//! kernel interface): loss (independent, correlated or Gilbert-Elliott),
//! duplication, corruption, reordering, delay with jitter and a rate limit
//! with a burst, per port and per direction.
//!
//! Runs on the data-plane thread with no system call and, once warm, no
//! allocation: frames that must wait are copied into recycled buffers and
//! kept in one queue per direction ordered by release time (the timer
//! structure); the loop's poll timeout comes from the queue's head. A
//! direction that only drops frames passes the others on untouched.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::wire::offload::Offload;

/// Longest delay (and jitter) accepted: a minute.
pub const MAX_DELAY_MS: f64 = 60_000.0;
/// Fastest rate limit accepted: 100 Gbit/s.
pub const MAX_RATE_KBPS: u64 = 100_000_000;
/// Largest burst accepted: 1 GiB.
pub const MAX_BURST_KB: u64 = 1 << 20;
/// Frames one direction may hold (delayed or shaped) before it drops.
pub const MAX_HELD_FRAMES: usize = 16_384;
/// Bytes one direction may hold before it drops.
pub const MAX_HELD_BYTES: usize = 64 << 20;
/// The shaper keeps at most this much traffic waiting (as `tbf`'s latency).
pub const SHAPER_QUEUE_NS: u64 = 100_000_000;
/// Bytes a frame of the largest standard size takes on the wire.
const FULL_FRAME: u64 = 1518;

/// What one direction of a port does to its frames. Every field is
/// optional; an absent field does nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectionSpec {
    /// Added one-way delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<f64>,
    /// Uniform variation of the delay, +- this much. Frames keep their
    /// order (a frame never leaves before the one ahead of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    /// Frames lost at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
    /// How much each frame's fate leans on the previous one's: losses
    /// come in runs while the mean stays `loss_pct` (unlike netem's
    /// correlation, which lowers the mean).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_correlation_pct: Option<f64>,
    /// Bursty loss by a two-state Markov chain instead of `loss_pct`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_gilbert_elliott: Option<GilbertElliott>,
    /// Frames sent twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_pct: Option<f64>,
    /// Frames that skip the delay and so overtake the ones waiting
    /// (netem's reorder); needs a delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder_pct: Option<f64>,
    /// Frames with one bit flipped after the Ethernet header (so they
    /// still arrive, with a bad checksum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt_pct: Option<f64>,
    /// Rate limit in kilobits (1000 bits) per second of frame bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_kbps: Option<u64>,
    /// Bytes (KiB) that may go at once before the rate applies; default
    /// the larger of 10 ms at the rate and two full frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_kb: Option<u64>,
}

/// The Gilbert-Elliott loss model: a good and a bad state, each with its
/// own loss probability.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GilbertElliott {
    /// Chance per frame of going from good to bad.
    pub p_pct: f64,
    /// Chance per frame of going from bad to good.
    pub r_pct: f64,
    /// Loss in the bad state (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_loss_pct: Option<f64>,
    /// Loss in the good state (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub good_loss_pct: Option<f64>,
}

/// Both directions of a port. `egress` is towards the port's client,
/// `ingress` from it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpairSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<DirectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<DirectionSpec>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImpairError {
    #[error("{dir}.{field} is {value}; it must be between {min} and {max}")]
    OutOfRange {
        dir: &'static str,
        field: &'static str,
        value: f64,
        min: f64,
        max: f64,
    },
    #[error(
        "{dir}.rate_kbps is 0, which would forward nothing; set link down or loss_pct 100 for that"
    )]
    ZeroRate { dir: &'static str },
    #[error("{dir}.{field} needs {needs}")]
    Needs {
        dir: &'static str,
        field: &'static str,
        needs: &'static str,
    },
    #[error("{dir}: loss_pct and loss_gilbert_elliott are two loss models; set one")]
    TwoLossModels { dir: &'static str },
}

impl ImpairSpec {
    pub fn validate(&self) -> Result<(), ImpairError> {
        if let Some(d) = &self.egress {
            d.validate("egress")?;
        }
        if let Some(d) = &self.ingress {
            d.validate("ingress")?;
        }
        Ok(())
    }

    /// Nothing set in either direction.
    pub fn is_empty(&self) -> bool {
        self.egress.as_ref().map_or(true, DirectionSpec::is_empty)
            && self.ingress.as_ref().map_or(true, DirectionSpec::is_empty)
    }
}

fn range(
    dir: &'static str,
    field: &'static str,
    v: Option<f64>,
    max: f64,
) -> Result<(), ImpairError> {
    match v {
        Some(value) if !(0.0..=max).contains(&value) || !value.is_finite() => {
            Err(ImpairError::OutOfRange {
                dir,
                field,
                value,
                min: 0.0,
                max,
            })
        }
        _ => Ok(()),
    }
}

impl DirectionSpec {
    pub fn validate(&self, dir: &'static str) -> Result<(), ImpairError> {
        range(dir, "delay_ms", self.delay_ms, MAX_DELAY_MS)?;
        range(dir, "jitter_ms", self.jitter_ms, MAX_DELAY_MS)?;
        for (field, v) in [
            ("loss_pct", self.loss_pct),
            ("loss_correlation_pct", self.loss_correlation_pct),
            ("duplicate_pct", self.duplicate_pct),
            ("reorder_pct", self.reorder_pct),
            ("corrupt_pct", self.corrupt_pct),
        ] {
            range(dir, field, v, 100.0)?;
        }
        if let Some(ge) = &self.loss_gilbert_elliott {
            if self.loss_pct.is_some() {
                return Err(ImpairError::TwoLossModels { dir });
            }
            for (field, v) in [
                ("loss_gilbert_elliott.p_pct", Some(ge.p_pct)),
                ("loss_gilbert_elliott.r_pct", Some(ge.r_pct)),
                ("loss_gilbert_elliott.bad_loss_pct", ge.bad_loss_pct),
                ("loss_gilbert_elliott.good_loss_pct", ge.good_loss_pct),
            ] {
                range(dir, field, v, 100.0)?;
            }
        }
        if self.loss_correlation_pct.is_some() && self.loss_pct.is_none() {
            return Err(ImpairError::Needs {
                dir,
                field: "loss_correlation_pct",
                needs: "loss_pct",
            });
        }
        if self.reorder_pct.is_some_and(|r| r > 0.0) && !self.delay_ms.is_some_and(|d| d > 0.0) {
            return Err(ImpairError::Needs {
                dir,
                field: "reorder_pct",
                needs: "a delay_ms above 0 (reordered frames are the ones that skip it)",
            });
        }
        if self.burst_kb.is_some() && self.rate_kbps.is_none() {
            return Err(ImpairError::Needs {
                dir,
                field: "burst_kb",
                needs: "rate_kbps",
            });
        }
        match self.rate_kbps {
            Some(0) => return Err(ImpairError::ZeroRate { dir }),
            Some(r) if r > MAX_RATE_KBPS => {
                return Err(ImpairError::OutOfRange {
                    dir,
                    field: "rate_kbps",
                    value: r as f64,
                    min: 1.0,
                    max: MAX_RATE_KBPS as f64,
                })
            }
            _ => {}
        }
        if let Some(b) = self.burst_kb {
            if b == 0 || b > MAX_BURST_KB {
                return Err(ImpairError::OutOfRange {
                    dir,
                    field: "burst_kb",
                    value: b as f64,
                    min: 1.0,
                    max: MAX_BURST_KB as f64,
                });
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == DirectionSpec::default()
    }
}

/// A probability as a threshold on a 32-bit random draw.
#[derive(Debug, Clone, Copy, Default)]
struct Chance(u64);

impl Chance {
    fn pct(p: Option<f64>) -> Chance {
        let p = p.unwrap_or(0.0).clamp(0.0, 100.0) / 100.0;
        Chance((p * (1u64 << 32) as f64) as u64)
    }
    fn is_zero(self) -> bool {
        self.0 == 0
    }
}

#[derive(Debug, Clone, Copy)]
enum LossModel {
    None,
    Random {
        p: Chance,
        correlation: f64,
    },
    GilbertElliott {
        p: Chance,
        r: Chance,
        bad: Chance,
        good: Chance,
    },
}

/// One frame that waits for its time.
#[derive(Debug)]
pub struct Held {
    pub release_ns: u64,
    pub buf: Vec<u8>,
    pub offload: Offload,
}

/// What [`Impairer::admit`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Goes on now, unchanged (the caller forwards its own bytes).
    Pass,
    /// Lost on purpose (`loss_*`).
    Lost,
    /// Nothing more may wait in this direction: dropped.
    QueueFull,
    /// Copied into the queue (once, or twice if duplicated); it comes out
    /// of [`Impairer::pop_due`].
    Held,
}

/// What happened to frames, as counts the data plane adds to the port's.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImpairEvents {
    pub duplicated: u64,
    pub corrupted: u64,
    pub reordered: u64,
}

/// One direction's impairments at run time.
#[derive(Debug)]
pub struct Impairer {
    spec: DirectionSpec,
    loss: LossModel,
    duplicate: Chance,
    reorder: Chance,
    corrupt: Chance,
    delay_ns: u64,
    jitter_ns: u64,
    /// Nanoseconds per byte, when rate limited.
    ns_per_byte: Option<f64>,
    /// The burst as time at the rate.
    burst_ns: u64,
    /// Whether any frame must wait or be copied (else admit only drops).
    holds: bool,
    rng: u64,
    last_lost: bool,
    ge_bad: bool,
    /// The shaper's theoretical arrival time (GCRA).
    tat_ns: u64,
    /// Release time of the last frame queued in order.
    last_release_ns: u64,
    queue: VecDeque<Held>,
    queued_bytes: usize,
    pool: Vec<Vec<u8>>,
    pub events: ImpairEvents,
}

impl Impairer {
    /// `spec` must have passed [`DirectionSpec::validate`].
    pub fn new(spec: &DirectionSpec, seed: u64) -> Impairer {
        let loss = if let Some(ge) = &spec.loss_gilbert_elliott {
            LossModel::GilbertElliott {
                p: Chance::pct(Some(ge.p_pct)),
                r: Chance::pct(Some(ge.r_pct)),
                bad: Chance::pct(Some(ge.bad_loss_pct.unwrap_or(100.0))),
                good: Chance::pct(ge.good_loss_pct),
            }
        } else if spec.loss_pct.is_some_and(|p| p > 0.0) {
            LossModel::Random {
                p: Chance::pct(spec.loss_pct),
                correlation: spec.loss_correlation_pct.unwrap_or(0.0).clamp(0.0, 100.0) / 100.0,
            }
        } else {
            LossModel::None
        };
        let ms_to_ns = |ms: Option<f64>| (ms.unwrap_or(0.0).clamp(0.0, MAX_DELAY_MS) * 1e6) as u64;
        let ns_per_byte = spec.rate_kbps.map(|k| 8e6 / k.max(1) as f64);
        let burst_bytes = match (spec.burst_kb, spec.rate_kbps) {
            (Some(b), _) => b * 1024,
            // 10 ms at the rate: kbps * 1000 / 8 * 0.01
            (None, Some(r)) => (r * 10 / 8).max(2 * FULL_FRAME),
            (None, None) => 0,
        };
        let burst_ns = ns_per_byte.map_or(0, |n| (burst_bytes as f64 * n) as u64);
        let duplicate = Chance::pct(spec.duplicate_pct);
        let reorder = Chance::pct(spec.reorder_pct);
        let corrupt = Chance::pct(spec.corrupt_pct);
        let delay_ns = ms_to_ns(spec.delay_ms);
        let jitter_ns = ms_to_ns(spec.jitter_ms);
        let holds = delay_ns > 0
            || jitter_ns > 0
            || ns_per_byte.is_some()
            || !duplicate.is_zero()
            || !reorder.is_zero()
            || !corrupt.is_zero();
        Impairer {
            spec: spec.clone(),
            loss,
            duplicate,
            reorder,
            corrupt,
            delay_ns,
            jitter_ns,
            ns_per_byte,
            burst_ns,
            holds,
            rng: seed | 1,
            last_lost: false,
            ge_bad: false,
            tat_ns: 0,
            last_release_ns: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            pool: Vec::new(),
            events: ImpairEvents::default(),
        }
    }

    pub fn spec(&self) -> &DirectionSpec {
        &self.spec
    }

    /// Takes over what `old` still holds, so changing the settings while
    /// frames wait neither loses nor reorders them.
    pub fn inherit(&mut self, old: Impairer) {
        self.queue = old.queue;
        self.queued_bytes = old.queued_bytes;
        self.pool = old.pool;
        self.last_release_ns = old.last_release_ns;
        self.ge_bad = old.ge_bad;
    }

    /// xorshift64*: fast, good enough for drawing loss and jitter.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A 32-bit draw.
    fn draw(&mut self) -> u64 {
        self.next() >> 32
    }

    fn happens(&mut self, c: Chance) -> bool {
        !c.is_zero() && self.draw() < c.0
    }

    fn lost(&mut self) -> bool {
        match self.loss {
            LossModel::None => false,
            LossModel::Random { p, correlation } => {
                if correlation == 0.0 {
                    return self.happens(p);
                }
                // A Markov chain whose stationary loss is p and whose
                // successive draws correlate by `correlation`: after a
                // loss the chance is c + (1-c)p, after a frame (1-c)p.
                let base = p.0 as f64 * (1.0 - correlation);
                let t = if self.last_lost {
                    base + correlation * (1u64 << 32) as f64
                } else {
                    base
                };
                self.last_lost = (self.draw() as f64) < t;
                self.last_lost
            }
            LossModel::GilbertElliott { p, r, bad, good } => {
                self.ge_bad = if self.ge_bad {
                    !self.happens(r)
                } else {
                    self.happens(p)
                };
                let c = if self.ge_bad { bad } else { good };
                self.happens(c)
            }
        }
    }

    /// Decides what happens to one frame arriving at `now_ns`.
    pub fn admit(&mut self, frame: &[u8], offload: Offload, now_ns: u64) -> Verdict {
        if self.lost() {
            return Verdict::Lost;
        }
        // Frames still waiting (from settings since cleared or changed)
        // go first: a new frame queues behind them.
        if !self.holds && self.queue.is_empty() {
            return Verdict::Pass;
        }
        let copies = if self.happens(self.duplicate) { 2 } else { 1 };
        for copy in 0..copies {
            if !self.hold(frame, offload, now_ns) {
                return if copy == 0 {
                    Verdict::QueueFull
                } else {
                    Verdict::Held
                };
            }
            if copy == 1 {
                self.events.duplicated += 1;
            }
        }
        Verdict::Held
    }

    /// Queues one copy; false if it does not fit.
    fn hold(&mut self, frame: &[u8], offload: Offload, now_ns: u64) -> bool {
        if self.queue.len() >= MAX_HELD_FRAMES || self.queued_bytes + frame.len() > MAX_HELD_BYTES {
            return false;
        }
        let mut depart = now_ns;
        if let Some(npb) = self.ns_per_byte {
            let tat = self.tat_ns.max(now_ns);
            depart = now_ns.max(tat.saturating_sub(self.burst_ns));
            let limit = SHAPER_QUEUE_NS.max((3.0 * FULL_FRAME as f64 * npb) as u64);
            if depart - now_ns > limit {
                return false;
            }
            self.tat_ns = tat + (frame.len() as f64 * npb) as u64;
        }
        let reordered = self.happens(self.reorder);
        let release = if reordered {
            self.events.reordered += 1;
            depart
        } else {
            let mut r = depart + self.delay_ns;
            if self.jitter_ns > 0 {
                let span = 2 * self.jitter_ns + 1;
                r = (r + self.next() % span).saturating_sub(self.jitter_ns);
            }
            // Jitter does not reorder: a frame waits for the one ahead.
            let r = r.max(self.last_release_ns).max(depart);
            self.last_release_ns = r;
            r
        };
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        if self.happens(self.corrupt) && buf.len() > crate::wire::ETH_HEADER_LEN {
            let bits = (buf.len() - crate::wire::ETH_HEADER_LEN) as u64 * 8;
            let bit = self.next() % bits;
            buf[crate::wire::ETH_HEADER_LEN + (bit / 8) as usize] ^= 1 << (bit % 8);
            self.events.corrupted += 1;
        }
        self.queued_bytes += buf.len();
        let held = Held {
            release_ns: release,
            buf,
            offload,
        };
        // Ordered by release time; only reordered frames go anywhere but
        // the back.
        if self.queue.back().map_or(true, |b| b.release_ns <= release) {
            self.queue.push_back(held);
        } else {
            let at = self.queue.partition_point(|h| h.release_ns <= release);
            self.queue.insert(at, held);
        }
        true
    }

    /// When the next held frame is due.
    pub fn next_due(&self) -> Option<u64> {
        self.queue.front().map(|h| h.release_ns)
    }

    /// The next frame due by `now_ns`; give its buffer back with
    /// [`Impairer::recycle`].
    pub fn pop_due(&mut self, now_ns: u64) -> Option<Held> {
        if self.queue.front()?.release_ns > now_ns {
            return None;
        }
        let h = self.queue.pop_front()?;
        self.queued_bytes -= h.buf.len();
        Some(h)
    }

    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < MAX_HELD_FRAMES {
            self.pool.push(buf);
        }
    }

    /// Frames waiting.
    pub fn held(&self) -> usize {
        self.queue.len()
    }

    /// Drops everything waiting (the port left its lan or is removed);
    /// returns how many.
    pub fn discard(&mut self) -> usize {
        let n = self.queue.len();
        while let Some(h) = self.queue.pop_front() {
            self.recycle(h.buf);
        }
        self.queued_bytes = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(f: impl FnOnce(&mut DirectionSpec)) -> DirectionSpec {
        let mut s = DirectionSpec::default();
        f(&mut s);
        s
    }

    fn frame(n: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[0] = 2;
        f[14] = n;
        f
    }

    /// The sequence number a test frame carries three times (so a
    /// corrupted bit cannot hide it).
    fn seq_of(f: &[u8]) -> u64 {
        let at = |i: usize| u64::from_le_bytes(f[i..i + 8].try_into().unwrap());
        let (a, b, c) = (at(15), at(23), at(31));
        if a == b || a == c {
            a
        } else {
            b
        }
    }

    fn stamp(f: &mut [u8], seq: u64) {
        for i in [15, 23, 31] {
            f[i..i + 8].copy_from_slice(&seq.to_le_bytes());
        }
    }

    /// Runs `frames` frames arriving every `gap_ns` through `imp`, and
    /// returns (release time - arrival time, frame) of everything out.
    fn run(imp: &mut Impairer, frames: usize, len: usize, gap_ns: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut arrivals = Vec::new();
        let mut now = 1_000_000_000u64;
        for i in 0..frames {
            let f = frame(i as u8, len);
            let mut seq = f.clone();
            stamp(&mut seq, i as u64);
            arrivals.push(now);
            match imp.admit(&seq, Offload::default(), now) {
                Verdict::Pass => out.push((0, seq)),
                Verdict::Held => {}
                Verdict::Lost | Verdict::QueueFull => {}
            }
            while let Some(h) = imp.pop_due(now) {
                let i = seq_of(&h.buf) as usize;
                out.push((h.release_ns - arrivals[i], h.buf.clone()));
                imp.recycle(h.buf);
            }
            now += gap_ns;
        }
        while let Some(t) = imp.next_due() {
            let h = imp.pop_due(t).unwrap();
            let i = seq_of(&h.buf) as usize;
            out.push((h.release_ns - arrivals[i], h.buf.clone()));
            imp.recycle(h.buf);
        }
        out
    }

    #[test]
    fn hostile_values_are_refused_with_the_field_named() {
        let bad = [
            (spec(|s| s.loss_pct = Some(150.0)), "egress.loss_pct is 150"),
            (spec(|s| s.loss_pct = Some(-1.0)), "egress.loss_pct is -1"),
            (
                spec(|s| s.delay_ms = Some(365.0 * 86_400_000.0)),
                "egress.delay_ms",
            ),
            (spec(|s| s.jitter_ms = Some(f64::NAN)), "egress.jitter_ms"),
            (spec(|s| s.rate_kbps = Some(0)), "forward nothing"),
            (
                spec(|s| s.rate_kbps = Some(MAX_RATE_KBPS + 1)),
                "egress.rate_kbps",
            ),
            (spec(|s| s.burst_kb = Some(10)), "needs rate_kbps"),
            (
                spec(|s| {
                    s.rate_kbps = Some(10);
                    s.burst_kb = Some(0)
                }),
                "egress.burst_kb is 0",
            ),
            (spec(|s| s.reorder_pct = Some(5.0)), "needs a delay_ms"),
            (
                spec(|s| s.loss_correlation_pct = Some(5.0)),
                "needs loss_pct",
            ),
            (
                spec(|s| {
                    s.loss_pct = Some(1.0);
                    s.loss_gilbert_elliott = Some(GilbertElliott::default())
                }),
                "two loss models",
            ),
            (
                spec(|s| {
                    s.loss_gilbert_elliott = Some(GilbertElliott {
                        p_pct: 101.0,
                        ..Default::default()
                    })
                }),
                "loss_gilbert_elliott.p_pct",
            ),
        ];
        for (s, want) in bad {
            let e = ImpairSpec {
                egress: Some(s.clone()),
                ingress: None,
            }
            .validate()
            .expect_err(&format!("{s:?} accepted"));
            assert!(e.to_string().contains(want), "{e} (wanted {want})");
        }
        let s: Result<ImpairSpec, _> = serde_json::from_str(r#"{"egress":{"delay":5}}"#);
        assert!(s.unwrap_err().to_string().contains("unknown field"));
        let ok = spec(|s| {
            s.delay_ms = Some(50.0);
            s.jitter_ms = Some(5.0);
            s.loss_pct = Some(1.0);
            s.rate_kbps = Some(10_000);
        });
        ok.validate("egress").unwrap();
    }

    #[test]
    fn no_impairment_passes_everything_without_copying() {
        let mut imp = Impairer::new(&DirectionSpec::default(), 1);
        for i in 0..1000 {
            assert_eq!(
                imp.admit(&frame(i as u8, 64), Offload::default(), i),
                Verdict::Pass
            );
        }
        assert_eq!(imp.held(), 0);
    }

    #[test]
    fn delay_and_jitter_stay_in_bounds_and_keep_order() {
        let mut imp = Impairer::new(
            &spec(|s| {
                s.delay_ms = Some(50.0);
                s.jitter_ms = Some(5.0)
            }),
            7,
        );
        let out = run(&mut imp, 5000, 64, 100_000);
        assert_eq!(out.len(), 5000);
        let mut last = None;
        for (waited, f) in &out {
            let seq = seq_of(f);
            assert!(last.map_or(true, |l| seq > l), "out of order at {seq}");
            last = Some(seq);
            // Order costs at most the jitter on top: 45..=60 ms.
            assert!((45_000_000..=60_000_000).contains(waited), "{waited}");
        }
        // Sparse traffic (a frame every 20 ms): nothing waits for the frame
        // ahead, so the delay spreads evenly over 45..55 ms.
        let mut sparse = Impairer::new(
            &spec(|s| {
                s.delay_ms = Some(50.0);
                s.jitter_ms = Some(5.0)
            }),
            8,
        );
        let out = run(&mut sparse, 2000, 64, 20_000_000);
        assert!(out
            .iter()
            .all(|(w, _)| (45_000_000..=55_000_000).contains(w)));
        let mean = out.iter().map(|(w, _)| *w).sum::<u64>() / out.len() as u64;
        assert!((49_700_000..=50_300_000).contains(&mean), "mean {mean}");
        let below = out.iter().filter(|(w, _)| *w < 50_000_000).count();
        assert_binomial(below, out.len(), 0.5);
        let plain = run(
            &mut Impairer::new(&spec(|s| s.delay_ms = Some(50.0)), 7),
            100,
            64,
            100_000,
        );
        assert!(plain.iter().all(|(w, _)| *w == 50_000_000));
    }

    /// Lost frames over n draws fall within 4.5 standard deviations of n*p.
    fn assert_binomial(lost: usize, n: usize, p: f64) {
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        let dev = (lost as f64 - n as f64 * p).abs();
        assert!(
            dev <= 4.5 * sd,
            "{lost} of {n} lost, expected {}",
            n as f64 * p
        );
    }

    #[test]
    fn loss_rates_match() {
        for p in [1.0, 10.0, 50.0] {
            let mut imp = Impairer::new(&spec(|s| s.loss_pct = Some(p)), 42);
            let out = run(&mut imp, 50_000, 64, 1000);
            assert_binomial(50_000 - out.len(), 50_000, p / 100.0);
        }
        let all = run(
            &mut Impairer::new(&spec(|s| s.loss_pct = Some(100.0)), 1),
            1000,
            64,
            1,
        );
        assert!(all.is_empty());
    }

    #[test]
    fn correlated_loss_keeps_its_mean_and_comes_in_runs() {
        let mut imp = Impairer::new(
            &spec(|s| {
                s.loss_pct = Some(20.0);
                s.loss_correlation_pct = Some(75.0)
            }),
            3,
        );
        let n = 100_000;
        let lost: Vec<bool> = (0..n)
            .map(|i| imp.admit(&frame(0, 64), Offload::default(), i) == Verdict::Lost)
            .collect();
        let rate = lost.iter().filter(|&&l| l).count() as f64 / n as f64;
        assert!((rate - 0.2).abs() < 0.01, "{rate}");
        let both = lost.windows(2).filter(|w| w[0] && w[1]).count() as f64;
        let after_loss = both / lost.iter().filter(|&&l| l).count() as f64;
        // c + (1-c)p = 0.75 + 0.25 * 0.2
        assert!((after_loss - 0.8).abs() < 0.02, "{after_loss}");
    }

    #[test]
    fn gilbert_elliott_matches_its_stationary_loss() {
        let ge = GilbertElliott {
            p_pct: 2.0,
            r_pct: 20.0,
            bad_loss_pct: Some(80.0),
            good_loss_pct: Some(1.0),
        };
        let mut imp = Impairer::new(&spec(|s| s.loss_gilbert_elliott = Some(ge)), 9);
        let n = 200_000;
        let lost = (0..n)
            .filter(|&i| imp.admit(&frame(0, 64), Offload::default(), i) == Verdict::Lost)
            .count();
        let bad = 0.02 / (0.02 + 0.20);
        let want = bad * 0.80 + (1.0 - bad) * 0.01;
        let rate = lost as f64 / n as f64;
        assert!((rate - want).abs() < 0.01, "{rate} vs {want}");
    }

    #[test]
    fn duplicates_corruption_and_reordering_are_counted_and_real() {
        let mut imp = Impairer::new(
            &spec(|s| {
                s.delay_ms = Some(10.0);
                s.duplicate_pct = Some(10.0);
                s.corrupt_pct = Some(10.0);
                s.reorder_pct = Some(10.0);
            }),
            11,
        );
        let n = 20_000;
        let out = run(&mut imp, n, 100, 1_000_000);
        let ev = imp.events;
        assert_eq!(out.len(), n + ev.duplicated as usize);
        assert_binomial(ev.duplicated as usize, n, 0.1);
        assert_binomial(ev.corrupted as usize, out.len(), 0.1);
        assert_binomial(ev.reordered as usize, out.len(), 0.1);
        // A corrupted frame differs from the original in exactly one bit,
        // after the Ethernet header.
        let mut flipped = 0;
        for (_, f) in &out {
            let seq = seq_of(f);
            let mut orig = frame(seq as u8, 100);
            stamp(&mut orig, seq);
            let bits: u32 = f.iter().zip(&orig).map(|(a, b)| (a ^ b).count_ones()).sum();
            if bits > 0 {
                assert_eq!(bits, 1);
                assert_eq!(f[..14], orig[..14]);
                flipped += 1;
            }
        }
        assert!(flipped as u64 <= ev.corrupted && flipped > 0);
        // Reordered frames skip the delay: some waited 0.
        assert!(out.iter().any(|(w, _)| *w == 0));
        assert!(out.iter().any(|(w, _)| *w == 10_000_000));
    }

    #[test]
    fn the_rate_limit_holds_and_drops_what_waits_too_long() {
        // 10 Mbit/s, offered 2x as fast (1500-byte frames every 600 µs).
        let mut imp = Impairer::new(&spec(|s| s.rate_kbps = Some(10_000)), 5);
        let mut now = 0u64;
        let mut out_bytes = 0u64;
        let mut dropped = 0;
        let f = frame(0, 1500);
        let mut first_out = None;
        let mut last_out = 0;
        for _ in 0..10_000 {
            if imp.admit(&f, Offload::default(), now) == Verdict::QueueFull {
                dropped += 1;
            }
            while let Some(h) = imp.pop_due(now) {
                if first_out.is_some() {
                    out_bytes += h.buf.len() as u64;
                }
                first_out.get_or_insert(h.release_ns);
                last_out = h.release_ns;
                imp.recycle(h.buf);
            }
            now += 600_000;
        }
        let secs = (last_out - first_out.unwrap()) as f64 / 1e9;
        let bps = out_bytes as f64 * 8.0 / secs;
        assert!((bps - 10e6).abs() < 0.02 * 10e6, "{bps}");
        assert!(dropped > 4000, "{dropped}");
        // Waiting time never above the shaper's queue limit.
        assert!(imp.next_due().unwrap().saturating_sub(now) <= SHAPER_QUEUE_NS + 1_000_000);
    }

    #[test]
    fn a_burst_goes_at_once_then_the_rate_applies() {
        let mut imp = Impairer::new(
            &spec(|s| {
                s.rate_kbps = Some(1000);
                s.burst_kb = Some(15)
            }),
            5,
        );
        for _ in 0..20 {
            assert_eq!(
                imp.admit(&frame(0, 1000), Offload::default(), 0),
                Verdict::Held
            );
        }
        let mut at_once = 0;
        while imp.pop_due(0).is_some() {
            at_once += 1;
        }
        // 15 KiB of 1000-byte frames: 15 or 16 (the first is free).
        assert!((15..=16).contains(&at_once), "{at_once}");
        // The bucket refills while it drains: frame 17 is due when its
        // 16 predecessors' 128 ms at 1 Mbit/s exceed the 122.88 ms burst.
        let next = imp.next_due().unwrap();
        assert!((5_000_000..=5_200_000).contains(&next), "{next}");
        // and the ones after it 8 ms apart.
        imp.pop_due(next).unwrap();
        assert!(imp.next_due().unwrap() - next == 8_000_000);
    }

    #[test]
    fn held_frames_are_bounded() {
        let mut imp = Impairer::new(&spec(|s| s.delay_ms = Some(1000.0)), 5);
        let mut full = 0;
        for i in 0..(MAX_HELD_FRAMES + 100) {
            if imp.admit(&frame(0, 64), Offload::default(), i as u64) == Verdict::QueueFull {
                full += 1;
            }
        }
        assert_eq!(full, 100);
        assert_eq!(imp.held(), MAX_HELD_FRAMES);
        assert_eq!(imp.discard(), MAX_HELD_FRAMES);
        assert_eq!(imp.held(), 0);
    }

    #[test]
    fn new_settings_keep_the_frames_that_wait() {
        let mut old = Impairer::new(&spec(|s| s.delay_ms = Some(100.0)), 5);
        for i in 0..10 {
            old.admit(&frame(i, 64), Offload::default(), 0);
        }
        let mut new = Impairer::new(&spec(|s| s.delay_ms = Some(1.0)), 5);
        new.inherit(old);
        assert_eq!(new.held(), 10);
        new.admit(&frame(99, 64), Offload::default(), 1_000_000);
        // The new frame waits for the old ones: order is kept.
        let mut order = Vec::new();
        while let Some(t) = new.next_due() {
            order.push(new.pop_due(t).unwrap().buf[14]);
        }
        assert_eq!(order, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 99]);
    }
}
