//! `dgram` ports: QEMU `-netdev dgram,local.type=unix,...,remote.path=PATH`.
//! One frame per datagram on a socket bound at the port path.
//!
//! The first client heard from becomes the port's peer, and the port's
//! socket is connected to it. That does three things: frames go back to
//! that address; the kernel lets only the peer send to the port (a stray
//! process cannot hijack it: its sends fail with EPERM, like a second
//! client of a stream port is refused); and the client's sends are no
//! longer capped by `net.unix.max_dgram_qlen` (10 on many hosts), which
//! applies only between unconnected sockets, while epoll reports the port
//! writable exactly when the peer has room again.
//!
//! The peer is let go when it is gone: a send is refused (its socket was
//! closed), or its socket file was removed or replaced (a restarted QEMU
//! binds the same path anew), checked once a second. Then the next sender
//! becomes the peer. Peers with abstract addresses cannot be checked that
//! way; the port stays unconnected for them and answers the last sender.
//!
//! When ulan launches the client itself it knows the client's socket path
//! (`expected_peer`): the port connects to it as soon as it exists (checked
//! once a second), so frames reach a guest before the guest has sent any.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::ports::queue::{FrameQueue, FRAME_QUEUE_DEPTH};
use crate::ports::sys::{self, UnixAddr};
use crate::ports::{
    count_lost, count_tx_drop_full, count_tx_drop_no_peer, set_interest, PortCx, PortIo, PortKind,
    PortLink, RxBatch, RxState,
};
use crate::ports::{receive_datagrams, track_backlog};

const SUB_SOCKET: usize = 0;

struct Peer {
    addr: UnixAddr,
    /// (device, inode) of the peer's socket file while connected to it.
    connected: Option<(u64, u64)>,
    /// That file, claimed: no other port may send to this port's client.
    _claim: Option<crate::ports::own::OwnSocket>,
}

pub struct DgramPort {
    link: PortLink,
    path: PathBuf,
    sock: OwnedFd,
    peer: Option<Peer>,
    queue: FrameQueue,
    want_write: bool,
    expected_peer: Option<UnixAddr>,
    _own: crate::ports::own::OwnSocket,
}

/// (device, inode) of the socket file at `addr`; None for an abstract
/// address or a missing file.
fn socket_file_id(addr: &UnixAddr) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(addr.fs_path()?).ok()?;
    Some((meta.dev(), meta.ino()))
}

impl DgramPort {
    pub fn open(path: &Path, link: PortLink, expected_peer: Option<&Path>) -> io::Result<Self> {
        let expected_peer = expected_peer.map(UnixAddr::from_path).transpose()?;
        let sock = sys::bound_socket(libc::SOCK_DGRAM, path)?;
        sys::set_buffer_sizes(&sock, 4 << 20);
        Ok(DgramPort {
            link,
            path: path.to_path_buf(),
            sock,
            peer: None,
            queue: FrameQueue::new(FRAME_QUEUE_DEPTH),
            want_write: false,
            expected_peer,
            _own: crate::ports::own::OwnSocket::claim(path),
        })
    }

    /// Connects the port's socket to `addr` if it is a socket file
    /// someone is bound to and not one of the switch's own (by any name:
    /// see [`crate::ports::own`]); returns that file's id.
    fn try_connect(&self, addr: &UnixAddr) -> io::Result<(u64, u64)> {
        crate::ports::own::connect_checked(&self.sock, addr)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
    }

    /// A new sender. A named one is adopted only once connected to: a
    /// name that cannot be connected to cannot be sent to either, and one
    /// that leads to the switch's own socket is refused (a loop or a bridge
    /// between lans). An abstract one is answered unconnected.
    fn set_peer(&mut self, addr: UnixAddr, cx: &mut PortCx<'_>) {
        if addr.fs_path().is_none() {
            return self.adopt_peer(addr, None, cx);
        }
        match self.try_connect(&addr) {
            Ok(id) => self.adopt_peer(addr, Some(id), cx),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                cx.counters.rejected_clients += 1;
                self.link
                    .warn(cx.now_ms, format_args!("refused a dgram sender: {e}"));
            }
            Err(_) => {}
        }
    }

    fn adopt_peer(&mut self, addr: UnixAddr, connected: Option<(u64, u64)>, cx: &mut PortCx<'_>) {
        let first = self.peer.is_none();
        self.peer = Some(Peer {
            addr,
            connected,
            _claim: connected.map(crate::ports::own::OwnSocket::claim_id),
        });
        if first {
            self.link.up(cx.counters, Some(addr.display()));
        } else {
            tracing::info!(port = %self.link.name, peer = %addr.display(), "dgram peer changed");
        }
    }

    fn forget_peer(&mut self, cx: &mut PortCx<'_>, reason: &str) {
        let Some(peer) = self.peer.take() else {
            return;
        };
        if peer.connected.is_some() {
            let _ = sys::disconnect(&self.sock);
        }
        if self.want_write {
            self.want_write = false;
            let _ = set_interest(cx.registry, &self.sock, cx.token(SUB_SOCKET), false, false);
        }
        count_lost(cx.counters, self.queue.clear());
        self.link.down(cx.counters, reason);
    }

    fn receive(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) -> RxState {
        // Connected, only the peer can send: no need to look at senders.
        let want_sender = !matches!(
            self.peer,
            Some(Peer {
                connected: Some(_),
                ..
            })
        );
        let mut sender = None;
        let from = want_sender.then_some(&mut sender);
        let rx = receive_datagrams(&self.sock, batch, &mut self.link, cx, from, false);
        if let Some(e) = rx.error {
            self.link
                .warn(cx.now_ms, format_args!("receive failed: {e}"));
        }
        if let Some(addr) = sender {
            if self.peer.as_ref().map(|p| p.addr) != Some(addr) {
                self.set_peer(addr, cx);
            }
        }
        rx.state
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
        if sub != SUB_SOCKET {
            return RxState::Drained;
        }
        if writable && self.want_write {
            self.flush(cx);
        }
        if readable {
            self.receive(cx, batch)
        } else {
            RxState::Drained
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
        let Some(peer) = &self.peer else {
            return false;
        };
        if self.queue.is_empty() {
            return false;
        }
        let dest = peer.connected.is_none().then_some(peer.addr);
        let connected = peer.connected.is_some();
        match self.queue.flush(&self.sock, dest.as_ref(), cx.counters) {
            Ok(done) => {
                // Connected: epoll tells when the peer has room again.
                if connected {
                    track_backlog(cx, &self.sock, SUB_SOCKET, &mut self.want_write, done);
                }
                !done
            }
            Err(e) => {
                // ECONNREFUSED / ENOENT: the peer's socket is gone.
                let reason = format!("peer unreachable: {e}");
                self.forget_peer(cx, &reason);
                false
            }
        }
    }

    fn tick(&mut self, cx: &mut PortCx<'_>) {
        if self.peer.is_none() {
            // Only a socket someone is bound to: the file of a guest that
            // has stopped stays until its next start, and adopting it would
            // bring the port up and down every second.
            if let Some(addr) = self.expected_peer {
                if let Ok(id) = self.try_connect(&addr) {
                    self.adopt_peer(addr, Some(id), cx);
                }
            }
            return;
        }
        let Some(Peer {
            addr,
            connected: Some(id),
            ..
        }) = &self.peer
        else {
            return;
        };
        if socket_file_id(addr) != Some(*id) {
            self.forget_peer(cx, "client socket file removed or replaced");
        }
    }

    fn needs_retry_timer(&self) -> bool {
        matches!(
            self.peer,
            Some(Peer {
                connected: None,
                ..
            })
        ) && !self.queue.is_empty()
    }

    fn discard_queued(&mut self, cx: &mut PortCx<'_>) {
        crate::ports::count_moved(cx.counters, self.queue.clear());
    }

    fn deregister(&mut self, registry: &mio::Registry) {
        crate::ports::deregister_fd(registry, &self.sock);
    }
}

impl Drop for DgramPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
