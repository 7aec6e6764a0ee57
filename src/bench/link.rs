//! The two ends of a benchmarked path: where the generator's frames go in
//! and where the sink takes them out.

use std::any::Any;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use std::path::Path;

use super::frames::{Generator, Meter, GEN_MAC, SINK_MAC};
use super::BenchError;
use crate::ports::sys::{self, RxBatch, RxRejects, UnixAddr, BATCH};
use crate::ports::PortKind;
use crate::testkit::vhost_frontend::{VhostFrontend, NET_HDR_LEN, SMALL_BUFFER};
use crate::testkit::{frame, Endpoint};
use crate::wire::{MacAddr, MAX_FRAME_LEN};

/// A broadcast from `src`: the switch learns where `src` is.
fn hello(src: MacAddr) -> Vec<u8> {
    frame(MacAddr::BROADCAST, src, 60, 0)
}

/// A path under test, driven by one thread.
pub trait Link {
    /// Gets ready to send copies of the generator's template (once per
    /// frame size).
    fn prepare(&mut self, gen: &Generator) -> Result<(), BenchError>;
    /// Sends up to `n` frames, fewer when the path pushes back; returns
    /// how many (committed in `gen`).
    fn send(&mut self, gen: &mut Generator, n: usize) -> Result<usize, BenchError>;
    /// Writes out what `send` accepted but the socket did not take yet;
    /// returns whether nothing is left.
    fn flush(&mut self) -> Result<bool, BenchError>;
    /// Receives what arrived (no waiting) into `meter`; returns how many.
    fn recv(&mut self, meter: &mut Meter) -> Result<usize, BenchError>;
    /// Sleeps until a frame may arrive or sending may go on, at most
    /// `timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<(), BenchError>;
}

/// How frames are delimited on a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One frame per datagram (dgram, vde).
    Datagram,
    /// QEMU's stream format: a 4-byte big-endian length, then the frame.
    Stream,
}

/// How the sending end hands frames to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendMode {
    /// One frame per syscall, as QEMU's socket netdevs send.
    PerFrame,
    /// Up to [`BATCH`] frames per syscall (sendmmsg, or one write of many
    /// stream records): a generator that is never the limit.
    Batched,
}

/// The sending end of a socket client.
pub struct SocketTx {
    fd: OwnedFd,
    dest: Option<UnixAddr>,
    framing: Framing,
    mode: SendMode,
    /// One copy of the template per batch slot (datagrams), or the records
    /// of one write (stream).
    slots: Vec<Vec<u8>>,
    records: Vec<u8>,
    /// Stream bytes accepted but not written yet (a partial write).
    pending: Vec<u8>,
    pending_at: usize,
    blocked: bool,
}

impl SocketTx {
    /// `dest` for an unconnected datagram socket (a dgram port).
    pub fn new(fd: OwnedFd, dest: Option<UnixAddr>, framing: Framing, mode: SendMode) -> SocketTx {
        SocketTx {
            fd,
            dest,
            framing,
            mode,
            slots: Vec::new(),
            records: Vec::new(),
            pending: Vec::new(),
            pending_at: 0,
            blocked: false,
        }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Whether the last send was pushed back by a full socket.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    pub fn prepare(&mut self, gen: &Generator) {
        let t = gen.template();
        self.slots = (0..BATCH).map(|_| t.to_vec()).collect();
        self.records.clear();
    }

    fn send_one(&self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: buf and dest are valid for the call.
        let r = unsafe {
            match &self.dest {
                Some(d) => libc::sendto(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    (&d.raw as *const libc::sockaddr_un).cast(),
                    d.len,
                ),
                None => libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                ),
            }
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Writes pending stream bytes; Ok(true) when none are left.
    pub fn flush(&mut self) -> Result<bool, BenchError> {
        while self.pending_at < self.pending.len() {
            match self.send_one(&self.pending[self.pending_at..]) {
                Ok(k) => self.pending_at += k,
                Err(e) if would_block(&e) => {
                    self.blocked = true;
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.pending.clear();
        self.pending_at = 0;
        Ok(true)
    }

    pub fn send(&mut self, gen: &mut Generator, n: usize) -> Result<usize, BenchError> {
        if self.slots.is_empty() {
            self.prepare(gen);
        }
        if !self.flush()? {
            return Ok(0);
        }
        let n = n.min(BATCH);
        let now = gen.now();
        let sent = match (self.framing, self.mode) {
            (Framing::Datagram, SendMode::PerFrame) => {
                let mut k = 0;
                while k < n {
                    gen.stamp(&mut self.slots[0], 0, now);
                    match self.send_one(&self.slots[0]) {
                        Ok(_) => {
                            gen.commit(1);
                            k += 1;
                        }
                        Err(e) if would_block(&e) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                k
            }
            (Framing::Datagram, SendMode::Batched) => {
                for (i, s) in self.slots[..n].iter_mut().enumerate() {
                    gen.stamp(s, i, now);
                }
                let frames: [&[u8]; BATCH] = std::array::from_fn(|i| &self.slots[i][..]);
                match sys::send_batch(&self.fd, &frames[..n], self.dest.as_ref()) {
                    Ok(k) => {
                        gen.commit(k);
                        k
                    }
                    Err(e) if would_block(&e) => 0,
                    Err(e) => return Err(e.into()),
                }
            }
            (Framing::Stream, mode) => {
                let per_write = if mode == SendMode::PerFrame { 1 } else { n };
                let mut k = 0;
                while k < n {
                    self.records.clear();
                    let m = per_write.min(n - k);
                    let t = &self.slots[0];
                    for i in 0..m {
                        self.records
                            .extend_from_slice(&(t.len() as u32).to_be_bytes());
                        let at = self.records.len();
                        self.records.extend_from_slice(t);
                        gen.stamp(&mut self.records[at..], i, now);
                    }
                    match self.send_one(&self.records) {
                        Ok(w) => {
                            // Whole records count as sent; the rest of a
                            // partial write goes out before anything else.
                            gen.commit(m);
                            k += m;
                            if w < self.records.len() {
                                self.pending.clear();
                                self.pending.extend_from_slice(&self.records[w..]);
                                self.pending_at = 0;
                                break;
                            }
                        }
                        Err(e) if would_block(&e) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                k
            }
        };
        self.blocked = sent < n;
        Ok(sent)
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR)
    )
}

/// The receiving end of a socket client.
pub struct SocketRx {
    fd: OwnedFd,
    framing: Framing,
    batch: RxBatch,
    rejects: RxRejects,
    buf: Vec<u8>,
    have: usize,
}

impl SocketRx {
    pub fn new(fd: OwnedFd, framing: Framing) -> SocketRx {
        SocketRx {
            fd,
            framing,
            batch: RxBatch::new(),
            rejects: RxRejects::default(),
            buf: if framing == Framing::Stream {
                vec![0u8; 1 << 20]
            } else {
                Vec::new()
            },
            have: 0,
        }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn recv(&mut self, meter: &mut Meter) -> Result<usize, BenchError> {
        meter.tick();
        match self.framing {
            Framing::Datagram => {
                self.batch.clear();
                match sys::recv_batch(&self.fd, &mut self.batch, &mut self.rejects, false) {
                    Ok(_) => {}
                    Err(e) if would_block(&e) => return Ok(0),
                    Err(e) => return Err(e.into()),
                }
                for i in 0..self.batch.len() {
                    meter.frame(self.batch.frame(i));
                }
                Ok(self.batch.len())
            }
            Framing::Stream => {
                match sys::read(&self.fd, &mut self.buf[self.have..]) {
                    Ok(0) => {
                        return Err(BenchError::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the switch closed the stream",
                        )))
                    }
                    Ok(k) => self.have += k,
                    Err(e) if would_block(&e) => return Ok(0),
                    Err(e) => return Err(e.into()),
                }
                let mut at = 0;
                let mut n = 0;
                while let Some(h) = self.buf[at..self.have].first_chunk::<4>() {
                    let len = u32::from_be_bytes(*h) as usize;
                    if len > MAX_FRAME_LEN {
                        return Err(BenchError::BadRecord(len));
                    }
                    if self.have - at - 4 < len {
                        break;
                    }
                    meter.frame(&self.buf[at + 4..at + 4 + len]);
                    at += 4 + len;
                    n += 1;
                }
                self.buf.copy_within(at..self.have, 0);
                self.have -= at;
                Ok(n)
            }
        }
    }
}

/// Waits for any of `fds` (at most two; events each), at most `timeout`,
/// with nanosecond resolution.
pub fn wait_fds(fds: &[(&OwnedFd, libc::c_short)], timeout: Duration) {
    let mut p = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 2];
    let n = fds.len().min(p.len());
    for (slot, (fd, ev)) in p.iter_mut().zip(fds) {
        slot.fd = fd.as_raw_fd();
        slot.events = *ev;
    }
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid pollfds and timespec for the call.
    unsafe { libc::ppoll(p.as_mut_ptr(), n as libc::nfds_t, &ts, std::ptr::null()) };
}

/// Two socket clients of a switch: one sends, the other receives.
pub struct SocketLink {
    pub tx: SocketTx,
    pub rx: SocketRx,
    /// What must live as long as the link (endpoints, a vde control
    /// connection, temp dirs).
    keep: Vec<Box<dyn Any + Send>>,
}

impl SocketLink {
    pub fn new(tx: SocketTx, rx: SocketRx) -> SocketLink {
        SocketLink {
            tx,
            rx,
            keep: Vec::new(),
        }
    }

    /// Two clients of the switch ports at `gen_path` and `sink_path` (for
    /// vde: the switch's directory, both), sending in batches. The switch
    /// learns the sink's MAC first, so frames are unicast.
    pub fn connect(
        kind: PortKind,
        gen_path: &Path,
        sink_path: &Path,
    ) -> Result<SocketLink, BenchError> {
        let scratch = tempfile::tempdir()?;
        let mut gen = Endpoint::connect(kind, gen_path, scratch.path())?;
        let mut sink = Endpoint::connect(kind, sink_path, scratch.path())?;
        // A dgram port also learns its client from the client's first frame.
        sink.send(&hello(SINK_MAC))?;
        gen.send(&hello(GEN_MAC))?;
        let framing = if kind == PortKind::Stream {
            Framing::Stream
        } else {
            Framing::Datagram
        };
        let dest = (kind == PortKind::Dgram)
            .then(|| UnixAddr::from_path(gen_path))
            .transpose()?;
        let tx = SocketTx::new(gen.raw_fd().try_clone()?, dest, framing, SendMode::Batched);
        let rx = SocketRx::new(sink.raw_fd().try_clone()?, framing);
        let mut link = SocketLink::new(tx, rx);
        link.keep(gen);
        link.keep(sink);
        link.keep(scratch);
        Ok(link)
    }

    pub fn keep(&mut self, v: impl Any + Send) {
        self.keep.push(Box::new(v));
    }
}

impl Link for SocketLink {
    fn prepare(&mut self, gen: &Generator) -> Result<(), BenchError> {
        self.tx.prepare(gen);
        Ok(())
    }

    fn send(&mut self, gen: &mut Generator, n: usize) -> Result<usize, BenchError> {
        self.tx.send(gen, n)
    }

    fn flush(&mut self) -> Result<bool, BenchError> {
        self.tx.flush()
    }

    fn recv(&mut self, meter: &mut Meter) -> Result<usize, BenchError> {
        self.rx.recv(meter)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), BenchError> {
        if self.tx.blocked() {
            wait_fds(
                &[(self.rx.fd(), libc::POLLIN), (self.tx.fd(), libc::POLLOUT)],
                timeout,
            );
        } else {
            wait_fds(&[(self.rx.fd(), libc::POLLIN)], timeout);
        }
        Ok(())
    }
}

/// A `vde_switch` of its own, in a temp dir, killed on drop: the peer
/// `ulan bench --compare` and `cargo bench` measure against.
pub struct VdeSwitch {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl VdeSwitch {
    pub fn start() -> Result<VdeSwitch, BenchError> {
        let dir = tempfile::tempdir()?;
        let child = std::process::Command::new("vde_switch")
            .arg("-s")
            .arg(dir.path().join("sw"))
            // It reads commands from stdin and quits at its end.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    BenchError::Peer("vde_switch is not installed (apt-get install vde2)".into())
                } else {
                    BenchError::Peer(format!("cannot start vde_switch: {e}"))
                }
            })?;
        let mut sw = VdeSwitch { child, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !sw.path().join("ctl").exists() {
            if let Ok(Some(st)) = sw.child.try_wait() {
                return Err(BenchError::Peer(format!(
                    "vde_switch exited at start ({st})"
                )));
            }
            if std::time::Instant::now() > deadline {
                return Err(BenchError::Peer(
                    "vde_switch made no control socket in 5 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(sw)
    }

    /// Its directory (what VDE clients connect to).
    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("sw")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for VdeSwitch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two vhost-user frontends on a switch's vhost-user ports: frames are
/// posted on one's TX ring (zero copy: only the stamped fields change)
/// and taken from the other's RX ring.
pub struct VhostLink {
    pub tx: VhostFrontend,
    pub rx: VhostFrontend,
}

impl VhostLink {
    /// Frontends on the vhost-user ports at `gen_path` and `sink_path`,
    /// with buffers for frames of up to `max_len` bytes.
    pub fn connect(
        gen_path: &Path,
        sink_path: &Path,
        max_len: usize,
    ) -> Result<VhostLink, BenchError> {
        let connect = |p: &Path| {
            VhostFrontend::builder(p)
                .big_frames(max_len + NET_HDR_LEN > SMALL_BUFFER)
                .timeout(Duration::from_secs(10))
                .connect()
        };
        let mut rx = connect(sink_path)?;
        let mut tx = connect(gen_path)?;
        rx.send(&[&hello(SINK_MAC)[..]]);
        let _ = tx.wait_rx(Duration::from_millis(200));
        tx.recv(|_| {});
        Ok(VhostLink { tx, rx })
    }
}

impl Link for VhostLink {
    fn prepare(&mut self, gen: &Generator) -> Result<(), BenchError> {
        self.tx.blast_prepare(gen.template())?;
        Ok(())
    }

    fn send(&mut self, gen: &mut Generator, n: usize) -> Result<usize, BenchError> {
        let now = gen.now();
        let mut i = 0;
        let g = &*gen;
        let k = self.tx.blast(n, |f| {
            g.stamp(f, i, now);
            i += 1;
        });
        gen.commit(k);
        Ok(k)
    }

    fn flush(&mut self) -> Result<bool, BenchError> {
        Ok(true)
    }

    fn recv(&mut self, meter: &mut Meter) -> Result<usize, BenchError> {
        meter.tick();
        Ok(self.rx.recv(|f| meter.frame(f)))
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), BenchError> {
        if timeout >= Duration::from_millis(1) {
            self.rx.wait_rx(timeout)?;
        } else {
            std::thread::yield_now();
        }
        Ok(())
    }
}
