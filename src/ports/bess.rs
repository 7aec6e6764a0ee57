//! `bess` ports: UML's `vecN:transport=bess,dst=PATH` vector transport.
//! AF_UNIX SOCK_SEQPACKET, one frame per message, no header. UML connects;
//! one client at a time.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::ports::queue::{FrameQueue, FRAME_QUEUE_DEPTH};
use crate::ports::sys;
use crate::ports::{
    accept_single, count_lost, count_tx_drop_full, count_tx_drop_no_peer, deregister_fd,
    receive_datagrams, set_interest, track_backlog, Accepted, PortCx, PortIo, PortKind, PortLink,
    RxBatch, RxState,
};

const SUB_LISTENER: usize = 0;
const SUB_CLIENT: usize = 1;

struct Client {
    fd: OwnedFd,
    want_write: bool,
}

pub struct BessPort {
    link: PortLink,
    path: PathBuf,
    listener: OwnedFd,
    client: Option<Client>,
    queue: FrameQueue,
    _own: crate::ports::own::OwnSocket,
}

impl BessPort {
    pub fn open(path: &Path, link: PortLink) -> io::Result<Self> {
        Ok(BessPort {
            link,
            path: path.to_path_buf(),
            listener: sys::bound_socket(libc::SOCK_SEQPACKET, path)?,
            client: None,
            queue: FrameQueue::new(FRAME_QUEUE_DEPTH),
            _own: crate::ports::own::OwnSocket::claim(path),
        })
    }

    fn drop_client(&mut self, cx: &mut PortCx<'_>, reason: &str) {
        if let Some(c) = self.client.take() {
            deregister_fd(cx.registry, &c.fd);
            count_lost(cx.counters, self.queue.clear());
            self.link.down(cx.counters, reason);
        }
    }

    fn receive(&mut self, cx: &mut PortCx<'_>, batch: &mut RxBatch) -> RxState {
        let Some(c) = self.client.as_ref() else {
            return RxState::Drained;
        };
        let rx = receive_datagrams(&c.fd, batch, &mut self.link, cx, false, true);
        if rx.eof {
            self.drop_client(cx, "client closed");
        } else if let Some(e) = rx.error {
            let reason = format!("receive failed: {e}");
            self.drop_client(cx, &reason);
        }
        rx.state
    }
}

impl PortIo for BessPort {
    fn kind(&self) -> PortKind {
        PortKind::Bess
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
            SUB_LISTENER => {
                let occupied = self.client.is_some();
                let fd = match accept_single(&self.listener, occupied, &mut self.link, cx) {
                    Accepted::Client(fd) => Some(fd),
                    Accepted::Busy => return RxState::More,
                    Accepted::Done => None,
                };
                if let Some(fd) = fd {
                    sys::set_buffer_sizes(&fd, 1 << 20);
                    match set_interest(cx.registry, &fd, cx.token(SUB_CLIENT), false, true) {
                        Ok(()) => {
                            self.client = Some(Client {
                                fd,
                                want_write: false,
                            });
                            self.link.up(cx.counters, None);
                        }
                        Err(e) => self
                            .link
                            .warn(cx.now_ms, format_args!("cannot poll client: {e}")),
                    }
                    return RxState::More; // more may be waiting: refuse them next
                }
                RxState::Drained
            }
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
        if self.client.is_none() {
            count_tx_drop_no_peer(cx.counters);
        } else if !self.queue.push(frame) {
            count_tx_drop_full(cx.counters);
        }
    }

    fn flush(&mut self, cx: &mut PortCx<'_>) -> bool {
        let Some(c) = self.client.as_mut() else {
            return false;
        };
        if self.queue.is_empty() {
            return false;
        }
        match self.queue.flush(&c.fd, None, cx.counters) {
            Ok(done) => {
                track_backlog(cx, &c.fd, SUB_CLIENT, &mut c.want_write, done);
                !done
            }
            Err(e) => {
                let reason = format!("send failed: {e}");
                self.drop_client(cx, &reason);
                false
            }
        }
    }

    fn discard_queued(&mut self, cx: &mut PortCx<'_>) {
        crate::ports::count_moved(cx.counters, self.queue.clear());
    }

    fn deregister(&mut self, registry: &mio::Registry) {
        deregister_fd(registry, &self.listener);
        if let Some(c) = &self.client {
            deregister_fd(registry, &c.fd);
        }
    }
}

impl Drop for BessPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
