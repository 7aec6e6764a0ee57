//! Synthetic endpoints for every port kind, written to the wire protocols
//! (not to ulan's code paths), for integration tests and benchmarks.
//! Not used by the daemon.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::ports::sys::{self, UnixAddr};
use crate::ports::vde::{REQ_NEW_CONTROL, VDE_MAGIC, VDE_VERSION};
use crate::ports::PortKind;
use crate::wire::{write_header, MacAddr};

pub mod vhost_frontend;

/// A test MAC: locally administered, unicast, ending in `n`.
pub fn mac(n: u32) -> MacAddr {
    let b = n.to_be_bytes();
    MacAddr([0x02, 0x00, b[0], b[1], b[2], b[3]])
}

/// A frame of `len` bytes (at least 18) carrying `tag` after the header.
pub fn frame(dst: MacAddr, src: MacAddr, len: usize, tag: u32) -> Vec<u8> {
    let mut f = vec![0u8; len.max(18)];
    write_header(&mut f, dst, src, 0x88b5);
    f[14..18].copy_from_slice(&tag.to_be_bytes());
    f
}

/// The tag written by [`frame`].
pub fn tag_of(frame: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(frame.get(14..18)?.try_into().ok()?))
}

/// A client plugged into one ulan port.
pub struct Endpoint {
    kind: PortKind,
    data: OwnedFd,
    /// Kept open for vde: closing it ends the session.
    _ctl: Option<OwnedFd>,
    /// Where a dgram port is (we send to it).
    dest: Option<UnixAddr>,
    bound: Option<PathBuf>,
    inbuf: Vec<u8>,
}

fn wait(fd: &OwnedFd, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r > 0)
}

impl Endpoint {
    /// Connects to the port at `path` (for vde, its directory). Datagram
    /// kinds bind their own socket at `scratch/<unique>`.
    pub fn connect(kind: PortKind, path: &Path, scratch: &Path) -> io::Result<Endpoint> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let own = scratch.join(format!(
            "ep{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        Self::connect_bound(kind, path, &own)
    }

    /// Like [`Endpoint::connect`], with the datagram kinds' own socket
    /// bound at `own`.
    pub fn connect_bound(kind: PortKind, path: &Path, own: &Path) -> io::Result<Endpoint> {
        let own = own.to_path_buf();
        let mut ep = Endpoint {
            kind,
            data: sys::unix_socket(libc::SOCK_STREAM)?,
            _ctl: None,
            dest: None,
            bound: None,
            inbuf: Vec::new(),
        };
        match kind {
            PortKind::Stream | PortKind::Bess => {
                let ty = if kind == PortKind::Stream {
                    libc::SOCK_STREAM
                } else {
                    libc::SOCK_SEQPACKET
                };
                let fd = sys::unix_socket(ty)?;
                connect_blocking(&fd, &UnixAddr::from_path(path)?)?;
                ep.data = fd;
            }
            PortKind::Dgram => {
                let fd = sys::unix_socket(libc::SOCK_DGRAM)?;
                sys::bind(&fd, &UnixAddr::from_path(&own)?)?;
                sys::set_buffer_sizes(&fd, 4 << 20);
                ep.data = fd;
                ep.dest = Some(UnixAddr::from_path(path)?);
                ep.bound = Some(own);
            }
            PortKind::Vde => {
                let data = sys::unix_socket(libc::SOCK_DGRAM)?;
                let own_addr = UnixAddr::from_path(&own)?;
                sys::bind(&data, &own_addr)?;
                sys::set_buffer_sizes(&data, 4 << 20);
                ep.bound = Some(own);
                let ctl = sys::unix_socket(libc::SOCK_STREAM)?;
                connect_blocking(&ctl, &UnixAddr::from_path(&path.join("ctl"))?)?;
                let mut req = Vec::new();
                req.extend(VDE_MAGIC.to_ne_bytes());
                req.extend(VDE_VERSION.to_ne_bytes());
                req.extend(REQ_NEW_CONTROL.to_ne_bytes());
                // SAFETY: sockaddr_un is plain old data, read as bytes.
                req.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(
                        (&own_addr.raw as *const libc::sockaddr_un).cast::<u8>(),
                        std::mem::size_of::<libc::sockaddr_un>(),
                    )
                });
                req.extend(b"ulan testkit\0");
                write_all(&ctl, &req)?;
                let mut reply = [0u8; std::mem::size_of::<libc::sockaddr_un>()];
                read_exact(&ctl, &mut reply, Duration::from_secs(5))?;
                // SAFETY: reply has exactly the size of a sockaddr_un.
                let raw: libc::sockaddr_un =
                    unsafe { std::ptr::read_unaligned(reply.as_ptr().cast()) };
                let switch_addr = UnixAddr::from_wire(raw)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad vde reply"))?;
                sys::connect(&data, &switch_addr)?;
                ep.data = data;
                ep._ctl = Some(ctl);
            }
        }
        Ok(ep)
    }

    pub fn kind(&self) -> PortKind {
        self.kind
    }

    /// Sends one frame, waiting up to 5 s for room.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.try_send(frame) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(e);
                    }
                    wait(&self.data, libc::POLLOUT, Duration::from_millis(5))?;
                }
                r => return r,
            }
        }
    }

    /// One non-blocking send attempt.
    pub fn try_send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.kind {
            PortKind::Stream => {
                let mut rec = (frame.len() as u32).to_be_bytes().to_vec();
                rec.extend_from_slice(frame);
                write_all(&self.data, &rec)
            }
            _ => {
                let n = sys::send_batch(&self.data, &[frame], self.dest.as_ref())?;
                if n == 1 {
                    Ok(())
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }
        }
    }

    /// Sends raw bytes as they are (hostile-input tests): for stream the
    /// bytes go on the stream unframed, otherwise as one datagram.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.kind {
            PortKind::Stream => write_all(&self.data, bytes),
            _ => sys::send_batch(&self.data, &[bytes], self.dest.as_ref()).map(drop),
        }
    }

    /// Receives one frame, or `None` if none comes within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.kind == PortKind::Stream && self.inbuf.len() >= 4 {
                let len = u32::from_be_bytes(self.inbuf[..4].try_into().unwrap()) as usize;
                if self.inbuf.len() >= 4 + len {
                    let f = self.inbuf[4..4 + len].to_vec();
                    self.inbuf.drain(..4 + len);
                    return Ok(Some(f));
                }
            }
            let mut buf = vec![0u8; 70000];
            match sys::read(&self.data, &mut buf) {
                // End of stream; on SOCK_SEQPACKET an empty read is the close.
                Ok(0) if matches!(self.kind, PortKind::Stream | PortKind::Bess) => {
                    return Err(io::ErrorKind::UnexpectedEof.into())
                }
                Ok(n) => {
                    if self.kind == PortKind::Stream {
                        self.inbuf.extend_from_slice(&buf[..n]);
                    } else {
                        buf.truncate(n);
                        return Ok(Some(buf));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !wait(&self.data, libc::POLLIN, left)? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives until `timeout` passes with nothing new; returns all.
    pub fn drain(&mut self, quiet: Duration) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        while let Some(f) = self.recv(quiet)? {
            out.push(f);
        }
        Ok(out)
    }

    pub fn raw_fd(&self) -> &OwnedFd {
        &self.data
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(p) = &self.bound {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn connect_blocking(fd: &OwnedFd, addr: &UnixAddr) -> io::Result<()> {
    match sys::connect(fd, addr) {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EINPROGRESS)
                || e.kind() == io::ErrorKind::WouldBlock =>
        {
            wait(fd, libc::POLLOUT, Duration::from_secs(5))?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

pub fn write_all(fd: &OwnedFd, mut bytes: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bytes.is_empty() {
        match sys::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(e);
                }
                wait(fd, libc::POLLOUT, Duration::from_millis(10))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_exact(fd: &OwnedFd, mut buf: &mut [u8], timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !buf.is_empty() {
        match sys::read(fd, buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !wait(fd, libc::POLLIN, left)? {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The learning switch driven by a script of operations decoded from any
/// bytes (frames from any ports, ports moved between lans and off them,
/// time passing), checking on every step that a frame never goes back to
/// its ingress port nor leaves its lan, that a port on no lan gets
/// `NoLan`, and that an address just learned on one port draws unicast from
/// the other ports of its lan. Panics on a violation. For the
/// `forwarding` fuzz target and its stand-in test.
pub mod forwarding_script {
    use crate::switch::fdb::Learned;
    use crate::switch::forward::{Decision, Forwarder};
    use crate::switch::topology::Snapshot;
    use crate::switch::{LanId, PortId};
    use crate::wire::EthernetFrame;

    const PORTS: usize = 6;
    const LANS: usize = 3;
    const AGING_MS: u64 = 1_000;
    /// Small, so a full table is reached too.
    const CAPACITY: usize = 8;

    fn snapshot(port_lan: &[Option<LanId>; PORTS], generation: u64) -> Snapshot {
        let mut lan_ports = vec![Some(Vec::new()); LANS];
        for (p, lan) in port_lan.iter().enumerate() {
            if let Some(l) = lan {
                if let Some(Some(v)) = lan_ports.get_mut(*l as usize) {
                    v.push(p as PortId);
                }
            }
        }
        Snapshot {
            generation,
            port_lan: port_lan.to_vec(),
            lan_ports,
        }
    }

    pub fn run(data: &[u8]) {
        let mut port_lan: [Option<LanId>; PORTS] =
            [Some(0), Some(0), Some(0), Some(1), Some(1), None];
        let mut generation = 1;
        let mut snap = snapshot(&port_lan, generation);
        let mut fwd = Forwarder::new(AGING_MS, CAPACITY);
        let mut now = 0u64;
        let mut rest = data;
        while let Some((&op, tail)) = rest.split_first() {
            rest = tail;
            match op % 4 {
                // A frame: ingress port, length, bytes (MACs come from the data,
                // a few values only, so they repeat and get learned).
                0 | 1 => {
                    let Some((&head, tail)) = rest.split_first() else {
                        return;
                    };
                    let ingress = (head as usize % PORTS) as PortId;
                    let len = (head as usize >> 3).min(tail.len()) + 14;
                    let mut frame = [0u8; 14 + 32];
                    let take = (len - 14).min(tail.len()).min(32);
                    frame[14..14 + take].copy_from_slice(&tail[..take]);
                    rest = &tail[take..];
                    // dst and src: 02:00:00:00:00:xx or a group address.
                    let pick = |b: u8| -> [u8; 6] {
                        match b % 8 {
                            0 => [0xff; 6],
                            1 => [0x01, 0x00, 0x5e, 0, 0, b],
                            _ => [0x02, 0, 0, 0, 0, b % 5],
                        }
                    };
                    let d = frame[14];
                    let s = frame.get(15).copied().unwrap_or(0);
                    frame[0..6].copy_from_slice(&pick(d));
                    frame[6..12].copy_from_slice(&pick(s));
                    let Ok(eth) = EthernetFrame::new_checked(&frame[..len.min(frame.len())]) else {
                        continue;
                    };
                    let (decision, learned) = fwd.decide(&snap, ingress, &eth, now);
                    let lan = snap.lan_of(ingress);
                    match decision {
                        Decision::NoLan => assert!(lan.is_none()),
                        Decision::Filtered => assert!(lan.is_some()),
                        Decision::Unicast(p) => {
                            assert_ne!(p, ingress, "unicast back to the ingress port");
                            assert_eq!(snap.lan_of(p), lan, "unicast across lans");
                        }
                        Decision::Flood(l) => assert_eq!(Some(l), lan, "flood on another lan"),
                    }
                    // Just learned: every other port of the lan reaches it.
                    let learnable = matches!(
                        learned,
                        Learned::New | Learned::Refreshed | Learned::Moved { .. }
                    );
                    if let (true, Some(l)) = (learnable, lan) {
                        let mut back = frame;
                        back[0..6].copy_from_slice(&frame[6..12]);
                        back[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xee]);
                        let back =
                            EthernetFrame::new_checked(&back[..len.min(frame.len())]).unwrap();
                        for &other in snap.ports_of(l) {
                            if other == ingress {
                                continue;
                            }
                            let (d, _) = fwd.decide(&snap, other, &back, now);
                            assert_eq!(d, Decision::Unicast(ingress), "a fresh entry is not used");
                        }
                    }
                }
                // Move a port to another lan, or off every lan.
                2 => {
                    let Some((&b, tail)) = rest.split_first() else {
                        return;
                    };
                    rest = tail;
                    let port = b as usize % PORTS;
                    let to = (b as usize / PORTS) % (LANS + 1);
                    port_lan[port] = (to < LANS).then_some(to as LanId);
                    generation += 1;
                    let new = snapshot(&port_lan, generation);
                    fwd.sync(&snap, &new);
                    snap = new;
                }
                // Time passes; sometimes past the aging time.
                _ => {
                    let Some((&b, tail)) = rest.split_first() else {
                        return;
                    };
                    rest = tail;
                    now += b as u64 * 10;
                    fwd.age(now);
                }
            }
        }
    }
}

/// Says loudly that a test is skipped, and why: on stderr (which `cargo
/// test` shows only for failing tests) and, when `ULAN_SKIP_LOG` names a
/// file, appended to it, so `scripts/test.sh` lists every skip at the end
/// of the run.
#[track_caller]
pub fn skipped(why: std::fmt::Arguments<'_>) {
    let at = std::panic::Location::caller();
    let line = format!("SKIPPED: {}:{}: {why}", at.file(), at.line());
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("ULAN_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
