//! Packet capture: the data plane copies frames into a bounded queue of
//! recycled buffers (a tap) and never waits for it; a writer thread per
//! capture turns them into pcapng and writes a file or feeds a stream.
//! Frames the queue cannot take are counted, not waited for.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::switch::PortId;
use crate::wire::pcapng::{self, Direction};

/// Records one capture's queue holds (buffers are allocated as needed up
/// to this many, then reused).
pub const QUEUE_RECORDS: usize = 8192;
/// Default and largest snap length.
pub const MAX_SNAPLEN: u32 = 65535;
/// How long a stream reader may stop reading before the capture ends.
pub const STALLED_READER: Duration = Duration::from_secs(5);
/// How often an idle writer looks at its queue.
const IDLE_POLL: Duration = Duration::from_millis(20);
const BUSY_POLL: Duration = Duration::from_millis(2);

/// One frame on its way to the writer.
pub struct Record {
    ts_ns: u64,
    port: PortId,
    dir: Direction,
    orig_len: u32,
    buf: Vec<u8>,
}

/// What a capture's writer and the API share.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Frames written.
    pub frames: AtomicU64,
    /// Bytes of pcapng written.
    pub bytes: AtomicU64,
    /// Frames the queue could not take.
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

/// The data plane's end: copies frames in, never blocks.
pub struct CaptureTap {
    id: u64,
    snaplen: u32,
    full: SyncSender<Record>,
    free: Receiver<Vec<u8>>,
    /// A buffer the full queue refused, for the next frame.
    spare: Option<Vec<u8>>,
    allocated: usize,
    stats: Arc<CaptureStats>,
}

impl CaptureTap {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues a copy of `frame`; false if the queue was full (counted in
    /// the capture's `dropped`).
    pub fn record(&mut self, ts_ns: u64, port: PortId, dir: Direction, frame: &[u8]) -> bool {
        let buf = match self.spare.take() {
            Some(b) => Some(b),
            None => match self.free.try_recv() {
                Ok(b) => Some(b),
                Err(_) if self.allocated < QUEUE_RECORDS => {
                    self.allocated += 1;
                    Some(Vec::with_capacity(frame.len().min(self.snaplen as usize)))
                }
                Err(_) => None,
            },
        };
        let Some(mut buf) = buf else {
            self.stats.dropped.fetch_add(1, Relaxed);
            return false;
        };
        buf.clear();
        buf.extend_from_slice(&frame[..frame.len().min(self.snaplen as usize)]);
        let rec = Record {
            ts_ns,
            port,
            dir,
            orig_len: frame.len() as u32,
            buf,
        };
        match self.full.try_send(rec) {
            Ok(()) => true,
            Err(TrySendError::Full(rec)) | Err(TrySendError::Disconnected(rec)) => {
                self.spare = Some(rec.buf);
                self.stats.dropped.fetch_add(1, Relaxed);
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
    full: Receiver<Record>,
    free: SyncSender<Vec<u8>>,
    snaplen: u32,
    stats: Arc<CaptureStats>,
}

/// A new capture's two ends and its stats.
pub fn capture(id: u64, snaplen: u32) -> (CaptureTap, CaptureReader, Arc<CaptureStats>) {
    let snaplen = snaplen.clamp(64, MAX_SNAPLEN);
    let (full_tx, full_rx) = mpsc::sync_channel(QUEUE_RECORDS);
    let (free_tx, free_rx) = mpsc::sync_channel(QUEUE_RECORDS);
    let stats = Arc::new(CaptureStats::default());
    (
        CaptureTap {
            id,
            snaplen,
            full: full_tx,
            free: free_rx,
            spare: None,
            allocated: 0,
            stats: stats.clone(),
        },
        CaptureReader {
            full: full_rx,
            free: free_tx,
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

    fn run(self, mut sink: CaptureSink, names: PortNamer) -> Result<(), SinkError> {
        let mut out = Vec::with_capacity(1 << 16);
        pcapng::section_header(&mut out);
        let mut interfaces: Vec<PortId> = Vec::new();
        let mut idle = false;
        loop {
            let mut disconnected = false;
            let mut frames = 0u64;
            // Whatever is queued now, in chunks of about 1 MiB.
            while out.len() < 1 << 20 {
                match self.full.try_recv() {
                    Ok(rec) => {
                        let iface = match interfaces.iter().position(|&p| p == rec.port) {
                            Some(i) => i,
                            None => {
                                let name =
                                    names(rec.port).unwrap_or_else(|| format!("port{}", rec.port));
                                pcapng::interface(&mut out, &name, self.snaplen);
                                interfaces.push(rec.port);
                                interfaces.len() - 1
                            }
                        };
                        pcapng::packet(
                            &mut out,
                            iface as u32,
                            rec.ts_ns,
                            rec.orig_len,
                            rec.dir,
                            &rec.buf,
                        );
                        frames += 1;
                        let _ = self.free.try_send(rec.buf);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if !out.is_empty() {
                sink.write(&out)?;
                self.stats.bytes.fetch_add(out.len() as u64, Relaxed);
                self.stats.frames.fetch_add(frames, Relaxed);
                out.clear();
                idle = false;
            } else {
                if !idle {
                    sink.flush()?;
                }
                idle = true;
            }
            if disconnected {
                return sink.flush();
            }
            if frames == 0 {
                std::thread::sleep(if idle { IDLE_POLL } else { BUSY_POLL });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks() {
        let (mut tap, reader, stats) = capture(1, 65535);
        let f = [0u8; 60];
        for _ in 0..QUEUE_RECORDS {
            assert!(tap.record(1, 0, Direction::Inbound, &f));
        }
        let t = Instant::now();
        for _ in 0..1000 {
            assert!(!tap.record(1, 0, Direction::Inbound, &f));
        }
        assert!(t.elapsed() < Duration::from_millis(500));
        assert_eq!(stats.dropped.load(Relaxed), 1000);
        assert_eq!(tap.allocated, QUEUE_RECORDS);
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
