//! `stream` ports: QEMU `-netdev stream` (and the legacy `-netdev socket`)
//! framing over a Unix stream socket: a 4-byte big-endian length, then the
//! frame. One client at a time; when it leaves, the port waits for the next.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::ports::queue::{StreamQueue, STREAM_QUEUE_BYTES};
use crate::ports::sys::{self, RX_BUF_LEN};
use crate::ports::{
    accept_single, count_lost, count_tx_drop_full, count_tx_drop_no_peer, deregister_fd,
    set_interest, track_backlog, Accepted, PortCx, PortIo, PortKind, PortLink, RxBatch, RxState,
};
use crate::wire::{check_frame_len, FrameError};

const SUB_LISTENER: usize = 0;
const SUB_CLIENT: usize = 1;
/// Room for one whole record plus a read's worth more.
const INBUF_LEN: usize = 4 + RX_BUF_LEN + 64 * 1024;

/// Why a stream stopped making sense: the client is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("frame length {0} is under the 14-byte Ethernet header")]
    Runt(u32),
    #[error("frame length {0} is over the 65535-byte limit")]
    Oversized(u32),
}

/// Splits whole records off the front of `buf`. Returns the frame and the
/// record length, `Ok(None)` when more bytes are needed.
pub fn parse_record(buf: &[u8]) -> Result<Option<(&[u8], usize)>, StreamError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(head.try_into().expect("4 bytes"));
    match check_frame_len(len as usize) {
        Ok(()) => {}
        Err(FrameError::Runt(_)) => return Err(StreamError::Runt(len)),
        Err(FrameError::Oversized(_)) => return Err(StreamError::Oversized(len)),
    }
    let end = 4 + len as usize;
    Ok(buf.get(4..end).map(|f| (f, end)))
}

struct Client {
    fd: OwnedFd,
    inbuf: Box<[u8]>,
    start: usize,
    end: usize,
    out: StreamQueue,
    want_write: bool,
}

pub struct StreamPort {
    link: PortLink,
    path: PathBuf,
    listener: OwnedFd,
    client: Option<Client>,
    _own: crate::ports::own::OwnSocket,
}

impl StreamPort {
    pub fn open(path: &Path, link: PortLink) -> io::Result<Self> {
        let listener = sys::bound_socket(libc::SOCK_STREAM, path)?;
        Ok(StreamPort {
            link,
            path: path.to_path_buf(),
            listener,
            client: None,
            _own: crate::ports::own::OwnSocket::claim(path),
        })
    }

    fn drop_client(&mut self, cx: &mut PortCx<'_>, reason: &str) {
        if let Some(mut c) = self.client.take() {
            deregister_fd(cx.registry, &c.fd);
            count_lost(cx.counters, c.out.clear());
            self.link.down(cx.counters, reason);
        }
    }

    /// Returns true when it should be called again (it took a client, or
    /// refused its share of them, and more may be waiting).
    fn accept(&mut self, cx: &mut PortCx<'_>) -> bool {
        let occupied = self.client.is_some();
        let fd = match accept_single(&self.listener, occupied, &mut self.link, cx) {
            Accepted::Client(fd) => fd,
            Accepted::Busy => return true,
            Accepted::Done => return false,
        };
        sys::set_buffer_sizes(&fd, 1 << 20);
        if let Err(e) = set_interest(cx.registry, &fd, cx.token(SUB_CLIENT), false, true) {
            self.link
                .warn(cx.now_ms, format_args!("cannot poll client: {e}"));
            return true;
        }
        self.client = Some(Client {
            fd,
            inbuf: vec![0u8; INBUF_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
            out: StreamQueue::new(STREAM_QUEUE_BYTES),
            want_write: false,
        });
        self.link.up(cx.counters, None);
        true
    }

    /// Reads and splits records into `batch` until the socket is empty or
    /// the batch is full.
    fn receive(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) -> RxState {
        let Some(c) = self.client.as_mut() else {
            return RxState::Drained;
        };
        let mut drained = false;
        loop {
            // Hand out every whole record already buffered.
            loop {
                match parse_record(&c.inbuf[c.start..c.end]) {
                    Ok(Some((frame, used))) => {
                        if !batch.push(frame) {
                            return RxState::More;
                        }
                        c.start += used;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        cx.counters.protocol_errors += 1;
                        match e {
                            StreamError::Runt(_) => cx.counters.rx_drop_runt += 1,
                            StreamError::Oversized(_) => cx.counters.rx_drop_oversized += 1,
                        }
                        cx.counters.rx_dropped += 1;
                        self.link
                            .warn(cx.now_ms, format_args!("client cut off: {e}"));
                        self.drop_client(cx, "protocol error");
                        return RxState::Drained;
                    }
                }
            }
            if c.start > 0 {
                c.inbuf.copy_within(c.start..c.end, 0);
                c.end -= c.start;
                c.start = 0;
            }
            if drained {
                return RxState::Drained;
            }
            let room = c.inbuf.len() - c.end;
            match sys::read(&c.fd, &mut c.inbuf[c.end..]) {
                Ok(0) => {
                    let reason = if c.end > 0 {
                        "client closed mid-frame"
                    } else {
                        "client closed"
                    };
                    self.drop_client(cx, reason);
                    return RxState::Drained;
                }
                Ok(n) => {
                    c.end += n;
                    // A short read emptied the socket (the next bytes are a
                    // new edge): hand out the records, then stop.
                    drained = n < room && !cx.read_to_end;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return RxState::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let reason = format!("read failed: {e}");
                    self.drop_client(cx, &reason);
                    return RxState::Drained;
                }
            }
        }
    }
}

impl PortIo for StreamPort {
    fn kind(&self) -> PortKind {
        PortKind::Stream
    }

    fn register(&mut self, cx: &mut PortCx<'_>) -> io::Result<()> {
        set_interest(
            cx.registry,
            &self.listener,
            cx.token(SUB_LISTENER),
            false,
            true,
        )
    }

    fn on_ready(
        &mut self,
        sub: usize,
        readable: bool,
        writable: bool,
        cx: &mut PortCx<'_>,
        batch: &mut RxBatch,
    ) -> RxState {
        match sub {
            SUB_LISTENER if self.accept(cx) => RxState::More,
            SUB_LISTENER => RxState::Drained,
            SUB_CLIENT => {
                if writable {
                    self.flush(cx);
                }
                if readable {
                    self.receive(cx, batch)
                } else {
                    RxState::Drained
                }
            }
            _ => RxState::Drained,
        }
    }

    fn enqueue(&mut self, frame: &[u8], cx: &mut PortCx<'_>) {
        match self.client.as_mut() {
            None => count_tx_drop_no_peer(cx.counters),
            Some(c) => {
                if !c.out.push(frame) {
                    count_tx_drop_full(cx.counters);
                }
            }
        }
    }

    fn flush(&mut self, cx: &mut PortCx<'_>) -> bool {
        let Some(c) = self.client.as_mut() else {
            return false;
        };
        if c.out.is_empty() {
            return false;
        }
        match c.out.flush(&c.fd, cx.counters) {
            Ok(done) => {
                track_backlog(cx, &c.fd, SUB_CLIENT, &mut c.want_write, done);
                !done
            }
            Err(e) => {
                let reason = format!("write failed: {e}");
                self.drop_client(cx, &reason);
                false
            }
        }
    }

    fn discard_queued(&mut self, cx: &mut PortCx<'_>) {
        if let Some(c) = self.client.as_mut() {
            crate::ports::count_moved(cx.counters, c.out.discard_unsent());
        }
    }

    fn deregister(&mut self, registry: &mio::Registry) {
        deregister_fd(registry, &self.listener);
        if let Some(c) = &self.client {
            deregister_fd(registry, &c.fd);
        }
    }
}

impl Drop for StreamPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records_and_waits_for_more() {
        let mut b = 20u32.to_be_bytes().to_vec();
        b.extend([0xab; 20]);
        b.extend(16u32.to_be_bytes());
        b.extend([1; 3]);
        let (f, used) = parse_record(&b).unwrap().unwrap();
        assert_eq!((f.len(), used), (20, 24));
        assert_eq!(parse_record(&b[used..]).unwrap(), None, "partial record");
        assert_eq!(parse_record(&b[..3]).unwrap(), None, "partial header");
    }

    #[test]
    fn rejects_hostile_lengths() {
        assert_eq!(
            parse_record(&13u32.to_be_bytes()),
            Err(StreamError::Runt(13))
        );
        assert_eq!(parse_record(&0u32.to_be_bytes()), Err(StreamError::Runt(0)));
        assert_eq!(
            parse_record(&65536u32.to_be_bytes()),
            Err(StreamError::Oversized(65536))
        );
        assert_eq!(
            parse_record(&u32::MAX.to_be_bytes()),
            Err(StreamError::Oversized(u32::MAX))
        );
    }
}

#[cfg(test)]
mod hostile_bytes {
    use super::*;

    #[test]
    fn arbitrary_streams_split_into_legal_records_or_stop() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5_000 {
            let len = (next() % 2048) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Plant plausible headers so records are actually found.
            let mut i = 0;
            while i + 4 < b.len() {
                let n = 14 + (next() % 100) as u32;
                b[i..i + 4].copy_from_slice(&n.to_be_bytes());
                i += 4 + n as usize + (next() % 3) as usize;
            }
            let mut rest = &b[..];
            while let Ok(Some((frame, used))) = parse_record(rest) {
                assert!(frame.len() >= 14 && used == frame.len() + 4);
                rest = &rest[used..];
            }
        }
    }
}
