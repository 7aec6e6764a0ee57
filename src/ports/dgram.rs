//! `dgram` ports: QEMU `-netdev dgram,local.type=unix,...,remote.path=PATH`.
//! One frame per datagram on a socket bound at the port path; the switch
//! answers to the address of the last sender.
//!
//! An unconnected datagram socket is always "writable" to epoll, even when
//! the peer's queue is full. To learn when the peer has room again, the
//! port keeps a second socket connected to the peer and used only to poll:
//! the kernel reports a connected datagram socket writable once the peer
//! drains. If that connect is refused, the data plane's retry tick covers.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::ports::queue::{FrameQueue, FRAME_QUEUE_DEPTH};
use crate::ports::sys::{self, RxRejects, UnixAddr};
use crate::ports::{
    count_lost, count_rx_rejects, count_tx_drop_full, count_tx_drop_no_peer, deregister_fd,
    set_interest, PortCx, PortIo, PortKind, PortLink, RxBatch, RxState,
};

const SUB_SOCKET: usize = 0;
const SUB_PROBE: usize = 1;

pub struct DgramPort {
    link: PortLink,
    path: PathBuf,
    sock: OwnedFd,
    peer: Option<UnixAddr>,
    /// Connected to `peer`, polled for writability only.
    probe: Option<OwnedFd>,
    queue: FrameQueue,
}

impl DgramPort {
    pub fn open(path: &Path, link: PortLink) -> io::Result<Self> {
        let sock = sys::bound_socket(libc::SOCK_DGRAM, path)?;
        sys::set_buffer_sizes(&sock, 4 << 20);
        Ok(DgramPort {
            link,
            path: path.to_path_buf(),
            sock,
            peer: None,
            probe: None,
            queue: FrameQueue::new(FRAME_QUEUE_DEPTH),
        })
    }

    fn set_peer(&mut self, addr: UnixAddr, cx: &mut PortCx<'_>) {
        if let Some(old) = self.probe.take() {
            deregister_fd(cx.registry, &old);
        }
        self.probe = sys::unix_socket(libc::SOCK_DGRAM)
            .and_then(|p| sys::connect(&p, &addr).map(|()| p))
            .ok();
        if let Some(p) = &self.probe {
            let _ = set_interest(cx.registry, p, cx.token(SUB_PROBE), false, true);
        }
        let first = self.peer.is_none();
        self.peer = Some(addr);
        if first {
            self.link.up(cx.counters, Some(addr.display()));
        } else {
            tracing::info!(port = %self.link.name, peer = %addr.display(), "dgram peer changed");
        }
    }

    fn forget_peer(&mut self, cx: &mut PortCx<'_>, reason: &str) {
        if let Some(p) = self.probe.take() {
            deregister_fd(cx.registry, &p);
        }
        if self.peer.take().is_some() {
            count_lost(cx.counters, self.queue.clear());
            self.link.down(cx.counters, reason);
        }
    }

    fn receive(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) -> RxState {
        let mut rejects = RxRejects::default();
        let mut sender = None;
        let state = loop {
            if batch.is_full() {
                break RxState::More;
            }
            match sys::recv_batch(&self.sock, batch, &mut rejects, Some(&mut sender)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxState::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.link
                        .warn(cx.now_ms, format_args!("receive failed: {e}"));
                    break RxState::Drained;
                }
            }
        };
        if let Some(addr) = sender {
            if self.peer != Some(addr) {
                self.set_peer(addr, cx);
            }
        }
        if rejects.runt + rejects.oversized + rejects.zero_len > 0 {
            count_rx_rejects(cx.counters, &rejects);
            self.link.warn(
                cx.now_ms,
                format_args!(
                    "dropped {} runt and {} oversized datagrams",
                    rejects.runt + rejects.zero_len,
                    rejects.oversized
                ),
            );
        }
        state
    }
}

impl PortIo for DgramPort {
    fn kind(&self) -> PortKind {
        PortKind::Dgram
    }

    fn register(&mut self, cx: &mut PortCx<'_>) -> io::Result<()> {
        set_interest(cx.registry, &self.sock, cx.token(SUB_SOCKET), false, true)
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
            SUB_SOCKET if readable => self.receive(cx, batch),
            SUB_PROBE if writable => {
                self.flush(cx);
                RxState::Drained
            }
            _ => RxState::Drained,
        }
    }

    fn enqueue(&mut self, frame: &[u8], cx: &mut PortCx<'_>) {
        if self.peer.is_none() {
            count_tx_drop_no_peer(cx.counters);
        } else if !self.queue.push(frame) {
            count_tx_drop_full(cx.counters);
        }
    }

    fn flush(&mut self, cx: &mut PortCx<'_>) -> bool {
        let Some(peer) = self.peer else {
            return false;
        };
        if self.queue.is_empty() {
            return false;
        }
        match self.queue.flush(&self.sock, Some(&peer), cx.counters) {
            Ok(true) => false,
            Ok(false) => {
                // Re-arm: the modify makes the kernel look at the peer's
                // queue again and wake us when it drains.
                if let Some(p) = &self.probe {
                    let _ = set_interest(cx.registry, p, cx.token(SUB_PROBE), true, false);
                }
                true
            }
            Err(e) => {
                // ECONNREFUSED / ENOENT: the peer's socket is gone.
                let reason = format!("peer unreachable: {e}");
                self.forget_peer(cx, &reason);
                false
            }
        }
    }

    fn deregister(&mut self, registry: &mio::Registry) {
        deregister_fd(registry, &self.sock);
        if let Some(p) = &self.probe {
            deregister_fd(registry, p);
        }
    }
}

impl Drop for DgramPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
