//! Packet capture: the data plane writes each frame as a finished pcapng
//! block straight into a capture's byte ring (one copy, no lock, no
//! allocation) and never waits for it; a writer thread per capture writes
//! the ring's bytes to a file or a stream as they are. Frames the ring
//! has no room for are counted, not waited for.

mod ring;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::switch::PortId;
use crate::wire::pcapng::{self, Direction};
use ring::{Consumer, Next, Producer};

/// Bytes of pcapng one capture's ring holds between the data plane and
/// the writer: about 10,000 small frames or 650 full-size ones. Smaller
/// than it could be on purpose: on cores that forwarding keeps busy the
/// writer's work is what a capture costs, and a smaller ring bounds it
/// (8 MiB kept twice the frames at line rate but cost 0.89x of the
/// frame rate on average against 0.96x for 1 MiB: README, "What the
/// instruments cost"). The writer's polls (5 ms idle, 2 ms busy) leave
/// room for 1.6 and 4 Gbit/s.
pub const RING_BYTES: usize = 1 << 20;
/// Default and largest snap length.
pub const MAX_SNAPLEN: u32 = 65535;
/// How long a stream reader may stop reading before the capture ends.
pub const STALLED_READER: Duration = Duration::from_secs(5);
/// How often an idle writer looks at its ring: often enough that a
/// burst from idle fills at most the ring (1 MiB in 5 ms is 1.6 Gbit/s).
const IDLE_POLL: Duration = Duration::from_millis(5);
const BUSY_POLL: Duration = Duration::from_millis(2);
/// While its ring overflows hopelessly (it drops more than twice what it
/// keeps), the writer waits before each drain, twice as long each time up
/// to this: such a capture is incomplete anyway, and on cores that
/// forwarding keeps busy every byte the writer moves is taken from
/// forwarding (its write() holds a core in these non-preemptive kernels
/// even under SCHED_IDLE). 1 MiB per 32 ms is still 260 Mbit/s of
/// capture. When it keeps a third or more (a mild overload, or one its
/// own waits caused), it drains at once again.
const OVERFLOW_BACKOFF_MAX: Duration = Duration::from_millis(32);
/// The writer's largest single write, after which it hands the space
/// back: these kernels do not preempt a thread inside write(), so a
/// shorter write holds a core for less, and the producer gets room back
/// without waiting for a whole drain.
const WRITE_CHUNK: usize = 256 << 10;
/// The writer thread runs under SCHED_IDLE: it gets a core only when
/// nothing else wants it, and any waking thread (the data plane, a guest,
/// a generator) preempts it at once. So on busy cores a capture at line
/// rate keeps what idle time allows and counts the rest as dropped,
/// instead of taking time from forwarding. Measured against a writer 10
/// nice levels down, which still held cores for whole slices: README,
/// "What the instruments cost". Moving to SCHED_IDLE needs no privilege;
/// where it is refused the writer falls back to that nice value.
const WRITER_NICE: libc::c_int = 10;

/// The nice value of the fallback, for a writer started by a thread at `nice`.
fn writer_nice(nice: libc::c_int) -> libc::c_int {
    (nice + WRITER_NICE).min(19)
}

/// Puts the calling thread (a writer) below forwarding; see [`WRITER_NICE`].
fn lower_writer_priority() {
    // SAFETY: plain syscalls on this thread's own id; a failure only
    // leaves the writer at a higher priority.
    unsafe {
        let tid = libc::gettid();
        let idle = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(tid, libc::SCHED_IDLE, &idle) != 0 {
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, writer_nice(nice));
        }
    }
}

/// What a capture's writer and the API share.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Frames written.
    pub frames: AtomicU64,
    /// Bytes of pcapng written.
    pub bytes: AtomicU64,
    /// Frames the ring could not take (stored by the data plane alone).
    pub dropped: AtomicU64,
    /// Set once the writer is done.
    pub ended: AtomicBool,
    /// Why it ended.
    pub reason: Mutex<Option<String>>,
}

impl CaptureStats {
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().map(|r| r.clone()).unwrap_or(None)
    }
}

/// The data plane's end: writes frames in, never blocks.
pub struct CaptureTap {
    id: u64,
    snaplen: u32,
    ring: Producer,
    /// Frames dropped so far; only this end writes `stats.dropped`, so a
    /// plain store publishes it (no locked add per frame).
    dropped: u64,
    stats: Arc<CaptureStats>,
}

impl CaptureTap {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Writes `frame` (cut to the snap length) as a pcapng block whose
    /// interface field holds the port id (the writer renumbers it); false
    /// if the ring was full (counted in the capture's `dropped`).
    pub fn record(&mut self, ts_ns: u64, port: PortId, dir: Direction, frame: &[u8]) -> bool {
        let data = &frame[..frame.len().min(self.snaplen as usize)];
        match self.ring.reserve(pcapng::packet_len(data.len())) {
            Some(block) => {
                pcapng::packet_into(block, port, ts_ns, frame.len() as u32, dir, data);
                // One release store; on x86 a plain move.
                self.ring.commit();
                true
            }
            None => {
                self.dropped += 1;
                self.stats.dropped.store(self.dropped, Relaxed);
                false
            }
        }
    }
}

/// Where the pcapng goes.
pub enum CaptureSink {
    File(std::fs::File),
    /// An HTTP response body; chunks of whole blocks.
    Stream(tokio::sync::mpsc::Sender<Bytes>),
}

/// Names the port ids a capture meets, for its interface blocks.
pub type PortNamer = Arc<dyn Fn(PortId) -> Option<String> + Send + Sync>;

/// The writer's end, until a writer thread takes it.
pub struct CaptureReader {
    ring: Consumer,
    snaplen: u32,
    stats: Arc<CaptureStats>,
}

/// A new capture's two ends and its stats.
pub fn capture(id: u64, snaplen: u32) -> (CaptureTap, CaptureReader, Arc<CaptureStats>) {
    capture_sized(id, snaplen, RING_BYTES)
}

fn capture_sized(
    id: u64,
    snaplen: u32,
    ring_bytes: usize,
) -> (CaptureTap, CaptureReader, Arc<CaptureStats>) {
    let snaplen = snaplen.clamp(64, MAX_SNAPLEN);
    let (producer, consumer) = ring::ring(ring_bytes);
    let stats = Arc::new(CaptureStats::default());
    (
        CaptureTap {
            id,
            snaplen,
            ring: producer,
            dropped: 0,
            stats: stats.clone(),
        },
        CaptureReader {
            ring: consumer,
            snaplen,
            stats: stats.clone(),
        },
        stats,
    )
}

#[derive(Debug, thiserror::Error)]
enum SinkError {
    #[error("writing the capture file failed: {0}")]
    File(std::io::Error),
    #[error("the stream's reader went away")]
    ReaderGone,
    #[error("the stream's reader stopped reading for {}s", STALLED_READER.as_secs())]
    ReaderStalled,
}

impl CaptureSink {
    fn write(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        match self {
            CaptureSink::File(f) => f.write_all(bytes).map_err(SinkError::File),
            CaptureSink::Stream(tx) => {
                let mut chunk = Bytes::copy_from_slice(bytes);
                let since = Instant::now();
                loop {
                    match tx.try_send(chunk) {
                        Ok(()) => return Ok(()),
                        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                            return Err(SinkError::ReaderGone)
                        }
                        Err(tokio::sync::mpsc::error::TrySendError::Full(c)) => {
                            if since.elapsed() > STALLED_READER {
                                return Err(SinkError::ReaderStalled);
                            }
                            chunk = c;
                            std::thread::sleep(BUSY_POLL);
                        }
                    }
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        match self {
            CaptureSink::File(f) => f.flush().map_err(SinkError::File),
            CaptureSink::Stream(_) => Ok(()),
        }
    }
}

impl CaptureReader {
    /// Starts the writer thread. It ends when the tap is dropped (the
    /// capture was stopped or its port or lan removed) or the sink fails,
    /// and then calls `on_end` with the reason.
    pub fn spawn(
        self,
        sink: CaptureSink,
        names: PortNamer,
        on_end: Box<dyn FnOnce(String) + Send>,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("ulan-capture".into())
            .spawn(move || {
                lower_writer_priority();
                let stats = self.stats.clone();
                let reason = match self.run(sink, names) {
                    Ok(()) => "stopped".to_string(),
                    Err(e) => e.to_string(),
                };
                // A reason given before (the port was removed) stands.
                if let Ok(mut r) = stats.reason.lock() {
                    r.get_or_insert_with(|| reason.clone());
                }
                stats.ended.store(true, Relaxed);
                on_end(reason);
            })
            .map(|_| ())
    }

    fn run(mut self, mut sink: CaptureSink, names: PortNamer) -> Result<(), SinkError> {
        let mut head = Vec::with_capacity(256);
        pcapng::section_header(&mut head);
        sink.write(&head)?;
        self.stats.bytes.fetch_add(head.len() as u64, Relaxed);
        let mut interfaces: Vec<PortId> = Vec::new();
        let mut idle = false;
        let mut backoff = Duration::ZERO;
        let mut dropped = self.stats.dropped.load(Relaxed);
        loop {
            // Closed first: what it published before closing is then seen.
            let closed = self.ring.closed();
            let published = self.ring.published();
            let (frames, bytes) = self.drain(published, &mut sink, &names, &mut interfaces)?;
            let now_dropped = self.stats.dropped.load(Relaxed);
            // Hopeless (it drops twice what it keeps): back off. A mild
            // overload, which draining at once would keep up with, or one
            // the back-off itself caused: drain at once again.
            backoff = if now_dropped.saturating_sub(dropped) > 2 * frames {
                (backoff * 2).clamp(BUSY_POLL, OVERFLOW_BACKOFF_MAX)
            } else {
                Duration::ZERO
            };
            dropped = now_dropped;
            if frames > 0 {
                self.stats.bytes.fetch_add(bytes, Relaxed);
                self.stats.frames.fetch_add(frames, Relaxed);
                idle = false;
            } else {
                if !idle {
                    sink.flush()?;
                }
                idle = true;
            }
            if closed && self.ring.pending() == 0 {
                return sink.flush();
            }
            if frames == 0 {
                std::thread::sleep(if idle { IDLE_POLL } else { BUSY_POLL });
            } else if !backoff.is_zero() {
                std::thread::sleep(backoff);
            }
        }
    }

    /// Writes every block published up to `published`, in runs of
    /// adjacent blocks straight from the ring, each block's interface id
    /// (a port id from the data plane) rewritten to its index in the file,
    /// with an interface block before a port's first frame.
    fn drain(
        &mut self,
        published: usize,
        sink: &mut CaptureSink,
        names: &PortNamer,
        interfaces: &mut Vec<PortId>,
    ) -> Result<(u64, u64), SinkError> {
        let (mut frames, mut bytes) = (0u64, 0u64);
        // The run of adjacent blocks not written yet: start and length.
        let mut run: Option<(*const u8, usize)> = None;
        let mut idb = Vec::new();
        while let Next::Record(block) = self.ring.next(published) {
            let at = pcapng::EPB_IFACE_AT;
            let port = u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
            let iface = match interfaces.iter().position(|&p| p == port) {
                Some(i) => i,
                None => {
                    let name = names(port).unwrap_or_else(|| format!("port{port}"));
                    pcapng::interface(&mut idb, &name, self.snaplen);
                    interfaces.push(port);
                    interfaces.len() - 1
                }
            };
            block[at..at + 4].copy_from_slice(&(iface as u32).to_le_bytes());
            let (ptr, len) = (block.as_ptr(), block.len());
            let adjacent = matches!(run, Some((start, n)) if start.wrapping_add(n) == ptr);
            if !idb.is_empty() || !adjacent {
                if let Some((start, n)) = run.take() {
                    bytes += write_run(sink, start, n)?;
                }
            }
            if !idb.is_empty() {
                sink.write(&idb)?;
                bytes += idb.len() as u64;
                idb.clear();
            }
            run = match run {
                Some((start, n)) => Some((start, n + len)),
                None => Some((ptr, len)),
            };
            frames += 1;
            // Every block taken is in the run now: write it and give its
            // space back.
            if let Some((start, n)) = run.filter(|&(_, n)| n >= WRITE_CHUNK) {
                bytes += write_run(sink, start, n)?;
                self.ring.release();
                run = None;
            }
        }
        if let Some((start, n)) = run {
            bytes += write_run(sink, start, n)?;
        }
        self.ring.release();
        Ok((frames, bytes))
    }
}

/// Writes the `n` ring bytes from `start`.
fn write_run(sink: &mut CaptureSink, start: *const u8, n: usize) -> Result<u64, SinkError> {
    // SAFETY: `start..start + n` is a run of whole blocks the consumer took
    // from the ring and has not released yet (it releases only blocks it
    // has written), so the producer does not touch it meanwhile.
    let bytes = unsafe { std::slice::from_raw_parts(start, n) };
    sink.write(bytes)?;
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_ring_drops_and_counts_and_never_blocks() {
        let (mut tap, reader, stats) = capture_sized(1, 65535, 16 << 10);
        let f = [0u8; 60];
        let mut kept = 0;
        while tap.record(1, 0, Direction::Inbound, &f) {
            kept += 1;
        }
        assert_eq!(kept, (16 << 10) / pcapng::packet_len(60));
        let t = Instant::now();
        for _ in 0..1000 {
            assert!(!tap.record(1, 0, Direction::Inbound, &f));
        }
        assert!(t.elapsed() < Duration::from_millis(500));
        assert_eq!(stats.dropped.load(Relaxed), 1001);
        // A frame too big for the ring at all is dropped too, not written.
        let (mut small, _r, small_stats) = capture_sized(2, 65535, 4096);
        assert!(!small.record(1, 0, Direction::Inbound, &[0u8; 4000]));
        assert_eq!(small_stats.dropped.load(Relaxed), 1);
        drop(reader);
        // The writer gone: still no panic and no wait.
        assert!(!tap.record(1, 0, Direction::Inbound, &f));
    }

    #[test]
    fn the_writer_writes_every_frame_then_ends_when_the_tap_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.pcapng");
        let (mut tap, reader, stats) = capture(1, 100);
        let (tx, rx) = std::sync::mpsc::channel();
        reader
            .spawn(
                CaptureSink::File(std::fs::File::create(&path).unwrap()),
                Arc::new(|p| Some(format!("p{p}"))),
                Box::new(move |r| tx.send(r).unwrap()),
            )
            .unwrap();
        // The writer yields to forwarding (SCHED_IDLE, see WRITER_NICE).
        let writer_policy = || {
            std::fs::read_dir("/proc/self/task")
                .ok()?
                .flatten()
                .find_map(|t| {
                    let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
                    if comm.trim() != "ulan-capture" {
                        return None;
                    }
                    let tid: libc::pid_t = t.file_name().to_str()?.parse().ok()?;
                    // SAFETY: a plain getter.
                    Some(unsafe { libc::sched_getscheduler(tid) })
                })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut policy = writer_policy();
        while policy != Some(libc::SCHED_IDLE) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            policy = writer_policy();
        }
        assert_eq!(policy, Some(libc::SCHED_IDLE));
        let mut sent = 0;
        for i in 0..3000u32 {
            let mut f = vec![0u8; 60 + (i as usize % 200)];
            f[14..18].copy_from_slice(&i.to_le_bytes());
            let dir = if i % 2 == 0 {
                Direction::Inbound
            } else {
                Direction::Outbound
            };
            if tap.record(1_000 + i as u64, i % 3, dir, &f) {
                sent += 1;
            }
            if i % 500 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        drop(tap);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "stopped");
        assert_eq!(stats.frames.load(Relaxed), sent);
        let bytes = std::fs::read(&path).unwrap();
        let blocks = pcapng::blocks(&bytes).unwrap();
        let idbs = blocks.iter().filter(|b| b.kind == pcapng::IDB).count();
        assert_eq!(idbs, 3);
        let epbs: Vec<_> = blocks.iter().filter(|b| b.kind == pcapng::EPB).collect();
        assert_eq!(epbs.len() as u64, sent);
        for (i, b) in epbs.iter().enumerate() {
            let caplen = u32::from_le_bytes(b.body[12..16].try_into().unwrap());
            let orig = u32::from_le_bytes(b.body[16..20].try_into().unwrap());
            assert_eq!(orig as usize, 60 + (i % 200));
            assert_eq!(caplen, orig.min(100));
            assert_eq!(&b.body[34..38], &(i as u32).to_le_bytes());
        }
    }
}
