//! Hooks for the `vhost_user_messages` and `vhost_user_rings` fuzz
//! targets (and their stand-in tests below, which `cargo test` runs): any
//! bytes as a frontend's protocol stream, and any bytes as the guest
//! memory the rings live in. Both must end (no hang) and never touch
//! memory outside what the frontend shared. Not used by the daemon.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::BackendReqHandler;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::control::{self, DeviceLink, Op, Reply, Session, Shared};
use super::device::{Device, RX, TX};
use super::features;
use super::ring::{GuestMap, SplitRing};
use crate::events::EventSink;
use crate::ports::PortLink;

const PAGE: usize = 4096;
/// The two guest regions the ring hook maps: (guest address, size).
const REGIONS: [(u64, usize); 2] = [(0x1_0000, 0x1_0000), (0x4_0000, 0x4000)];

/// Guest memory with an inaccessible page before, between and after the
/// regions: a read or write past a region faults instead of landing in
/// some other allocation of the process.
struct Guarded {
    base: *mut u8,
    len: usize,
}

impl Guarded {
    fn new() -> Option<Guarded> {
        let len = PAGE + REGIONS.iter().map(|r| r.1 + PAGE).sum::<usize>();
        // SAFETY: a new private anonymous mapping, inaccessible at first.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let g = Guarded {
            base: p.cast(),
            len,
        };
        let mut off = PAGE;
        for &(_, size) in &REGIONS {
            // SAFETY: inside our mapping.
            let r = unsafe {
                libc::mprotect(
                    g.base.add(off).cast(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if r != 0 {
                return None;
            }
            off += size + PAGE;
        }
        Some(g)
    }

    /// The regions as guest memory (borrowing the mapping: it must outlive
    /// the result) and as host slices to fill.
    fn memory(&self) -> Option<GuestMemoryMmap> {
        let mut regions = Vec::new();
        let mut off = PAGE;
        for &(gpa, size) in &REGIONS {
            // SAFETY: `size` bytes at `off` are a read-write part of our
            // mapping, which outlives the memory (the caller keeps it).
            let m = unsafe {
                MmapRegion::build_raw(
                    self.base.add(off),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .ok()?;
            regions.push(GuestRegionMmap::new(m, GuestAddress(gpa))?);
            off += size + PAGE;
        }
        GuestMemoryMmap::from_regions(regions).ok()
    }

    /// Fills the regions with `data`, over and over.
    fn fill(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut off = PAGE;
        let mut k = 0;
        for &(_, size) in &REGIONS {
            for i in 0..size {
                // SAFETY: inside a read-write region of our mapping.
                unsafe { *self.base.add(off + i) = data[k % data.len()] };
                k += 1;
            }
            off += size + PAGE;
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once, after the memory using it.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Reads little-endian numbers off the front of the input (zeros past
/// its end).
struct Take<'a>(&'a [u8]);

impl Take<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
}

/// A guest address picked by two input bytes: mostly inside the regions
/// (aligned or not), sometimes just past one or nowhere near.
fn pick_addr(t: &mut Take<'_>) -> u64 {
    let sel = t.u8();
    let off = u64::from(t.u16());
    let (gpa, size) = REGIONS[usize::from(sel & 1)];
    let size = size as u64;
    match sel >> 5 {
        0 => gpa + size - (off % 64),
        1 => off,
        _ => gpa + (off % size),
    }
}

/// The `vhost_user_rings` target: the input picks two rings' sizes,
/// places, start indexes and the negotiated features, then fills guest
/// memory (descriptor tables, rings, buffers alike) with the rest. The
/// device then takes every frame the transmit ring offers and fills the
/// receive ring with frames, until a ring runs dry or is found broken.
/// Every step is bounded; any access outside the regions faults.
pub fn rings(data: &[u8]) {
    let Some(guard) = Guarded::new() else { return };
    let Some(mem) = guard.memory() else { return };
    let mut t = Take(data);
    let feat = t.u8();
    let mut features_acked = 0u64;
    if feat & 1 != 0 {
        features_acked |= 1 << features::VIRTIO_NET_F_MRG_RXBUF;
    }
    if feat & 2 != 0 {
        features_acked |= 1 << features::VIRTIO_RING_F_EVENT_IDX;
    }
    if feat & 4 != 0 {
        features_acked |= 1 << features::VIRTIO_F_VERSION_1;
    }
    let mut params = Vec::new();
    for _ in 0..2 {
        let size = 1u16 << (t.u8() % 10);
        let desc = pick_addr(&mut t);
        let avail = pick_addr(&mut t);
        let used = pick_addr(&mut t);
        let base = t.u16();
        params.push((size, desc, avail, used, base));
    }
    let frame_len = usize::from(t.u16() % 9000);
    guard.fill(t.0);

    let mut dev = Device::default();
    dev.features = features_acked;
    let map = GuestMap::new(Arc::new(mem));
    for (i, &(size, desc, avail, used, base)) in params.iter().enumerate() {
        if let Ok(r) = SplitRing::new(&map, size, desc, avail, used, base, dev.event_idx()) {
            dev.rings[i].ring = Some(r);
            dev.rings[i].started = true;
            dev.rings[i].enabled = true;
        }
    }
    dev.map = Some(map);

    // The device's used entries land in guest memory the input laid out,
    // maybe on top of the available ring: bound the rounds, not the ring.
    let mut out = vec![0u8; 65536];
    for _ in 0..(4 * 1024) {
        match dev.pop_tx(&mut out) {
            Ok(Some(f)) => {
                let _ = f.header;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = dev.signal(TX);
    let _ = dev.notifications(TX, true);
    let frame: Vec<u8> = (0..frame_len).map(|i| i as u8).collect();
    let header = [0u8; features::NET_HDR_LEN];
    for _ in 0..(4 * 1024) {
        match dev.push_rx(&header, &frame) {
            Ok(super::device::Delivery::Delivered) => {}
            Ok(_) | Err(_) => break,
        }
    }
    let _ = dev.signal(RX);
    let _ = dev.notifications(RX, true);
    let _ = dev.has_avail(RX);
    dev.reset();
    drop(dev);
    drop(guard);
}

/// A sealed memfd of `len` bytes (what a well-behaved frontend sends), or
/// an unsealed one.
fn memfd(len: i64, sealed: bool) -> io::Result<File> {
    // SAFETY: a valid C string; the fd is ours when non-negative.
    let raw = unsafe {
        libc::memfd_create(
            c"ulan-fuzz".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(raw) };
    f.set_len(len as u64)?;
    if sealed {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: plain fcntl on our fd.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// Writes `bytes` with `fds` attached (SCM_RIGHTS) in one sendmsg.
pub fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[i32]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one header and `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Stands in for the data plane: applies each op to a real [`Device`]
/// (so ring places are checked against the mapped memory) and answers.
fn data_plane(ops: mpsc::Receiver<(u64, Op)>, replies: mpsc::SyncSender<(u64, Reply)>) {
    let mut dev = Device::default();
    while let Ok((seq, op)) = ops.recv() {
        let reply = match op {
            Op::Features(f) => {
                dev.features = f;
                Reply::Done
            }
            Op::Memory { mem, rings } => {
                let addrs = rings.map(|a| a.map(|a| (a.desc, a.avail, a.used)));
                match dev.set_memory(mem, addrs) {
                    Ok(()) => Reply::Done,
                    Err(e) => Reply::Refused(e.to_string()),
                }
            }
            Op::Start { index, setup } => match dev.start(index, setup) {
                Ok(()) => {
                    dev.rings[index].enabled = true;
                    // Whatever the rings hold: take and fill, bounded.
                    let mut out = vec![0u8; 2048];
                    for _ in 0..64 {
                        if !matches!(dev.pop_tx(&mut out), Ok(Some(_))) {
                            break;
                        }
                    }
                    let _ = dev.push_rx(&[0; features::NET_HDR_LEN], &[0xab; 60]);
                    Reply::Done
                }
                Err(e) => Reply::Refused(e.to_string()),
            },
            Op::Stop { index } => Reply::Base(dev.stop(index)),
            Op::Call { index, call } => {
                dev.rings[index].call = call;
                Reply::Done
            }
            Op::Enable { index, on } => {
                dev.rings[index].enabled = on;
                Reply::Done
            }
            Op::ProtocolInUse => Reply::Done,
            Op::Reset => {
                dev.reset();
                Reply::Done
            }
        };
        if replies.send((seq, reply)).is_err() {
            break;
        }
    }
    dev.reset();
}

/// The `vhost_user_messages` target: the input is a list of chunks, each
/// `[kind, len_lo, len_hi, bytes...]`, written to the frontend end of a
/// socket pair one sendmsg each, with file descriptors attached by `kind`
/// (none, an eventfd, a sealed 64 KiB memfd, an unsealed or too short
/// one, several). The write side is then shut and ulan's session (the
/// `vhost` crate's request handler over [`Session`], with SET_VRING_ENABLE
/// taken first as the port does) reads until it ends. Replies are not
/// read: the socket holds them, the input is capped well below its buffer.
pub fn messages(data: &[u8]) {
    let data = &data[..data.len().min(8192)];
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    // A reply the frontend never reads, or a read that would wait for
    // more, must not hang the harness.
    let _ = ours.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = ours.set_write_timeout(Some(Duration::from_secs(2)));
    let mut t = Take(data);
    while !t.0.is_empty() {
        let kind = t.u8();
        let len = usize::from(t.u16()) % 512;
        let len = len.min(t.0.len());
        let (chunk, rest) = t.0.split_at(len);
        t.0 = rest;
        let files: Vec<File> = match kind % 8 {
            1 | 2 => control::eventfd().into_iter().collect(),
            3 => memfd(0x1_0000, true).into_iter().collect(),
            4 => memfd(0x1_0000, false).into_iter().collect(),
            5 => memfd(0x1000, true).into_iter().collect(),
            6 => (0..3).filter_map(|_| memfd(0x1_0000, true).ok()).collect(),
            _ => Vec::new(),
        };
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        if send_with_fds(&theirs, chunk, &fds).is_err() {
            break;
        }
    }
    let _ = theirs.shutdown(std::net::Shutdown::Write);

    let Ok(shared) = Shared::new() else { return };
    let shared = Arc::new(shared);
    let (ops_tx, ops_rx) = mpsc::channel();
    let (rep_tx, rep_rx) = mpsc::sync_channel(16);
    let plane = std::thread::spawn(move || data_plane(ops_rx, rep_tx));
    let log = PortLink::new(
        "fuzz",
        Arc::new(Default::default()),
        Arc::new(EventSink::new()),
    );
    let link = DeviceLink::new(ops_tx, rep_rx, shared);
    let session = Arc::new(Mutex::new(Session::new(link, log, features::BASE_FEATURES)));
    let Ok(watch) = ours.try_clone() else { return };
    let mut handler = BackendReqHandler::from_stream(ours, session.clone());
    // Every message is at least a 12-byte header: more steps than that
    // means the session loops without reading.
    for _ in 0..=(data.len() / 12 + 1) {
        if !control::step(&mut handler, &watch, &session, "fuzz") {
            break;
        }
    }
    if let Ok(mut s) = session.lock() {
        s.reset();
    }
    drop(handler);
    drop(session);
    let _ = plane.join();
    let _ = (&theirs).flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// The `vhost_user_rings` target over pseudo-random memory images.
    #[test]
    fn random_ring_images_never_leave_guest_memory() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for round in 0..3000 {
            let len = (next() % 2048) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Every fourth round, descriptors that point into the regions
            // with small lengths and short chains: the walk goes deeper.
            if round % 4 == 0 && data.len() > 64 {
                for chunk in data[32..].chunks_mut(16) {
                    if chunk.len() == 16 {
                        let addr = 0x1_0000u64 + (next() % 0xf000);
                        chunk[..8].copy_from_slice(&addr.to_le_bytes());
                        chunk[8..12].copy_from_slice(&((next() % 3000) as u32).to_le_bytes());
                        chunk[12..14].copy_from_slice(&((next() % 4) as u16).to_le_bytes());
                        chunk[14..16].copy_from_slice(&((next() % 300) as u16).to_le_bytes());
                    }
                }
            }
            rings(&data);
        }
    }

    /// A hand-made image: one ring of 4 at the start of region 0, a chain
    /// of two descriptors, and a frame of 60 bytes comes out of it whole.
    #[test]
    fn a_well_formed_image_yields_its_frame() {
        let guard = Guarded::new().unwrap();
        let mem = guard.memory().unwrap();
        let map = GuestMap::new(Arc::new(mem));
        let base = 0x1_0000u64;
        let (desc, avail, used, buf) = (base, base + 0x100, base + 0x200, base + 0x1000);
        let w = |gpa: u64, bytes: &[u8]| {
            let p = map.host(gpa, bytes.len() as u64).unwrap();
            // SAFETY: checked inside the mapping just above.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        };
        // desc 0: the 12-byte header, next 1; desc 1: 60 bytes of frame.
        let mut d = Vec::new();
        d.extend_from_slice(&buf.to_le_bytes());
        d.extend_from_slice(&12u32.to_le_bytes());
        d.extend_from_slice(&1u16.to_le_bytes());
        d.extend_from_slice(&1u16.to_le_bytes());
        d.extend_from_slice(&(buf + 12).to_le_bytes());
        d.extend_from_slice(&60u32.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        w(desc, &d);
        w(buf + 12, &[7u8; 60]);
        w(avail, &[0, 0, 1, 0, 0, 0]);
        let mut dev = Device::default();
        dev.features = 1 << features::VIRTIO_F_VERSION_1;
        dev.rings[TX].ring = Some(SplitRing::new(&map, 4, desc, avail, used, 0, false).unwrap());
        dev.map = Some(map);
        let mut out = [0u8; 2048];
        let f = dev.pop_tx(&mut out).unwrap().unwrap();
        assert_eq!(f.len, 60);
        assert_eq!(&out[..60], &[7u8; 60]);
        assert!(dev.pop_tx(&mut out).unwrap().is_none());
        dev.reset();
    }

    /// The `vhost_user_messages` target over pseudo-random streams, half
    /// of them starting with a valid handshake so later messages get past
    /// the header checks.
    #[test]
    fn random_message_streams_end_and_never_hang() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let hdr = |req: u32, size: u32| {
            let mut v = Vec::new();
            v.extend_from_slice(&req.to_ne_bytes());
            v.extend_from_slice(&1u32.to_ne_bytes());
            v.extend_from_slice(&size.to_ne_bytes());
            v
        };
        for round in 0..1500 {
            let mut data = Vec::new();
            if round % 2 == 0 {
                // GET_FEATURES, SET_OWNER, SET_MEM_TABLE (one region of
                // 64 KiB, a sealed memfd attached by kind 3).
                for (kind, msg) in [(0u8, hdr(1, 0)), (0, hdr(3, 0))] {
                    data.push(kind);
                    data.extend_from_slice(&(msg.len() as u16).to_le_bytes());
                    data.extend_from_slice(&msg);
                }
                let mut m = hdr(5, 8 + 32);
                m.extend_from_slice(&1u32.to_ne_bytes());
                m.extend_from_slice(&0u32.to_ne_bytes());
                for v in [0u64, 0x1_0000, 0x7000_0000, 0] {
                    m.extend_from_slice(&v.to_ne_bytes());
                }
                data.push(3);
                data.extend_from_slice(&(m.len() as u16).to_le_bytes());
                data.extend_from_slice(&m);
            }
            let chunks = next() % 12;
            for _ in 0..chunks {
                let req = (next() % 42) as u32;
                let size = match next() % 4 {
                    0 => 8,
                    1 => 40,
                    2 => (next() % 64) as u32,
                    _ => (next() % 0x2000) as u32,
                };
                let mut msg = hdr(req, size);
                let body = (next() % 48) as usize;
                msg.extend((0..body).map(|_| next() as u8));
                if next() % 8 == 0 {
                    msg.truncate((next() % 12) as usize);
                }
                data.push(next() as u8);
                data.extend_from_slice(&(msg.len() as u16).to_le_bytes());
                data.extend_from_slice(&msg);
            }
            messages(&data);
        }
    }
}
