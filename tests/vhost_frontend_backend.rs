//! ulan's vhost-user frontend (ulan::testkit::vhost_frontend) against an
//! in-process backend made of rust-vmm parts, the same ones ulan's own
//! vhost-user port uses: the `vhost` crate's backend request handler for
//! the protocol and virtio-queue's device-side `Queue` over the memory the
//! frontend sent. The test plays the device by hand, so it can do what
//! testpmd never does: mergeable frames over several buffers, offload
//! headers, bogus used entries, kicks on demand, closing the socket.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    Backend, BackendListener, GpuBackend, Listener, VhostUserBackendReqHandlerMut,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use ulan::testkit::vhost_frontend::features::*;
use ulan::testkit::vhost_frontend::{NetHeader, VhostFrontend, NET_HDR_LEN, RX_QUEUE, TX_QUEUE};

type VuResult<T> = vhost::vhost_user::Result<T>;

/// The device state the protocol handler fills in and the test drives.
struct Fake {
    offered: u64,
    offered_protocol: VhostUserProtocolFeatures,
    acked: u64,
    acked_protocol: u64,
    mem: Option<GuestMemoryMmap>,
    /// (guest physical, frontend virtual, size) of the one region.
    region: Option<(u64, u64, u64)>,
    sealed: bool,
    queues: Vec<Queue>,
    kick: [Option<File>; 2],
    call: [Option<File>; 2],
    enabled: [bool; 2],
    owner: bool,
    /// Close the session after the next GET_FEATURES.
    hang_up: bool,
    /// Set by the GET_FEATURES that saw `hang_up`: the server closes now.
    closing: bool,
}

impl Fake {
    fn new(offered: u64) -> Fake {
        Fake {
            offered,
            offered_protocol: VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG,
            acked: 0,
            acked_protocol: 0,
            mem: None,
            region: None,
            sealed: false,
            queues: vec![Queue::new(1024).unwrap(), Queue::new(1024).unwrap()],
            kick: [None, None],
            call: [None, None],
            enabled: [false, false],
            owner: false,
            hang_up: false,
            closing: false,
        }
    }

    fn va_to_gpa(&self, va: u64) -> VuResult<u64> {
        let (gpa, uva, size) = self.region.ok_or(vhost::vhost_user::Error::InvalidParam)?;
        if va < uva || va >= uva + size {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        Ok(va - uva + gpa)
    }

    fn queue(&mut self, index: u32) -> VuResult<&mut Queue> {
        self.queues
            .get_mut(index as usize)
            .ok_or(vhost::vhost_user::Error::InvalidParam)
    }
}

fn unsupported<T>() -> VuResult<T> {
    Err(vhost::vhost_user::Error::InvalidOperation(
        "not in this test",
    ))
}

impl VhostUserBackendReqHandlerMut for Fake {
    fn set_owner(&mut self) -> VuResult<()> {
        self.owner = true;
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.owner = false;
        Ok(())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn get_features(&mut self) -> VuResult<u64> {
        // Decided while handling the request, not after it: the server
        // thread may only look after the frontend has sent the next one.
        self.closing = self.hang_up;
        Ok(self.offered)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered != 0 {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        self.acked = features;
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<u64>>> {
        let (Some(r), Some(file)) = (ctx.first(), files.into_iter().next()) else {
            return Err(vhost::vhost_user::Error::InvalidParam);
        };
        // SAFETY: plain fcntl on a file we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        self.sealed = seals >= 0 && seals & want == want;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(r.guest_phys_addr),
            r.memory_size as usize,
            Some(FileOffset::new(file, r.mmap_offset)),
        )])
        .map_err(|_| vhost::vhost_user::Error::InvalidParam)?;
        self.mem = Some(mem);
        self.region = Some((r.guest_phys_addr, r.user_addr, r.memory_size));
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.queue(index)?.set_size(num as u16);
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let (d, u, a) = (
            self.va_to_gpa(descriptor)?,
            self.va_to_gpa(used)?,
            self.va_to_gpa(available)?,
        );
        let split = |x: u64| (Some(x as u32), Some((x >> 32) as u32));
        let q = self.queue(index)?;
        let (l, h) = split(d);
        q.set_desc_table_address(l, h);
        let (l, h) = split(u);
        q.set_used_ring_address(l, h);
        let (l, h) = split(a);
        q.set_avail_ring_address(l, h);
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let q = self.queue(index)?;
        q.set_next_avail(base as u16);
        q.set_next_used(base as u16);
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let q = self.queue(index)?;
        q.set_ready(false);
        Ok(VhostUserVringState::new(index, q.next_avail() as u32))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = index as usize;
        if i > 1 {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        self.kick[i] = fd;
        self.queues[i].set_ready(true);
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = index as usize;
        if i > 1 {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        self.call[i] = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol)
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(2)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let e = self
            .enabled
            .get_mut(index as usize)
            .ok_or(vhost::vhost_user::Error::InvalidParam)?;
        *e = enable;
        Ok(())
    }
    fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        unsupported()
    }
    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
        unsupported()
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported()
    }
    fn get_inflight_fd(&mut self, _: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        unsupported()
    }
    fn set_inflight_fd(&mut self, _: &VhostUserInflight, _: File) -> VuResult<()> {
        unsupported()
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(8)
    }
    fn add_mem_region(
        &mut self,
        _: &VhostUserSingleMemoryRegion,
        _: File,
        _: Option<bool>,
    ) -> VuResult<Option<u64>> {
        unsupported()
    }
    fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> VuResult<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> VuResult<()> {
        unsupported()
    }
}

/// The backend: a socket, a thread serving the protocol until the
/// frontend goes, and the device state.
struct Device {
    fake: Arc<Mutex<Fake>>,
    server: Option<JoinHandle<vhost::vhost_user::Result<()>>>,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

const OFFER_ALL: u64 = VIRTIO_F_VERSION_1
    | VHOST_USER_F_PROTOCOL_FEATURES
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4;

impl Device {
    fn start(offered: u64) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vhost.sock");
        let fake = Arc::new(Mutex::new(Fake::new(offered)));
        let mut listener = Listener::new(&path, true).unwrap();
        let f = fake.clone();
        let server = std::thread::spawn(move || {
            let mut bl = BackendListener::new(&mut listener, f.clone())?;
            let mut handler = loop {
                if let Some(h) = bl.accept()? {
                    break h;
                }
            };
            loop {
                handler.handle_request()?;
                if f.lock().unwrap().closing {
                    return Ok(());
                }
            }
        });
        Device {
            fake,
            server: Some(server),
            _dir: dir,
            path,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&mut Fake) -> T) -> T {
        f(&mut self.fake.lock().unwrap())
    }

    /// Pops every TX chain: (header, frame) each, and marks them used.
    fn take_tx(&self) -> Vec<(NetHeader, Vec<u8>)> {
        self.with(|d| {
            let mem = d.mem.clone().unwrap();
            let mut out = Vec::new();
            let q = &mut d.queues[TX_QUEUE];
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let mut bytes = Vec::new();
                for desc in chain {
                    assert!(!desc.is_write_only(), "TX descriptors are device-readable");
                    let mut b = vec![0u8; desc.len() as usize];
                    mem.read_slice(&mut b, desc.addr()).unwrap();
                    bytes.extend_from_slice(&b);
                }
                q.add_used(&mem, head, 0).unwrap();
                let hdr: [u8; NET_HDR_LEN] = bytes[..NET_HDR_LEN].try_into().unwrap();
                out.push((NetHeader::from_bytes(&hdr), bytes[NET_HDR_LEN..].to_vec()));
            }
            signal(d, TX_QUEUE, &mem);
            out
        })
    }

    /// Writes one frame into as many RX buffers as it needs (only one
    /// without MRG_RXBUF); returns how many it used, or None when the
    /// ring had too few.
    fn put_rx(&self, hdr: NetHeader, frame: &[u8]) -> Option<u16> {
        self.with(|d| {
            let mem = d.mem.clone().unwrap();
            let mrg = d.acked & VIRTIO_NET_F_MRG_RXBUF != 0;
            let mut bytes = Vec::with_capacity(NET_HDR_LEN + frame.len());
            bytes.extend_from_slice(&[0u8; NET_HDR_LEN]);
            bytes.extend_from_slice(frame);
            let q = &mut d.queues[RX_QUEUE];
            let mut used = Vec::new();
            let mut off = 0;
            while off < bytes.len() {
                let chain = q.pop_descriptor_chain(&mem)?;
                let head = chain.head_index();
                let mut wrote = 0u32;
                for desc in chain {
                    assert!(desc.is_write_only(), "RX descriptors are device-writable");
                    let n = (desc.len() as usize).min(bytes.len() - off);
                    mem.write_slice(&bytes[off..off + n], desc.addr()).unwrap();
                    off += n;
                    wrote += n as u32;
                }
                used.push((head, wrote));
                if !mrg && off < bytes.len() {
                    panic!("frame does not fit one buffer without MRG_RXBUF");
                }
            }
            // The header goes in the first buffer, with num_buffers.
            let mut h = hdr;
            h.num_buffers = if mrg { used.len() as u16 } else { 0 };
            let first = used[0].0;
            let addr = first_buffer_addr(q, &mem, first);
            mem.write_slice(&h.to_bytes(), addr).unwrap();
            for (head, len) in &used {
                q.add_used(&mem, *head, *len).unwrap();
            }
            signal(d, RX_QUEUE, &mem);
            Some(used.len() as u16)
        })
    }

    /// Makes the next TX post need a kick (EVENT_IDX: avail_event =
    /// next_avail; otherwise clears NO_NOTIFY).
    fn want_kicks(&self) {
        self.with(|d| {
            let mem = d.mem.clone().unwrap();
            d.queues[TX_QUEUE].enable_notification(&mem).unwrap();
        })
    }

    fn kicked(&self, queue: usize) -> bool {
        self.with(|d| {
            let f = d.kick[queue].as_ref().unwrap();
            let mut b = [0u8; 8];
            // SAFETY: a non-blocking eventfd read into a local buffer.
            let r = unsafe { libc::read(f.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
            r == 8
        })
    }

    /// Stops serving: the protocol thread ends with the frontend's close.
    fn wait_closed(&mut self) -> vhost::vhost_user::Error {
        let h = self.server.take().unwrap();
        match h.join().unwrap() {
            Err(e) => e,
            Ok(()) => panic!("the server loop cannot end without an error"),
        }
    }
}

/// The descriptor a used head points at: its buffer address (the
/// frontend gives every descriptor one buffer, never a chain).
fn first_buffer_addr(q: &Queue, mem: &GuestMemoryMmap, head: u16) -> GuestAddress {
    let desc = GuestAddress(q.desc_table() + 16 * head as u64);
    GuestAddress(mem.read_obj::<u64>(desc).unwrap())
}

/// A used entry virtio-queue would refuse to write (a bad id).
fn raw_used(q: &mut Queue, mem: &GuestMemoryMmap, id: u32, len: u32) {
    let next = q.next_used();
    let slot = (next % q.size()) as u64;
    let entry = GuestAddress(q.used_ring() + 4 + 8 * slot);
    mem.write_obj(id, entry).unwrap();
    mem.write_obj(len, GuestAddress(entry.0 + 4)).unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let next = next.wrapping_add(1);
    mem.write_obj(next, GuestAddress(q.used_ring() + 2))
        .unwrap();
    q.set_next_used(next);
}

fn signal(d: &mut Fake, queue: usize, mem: &GuestMemoryMmap) {
    if d.queues[queue].needs_notification(mem).unwrap() {
        if let Some(c) = d.call[queue].as_mut() {
            let _ = c.write(&1u64.to_ne_bytes());
        }
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn negotiation_takes_the_intersection_and_sets_everything_up() {
    let dev = Device::start(OFFER_ALL);
    let fe = VhostFrontend::connect(dev.path()).unwrap();
    let n = *fe.negotiated();
    assert_eq!(n.backend_features, OFFER_ALL);
    assert_eq!(
        n.features,
        VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_NET_F_MRG_RXBUF,
        "offloads only when asked"
    );
    assert!(n.event_idx && n.mrg_rxbuf && n.reply_ack);
    assert_eq!(
        n.protocol_features,
        VhostUserProtocolFeatures::REPLY_ACK.bits()
    );
    assert_eq!(n.queue_size, 256);
    dev.with(|d| {
        assert_eq!(d.acked, n.features);
        assert_eq!(d.acked_protocol, n.protocol_features);
        assert!(d.owner && d.sealed, "owner set, memory sealed");
        assert_eq!(d.enabled, [true, true]);
        assert!(d.kick.iter().all(Option::is_some) && d.call.iter().all(Option::is_some));
        assert!(d.queues.iter().all(|q| q.ready() && q.size() == 256));
        let mem = d.mem.clone().unwrap();
        assert!(d.queues.iter().all(|q| q.is_valid(&mem)));
        assert_eq!(mem.last_addr().0 + 1, 64 << 20);
        // The RX ring is full of device-writable buffers.
        assert_eq!(
            d.queues[RX_QUEUE]
                .avail_idx(&mem, std::sync::atomic::Ordering::Acquire)
                .unwrap()
                .0,
            256
        );
    });
    // The first kicks start the rings.
    assert!(dev.kicked(RX_QUEUE) && dev.kicked(TX_QUEUE));
}

#[test]
fn options_and_offers_narrow_what_is_negotiated() {
    let dev = Device::start(OFFER_ALL);
    let fe = VhostFrontend::builder(dev.path())
        .event_idx(false)
        .mrg_rxbuf(false)
        .features(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_HOST_TSO4)
        .queue_size(1024)
        .memory_size(16 << 20)
        .connect()
        .unwrap();
    let n = fe.negotiated();
    assert!(!n.event_idx && !n.mrg_rxbuf);
    assert!(n.has(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4));
    assert!(!n.has(VIRTIO_NET_F_HOST_TSO4), "not offered");
    assert_eq!(n.queue_size, 1024);

    // A backend without EVENT_IDX, MRG_RXBUF or PROTOCOL_FEATURES.
    let dev = Device::start(VIRTIO_F_VERSION_1);
    let fe = VhostFrontend::connect(dev.path()).unwrap();
    let n = fe.negotiated();
    assert_eq!(n.features, VIRTIO_F_VERSION_1);
    assert!(!n.event_idx && !n.mrg_rxbuf && !n.reply_ack);
    assert_eq!(n.protocol_features, 0);
    dev.with(|d| assert_eq!(d.enabled, [false, false], "no SET_VRING_ENABLE"));

    // Without VERSION_1 there is nothing to talk about.
    let dev = Device::start(VHOST_USER_F_PROTOCOL_FEATURES);
    let e = VhostFrontend::connect(dev.path()).err().unwrap();
    assert!(e.to_string().contains("VIRTIO_F_VERSION_1"), "{e}");

    // Too little memory for 1024-entry queues of 64 KiB buffers.
    let dev = Device::start(OFFER_ALL);
    let e = VhostFrontend::builder(dev.path())
        .mrg_rxbuf(false)
        .big_frames(true)
        .queue_size(1024)
        .connect()
        .err()
        .unwrap();
    assert!(e.to_string().contains("too small"), "{e}");
}

#[test]
fn tx_frames_reach_the_device_with_their_headers() {
    let dev = Device::start(OFFER_ALL);
    let mut fe = VhostFrontend::connect(dev.path()).unwrap();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(60 + 500 * i, i as u8)).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
    assert_eq!(fe.send(&refs), 3);
    let got = dev.take_tx();
    assert_eq!(got.len(), 3);
    for ((h, f), want) in got.iter().zip(&frames) {
        assert_eq!(*h, NetHeader::default());
        assert_eq!(f, want);
    }
    let gso = NetHeader {
        flags: NetHeader::F_NEEDS_CSUM,
        gso_type: NetHeader::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let big = frame(1800, 9);
    assert_eq!(fe.send_with_header(&[(gso, &big[..])]), 1);
    assert_eq!(dev.take_tx(), vec![(gso, big)]);
    // Oversize frames are taken and counted, not posted.
    let huge = frame(fe.max_tx_frame() + 1, 0);
    assert_eq!(fe.send(&[&huge[..]]), 1);
    assert_eq!(fe.stats().tx_oversize, 1);
    assert!(dev.take_tx().is_empty());
    assert!(fe.flush_tx(Duration::from_secs(1)).unwrap());
    assert_eq!(fe.tx_free(), 256);
    let s = fe.stats();
    assert_eq!((s.tx_frames, s.tx_completed, s.bad_used), (4, 4, 0));
}

#[test]
fn a_full_tx_ring_takes_what_fits_and_continues_after_completions() {
    let dev = Device::start(OFFER_ALL);
    let mut fe = VhostFrontend::builder(dev.path())
        .queue_size(8)
        .connect()
        .unwrap();
    let frames: Vec<Vec<u8>> = (0..20).map(|i| frame(64, i)).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
    assert_eq!(fe.send(&refs), 8);
    assert_eq!(fe.send(&refs[8..]), 0);
    assert!(!fe.wait_tx(Duration::from_millis(20)).unwrap());
    assert_eq!(dev.take_tx().len(), 8);
    assert!(fe.wait_tx(Duration::from_secs(1)).unwrap());
    assert_eq!(fe.send(&refs[8..]), 8);
    let got = dev.take_tx();
    assert_eq!(got[0].1, frames[8]);
    assert_eq!(got[7].1, frames[15]);
}

#[test]
fn kicks_only_when_the_device_asks() {
    let dev = Device::start(OFFER_ALL);
    let mut fe = VhostFrontend::connect(dev.path()).unwrap();
    assert!(dev.kicked(TX_QUEUE), "the setup kick");
    let f = frame(64, 1);
    // avail_event is 0: the first post passes it once.
    fe.send(&[&f[..]]);
    let k0 = fe.stats().tx_kicks;
    fe.send(&[&f[..]]);
    fe.send(&[&f[..]]);
    assert_eq!(fe.stats().tx_kicks, k0, "the device did not ask");
    dev.take_tx();
    dev.want_kicks();
    let _ = dev.kicked(TX_QUEUE);
    fe.send(&[&f[..], &f[..]]);
    assert_eq!(fe.stats().tx_kicks, k0 + 1);
    assert!(dev.kicked(TX_QUEUE));

    // Without EVENT_IDX the device's NO_NOTIFY flag decides.
    let dev = Device::start(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES);
    let mut fe = VhostFrontend::connect(dev.path()).unwrap();
    let _ = dev.kicked(TX_QUEUE);
    dev.with(|d| {
        let mem = d.mem.clone().unwrap();
        d.queues[TX_QUEUE].disable_notification(&mem).unwrap();
    });
    fe.send(&[&f[..]]);
    assert_eq!(fe.stats().tx_kicks, 0);
    dev.want_kicks();
    fe.send(&[&f[..]]);
    assert_eq!(fe.stats().tx_kicks, 1);
    assert!(dev.kicked(TX_QUEUE));
}

#[test]
fn rx_frames_come_whole_with_headers_even_over_several_buffers() {
    let dev = Device::start(OFFER_ALL);
    let mut fe = VhostFrontend::connect(dev.path()).unwrap();
    assert!(fe.negotiated().mrg_rxbuf);
    let hdr = NetHeader {
        flags: NetHeader::F_DATA_VALID,
        gso_type: NetHeader::GSO_TCPV4,
        hdr_len: 66,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let small = frame(60, 3);
    let jumbo = frame(5000, 4);
    assert_eq!(dev.put_rx(NetHeader::default(), &small), Some(1));
    assert_eq!(dev.put_rx(hdr, &jumbo), Some(3), "2048-byte buffers");
    assert!(fe.wait_rx(Duration::from_secs(1)).unwrap());
    let mut got = Vec::new();
    assert_eq!(fe.recv_with_header(|h, f| got.push((*h, f.to_vec()))), 2);
    assert_eq!(got[0].1, small);
    assert_eq!(got[0].0.num_buffers, 1);
    assert_eq!(got[1].1, jumbo);
    assert_eq!(
        (got[1].0.flags, got[1].0.gso_type, got[1].0.gso_size),
        (hdr.flags, hdr.gso_type, hdr.gso_size)
    );
    assert_eq!((got[1].0.csum_start, got[1].0.csum_offset), (34, 16));
    assert_eq!(got[1].0.num_buffers, 3);
    // The buffers went back: the ring takes 256 more single-buffer frames.
    for i in 0..256 {
        assert_eq!(dev.put_rx(NetHeader::default(), &small), Some(1), "{i}");
    }
    assert_eq!(dev.put_rx(NetHeader::default(), &small), None, "ring full");
    assert_eq!(fe.recv(|f| assert_eq!(f, &small[..])), 256);
    let s = fe.stats();
    assert_eq!((s.rx_frames, s.bad_used, s.rx_malformed), (258, 0, 0));
}

#[test]
fn big_frames_fit_one_buffer_without_mergeable_buffers() {
    let dev = Device::start(OFFER_ALL);
    let mut fe = VhostFrontend::builder(dev.path())
        .mrg_rxbuf(false)
        .big_frames(true)
        .queue_size(64)
        .connect()
        .unwrap();
    assert_eq!(fe.max_tx_frame(), 65536);
    let f = frame(65000, 5);
    assert_eq!(dev.put_rx(NetHeader::default(), &f), Some(1));
    let mut n = 0;
    fe.recv(|g| {
        assert_eq!(g, &f[..]);
        n += 1;
    });
    assert_eq!(n, 1);
    assert_eq!(fe.send(&[&f[..]]), 1);
    assert_eq!(dev.take_tx()[0].1, f);
}

#[test]
fn wait_rx_sleeps_until_the_device_calls() {
    let dev = Arc::new(Device::start(OFFER_ALL));
    let mut fe = VhostFrontend::connect(dev.path()).unwrap();
    assert!(!fe.wait_rx(Duration::from_millis(30)).unwrap());
    let d = dev.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        d.put_rx(NetHeader::default(), &frame(100, 1))
    });
    let t = Instant::now();
    assert!(fe.wait_rx(Duration::from_secs(5)).unwrap());
    assert!(t.elapsed() < Duration::from_secs(4), "woken by the call");
    assert_eq!(writer.join().unwrap(), Some(1));
    assert_eq!(fe.recv(|_| {}), 1);
}

#[test]
fn bogus_used_entries_are_counted_not_trusted() {
    let dev = Device::start(OFFER_ALL);
    let mut fe = VhostFrontend::connect(dev.path()).unwrap();
    dev.with(|d| {
        let mem = d.mem.clone().unwrap();
        let q = &mut d.queues[RX_QUEUE];
        let c = q.pop_descriptor_chain(&mem).unwrap();
        // An id that does not exist, then a length beyond the buffer.
        raw_used(q, &mem, 300, 64);
        q.add_used(&mem, c.head_index(), 1 << 20).unwrap();
        // A header with num_buffers 0 under MRG_RXBUF.
        let c = q.pop_descriptor_chain(&mem).unwrap();
        let head = c.head_index();
        let addr = first_buffer_addr(q, &mem, head);
        mem.write_slice(&[0u8; NET_HDR_LEN], addr).unwrap();
        q.add_used(&mem, head, 100).unwrap();
        // And one shorter than the header.
        let c = q.pop_descriptor_chain(&mem).unwrap();
        q.add_used(&mem, c.head_index(), 4).unwrap();
    });
    assert_eq!(fe.recv(|_| panic!("nothing valid arrived")), 0);
    let s = fe.stats();
    assert_eq!((s.bad_used, s.rx_malformed), (2, 2));
    // The frontend still works.
    assert_eq!(dev.put_rx(NetHeader::default(), &frame(70, 1)), Some(1));
    assert_eq!(fe.recv(|f| assert_eq!(f.len(), 70)), 1);
    // A TX used entry for a descriptor never posted.
    dev.with(|d| {
        let mem = d.mem.clone().unwrap();
        raw_used(&mut d.queues[TX_QUEUE], &mem, 5, 0);
    });
    assert_eq!(fe.send(&[&frame(64, 0)[..]]), 1);
    assert_eq!(fe.stats().bad_used, 3);
}

#[test]
fn blast_mode_reposts_the_template_with_patched_bytes() {
    let dev = Device::start(OFFER_ALL);
    let mut fe = VhostFrontend::builder(dev.path())
        .queue_size(16)
        .connect()
        .unwrap();
    assert_eq!(fe.blast(4, |_| {}), 0, "nothing prepared");
    let t = frame(64, 8);
    fe.blast_prepare(&t).unwrap();
    let mut seq = 0u8;
    let mut posted = 0;
    let mut seen = Vec::new();
    while seen.len() < 40 {
        posted += fe.blast(64, |f| {
            f[20] = seq;
            seq = seq.wrapping_add(1);
        });
        seen.extend(dev.take_tx());
    }
    assert_eq!(posted, seen.len());
    for (i, (h, f)) in seen.iter().enumerate() {
        assert_eq!(*h, NetHeader::default());
        assert_eq!(f[20], i as u8, "frame {i}");
        assert_eq!(f[..20], t[..20]);
        assert_eq!(f[21..], t[21..]);
    }
    // send overwrites buffers; blast puts the template back in them.
    let other = frame(64, 0xff);
    fe.send(&[&other[..]; 16]);
    assert_eq!(dev.take_tx().len(), 16);
    fe.blast(16, |_| {});
    for (_, f) in dev.take_tx() {
        assert_eq!(f, t);
    }
    let e = fe.blast_prepare(&frame(4000, 0)).err().unwrap();
    assert!(e.to_string().contains("does not fit"), "{e}");
}

#[test]
fn closing_either_side_is_seen_by_the_other() {
    // The frontend goes: the backend's session ends.
    let mut dev = Device::start(OFFER_ALL);
    let fe = VhostFrontend::connect(dev.path()).unwrap();
    assert!(fe.is_connected());
    drop(fe);
    let e = dev.wait_closed();
    assert!(
        matches!(
            e,
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage
        ),
        "{e:?}"
    );
    // The backend goes: the frontend notices, and calls fail cleanly.
    let mut dev = Device::start(OFFER_ALL);
    let mut fe = VhostFrontend::connect(dev.path()).unwrap();
    use vhost::VhostBackend;
    dev.with(|d| d.hang_up = true);
    assert_eq!(fe.session().get_features().unwrap(), OFFER_ALL);
    assert!(dev.server.take().unwrap().join().unwrap().is_ok());
    let deadline = Instant::now() + Duration::from_secs(5);
    while fe.is_connected() {
        assert!(Instant::now() < deadline, "the close was not seen");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(fe.session().get_features().is_err());
    // The rings are ours: posting still works, nothing panics.
    assert_eq!(fe.send(&[&frame(64, 0)[..]]), 1);
    assert_eq!(fe.recv(|_| {}), 0);
}
