//! RFC 2544-style tests over a [`Link`]: paced trials, throughput by
//! binary search, latency percentiles, frame loss at chosen rates and
//! back-to-back bursts.
//!
//! Unix sockets push back instead of dropping: a sender whose frames the
//! switch cannot take yet is told to wait. So a trial passes only if it
//! lost no more than the tolerance *and* the generator managed to offer
//! at least [`OFFERED_SHARE`] of the rate it aimed at; otherwise the path
//! was slower than the rate, whether it dropped or pushed back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::frames::{port_len, Generator, Meter, MeterCounts, GEN_MAC, SINK_MAC};
use super::link::Link;
use super::BenchError;
use crate::ports::sys::BATCH;
use crate::testkit::vhost_frontend::traffic::MAX_STREAMS;

/// Share of the aimed rate a trial must offer to pass.
pub const OFFERED_SHARE: f64 = 0.99;
/// After a trial: frames still in flight arrive within this quiet time
/// (or the limit), the rest are lost.
const DRAIN_QUIET: Duration = Duration::from_millis(100);
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// What one trial does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrialSpec {
    /// RFC 2544 frame size (counts the FCS).
    pub size: usize,
    /// Frames per second to offer; None: as fast as the path takes them.
    pub rate_pps: Option<f64>,
    pub duration: Duration,
    /// Send exactly this many frames back to back (rate and duration are
    /// then ignored).
    pub burst: Option<u64>,
    pub latency: bool,
}

/// How a trial went.
#[derive(Clone, Debug, Default)]
pub struct Trial {
    pub sent: u64,
    pub received: MeterCounts,
    /// Frames sent and never received.
    pub lost: u64,
    /// Time spent sending.
    pub elapsed: Duration,
    pub latency: Option<LatencySummary>,
}

impl Trial {
    pub fn offered_pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn received_pps(&self) -> f64 {
        self.received.frames as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.lost as f64 * 100.0 / self.sent as f64
        }
    }

    /// Lost no more than `tolerance_pct` and offered what it aimed at.
    pub fn passes(&self, rate_pps: Option<f64>, tolerance_pct: f64) -> bool {
        self.sent > 0
            && self.loss_pct() <= tolerance_pct
            && rate_pps.map_or(true, |r| self.offered_pps() >= r * OFFERED_SHARE)
    }
}

/// One-way latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub frames: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Runs trials on one link; numbers streams so that a late frame of an
/// earlier trial is never counted in a later one.
pub struct Runner<'a> {
    link: &'a mut dyn Link,
    epoch: Instant,
    stream: u32,
    cancel: Option<&'a AtomicBool>,
}

impl<'a> Runner<'a> {
    pub fn new(link: &'a mut dyn Link, cancel: Option<&'a AtomicBool>) -> Runner<'a> {
        Runner {
            link,
            epoch: Instant::now(),
            stream: 0,
            cancel,
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }

    fn generator(&mut self, size: usize, timestamps: bool) -> Result<Generator, BenchError> {
        let len = port_len(size)?;
        self.stream = (self.stream + 1) % MAX_STREAMS;
        let gen = Generator::new(len, SINK_MAC, GEN_MAC, self.stream, self.epoch, timestamps)?;
        // The pattern bytes depend on the stream: the link's buffers get
        // the new template.
        self.link.prepare(&gen)?;
        Ok(gen)
    }

    /// Sends frames until one comes through (the switch may need a moment
    /// for a port's first frames), up to `limit`.
    pub fn check_path(&mut self, size: usize, limit: Duration) -> Result<(), BenchError> {
        let mut gen = self.generator(size, false)?;
        let mut meter = Meter::new(gen.stream(), self.epoch, false);
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.cancelled() {
                return Err(BenchError::Interrupted);
            }
            self.link.send(&mut gen, 1)?;
            self.link.flush()?;
            self.link.wait(Duration::from_millis(20))?;
            while self.link.recv(&mut meter)? > 0 {}
            if meter.counts().frames > 0 {
                self.drain(&mut meter)?;
                return Ok(());
            }
        }
        Err(BenchError::NoPath(limit))
    }

    fn drain(&mut self, meter: &mut Meter) -> Result<(), BenchError> {
        let end = Instant::now() + DRAIN_LIMIT;
        let mut last = Instant::now();
        loop {
            let now = Instant::now();
            if now >= end || now - last >= DRAIN_QUIET {
                return Ok(());
            }
            let flushed = self.link.flush()?;
            if self.link.recv(meter)? > 0 || !flushed {
                last = Instant::now();
            } else {
                self.link.wait(Duration::from_millis(5))?;
            }
        }
    }

    /// One trial.
    pub fn trial(&mut self, spec: &TrialSpec) -> Result<Trial, BenchError> {
        let mut gen = self.generator(spec.size, spec.latency)?;
        let mut meter = Meter::new(gen.stream(), self.epoch, spec.latency);
        let start = Instant::now();
        let mut end = start;
        let rate = spec.rate_pps.filter(|r| r.is_finite() && *r > 0.0);
        let mut turns = 0u32;
        loop {
            let now = Instant::now();
            end = end.max(now);
            let el = now - start;
            let want = match spec.burst {
                Some(n) => {
                    if gen.sent() >= n {
                        break;
                    }
                    (n - gen.sent()).min(BATCH as u64) as usize
                }
                None => {
                    if el >= spec.duration {
                        break;
                    }
                    match rate {
                        None => BATCH,
                        Some(r) => {
                            let due = (el.as_secs_f64() * r) as u64 + 1;
                            due.saturating_sub(gen.sent()).min(BATCH as u64) as usize
                        }
                    }
                }
            };
            let sent = if want > 0 {
                self.link.send(&mut gen, want)?
            } else {
                0
            };
            let got = self.link.recv(&mut meter)?;
            if sent == 0 && got == 0 {
                match (want, rate) {
                    // Pushed back: wait for room (or a frame to take).
                    (w, _) if w > 0 => self.link.wait(Duration::from_micros(50))?,
                    (_, Some(r)) => {
                        let next = Duration::from_secs_f64(gen.sent() as f64 / r);
                        let gap = next.saturating_sub(el);
                        if gap > Duration::from_micros(200) {
                            self.link.wait(
                                (gap - Duration::from_micros(100)).min(Duration::from_millis(1)),
                            )?;
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    _ => {}
                }
            }
            turns = turns.wrapping_add(1);
            if turns % 1024 == 0 && self.cancelled() {
                return Err(BenchError::Interrupted);
            }
        }
        let elapsed = end - start;
        self.drain(&mut meter)?;
        let received = meter.counts();
        let latency = meter.latency().filter(|h| !h.is_empty()).map(|h| {
            let us = |v: u64| v as f64 / 1000.0;
            LatencySummary {
                frames: h.len(),
                p50_us: us(h.value_at_quantile(0.5)),
                p99_us: us(h.value_at_quantile(0.99)),
                p999_us: us(h.value_at_quantile(0.999)),
                max_us: us(h.max()),
            }
        });
        Ok(Trial {
            sent: gen.sent(),
            lost: gen.sent().saturating_sub(received.frames),
            received,
            elapsed,
            latency,
        })
    }
}

/// The outcome of a rate search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchResult {
    /// The highest rate that passed (None: even the lowest tried failed).
    pub best: Option<f64>,
    pub trials: u32,
}

/// Binary search for the highest passing value in (0, `max`]: `max` is
/// tried first; then halving until the bracket is within `resolution`
/// (a share of `max`) or `max_trials` ran. `pass` runs one trial.
pub fn search(
    max: f64,
    resolution: f64,
    max_trials: u32,
    mut pass: impl FnMut(f64) -> Result<bool, BenchError>,
) -> Result<SearchResult, BenchError> {
    let mut trials = 1;
    if pass(max)? {
        return Ok(SearchResult {
            best: Some(max),
            trials,
        });
    }
    let (mut lo, mut hi) = (0.0f64, max);
    let mut best = None;
    while trials < max_trials && hi - lo > resolution * max {
        let mid = (lo + hi) / 2.0;
        trials += 1;
        if pass(mid)? {
            best = Some(mid);
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(SearchResult { best, trials })
}

/// The throughput test: first as fast as the path takes frames (the upper
/// bound, and the answer if nothing was lost), then a binary search under
/// it. Returns the throughput (frames/s, None if no rate passed), the
/// unlimited trial, and how many trials ran.
pub fn throughput(
    runner: &mut Runner<'_>,
    size: usize,
    duration: Duration,
    tolerance_pct: f64,
    resolution: f64,
    max_trials: u32,
    mut progress: impl FnMut(&str),
) -> Result<(Option<f64>, Trial, u32), BenchError> {
    progress("as fast as it goes");
    let top = runner.trial(&TrialSpec {
        size,
        rate_pps: None,
        duration,
        burst: None,
        latency: false,
    })?;
    let max = top.offered_pps();
    if top.passes(None, tolerance_pct) {
        return Ok((Some(max), top, 1));
    }
    // The unlimited trial was the search's first (failed) step at `max`.
    let mut first = true;
    let r = search(max, resolution, max_trials, |rate| {
        if std::mem::take(&mut first) {
            return Ok(false);
        }
        progress(&format!("{:.3} Mpps", rate / 1e6));
        let t = runner.trial(&TrialSpec {
            size,
            rate_pps: Some(rate),
            duration,
            burst: None,
            latency: false,
        })?;
        Ok(t.passes(Some(rate), tolerance_pct))
    })?;
    Ok((r.best, top, r.trials))
}

/// Back-to-back: the longest burst (sent as fast as the path takes it)
/// that loses nothing, up to `max_frames`. Returns (frames, trials).
pub fn back_to_back(
    runner: &mut Runner<'_>,
    size: usize,
    max_frames: u64,
    max_trials: u32,
    mut progress: impl FnMut(&str),
) -> Result<(u64, u32), BenchError> {
    let r = search(max_frames as f64, 0.01, max_trials, |n| {
        let n = (n as u64).max(1);
        progress(&format!("burst of {n}"));
        let t = runner.trial(&TrialSpec {
            size,
            rate_pps: None,
            duration: Duration::MAX,
            burst: Some(n),
            latency: false,
        })?;
        Ok(t.sent == n && t.lost == 0)
    })?;
    Ok((r.best.map_or(0, |b| (b as u64).max(1)), r.trials))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_finds_the_edge_within_resolution() {
        for edge in [1.0, 123_456.0, 999_000.0] {
            let mut tried = Vec::new();
            let r = search(1e6, 0.01, 20, |x| {
                tried.push(x);
                Ok(x <= edge)
            })
            .unwrap();
            let best = r.best.unwrap_or(0.0);
            assert!(best <= edge, "{best} > {edge}");
            // Within 1% of max below the edge (or no pass when the edge is
            // under the resolution).
            assert!(edge - best <= 0.01 * 1e6, "{best} vs {edge}");
            assert_eq!(tried[0], 1e6);
            assert_eq!(r.trials as usize, tried.len());
            assert!(r.trials <= 9, "{} trials", r.trials);
        }
    }

    #[test]
    fn search_stops_at_max_when_it_passes_and_at_the_trial_cap() {
        let r = search(5.0, 0.01, 20, |_| Ok(true)).unwrap();
        assert_eq!((r.best, r.trials), (Some(5.0), 1));
        let r = search(5.0, 0.0, 4, |_| Ok(false)).unwrap();
        assert_eq!((r.best, r.trials), (None, 4));
    }

    #[test]
    fn search_passes_errors_through() {
        let r = search(5.0, 0.01, 20, |_| Err(BenchError::Interrupted));
        assert!(matches!(r, Err(BenchError::Interrupted)));
    }

    #[test]
    fn a_trial_passes_only_with_little_loss_and_the_rate_offered() {
        let t = Trial {
            sent: 1000,
            lost: 1,
            elapsed: Duration::from_secs(1),
            ..Trial::default()
        };
        assert!(!t.passes(None, 0.0));
        assert!(t.passes(None, 0.1));
        assert!(t.passes(Some(1000.0), 0.1));
        assert!(t.passes(Some(1010.0), 0.1));
        // Pushed back: offered 1000/s of the 2000/s aimed at.
        assert!(!t.passes(Some(2000.0), 0.1));
        assert!(!Trial::default().passes(None, 100.0));
    }
}
