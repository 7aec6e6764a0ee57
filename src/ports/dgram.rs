//! `dgram` ports: QEMU `-netdev dgram,local.type=unix,...,remote.path=PATH`.
//! One frame per datagram on a socket bound at the port path.
//!
//! The first sender heard from (with an address it can be answered at)
//! becomes the port's client. Datagrams from anyone else are dropped and
//! counted (`rx_drop_stranger`): recvmmsg hands over every frame's source
//! address, so the check is a compare. A stranger does not displace a
//! live client; when one speaks, the client is checked on the spot (a
//! `connect` to its address: refused if nobody is bound there), and if it
//! is gone the stranger becomes the client at once. So a client that dies
//! without a word, its socket file left behind, never holds the port.
//!
//! The port's socket connects to the client when there is first a frame
//! for it, and stays connected until the client is gone:
//! - sending on a connected socket costs about 1 µs per frame less here
//!   than naming the destination in each message (the kernel looks the
//!   path up per message), and epoll reports the socket writable when the
//!   client has room again, or closed (an unconnected sender gets no such
//!   wakeup);
//! - the client's own sends are then no longer capped by
//!   `net.unix.max_dgram_qlen` (10 on many hosts), which applies only
//!   towards a socket not connected to the sender;
//! - but the kernel then refuses everyone else (EPERM, to `sendto` and to
//!   `connect`), and ulan does not see them. (Once what was queued before
//!   the connect is read, receives skip the senders' names: about 50 ns
//!   per frame here.) Dissolving the connection is
//!   only safe once the client is gone: on Linux, disconnecting purges the
//!   socket's receive queue and, if the client is connected to the port,
//!   makes the client's next call fail with ECONNRESET. So the port never
//!   disconnects from a live client, and does not connect before it must:
//!   a port nothing is sent to (a receive-only port, a quiet lan) stays
//!   unconnected and hears everyone.
//!
//! The client is let go when it is found gone: a send to it is refused,
//! its socket file is removed, or a check every
//! [`PROBE_MS`](crate::ports::PROBE_MS) finds nobody bound at its address
//! (for a connected port the check reconnects the port's own socket to
//! the address: nothing changes for a live peer, a dead one refuses). So
//! a connected port takes a new client within one check of the old one's
//! end, or at the first frame sent to the old one; until then the kernel
//! refuses the newcomer. A socket file replaced at the client's path is a
//! restarted client: the port follows it (down, then up) without waiting
//! for it to speak.
//!
//! When ulan launches the client itself it knows the client's socket path
//! (`expected_peer`): the port adopts it as soon as someone is bound there
//! (checked as often), so frames reach a guest before the guest has sent
//! any. A port that lost its client watches that client's address the
//! same way until someone else speaks: a client restarted at the same path
//! is back within a check, silent or not.

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

#[derive(Clone, Copy)]
struct Peer {
    addr: UnixAddr,
    /// (device, inode) of the client's socket file when adopted; None for
    /// an abstract address.
    file: Option<(u64, u64)>,
}

pub struct DgramPort {
    link: PortLink,
    path: PathBuf,
    sock: OwnedFd,
    /// An unbound socket for checking that an address has someone bound
    /// at it (connect succeeds) without touching `sock`.
    probe: OwnedFd,
    peer: Option<Peer>,
    /// `sock` is connected to the peer.
    connected: bool,
    /// Connected, but datagrams that came before may still be queued:
    /// senders are checked until a receive finds the socket empty. After
    /// that only the peer can be in the queue, and receives skip the
    /// names (about 50 ns per frame here).
    unsorted: bool,
    /// When the peer was last found alive by a check (ms): a stranger
    /// sending in a loop causes at most one check per ms.
    checked_ms: Option<u64>,
    queue: FrameQueue,
    want_write: bool,
    expected_peer: Option<UnixAddr>,
    /// The last client's address, while the port has none: a client
    /// restarted there is taken back without waiting for it to speak.
    returning: Option<UnixAddr>,
    /// A sender last found unreachable (its socket file removed) and when
    /// (ms): one that keeps sending is checked at most once per ms.
    unreachable: Option<(UnixAddr, u64)>,
    /// The port's socket file is the lab's own: no client may name it.
    _own: crate::ports::own::OwnSocket,
    /// The client's socket file, claimed while it is the client: no other
    /// port may be pointed at it (one lan's frames to another's client).
    peer_claim: Option<crate::ports::own::OwnSocket>,
}

/// (device, inode) of the socket file at `addr`; None for an abstract
/// address or a missing file.
fn socket_file_id(addr: &UnixAddr) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(addr.fs_path()?).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// What a `connect` to a client's address says about the client. EPERM
/// means a live socket that is connected to someone else (a client
/// connected to the port refuses everyone but the port).
fn alive(connect: io::Result<()>) -> io::Result<()> {
    match connect {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        r => r,
    }
}

impl DgramPort {
    pub fn open(path: &Path, link: PortLink, expected_peer: Option<&Path>) -> io::Result<Self> {
        let expected_peer = expected_peer.map(UnixAddr::from_path).transpose()?;
        let sock = sys::bound_socket(libc::SOCK_DGRAM, path)?;
        sys::set_buffer_sizes(&sock, 4 << 20);
        let probe = sys::unix_socket(libc::SOCK_DGRAM)?;
        Ok(DgramPort {
            link,
            path: path.to_path_buf(),
            sock,
            probe,
            peer: None,
            connected: false,
            unsorted: false,
            checked_ms: None,
            queue: FrameQueue::new(FRAME_QUEUE_DEPTH),
            want_write: false,
            expected_peer,
            returning: None,
            unreachable: None,
            _own: crate::ports::own::OwnSocket::claim(path),
            peer_claim: None,
        })
    }

    /// Whether someone is bound at `addr`, without connecting `sock`.
    fn reachable(&self, addr: &UnixAddr) -> io::Result<()> {
        alive(sys::connect(&self.probe, addr))
    }

    /// Takes `addr` as the client if someone is bound there.
    fn adopt(&mut self, addr: UnixAddr, cx: &mut PortCx<'_>) -> bool {
        if self.unreachable == Some((addr, cx.now_ms)) {
            return false;
        }
        // A name that leads to one of the switch's own sockets (by any
        // name: see ports::own) is refused: a loop or a bridge of lans.
        let target = match crate::ports::own::resolve(&addr) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                cx.counters.rejected_clients += 1;
                self.link
                    .warn(cx.now_ms, format_args!("refused a dgram sender: {e}"));
                self.unreachable = Some((addr, cx.now_ms));
                return false;
            }
            Err(_) => None,
        };
        if self.reachable(&addr).is_err() {
            self.unreachable = Some((addr, cx.now_ms));
            return false;
        }
        self.peer_claim = target.map(crate::ports::own::OwnSocket::claim_target);
        self.peer = Some(Peer {
            addr,
            file: socket_file_id(&addr),
        });
        self.checked_ms = Some(cx.now_ms);
        self.link.up(cx.counters, Some(addr.display()));
        true
    }

    fn forget_peer(&mut self, cx: &mut PortCx<'_>, reason: &str) {
        let Some(peer) = self.peer.take() else {
            return;
        };
        self.returning = Some(peer.addr);
        self.peer_claim = None;
        self.checked_ms = None;
        if self.connected {
            // The peer is gone: what the purge drops was its own.
            self.connected = false;
            let _ = sys::disconnect(&self.sock);
        }
        if self.want_write {
            self.want_write = false;
            let _ = set_interest(cx.registry, &self.sock, cx.token(SUB_SOCKET), false, false);
        }
        count_lost(cx.counters, self.queue.clear());
        self.link.down(cx.counters, reason);
    }

    /// A stranger spoke: is the client still there? Checked at most once
    /// per ms; a client found gone is let go.
    fn client_still_there(&mut self, cx: &mut PortCx<'_>) -> bool {
        let Some(peer) = self.peer else {
            return false;
        };
        if self.checked_ms == Some(cx.now_ms) {
            return true;
        }
        let check = if self.connected {
            alive(sys::connect(&self.sock, &peer.addr))
        } else {
            self.reachable(&peer.addr)
        };
        match check {
            Ok(()) => {
                self.checked_ms = Some(cx.now_ms);
                true
            }
            Err(e) => {
                self.forget_peer(cx, &format!("client gone ({e}); a new one spoke"));
                false
            }
        }
    }

    /// Keeps the client's frames; takes the first answerable sender as the
    /// client if there is none (or the one there was is gone); drops and
    /// counts the rest.
    fn filter_senders(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) {
        let mut first_stranger = None;
        let dropped = batch.retain(|_, from| {
            let Some(from) = from else {
                // Unbound sender: it cannot be answered, nor be a client.
                return self.peer.is_none();
            };
            if let Some(p) = self.peer {
                if p.addr == *from {
                    return true;
                }
                if first_stranger.is_some() || self.client_still_there(cx) {
                    first_stranger.get_or_insert(*from);
                    return false;
                }
            }
            // No client, or the one there was is gone.
            self.adopt(*from, cx) || self.peer.is_none()
        });
        if dropped > 0 {
            cx.counters.rx_drop_stranger += dropped as u64;
            cx.counters.rx_dropped += dropped as u64;
            let client = self.peer.map(|p| p.addr.display()).unwrap_or_default();
            let stranger = first_stranger.map(|a| a.display());
            self.link.warn(
                cx.now_ms,
                format_args!(
                    "dropped {dropped} datagrams from senders other than the port's client {client} (first: {})",
                    stranger.as_deref().unwrap_or("unbound")
                ),
            );
        }
    }

    fn receive(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) -> RxState {
        let names = !self.connected || self.unsorted;
        let rx = receive_datagrams(&self.sock, batch, &mut self.link, cx, names, false);
        if let Some(e) = &rx.error {
            self.link
                .warn(cx.now_ms, format_args!("receive failed: {e}"));
        }
        if names {
            self.filter_senders(cx, batch);
            if rx.state == RxState::Drained && rx.error.is_none() {
                self.unsorted = false;
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
        let Some(peer) = self.peer else {
            return false;
        };
        if self.queue.is_empty() {
            return false;
        }
        if !self.connected {
            // From unconnected, connecting purges nothing. (The name was
            // checked not to lead to a socket of the switch's when the
            // client was adopted; a file replaced since is a restarted
            // client, which the probe notices.)
            match sys::connect(&self.sock, &peer.addr) {
                Ok(()) => {
                    self.connected = true;
                    self.unsorted = true;
                }
                // Alive, but connected to another socket: it takes
                // nothing from the port. Keep it (it still talks to us)
                // rather than flap.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    count_lost(cx.counters, self.queue.clear());
                    self.link.warn(
                        cx.now_ms,
                        format_args!(
                            "client {} refuses the port's frames (its socket is connected elsewhere)",
                            peer.addr.display()
                        ),
                    );
                    return false;
                }
                Err(e) => {
                    self.forget_peer(cx, &format!("client unreachable: {e}"));
                    return false;
                }
            }
        }
        match self.queue.flush(&self.sock, None, cx.counters) {
            Ok(done) => {
                track_backlog(cx, &self.sock, SUB_SOCKET, &mut self.want_write, done);
                !done
            }
            Err(e) => {
                // ECONNREFUSED: the client's socket was closed.
                self.forget_peer(cx, &format!("client unreachable: {e}"));
                false
            }
        }
    }

    fn wants_probe(&self) -> bool {
        true
    }

    fn probe(&mut self, cx: &mut PortCx<'_>) {
        let Some(peer) = self.peer else {
            // Only a socket someone is bound to (adopt checks): the file of
            // a guest that has stopped stays until its next start, and
            // adopting it would bring the port up and down on every check.
            if let Some(addr) = self.expected_peer.or(self.returning) {
                // A stat first: cheaper than a connect while nobody is there.
                if addr.fs_path().is_none() || socket_file_id(&addr).is_some() {
                    self.adopt(addr, cx);
                }
            }
            return;
        };
        if peer.file.is_some() {
            match socket_file_id(&peer.addr) {
                None => {
                    self.forget_peer(cx, "client socket file removed");
                    return;
                }
                Some(id) if Some(id) != peer.file => {
                    // Bound anew at the same path: the client restarted.
                    self.forget_peer(cx, "client socket file replaced (client restarted)");
                    self.adopt(peer.addr, cx);
                    return;
                }
                Some(_) => {}
            }
        }
        // Reconnecting to a live peer changes nothing; to a dead one it
        // fails and leaves the socket as it was.
        let check = if self.connected {
            alive(sys::connect(&self.sock, &peer.addr))
        } else {
            self.reachable(&peer.addr)
        };
        match check {
            Ok(()) => self.checked_ms = Some(cx.now_ms),
            Err(e) => self.forget_peer(cx, &format!("client gone: {e}")),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventSink;
    use crate::switch::stats::{PortCounters, PortShared};
    use crate::testkit::{frame, mac, tag_of};
    use crate::wire::MacAddr;
    use std::sync::Arc;

    fn send_from(fd: &OwnedFd, to: &UnixAddr, tag: u32) {
        let f = frame(MacAddr::BROADCAST, mac(tag), 60, tag);
        assert_eq!(sys::send_batch(fd, &[&f], Some(to)).unwrap(), 1);
    }

    /// What one receive kept, by tag.
    fn receive(
        port: &mut DgramPort,
        poll: &mio::Poll,
        c: &mut PortCounters,
        now_ms: u64,
    ) -> Vec<u32> {
        let mut batch = RxBatch::new();
        let mut cx = PortCx {
            registry: poll.registry(),
            token: 0,
            counters: c,
            now_ms,
            read_to_end: true,
        };
        port.receive(&mut cx, &mut batch);
        (0..batch.len())
            .filter_map(|i| tag_of(batch.frame(i)))
            .collect()
    }

    #[test]
    fn a_stranger_is_counted_until_the_client_is_gone_then_takes_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("port");
        let shared = Arc::new(PortShared::default());
        let link = PortLink::new("d", shared.clone(), Arc::new(EventSink::new()));
        let mut port = DgramPort::open(&path, link, None).unwrap();
        let poll = mio::Poll::new().unwrap();
        let to = UnixAddr::from_path(&path).unwrap();
        let a = sys::bound_socket(libc::SOCK_DGRAM, &dir.path().join("a")).unwrap();
        let b = sys::bound_socket(libc::SOCK_DGRAM, &dir.path().join("b")).unwrap();
        let unbound = sys::unix_socket(libc::SOCK_DGRAM).unwrap();
        let mut c = PortCounters::default();

        send_from(&a, &to, 1);
        send_from(&b, &to, 2);
        send_from(&unbound, &to, 3);
        send_from(&a, &to, 4);
        assert_eq!(receive(&mut port, &poll, &mut c, 10), [1, 4]);
        assert!(shared.is_up());
        assert_eq!((c.rx_drop_stranger, c.rx_dropped, c.connects), (2, 2, 1));

        // The client closes without a word (its file stays): the next
        // datagram from b makes b the client, in the same receive.
        drop(a);
        assert!(dir.path().join("a").exists());
        send_from(&b, &to, 5);
        send_from(&b, &to, 6);
        assert_eq!(receive(&mut port, &poll, &mut c, 11), [5, 6]);
        assert!(shared.is_up());
        assert_eq!((c.connects, c.disconnects, c.rx_drop_stranger), (2, 1, 2));
        assert_eq!(
            port.peer.map(|p| p.addr),
            Some(UnixAddr::from_path(&dir.path().join("b")).unwrap())
        );
    }

    /// A client whose socket is connected to some other socket takes no
    /// frames from the port: they are counted lost, and the client keeps
    /// the port (no down and up on every frame).
    #[test]
    fn a_client_connected_elsewhere_keeps_the_port_and_its_frames_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("port");
        let shared = Arc::new(PortShared::default());
        let link = PortLink::new("d", shared.clone(), Arc::new(EventSink::new()));
        let mut port = DgramPort::open(&path, link, None).unwrap();
        let poll = mio::Poll::new().unwrap();
        let to = UnixAddr::from_path(&path).unwrap();
        let other = sys::bound_socket(libc::SOCK_DGRAM, &dir.path().join("other")).unwrap();
        let a = sys::bound_socket(libc::SOCK_DGRAM, &dir.path().join("a")).unwrap();
        sys::connect(&a, &UnixAddr::from_path(&dir.path().join("other")).unwrap()).unwrap();
        let mut c = PortCounters::default();
        send_from(&a, &to, 1);
        assert_eq!(receive(&mut port, &poll, &mut c, 10), [1]);
        for now_ms in [20, 30] {
            let mut cx = PortCx {
                registry: poll.registry(),
                token: 0,
                counters: &mut c,
                now_ms,
                read_to_end: true,
            };
            port.enqueue(&frame(mac(1), mac(2), 60, 9), &mut cx);
            assert!(!port.flush(&mut cx));
        }
        assert!(shared.is_up());
        assert_eq!((c.connects, c.disconnects), (1, 0));
        assert_eq!((c.tx_drop_error, c.tx_dropped, c.tx_frames), (2, 2, 0));
        drop(other);
    }

    /// A stranger's datagram that was queued before the port connected to
    /// its client is still told apart from the client's (the kernel only
    /// filters what comes after).
    #[test]
    fn datagrams_queued_before_the_port_connects_are_still_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("port");
        let shared = Arc::new(PortShared::default());
        let link = PortLink::new("d", shared, Arc::new(EventSink::new()));
        let mut port = DgramPort::open(&path, link, None).unwrap();
        let poll = mio::Poll::new().unwrap();
        let to = UnixAddr::from_path(&path).unwrap();
        let a = sys::bound_socket(libc::SOCK_DGRAM, &dir.path().join("a")).unwrap();
        let b = sys::bound_socket(libc::SOCK_DGRAM, &dir.path().join("b")).unwrap();
        let mut c = PortCounters::default();
        send_from(&a, &to, 1);
        assert_eq!(receive(&mut port, &poll, &mut c, 10), [1]);
        send_from(&b, &to, 2);
        send_from(&a, &to, 3);
        {
            let mut cx = PortCx {
                registry: poll.registry(),
                token: 0,
                counters: &mut c,
                now_ms: 10,
                read_to_end: true,
            };
            port.enqueue(&frame(mac(1), mac(2), 60, 9), &mut cx);
            assert!(!port.flush(&mut cx));
        }
        assert!(port.connected);
        // Now the kernel refuses b; what it sent before is still queued.
        let f = frame(MacAddr::BROADCAST, mac(2), 60, 4);
        let err = sys::send_batch(&b, &[&f], Some(&to)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert_eq!(receive(&mut port, &poll, &mut c, 10), [3]);
        assert_eq!((c.rx_drop_stranger, c.tx_frames), (1, 1));
        assert!(
            !port.unsorted,
            "still checking senders after the queue drained"
        );
        send_from(&a, &to, 5);
        assert_eq!(receive(&mut port, &poll, &mut c, 11), [5]);
    }
}
