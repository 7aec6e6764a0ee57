//! The data-plane side of a tap port: the handover listener, at most
//! [`PENDING`] handovers in progress, and the tap fd itself, read and
//! written with its virtio-net header.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::handover::{self, Handed, HandoverError, Header};
use crate::events::Event;
use crate::ports::queue::{FrameQueue, FRAME_QUEUE_DEPTH};
use crate::ports::sys;
use crate::ports::{
    count_lost, count_tx_drop_full, count_tx_drop_no_peer, deregister_fd, set_interest,
    track_backlog, PortCx, PortIo, PortKind, PortLink, RxBatch, RxState,
};
use crate::wire::offload::{self, Accepts, Offload, VIRTIO_HDR_FIELDS_LEN};
use crate::wire::{check_frame_len, FrameError};

const SUB_LISTENER: usize = 0;
const SUB_TAP: usize = 1;
/// Subs of the handovers in progress: 2 and 3.
const SUB_PENDING: usize = 2;
/// Handovers one port reads at a time; more are refused as busy.
pub const PENDING: usize = 2;
/// A client that connected must have sent its handover by then.
pub const HANDOVER_TIMEOUT_MS: u64 = 5_000;
/// The longest vnet header (virtio_net_hdr_v1).
const MAX_VNET: usize = 12;
/// Reads one receive call makes at most: a tap spraying runts must not
/// keep the data plane in this port (the batch limit covers good frames).
const MAX_READS: usize = 2 * sys::BATCH;

struct Pending {
    conn: OwnedFd,
    since_ms: u64,
}

struct Tap {
    fd: OwnedFd,
    header: Header,
    queue: FrameQueue,
    want_write: bool,
}

pub struct TapPort {
    link: PortLink,
    path: PathBuf,
    listener: OwnedFd,
    pending: [Option<Pending>; PENDING],
    tap: Option<Tap>,
    /// Scratch for the vnet header of each read.
    rx_hdr: [u8; MAX_VNET],
    _own: crate::ports::own::OwnSocket,
}

impl TapPort {
    pub fn open(path: &Path, link: PortLink) -> io::Result<Self> {
        let listener = sys::bound_socket(libc::SOCK_SEQPACKET, path)?;
        Ok(TapPort {
            link,
            path: path.to_path_buf(),
            listener,
            pending: [None, None],
            tap: None,
            rx_hdr: [0; MAX_VNET],
            _own: crate::ports::own::OwnSocket::claim(path),
        })
    }

    fn drop_tap(&mut self, cx: &mut PortCx<'_>, reason: &str) {
        if let Some(mut t) = self.tap.take() {
            deregister_fd(cx.registry, &t.fd);
            count_lost(cx.counters, t.queue.clear());
            self.link.down(cx.counters, reason);
        }
    }

    /// Says no to a handover: counted, logged (rate-limited), an event,
    /// and the reason to the client when it can still hear it.
    fn refuse(&mut self, conn: Option<&OwnedFd>, e: &HandoverError, cx: &mut PortCx<'_>) {
        cx.counters.rejected_clients += 1;
        if !matches!(e, HandoverError::Disconnected | HandoverError::Timeout(_)) {
            cx.counters.protocol_errors += 1;
        }
        if let Some(conn) = conn {
            let _ = sys::write(conn, handover::reply_text(Err(e)).as_bytes());
        }
        self.link
            .warn(cx.now_ms, format_args!("refused a tap handover: {e}"));
        self.link.events.emit(Event::PortRefused {
            port: self.link.name.clone(),
            reason: e.to_string(),
        });
    }

    fn accept(&mut self, cx: &mut PortCx<'_>) -> bool {
        for _ in 0..16 {
            let conn = match sys::accept(&self.listener) {
                Ok(Some(c)) => c,
                Ok(None) => return false,
                Err(e) => {
                    self.link
                        .warn(cx.now_ms, format_args!("accept failed: {e}"));
                    return false;
                }
            };
            let Some(slot) = self.pending.iter().position(Option::is_none) else {
                self.refuse(Some(&conn), &HandoverError::Busy, cx);
                continue;
            };
            let sub = SUB_PENDING + slot;
            if let Err(e) = set_interest(cx.registry, &conn, cx.token(sub), false, true) {
                self.link
                    .warn(cx.now_ms, format_args!("cannot poll a handover: {e}"));
                continue;
            }
            self.pending[slot] = Some(Pending {
                conn,
                since_ms: cx.now_ms,
            });
            // The message is usually there already.
            self.read_handover(slot, cx);
        }
        true
    }

    fn read_handover(&mut self, slot: usize, cx: &mut PortCx<'_>) {
        let Some(p) = &self.pending[slot] else {
            return;
        };
        let result = handover::receive(&p.conn);
        if let Ok(None) = result {
            return;
        }
        let p = self.pending[slot].take().expect("checked above");
        deregister_fd(cx.registry, &p.conn);
        match result {
            Ok(Some(handed)) => self.install(handed, &p.conn, cx),
            Err(e) => self.refuse(Some(&p.conn), &e, cx),
            Ok(None) => unreachable!("returned above"),
        }
    }

    fn install(&mut self, handed: Handed, conn: &OwnedFd, cx: &mut PortCx<'_>) {
        let Handed { fd, header, ifname } = handed;
        if let Err(e) = set_interest(cx.registry, &fd, cx.token(SUB_TAP), false, true) {
            let e = HandoverError::Io(e);
            self.refuse(Some(conn), &e, cx);
            return;
        }
        // epoll keys on the fd number as well as the file, so the old fd
        // (even a dup of the same tap) is removed without touching the new.
        if let Some(mut old) = self.tap.take() {
            deregister_fd(cx.registry, &old.fd);
            count_lost(cx.counters, old.queue.clear());
            self.link
                .down(cx.counters, "replaced by a new tap handover");
        }
        let _ = sys::write(conn, handover::reply_text(Ok(&ifname)).as_bytes());
        let peer = match peer_pid(conn) {
            Some(pid) => format!("{ifname} (pid {pid})"),
            None => ifname,
        };
        self.tap = Some(Tap {
            fd,
            header,
            queue: FrameQueue::new(FRAME_QUEUE_DEPTH),
            want_write: false,
        });
        self.link.up(cx.counters, Some(peer));
        // Frames queued in the tap before it was handed over raise no new
        // edge: read them now.
        cx.read_to_end = true;
    }

    fn receive(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) -> RxState {
        let Some(t) = self.tap.as_ref() else {
            return RxState::Drained;
        };
        let vnet = usize::from(t.header.vnet_hdr_len);
        let raw = t.fd.as_raw_fd();
        let (mut runt, mut oversized, mut bad_offload) = (0u64, 0u64, 0u64);
        let mut last_offload_error = None;
        let mut state = RxState::Drained;
        let mut gone = None;
        for _ in 0..MAX_READS {
            if batch.is_full() {
                state = RxState::More;
                break;
            }
            let buf = batch.next_buf();
            let mut iov = [
                libc::iovec {
                    iov_base: self.rx_hdr.as_mut_ptr().cast(),
                    iov_len: vnet,
                },
                libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                },
            ];
            let (iov, cnt) = if vnet == 0 {
                (&mut iov[1..], 1)
            } else {
                (&mut iov[..], 2)
            };
            // SAFETY: both iovecs point at live buffers of their lengths.
            let n = unsafe { libc::readv(raw, iov.as_ptr(), cnt) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        gone = Some(format!("tap read failed: {e} (its namespace ended?)"));
                        break;
                    }
                }
            }
            let n = n as usize;
            if n == 0 {
                gone = Some("tap closed (its namespace ended?)".to_string());
                break;
            }
            let Some(len) = n.checked_sub(vnet) else {
                runt += 1;
                continue;
            };
            match check_frame_len(len) {
                Ok(()) => {}
                Err(FrameError::Runt(_)) => {
                    runt += 1;
                    continue;
                }
                Err(FrameError::Oversized(_)) => {
                    oversized += 1;
                    continue;
                }
            }
            let off = if vnet == 0 {
                Offload::default()
            } else {
                let mut f = [0u8; VIRTIO_HDR_FIELDS_LEN];
                f.copy_from_slice(&self.rx_hdr[..VIRTIO_HDR_FIELDS_LEN]);
                match offload::offload_from_header(&f) {
                    Ok(o) => o,
                    Err(e) => {
                        bad_offload += 1;
                        last_offload_error = Some(e);
                        continue;
                    }
                }
            };
            batch.commit_with(len, off);
        }
        let c = &mut *cx.counters;
        c.rx_drop_runt += runt;
        c.rx_drop_oversized += oversized;
        c.rx_drop_bad_offload += bad_offload;
        c.rx_dropped += runt + oversized + bad_offload;
        if runt + oversized > 0 {
            self.link.warn(
                cx.now_ms,
                format_args!("dropped {runt} runt and {oversized} oversized frames from the tap"),
            );
        }
        if let Some(e) = last_offload_error {
            self.link.warn(
                cx.now_ms,
                format_args!("dropped {bad_offload} frames with a bad vnet header: {e}"),
            );
        }
        if let Some(reason) = gone {
            self.drop_tap(cx, &reason);
            return RxState::Drained;
        }
        state
    }

    fn push(&mut self, frame: &[u8], off: Option<&Offload>, cx: &mut PortCx<'_>) {
        let Some(t) = self.tap.as_mut() else {
            count_tx_drop_no_peer(cx.counters);
            return;
        };
        let vnet = usize::from(t.header.vnet_hdr_len);
        let mut hdr = [0u8; MAX_VNET];
        if let Some(off) = off {
            let mut f = [0u8; VIRTIO_HDR_FIELDS_LEN];
            offload::write_header(off, &mut f);
            hdr[..VIRTIO_HDR_FIELDS_LEN].copy_from_slice(&f);
        }
        // Nothing waiting: straight into the tap, no copy into the queue
        // (a tap takes one frame per write anyway, so batching the writes
        // would save no syscall).
        if t.queue.is_empty() {
            match write_frame(&t.fd, &hdr[..vnet], frame) {
                Ok(()) => {
                    cx.counters.tx_frames += 1;
                    cx.counters.tx_bytes += frame.len() as u64;
                    return;
                }
                Err(e) => match classify(&e) {
                    WriteError::Later => {}
                    WriteError::Lost => {
                        cx.counters.tx_drop_error += 1;
                        cx.counters.tx_dropped += 1;
                        return;
                    }
                    WriteError::Fatal => {
                        let reason = format!("tap write failed: {e} (tap deleted?)");
                        self.drop_tap(cx, &reason);
                        return;
                    }
                },
            }
        }
        if !t.queue.push_parts(&hdr[..vnet], frame) {
            count_tx_drop_full(cx.counters);
        }
    }
}

/// What a failed write to a tap means.
enum WriteError {
    /// Full (or interrupted): keep the frame for later.
    Later,
    /// The interface is down in its namespace, or the kernel refused this
    /// frame's header: this frame is lost, the port goes on.
    Lost,
    /// The tap is gone.
    Fatal,
}

fn classify(e: &io::Error) -> WriteError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => WriteError::Later,
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EMSGSIZE) => WriteError::Lost,
        _ => WriteError::Fatal,
    }
}

/// One frame with its vnet header (possibly empty) in one writev.
fn write_frame(fd: &OwnedFd, hdr: &[u8], frame: &[u8]) -> io::Result<()> {
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        },
    ];
    // SAFETY: both iovecs point at live buffers; the kernel only reads them.
    let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), 2) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The pid of the process at the other end of a Unix socket.
fn peer_pid(conn: &OwnedFd) -> Option<i32> {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most len bytes into cred.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Writes what is queued into the tap, one frame per write (a tap takes
/// one frame per call). `Ok(true)` when everything went.
fn flush_tap(t: &mut Tap, counters: &mut crate::switch::stats::PortCounters) -> io::Result<bool> {
    let vnet = usize::from(t.header.vnet_hdr_len);
    while let Some(entry) = t.queue.front() {
        // SAFETY: entry is valid for reads of its length.
        let r = unsafe { libc::write(t.fd.as_raw_fd(), entry.as_ptr().cast(), entry.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match classify(&e) {
                WriteError::Later if e.raw_os_error() == Some(libc::EINTR) => continue,
                WriteError::Later => return Ok(false),
                WriteError::Lost => {
                    counters.tx_drop_error += 1;
                    counters.tx_dropped += 1;
                    t.queue.pop_front();
                    continue;
                }
                WriteError::Fatal => return Err(e),
            }
        }
        counters.tx_frames += 1;
        counters.tx_bytes += (entry.len() - vnet) as u64;
        t.queue.pop_front();
    }
    Ok(true)
}

impl PortIo for TapPort {
    fn kind(&self) -> PortKind {
        PortKind::Tap
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
            SUB_TAP => {
                if writable {
                    self.flush(cx);
                }
                if readable {
                    self.receive(cx, batch)
                } else {
                    RxState::Drained
                }
            }
            s if (SUB_PENDING..SUB_PENDING + PENDING).contains(&s) => {
                self.read_handover(s - SUB_PENDING, cx);
                // A handover just installed may have frames waiting.
                if self.tap.is_some() && cx.read_to_end {
                    self.receive(cx, batch)
                } else {
                    RxState::Drained
                }
            }
            _ => RxState::Drained,
        }
    }

    fn accepts(&self) -> Accepts {
        // The kernel takes any checksum or TCP segmentation request written
        // into a tap with a vnet header (virtio_net_hdr_to_skb), whatever
        // TUNSETOFFLOAD said: that only governs what it hands to us.
        match &self.tap {
            Some(t) if t.header.vnet() => Accepts {
                csum: true,
                tso4: true,
                tso6: true,
                ecn: true,
            },
            _ => Accepts::NONE,
        }
    }

    fn enqueue(&mut self, frame: &[u8], cx: &mut PortCx<'_>) {
        // A zero vnet header: a complete frame.
        self.push(frame, None, cx);
    }

    fn enqueue_offload(&mut self, frame: &[u8], off: &Offload, cx: &mut PortCx<'_>) {
        self.push(frame, Some(off), cx);
    }

    fn flush(&mut self, cx: &mut PortCx<'_>) -> bool {
        let Some(t) = self.tap.as_mut() else {
            return false;
        };
        if t.queue.is_empty() {
            return false;
        }
        match flush_tap(t, cx.counters) {
            Ok(done) => {
                track_backlog(cx, &t.fd, SUB_TAP, &mut t.want_write, done);
                !done
            }
            Err(e) => {
                let reason = format!("tap write failed: {e} (its namespace ended?)");
                self.drop_tap(cx, &reason);
                false
            }
        }
    }

    fn tick(&mut self, cx: &mut PortCx<'_>) {
        for slot in 0..PENDING {
            let late = matches!(&self.pending[slot],
                Some(p) if cx.now_ms.saturating_sub(p.since_ms) >= HANDOVER_TIMEOUT_MS);
            if late {
                let p = self.pending[slot].take().expect("checked");
                deregister_fd(cx.registry, &p.conn);
                self.refuse(
                    Some(&p.conn),
                    &HandoverError::Timeout(HANDOVER_TIMEOUT_MS),
                    cx,
                );
            }
        }
    }

    fn discard_queued(&mut self, cx: &mut PortCx<'_>) {
        if let Some(t) = self.tap.as_mut() {
            crate::ports::count_moved(cx.counters, t.queue.clear());
        }
    }

    fn deregister(&mut self, registry: &mio::Registry) {
        deregister_fd(registry, &self.listener);
        if let Some(t) = &self.tap {
            deregister_fd(registry, &t.fd);
        }
        for p in self.pending.iter().flatten() {
            deregister_fd(registry, &p.conn);
        }
    }
}

impl Drop for TapPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
