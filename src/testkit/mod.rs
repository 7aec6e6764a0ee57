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
            PortKind::VhostUser => {
                return Err(io::Error::other(
                    "a vhost-user port needs a vhost-user frontend, not a socket endpoint",
                ))
            }
            PortKind::Tap => {
                return Err(io::Error::other(
                    "a tap port takes a tap device's fd (ports::tap::client::hand_over), not a socket endpoint",
                ))
            }
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

/// An independent reading of finished frames for the offload tests and the
/// `offload` fuzz target: builders for TCP super-frames and UDP/TCP frames
/// with a partial checksum as Linux leaves them, a checksum verifier written
/// from RFC 1071 (not `wire::checksum`), and [`offload_check::check`],
/// which says whether what `wire::offload` made is right.
pub mod offload_check {
    use crate::wire::offload::{complete_checksum, Gso, Offload, Segmenter};

    /// The 16-bit ones' complement sum of `bytes`, word by word.
    pub fn ones_sum(bytes: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |b| u32::from(*b));
            s += hi | lo;
            if s > 0xffff {
                s -= 0xffff;
            }
        }
        s as u16
    }

    fn be16(f: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([f[at], f[at + 1]])
    }

    fn be32(f: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]])
    }

    /// Where the headers of a TCP or UDP frame are.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct View {
        pub l3: usize,
        pub l4: usize,
        /// Start of the L4 payload.
        pub data: usize,
        pub v6: bool,
        pub proto: u8,
    }

    /// Reads Ethernet (one optional tag), IPv4/IPv6, TCP/UDP; `None` if
    /// the frame is not that or is too short.
    pub fn view(f: &[u8]) -> Option<View> {
        if f.len() < 14 {
            return None;
        }
        let mut l3 = 14;
        let mut et = be16(f, 12);
        if et == 0x8100 || et == 0x88a8 {
            if f.len() < 18 {
                return None;
            }
            et = be16(f, 16);
            l3 = 18;
        }
        let (l4, proto, v6) = match et {
            0x0800 if f.len() >= l3 + 20 && f[l3] >> 4 == 4 => {
                (l3 + usize::from(f[l3] & 15) * 4, f[l3 + 9], false)
            }
            0x86dd if f.len() >= l3 + 40 && f[l3] >> 4 == 6 => (l3 + 40, f[l3 + 6], true),
            _ => return None,
        };
        let data = match proto {
            6 if f.len() >= l4 + 20 => l4 + usize::from(f[l4 + 12] >> 4) * 4,
            17 => l4 + 8,
            _ => return None,
        };
        (data <= f.len()).then_some(View {
            l3,
            l4,
            data,
            v6,
            proto,
        })
    }

    /// The IPv4 header checksum verifies.
    pub fn ipv4_header_ok(f: &[u8], v: &View) -> bool {
        !v.v6 && ones_sum(&f[v.l3..v.l4]) == 0xffff
    }

    /// The pseudo-header (as bytes) for the L4 part of `f`.
    fn pseudo(f: &[u8], v: &View) -> Vec<u8> {
        let len = f.len() - v.l4;
        let mut p = Vec::new();
        if v.v6 {
            p.extend_from_slice(&f[v.l3 + 8..v.l3 + 40]);
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, v.proto]);
        } else {
            p.extend_from_slice(&f[v.l3 + 12..v.l3 + 20]);
            p.extend_from_slice(&[0, v.proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        p
    }

    /// The TCP or UDP checksum over pseudo-header and segment verifies
    /// (for UDP, 0 "no checksum" does not count as valid).
    pub fn l4_checksum_ok(f: &[u8], v: &View) -> bool {
        if v.proto == 17 && be16(f, v.l4 + 6) == 0 {
            return false;
        }
        let mut all = pseudo(f, v);
        all.extend_from_slice(&f[v.l4..]);
        ones_sum(&all) == 0xffff
    }

    /// A TCP super-frame as a Linux guest hands it to a TSO device.
    #[derive(Debug, Clone)]
    pub struct TcpSpec {
        pub v6: bool,
        pub vlan: bool,
        /// IPv4 option words (0..=10); ignored for IPv6.
        pub ip_option_words: u8,
        /// TCP option words (0..=10).
        pub tcp_option_words: u8,
        pub payload_len: usize,
        pub flags: u8,
        pub seq: u32,
        pub ip_id: u16,
        pub gso_size: u16,
        pub ecn: bool,
    }

    impl Default for TcpSpec {
        fn default() -> Self {
            TcpSpec {
                v6: false,
                vlan: false,
                ip_option_words: 0,
                tcp_option_words: 3,
                payload_len: 60_000,
                flags: 0x18, // PSH ACK
                seq: 0xfff0_0000,
                ip_id: 0xfffe,
                gso_size: 1448,
                ecn: false,
            }
        }
    }

    fn eth(f: &mut Vec<u8>, vlan: bool, ethertype: u16) {
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x20, 0x07]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
    }

    /// An IPv4 or IPv6 header for `l4_len` bytes of `proto`.
    fn ip(f: &mut Vec<u8>, v6: bool, option_words: u8, proto: u8, l4_len: usize, id: u16, tos: u8) {
        let l3 = f.len();
        if v6 {
            f.extend_from_slice(&[0x60 | (tos >> 4), (tos << 4) | 0x01, 0x23, 0x45]);
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 2]);
        } else {
            let hlen = 20 + 4 * usize::from(option_words);
            f.push(0x40 | (5 + option_words));
            f.push(tos);
            f.extend_from_slice(&((hlen + l4_len) as u16).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
            f.extend_from_slice(&[10, 0, 0, 1, 192, 168, 77, 2]);
            // NOPs, then an End of options list.
            f.resize(l3 + hlen, 1);
            if option_words > 0 {
                f[l3 + hlen - 1] = 0;
            }
            let c = !ones_sum(&f[l3..]);
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
    }

    fn payload_byte(i: usize) -> u8 {
        (i.wrapping_mul(31) ^ (i >> 8)) as u8
    }

    /// Puts the pseudo-header sum (folded, not complemented) in the L4
    /// checksum field at `at`, as Linux does for CHECKSUM_PARTIAL.
    fn partial(f: &mut [u8], at: usize) {
        let v = view(f).expect("built frame parses");
        let p = ones_sum(&pseudo(f, &v));
        f[at..at + 2].copy_from_slice(&p.to_be_bytes());
    }

    impl TcpSpec {
        /// The frame and its virtio-net header request.
        pub fn build(&self) -> (Vec<u8>, Offload) {
            let mut f = Vec::with_capacity(self.payload_len + 200);
            eth(&mut f, self.vlan, if self.v6 { 0x86dd } else { 0x0800 });
            let tcp_hlen = 20 + 4 * usize::from(self.tcp_option_words);
            let tos = if self.ecn { 0x02 } else { 0 };
            let ipo = if self.v6 { 0 } else { self.ip_option_words };
            ip(
                &mut f,
                self.v6,
                ipo,
                6,
                tcp_hlen + self.payload_len,
                self.ip_id,
                tos,
            );
            let l4 = f.len();
            f.extend_from_slice(&40000u16.to_be_bytes());
            f.extend_from_slice(&5201u16.to_be_bytes());
            f.extend_from_slice(&self.seq.to_be_bytes());
            f.extend_from_slice(&0x1234_5678u32.to_be_bytes());
            f.push(((tcp_hlen / 4) as u8) << 4);
            f.push(self.flags);
            f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
            if self.tcp_option_words >= 3 {
                f.extend_from_slice(&[1, 1, 8, 10, 0, 1, 2, 3, 4, 5, 6, 7]);
            }
            f.resize(l4 + tcp_hlen, 1);
            let data = f.len();
            f.extend((0..self.payload_len).map(payload_byte));
            partial(&mut f, l4 + 16);
            let gso = if self.v6 {
                Gso::Tcp6 { ecn: self.ecn }
            } else {
                Gso::Tcp4 { ecn: self.ecn }
            };
            let off = Offload {
                needs_csum: true,
                csum_start: l4 as u16,
                csum_offset: 16,
                gso,
                gso_size: self.gso_size,
                hdr_len: data as u16,
            };
            (f, off)
        }
    }

    /// A TCP (`proto` 6) or UDP (17) frame with a partial checksum and its
    /// NEEDS_CSUM request (no segmentation).
    pub fn partial_frame(v6: bool, vlan: bool, proto: u8, payload: &[u8]) -> (Vec<u8>, Offload) {
        let mut f = Vec::new();
        eth(&mut f, vlan, if v6 { 0x86dd } else { 0x0800 });
        let hlen = if proto == 17 { 8 } else { 20 };
        ip(&mut f, v6, 0, proto, hlen + payload.len(), 7, 0);
        let l4 = f.len();
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        let csum_offset = if proto == 17 {
            f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
            6
        } else {
            f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0x10, 0, 0, 0, 0, 0]);
            16
        };
        f.extend_from_slice(payload);
        partial(&mut f, l4 + csum_offset);
        let off = Offload {
            needs_csum: true,
            csum_start: l4 as u16,
            csum_offset: csum_offset as u16,
            ..Offload::default()
        };
        (f, off)
    }

    /// Checks what `Segmenter::finish(original, off)` returned: `Ok` if it
    /// is exactly what the request asks for, else what is wrong.
    pub fn check(original: &[u8], off: &Offload, out: &[&[u8]]) -> Result<(), String> {
        if off.is_none() {
            return if out == [original] {
                Ok(())
            } else {
                Err("a complete frame was changed".into())
            };
        }
        if off.gso == Gso::None {
            return check_csum_only(original, off, out);
        }
        let v = view(original).ok_or("accepted a frame the checker cannot read")?;
        if v.proto != 6 || v.v6 != matches!(off.gso, Gso::Tcp6 { .. }) {
            return Err(format!("accepted {v:?} for {:?}", off.gso));
        }
        let hl = v.data;
        let payload = &original[hl..];
        let mss = usize::from(off.gso_size);
        let want = payload.len().div_ceil(mss).max(1);
        if out.len() != want {
            return Err(format!("{} segments, want {want}", out.len()));
        }
        let seq0 = be32(original, v.l4 + 4);
        let id0 = be16(original, v.l3 + 4);
        let flags0 = original[v.l4 + 13];
        // Bytes each segment may change: IP length/ID/checksum, TCP
        // sequence, flags, checksum.
        let mut varies = vec![false; hl];
        let fields: &[(usize, usize)] = if v.v6 {
            &[(v.l3 + 4, 2)]
        } else {
            &[(v.l3 + 2, 4), (v.l3 + 10, 2)]
        };
        for &(at, n) in fields
            .iter()
            .chain(&[(v.l4 + 4, 4), (v.l4 + 13, 1), (v.l4 + 16, 2)])
        {
            varies[at..at + n].iter_mut().for_each(|b| *b = true);
        }
        let mut joined = Vec::with_capacity(payload.len());
        for (i, s) in out.iter().enumerate() {
            let sv = view(s).ok_or_else(|| format!("segment {i} does not parse"))?;
            if sv != v {
                return Err(format!("segment {i} headers {sv:?} differ from {v:?}"));
            }
            let data = &s[hl..];
            let last = i + 1 == out.len();
            if data.len() > mss || (!last && data.len() != mss) {
                return Err(format!("segment {i} has {} payload bytes", data.len()));
            }
            if let Some(at) = (0..hl).find(|&k| !varies[k] && s[k] != original[k]) {
                return Err(format!("segment {i} changed header byte {at}"));
            }
            if v.v6 {
                if usize::from(be16(s, v.l3 + 4)) != s.len() - v.l3 - 40 {
                    return Err(format!("segment {i}: IPv6 payload length"));
                }
            } else {
                if usize::from(be16(s, v.l3 + 2)) != s.len() - v.l3 {
                    return Err(format!("segment {i}: IPv4 total length"));
                }
                if be16(s, v.l3 + 4) != id0.wrapping_add(i as u16) {
                    return Err(format!("segment {i}: IPv4 ID"));
                }
                if !ipv4_header_ok(s, &sv) {
                    return Err(format!("segment {i}: IPv4 header checksum"));
                }
            }
            if !l4_checksum_ok(s, &sv) {
                return Err(format!("segment {i}: TCP checksum"));
            }
            if be32(s, v.l4 + 4) != seq0.wrapping_add(joined.len() as u32) {
                return Err(format!("segment {i}: sequence number"));
            }
            let mut flags = flags0;
            if !last {
                flags &= !0x09; // FIN, PSH
            }
            if i > 0 {
                flags &= !0x80; // CWR
            }
            if s[v.l4 + 13] != flags {
                return Err(format!("segment {i}: flags {:#x}", s[v.l4 + 13]));
            }
            joined.extend_from_slice(data);
        }
        if joined != payload {
            return Err("payloads do not add up to the original".into());
        }
        Ok(())
    }

    fn check_csum_only(original: &[u8], off: &Offload, out: &[&[u8]]) -> Result<(), String> {
        let [f] = out else {
            return Err(format!("{} frames for a checksum-only request", out.len()));
        };
        let start = usize::from(off.csum_start);
        let at = start + usize::from(off.csum_offset);
        if f.len() != original.len() || at + 2 > f.len() {
            return Err("length changed or checksum outside".into());
        }
        if let Some(k) = (0..f.len()).find(|&k| (k < at || k >= at + 2) && f[k] != original[k]) {
            return Err(format!("byte {k} changed"));
        }
        if be16(f, at) == 0 {
            return Err("checksum 0 written".into());
        }
        // The field held the pseudo-header sum P; with the checksum C in
        // its place, the covered bytes plus P must sum to (negative) zero.
        let mut covered = f[start..].to_vec();
        covered.extend_from_slice(if covered.len() % 2 == 1 {
            &[0, 0, 0]
        } else {
            &[0, 0]
        });
        let n = covered.len();
        covered[n - 2..].copy_from_slice(&be16(original, at).to_be_bytes());
        if ones_sum(&covered) != 0xffff {
            return Err("checksum does not verify".into());
        }
        Ok(())
    }

    /// Offload from raw header bytes: flags, gso type, then hdr_len,
    /// gso_size, csum_start, csum_offset (big-endian u16s). Biased towards
    /// meaningful values.
    fn offload_from(b: &[u8; 10]) -> Offload {
        let w = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let gso = match b[1] % 8 {
            0..=2 => Gso::None,
            3 | 4 => Gso::Tcp4 {
                ecn: b[1] & 0x80 != 0,
            },
            _ => Gso::Tcp6 {
                ecn: b[1] & 0x80 != 0,
            },
        };
        Offload {
            needs_csum: b[0] & 1 != 0,
            csum_start: w(6) % 128,
            csum_offset: if b[0] & 2 != 0 { 16 } else { w(8) % 64 },
            gso,
            gso_size: w(4),
            hdr_len: w(2),
        }
    }

    /// The `offload` fuzz target's body: never a panic, and whatever is
    /// accepted is finished right (see [`check`]). Byte 0 picks raw mode
    /// (a header and any frame) or built mode (a valid super-frame from
    /// parameters, then byte mutations). Returns whether the Segmenter
    /// accepted the frame.
    pub fn run(seg: &mut Segmenter, data: &[u8]) -> bool {
        let Some((&mode, rest)) = data.split_first() else {
            return false;
        };
        if mode & 1 == 0 {
            raw(seg, rest)
        } else {
            built(seg, rest)
        }
    }

    fn finish_and_check(seg: &mut Segmenter, frame: &[u8], off: &Offload, must: bool) -> bool {
        match seg.finish(frame, off) {
            Ok(out) => {
                let out: Vec<&[u8]> = out.collect();
                if let Err(e) = check(frame, off, &out) {
                    panic!("{e}: {off:?} on {} bytes", frame.len());
                }
                true
            }
            Err(e) if must => panic!("a valid frame was refused: {e} ({off:?})"),
            Err(_) => false,
        }
    }

    fn raw(seg: &mut Segmenter, data: &[u8]) -> bool {
        let Some((h, frame)) = data.split_first_chunk::<10>() else {
            return false;
        };
        let w = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        if let Ok(off) = Offload::from_virtio(h[0], h[1], w(2), w(4), w(6), w(8)) {
            let (a, b, c, d, e, f) = off.to_virtio();
            assert_eq!(Offload::from_virtio(a, b, c, d, e, f), Ok(off));
        }
        let off = offload_from(h);
        let mut copy = frame.to_vec();
        if complete_checksum(&mut copy, &off).is_ok() && off.needs_csum {
            if let Err(e) = check_csum_only(frame, &off, &[&copy]) {
                panic!("complete_checksum: {e}");
            }
        }
        finish_and_check(seg, frame, &off, off.is_none())
    }

    fn built(seg: &mut Segmenter, data: &[u8]) -> bool {
        let mut p = [0u8; 16];
        let n = data.len().min(16);
        p[..n].copy_from_slice(&data[..n]);
        let mutations = data.get(16..).unwrap_or(&[]);
        let mut spec = TcpSpec {
            v6: p[0] & 1 != 0,
            vlan: p[0] & 2 != 0,
            ecn: p[0] & 4 != 0,
            ip_option_words: p[1] % 11,
            tcp_option_words: p[2] % 11,
            flags: p[3],
            seq: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            ip_id: u16::from_be_bytes([p[8], p[9]]),
            gso_size: 32 + u16::from_be_bytes([p[10], p[11]]) % 2000,
            payload_len: 0,
        };
        let room = 65535 - 18 - 60 - 60;
        spec.payload_len = usize::from(u16::from_be_bytes([p[12], p[13]])) % (room + 1);
        if p[0] & 8 != 0 {
            // Often small, to reach one-segment frames and short tails.
            spec.payload_len %= 4000;
        }
        let (mut frame, off) = spec.build();
        for m in mutations.chunks_exact(3) {
            let at = usize::from(u16::from_be_bytes([m[0], m[1]])) % frame.len();
            frame[at] = m[2];
        }
        if mutations.len() % 3 == 1 {
            // A trailing byte cuts the frame short.
            let cut = usize::from(mutations[mutations.len() - 1]);
            frame.truncate(frame.len().saturating_sub(cut));
        }
        finish_and_check(seg, &frame, &off, mutations.is_empty())
    }
}
