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
/// Bytes of guest memory the ring hook fills.
pub const IMAGE_LEN: usize = REGIONS[0].1 + REGIONS[1].1;
/// Bytes of parameters before the image.
pub const RINGS_HEADER_LEN: usize = 1 + 2 * 15 + 2;

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
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
}

/// The `vhost_user_rings` target: the input picks the negotiated features
/// (1 byte), then for RX and TX a ring size (1 byte, log2), the guest
/// addresses of the descriptor table, available and used rings (3 x u32
/// LE) and the start index (u16 LE), then a frame length (u16 LE); the
/// rest fills guest memory (descriptor tables, rings, buffers alike),
/// repeated: region 0 is guest 0x1_0000..0x2_0000 and region 1
/// 0x4_0000..0x4_4000, so a rest of [`IMAGE_LEN`] bytes is an exact
/// image. The
/// device then takes every frame the transmit ring offers and fills the
/// receive ring with frames, until a ring runs dry or is found broken.
/// Every step is bounded; any access outside the regions faults.
pub fn rings(data: &[u8]) -> RingsOutcome {
    let mut outcome = RingsOutcome::default();
    let Some(guard) = Guarded::new() else {
        return outcome;
    };
    let Some(mem) = guard.memory() else {
        return outcome;
    };
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
        let desc = u64::from(t.u32());
        let avail = u64::from(t.u32());
        let used = u64::from(t.u32());
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
            outcome.rings += 1;
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
            Ok(Some(_)) => outcome.tx_frames += 1,
            Ok(None) => break,
            Err(_) => {
                outcome.errors += 1;
                break;
            }
        }
    }
    let _ = dev.signal(TX);
    let _ = dev.notifications(TX, true);
    let frame: Vec<u8> = (0..frame_len).map(|i| i as u8).collect();
    let header = [0u8; features::NET_HDR_LEN];
    for _ in 0..(4 * 1024) {
        match dev.push_rx(&header, &frame) {
            Ok(super::device::Delivery::Delivered) => outcome.rx_frames += 1,
            Ok(_) => break,
            Err(_) => {
                outcome.errors += 1;
                break;
            }
        }
    }
    let _ = dev.signal(RX);
    let _ = dev.notifications(RX, true);
    let _ = dev.has_avail(RX);
    dev.reset();
    drop(dev);
    drop(guard);
    outcome
}

/// What one ring image gave (for the stand-in tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingsOutcome {
    /// Rings whose places passed the checks.
    pub rings: usize,
    pub tx_frames: usize,
    pub rx_frames: usize,
    /// Rings found broken.
    pub errors: usize,
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
fn data_plane(ops: mpsc::Receiver<(u64, Op)>, replies: mpsc::SyncSender<(u64, Reply)>) -> usize {
    let mut dev = Device::default();
    let mut started = 0;
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
                    started += 1;
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
    started
}

/// How a message stream fared (for the stand-in tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MessagesOutcome {
    /// Messages read and answered before the session ended.
    pub steps: usize,
    /// Rings the data plane started.
    pub rings_started: usize,
    /// Sessions cut off for breaking the protocol (0 or 1).
    pub protocol_errors: u64,
}

/// The `vhost_user_messages` target: the input is a list of chunks, each
/// `[kind, len_lo, len_hi, bytes...]`, written to the frontend end of a
/// socket pair one sendmsg each, with file descriptors attached by `kind`
/// (none, an eventfd, a sealed 64 KiB memfd, an unsealed or too short
/// one, several). The write side is then shut and ulan's session (the
/// `vhost` crate's request handler over [`Session`], with SET_VRING_ENABLE
/// taken first as the port does) reads until it ends. Replies are not
/// read: the socket holds them, the input is capped well below its buffer.
pub fn messages(data: &[u8]) -> MessagesOutcome {
    let data = &data[..data.len().min(8192)];
    let mut outcome = MessagesOutcome::default();
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return outcome;
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

    let Ok(shared) = Shared::new() else {
        return outcome;
    };
    let shared = Arc::new(shared);
    let (ops_tx, ops_rx) = mpsc::channel();
    let (rep_tx, rep_rx) = mpsc::sync_channel(16);
    let plane = std::thread::spawn(move || data_plane(ops_rx, rep_tx));
    let counters: Arc<crate::switch::stats::PortShared> = Arc::new(Default::default());
    let log = PortLink::new("fuzz", counters.clone(), Arc::new(EventSink::new()));
    let link = DeviceLink::new(ops_tx, rep_rx, shared);
    let session = Arc::new(Mutex::new(Session::new(link, log, features::BASE_FEATURES)));
    let Ok(watch) = ours.try_clone() else {
        return outcome;
    };
    let mut handler = BackendReqHandler::from_stream(ours, session.clone());
    // Every message is at least a 12-byte header: more steps than that
    // means the session loops without reading.
    for _ in 0..=(data.len() / 12 + 1) {
        if !control::step(&mut handler, &watch, &session, "fuzz") {
            break;
        }
        outcome.steps += 1;
    }
    if let Ok(mut s) = session.lock() {
        s.reset();
    }
    drop(handler);
    drop(session);
    outcome.rings_started = plane.join().unwrap_or(0);
    outcome.protocol_errors = counters.counters.load().protocol_errors;
    let _ = (&theirs).flush();
    outcome
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

    /// The `vhost_user_rings` target over pseudo-random memory images:
    /// a third plain noise, the rest rings of plausible shape (tables and
    /// rings where they fit, descriptors into the regions with small
    /// lengths and short chains) spoilt here and there: addresses off or
    /// unaligned, lengths huge, links out of range or looping, indexes
    /// past the ring, writable TX and readable RX buffers.
    #[test]
    fn random_ring_images_never_leave_guest_memory() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut total = RingsOutcome::default();
        for round in 0..2000 {
            if round % 3 == 0 {
                let len = (next() % 4096) as usize;
                let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let o = rings(&data);
                total.rings += o.rings;
                total.errors += o.errors;
                continue;
            }
            let mut head = vec![(next() % 8) as u8];
            let mut image = vec![0u8; IMAGE_LEN];
            let put = |image: &mut Vec<u8>, gpa: u64, bytes: &[u8]| {
                let off = (gpa - 0x1_0000) as usize;
                if let Some(d) = image.get_mut(off..off + bytes.len()) {
                    d.copy_from_slice(bytes);
                }
            };
            for ring in 0..2u64 {
                let log = (next() % 9) as u8;
                let size = 1u64 << log;
                let base = 0x1_0000 + ring * 0x4000;
                let (mut desc, mut avail, mut used) = (base, base + 0x2000, base + 0x3000);
                match next() % 16 {
                    0 => desc += 8,
                    1 => avail = 0x2_0000 - 4,
                    2 => used = 0x4_4000 - 8,
                    _ => {}
                }
                let start = next() as u16;
                head.push(log);
                for v in [desc as u32, avail as u32, used as u32] {
                    head.extend_from_slice(&v.to_le_bytes());
                }
                head.extend_from_slice(&start.to_le_bytes());
                let writable = if ring == 0 { 2u16 } else { 0 };
                for i in 0..size {
                    let addr = match next() % 32 {
                        0 => 0x2_0000 - (next() % 64),
                        1 => next(),
                        2..=9 => 0x4_0000 + next() % 0x3000,
                        _ => 0x1_8000 + next() % 0x7000,
                    };
                    let len = match next() % 32 {
                        0 => u32::MAX,
                        1 => 0,
                        _ => 1 + (next() % 1600) as u32,
                    };
                    let mut flags = if next() % 3 == 0 { 1 } else { 0 } | writable;
                    if next() % 40 == 0 {
                        flags ^= 2;
                    }
                    if next() % 100 == 0 {
                        flags |= 4;
                    }
                    let link = match next() % 20 {
                        0 => i as u16,
                        1 => (size + next() % 8) as u16,
                        _ => ((i + 1 + next() % 3) % size) as u16,
                    };
                    let mut d = Vec::new();
                    d.extend_from_slice(&addr.to_le_bytes());
                    d.extend_from_slice(&len.to_le_bytes());
                    d.extend_from_slice(&flags.to_le_bytes());
                    d.extend_from_slice(&link.to_le_bytes());
                    put(&mut image, desc + 16 * i, &d);
                }
                let ahead = match next() % 10 {
                    0 => (size + 1 + next() % 100) as u16,
                    _ => (next() % (size + 1)) as u16,
                };
                let mut a = vec![(next() % 2) as u8, 0];
                a.extend_from_slice(&start.wrapping_add(ahead).to_le_bytes());
                for _ in 0..size {
                    let h = match next() % 50 {
                        0 => (size + next() % 10) as u16,
                        _ => (next() % size) as u16,
                    };
                    a.extend_from_slice(&h.to_le_bytes());
                }
                put(&mut image, avail, &a);
            }
            head.extend_from_slice(&((next() % 3000) as u16).to_le_bytes());
            assert_eq!(head.len(), RINGS_HEADER_LEN);
            head.extend_from_slice(&image);
            let o = rings(&head);
            total.rings += o.rings;
            total.tx_frames += o.tx_frames;
            total.rx_frames += o.rx_frames;
            total.errors += o.errors;
        }
        // Deep enough: rings start, frames go both ways, rings break.
        assert!(
            total.rings > 1500
                && total.tx_frames > 1000
                && total.rx_frames > 500
                && total.errors > 500,
            "{total:?}"
        );
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

    fn chunk(kind: u8, msg: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&(msg.len() as u16).to_le_bytes());
        v.extend_from_slice(msg);
        v
    }

    fn msg(req: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&req.to_ne_bytes());
        v.extend_from_slice(&1u32.to_ne_bytes());
        v.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        v.extend_from_slice(body);
        v
    }

    fn u64s(v: &[u64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    /// What a frontend does to start both rings, in 64 KiB of memory at
    /// frontend address 0x7000_0000 (rings of 8 at 0x0/0x100/0x200 and
    /// 0x1000/0x1100/0x1200).
    fn good_stream() -> Vec<u8> {
        let ua = 0x7000_0000u64;
        let mut d = Vec::new();
        d.extend(chunk(0, &msg(1, &[]))); // GET_FEATURES
        d.extend(chunk(0, &msg(3, &[]))); // SET_OWNER
        d.extend(chunk(0, &msg(2, &u64s(&[1 << 32])))); // SET_FEATURES
        let mut table = vec![1, 0, 0, 0, 0, 0, 0, 0];
        table.extend(u64s(&[0, 0x1_0000, ua, 0]));
        d.extend(chunk(3, &msg(5, &table))); // SET_MEM_TABLE + sealed memfd
        for (i, base) in [(0u32, ua), (1, ua + 0x1000)] {
            let state = |n: u32| [i.to_ne_bytes(), n.to_ne_bytes()].concat();
            d.extend(chunk(0, &msg(8, &state(8)))); // SET_VRING_NUM
            let mut addr = state(0);
            addr.extend(u64s(&[base, base + 0x200, base + 0x100, 0]));
            d.extend(chunk(0, &msg(9, &addr))); // SET_VRING_ADDR
            d.extend(chunk(0, &msg(10, &state(0)))); // SET_VRING_BASE
            d.extend(chunk(1, &msg(12, &u64s(&[u64::from(i)])))); // KICK + fd
        }
        d
    }

    /// The harness really drives the session: a well-formed stream
    /// starts both rings with no error; the same stream with a broken
    /// last message is cut off and counted; a stream cut short too.
    #[test]
    fn the_message_harness_reaches_the_rings() {
        let good = messages(&good_stream());
        assert_eq!(
            good,
            MessagesOutcome {
                steps: 12,
                rings_started: 2,
                protocol_errors: 0
            }
        );
        let mut bad = good_stream();
        bad.extend(chunk(0, &msg(8, &[0, 0, 0, 0]))); // SET_VRING_NUM, size 4
        let bad = messages(&bad);
        assert_eq!((bad.steps, bad.protocol_errors), (12, 1), "{bad:?}");
        let mut cut = good_stream();
        cut.extend(chunk(0, &msg(8, &[0; 8])[..7]));
        let cut = messages(&cut);
        assert_eq!((cut.steps, cut.protocol_errors), (12, 1), "{cut:?}");
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
        let (mut deep, mut errors) = (0, 0);
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
            let o = messages(&data);
            if o.steps >= 3 {
                deep += 1;
            }
            errors += o.protocol_errors;
        }
        // The handshake rounds get past it; most streams break the protocol.
        assert!(deep > 300 && errors > 500, "deep {deep}, errors {errors}");
    }
}
