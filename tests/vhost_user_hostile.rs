//! Hostile vhost-user frontends against ulan's vhost-user port, in
//! process: a frontend is another process ulan cannot trust. Each test
//! runs a lab with a victim vhost-user port `v`, two well-behaved
//! bystanders (`a`, `b`) exchanging unicast frames on a thread of their
//! own all along, and a helper `c` (sends to the victim, floods it). Each
//! attack must be caught: the victim's connection is closed and counted
//! in `protocol_errors` (or, for a frontend that does not read, frames
//! are dropped and counted), while the bystanders lose not one frame, the
//! lab answers, and a fresh well-behaved frontend works on the victim
//! port afterwards.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

use ulan::lab::{Lab, LabConfig};
use ulan::ports::vhost_user::fuzz::send_with_fds;
use ulan::ports::PortKind;
use ulan::switch::stats::PortCounters;
use ulan::testkit::vhost_frontend::ring::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use ulan::testkit::vhost_frontend::{RawDesc, VhostFrontend, RX_QUEUE, TX_QUEUE};

const WAIT: Duration = Duration::from_secs(5);
/// Guest memory per frontend: rings and 2 KiB buffers fit in 4 MiB.
const MEM: usize = 4 << 20;
const QUEUE: u16 = 256;
const ETHERTYPE: u16 = 0x88b5;
const A: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
const B: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
const C: [u8; 6] = [2, 0, 0, 0, 0, 0x0c];
const V: [u8; 6] = [2, 0, 0, 0, 0, 0x0e];

/// vhost-user request codes used raw.
const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_ENABLE: u32 = 18;

fn frame(dst: [u8; 6], src: [u8; 6], tag: u32, seq: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&tag.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(60, 0x5a);
    f
}

/// (src, tag, seq) of one of our frames.
fn parse(f: &[u8]) -> Option<([u8; 6], u32, u32)> {
    if f.len() < 22 || f[12..14] != ETHERTYPE.to_be_bytes() {
        return None;
    }
    let src: [u8; 6] = f[6..12].try_into().ok()?;
    let tag = u32::from_be_bytes(f[14..18].try_into().ok()?);
    let seq = u32::from_be_bytes(f[18..22].try_into().ok()?);
    Some((src, tag, seq))
}

fn connect(path: &PathBuf) -> VhostFrontend {
    VhostFrontend::builder(path)
        .memory_size(MEM)
        .queue_size(QUEUE)
        .connect()
        .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()))
}

/// A well-behaved frontend, retried while the port is still letting go
/// of the one before (it closes a second frontend at once).
fn connect_fresh(path: &PathBuf) -> VhostFrontend {
    let deadline = Instant::now() + WAIT;
    loop {
        match VhostFrontend::builder(path)
            .memory_size(MEM)
            .queue_size(QUEUE)
            .timeout(Duration::from_secs(2))
            .connect()
        {
            Ok(f) => return f,
            Err(e) if Instant::now() < deadline => {
                eprintln!("fresh frontend not yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("a fresh frontend cannot connect to the victim: {e}"),
        }
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two frontends sending each other bursts of numbered frames until told
/// to stop; every frame must arrive, in order.
struct Bystanders {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    /// Frames received each way (a -> b, b -> a).
    each: Arc<[AtomicU64; 2]>,
    thread: Option<JoinHandle<Result<(u64, u64), String>>>,
}

impl Bystanders {
    fn start(mut a: VhostFrontend, mut b: VhostFrontend) -> Bystanders {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let each = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (s, r, e) = (stop.clone(), received.clone(), each.clone());
        let thread = std::thread::spawn(move || {
            let mut sent = [0u32; 2];
            let mut got = [0u32; 2];
            let mut run = |draining: bool| -> Result<bool, String> {
                if !draining {
                    for (i, (fe, src, dst)) in
                        [(&mut a, A, B), (&mut b, B, A)].into_iter().enumerate()
                    {
                        let burst: Vec<Vec<u8>> = (0..8)
                            .map(|k| frame(dst, src, 0xb0 + i as u32, sent[i] + k))
                            .collect();
                        let refs: Vec<&[u8]> = burst.iter().map(|f| f.as_slice()).collect();
                        let n = fe.send(&refs);
                        sent[i] += n as u32;
                    }
                }
                let mut bad = None;
                for (i, (fe, from)) in [(&mut b, A), (&mut a, B)].into_iter().enumerate() {
                    let _ = fe.wait_rx(Duration::from_millis(20));
                    fe.recv(|f| {
                        if let Some((src, tag, seq)) = parse(f) {
                            if src == from && tag == 0xb0 + i as u32 {
                                if seq != got[i] {
                                    bad = Some(format!(
                                        "bystander {i}: frame {seq} where {} was due",
                                        got[i]
                                    ));
                                }
                                got[i] = seq + 1;
                                r.fetch_add(1, Ordering::SeqCst);
                                e[i].fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
                if let Some(b) = bad {
                    return Err(b);
                }
                Ok(got == sent)
            };
            while !s.load(Ordering::SeqCst) {
                run(false)?;
                std::thread::sleep(Duration::from_millis(2));
            }
            // Whatever is in flight arrives within a moment.
            let deadline = Instant::now() + WAIT;
            while !run(true)? {
                if Instant::now() > deadline {
                    return Err(format!("bystanders sent {sent:?} but got {got:?}"));
                }
            }
            Ok((u64::from(sent[0]), u64::from(sent[1])))
        });
        Bystanders {
            stop,
            received,
            each,
            thread: Some(thread),
        }
    }

    /// Waits until at least `n` more bystander frames arrived.
    fn still_flow(&self, n: u64, after: &str) {
        let start = self.received.load(Ordering::SeqCst);
        wait_for(
            &format!("bystander frames to keep flowing after {after}"),
            || self.received.load(Ordering::SeqCst) >= start + n,
        );
    }

    /// Stops them once each has moved over 100 frames (a short test on a
    /// loaded machine may end sooner: the count is about flow, not speed);
    /// every frame each sent has arrived.
    fn finish(mut self) -> (u64, u64) {
        wait_for("the bystanders to move over 100 frames each way", || {
            self.each.iter().all(|n| n.load(Ordering::SeqCst) > 100)
        });
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(sent))) => sent,
            Some(Ok(Err(e))) => panic!("bystanders lost frames: {e}"),
            _ => panic!("the bystander thread panicked"),
        }
    }
}

struct Lab3 {
    _dir: tempfile::TempDir,
    lab: Arc<Lab>,
    victim: PathBuf,
    c: VhostFrontend,
    bystanders: Option<Bystanders>,
}

impl Lab3 {
    fn start(name: &str) -> Lab3 {
        let dir = tempfile::Builder::new()
            .prefix("ulan-vh")
            .tempdir()
            .unwrap();
        let lab = Lab::start(LabConfig::new(name, &dir.path().join("run"))).unwrap();
        lab.add_lan("l").unwrap();
        let path = |n: &str| {
            PathBuf::from(
                lab.add_port(n, PortKind::VhostUser, Some("l"))
                    .unwrap()
                    .path,
            )
        };
        let victim = path("v");
        let (pa, pb, pc) = (path("a"), path("b"), path("c"));
        let a = connect(&pa);
        let b = connect(&pb);
        let c = connect(&pc);
        wait_for("a, b and c to be up", || {
            ["a", "b", "c"].iter().all(|p| lab.port(p).unwrap().up)
        });
        let bystanders = Bystanders::start(a, b);
        bystanders.still_flow(32, "start");
        Lab3 {
            _dir: dir,
            lab,
            victim,
            c,
            bystanders: Some(bystanders),
        }
    }

    fn victim_counters(&self) -> PortCounters {
        self.lab.port_stats("v").unwrap().counters
    }

    fn bystanders(&self) -> &Bystanders {
        self.bystanders.as_ref().unwrap()
    }

    /// Sends one tagged frame `from` -> `to` and waits for it.
    fn pass(
        from: &mut VhostFrontend,
        to: &mut VhostFrontend,
        src: [u8; 6],
        dst: [u8; 6],
        tag: u32,
    ) -> bool {
        let f = frame(dst, src, tag, 0);
        let deadline = Instant::now() + WAIT;
        let mut sent_at = None::<Instant>;
        while Instant::now() < deadline {
            // Re-send now and then: the first may flood while the switch
            // learns, or reach a port still being set up.
            if sent_at.map_or(true, |t| t.elapsed() > Duration::from_millis(500)) {
                from.send(&[&f]);
                sent_at = Some(Instant::now());
            }
            let _ = to.wait_rx(Duration::from_millis(50));
            let mut seen = false;
            to.recv(|g| {
                if parse(g) == Some((src, tag, 0)) {
                    seen = true;
                }
            });
            if seen {
                return true;
            }
        }
        false
    }

    /// What must hold after every attack.
    fn after_attack(&mut self, what: &str, before: &PortCounters) {
        let now = self.victim_counters();
        assert!(
            now.protocol_errors > before.protocol_errors,
            "{what}: protocol_errors did not rise: {now:?}"
        );
        self.survives(what);
    }

    /// The lab answers, the bystanders go on, a fresh frontend works on
    /// the victim port both ways.
    fn survives(&mut self, what: &str) {
        assert!(self.lab.ports().len() == 4, "{what}: the lab lost ports");
        for p in ["a", "b", "c"] {
            let s = self.lab.port_stats(p).unwrap();
            assert!(s.up, "{what}: bystander port {p} went down");
            assert_eq!(s.counters.protocol_errors, 0, "{what}: port {p}: {s:?}");
        }
        self.bystanders().still_flow(32, what);
        let mut fresh = connect_fresh(&self.victim);
        wait_for(&format!("the victim port up again after {what}"), || {
            self.lab.port("v").unwrap().up
        });
        assert!(
            Self::pass(&mut fresh, &mut self.c, V, C, 0xf1),
            "{what}: a fresh frontend's frame did not reach c"
        );
        assert!(
            Self::pass(&mut self.c, &mut fresh, C, V, 0xf2),
            "{what}: c's frame did not reach the fresh frontend"
        );
        drop(fresh);
        wait_for("the fresh frontend to be gone", || {
            !self.lab.port("v").unwrap().up
        });
    }

    fn finish(mut self) {
        let sent = self.bystanders.take().unwrap().finish();
        assert!(
            sent.0 > 100 && sent.1 > 100,
            "bystanders sent only {sent:?}"
        );
        let a = self.lab.port_stats("a").unwrap().counters;
        assert_eq!(a.protocol_errors, 0, "{a:?}");
        self.lab.shutdown();
    }
}

fn wait_eof(fe: &VhostFrontend, what: &str) {
    wait_for(&format!("the victim to be cut off after {what}"), || {
        !fe.is_connected()
    });
}

/// A victim that connected properly and then breaks its ring.
fn ring_attack(name: &str, attack: impl Fn(&mut VhostFrontend)) {
    let mut lab = Lab3::start(name);
    let mut v = connect(&lab.victim);
    wait_for("the victim up", || lab.lab.port("v").unwrap().up);
    // It works first: the attack is what breaks it.
    assert!(Lab3::pass(&mut v, &mut lab.c, V, C, 0xa1));
    let before = lab.victim_counters();
    attack(&mut v);
    wait_eof(&v, name);
    wait_for("the victim port down", || !lab.lab.port("v").unwrap().up);
    drop(v);
    lab.after_attack(name, &before);
    lab.finish();
}

fn desc(id: u16, addr: u64, len: u32, flags: u16, next: u16) -> RawDesc {
    RawDesc {
        id,
        addr,
        len,
        flags,
        next,
    }
}

/// Somewhere in the victim's memory that is not a ring (its TX buffers).
const BUF: u64 = 3 << 20;

#[test]
fn tx_descriptor_outside_guest_memory() {
    ring_attack("txout", |v| {
        let past = v.memory_len() as u64 + 0x10_0000;
        v.post_raw(TX_QUEUE, &[desc(0, past, 60, 0, 0)], &[0], 0);
    });
}

#[test]
fn tx_descriptor_straddling_the_end_of_guest_memory() {
    ring_attack("txedge", |v| {
        let edge = v.memory_len() as u64 - 30;
        v.post_raw(TX_QUEUE, &[desc(0, edge, 60, 0, 0)], &[0], 0);
    });
}

#[test]
fn tx_descriptor_loop() {
    ring_attack("txloop", |v| {
        v.post_raw(
            TX_QUEUE,
            &[
                desc(0, BUF, 12, VIRTQ_DESC_F_NEXT, 1),
                desc(1, BUF + 64, 60, VIRTQ_DESC_F_NEXT, 0),
            ],
            &[0],
            0,
        );
    });
}

#[test]
fn tx_descriptor_pointing_at_itself() {
    ring_attack("txself", |v| {
        v.post_raw(TX_QUEUE, &[desc(5, BUF, 1, VIRTQ_DESC_F_NEXT, 5)], &[5], 0);
    });
}

#[test]
fn tx_chain_with_next_past_the_ring() {
    ring_attack("txnext", |v| {
        v.post_raw(
            TX_QUEUE,
            &[desc(0, BUF, 12, VIRTQ_DESC_F_NEXT, QUEUE)],
            &[0],
            0,
        );
    });
}

#[test]
fn tx_length_that_wraps_the_address_space() {
    ring_attack("txwrap", |v| {
        v.post_raw(
            TX_QUEUE,
            &[desc(0, u64::MAX - 8, 0xffff_ffff, 0, 0)],
            &[0],
            0,
        );
    });
}

#[test]
fn tx_length_of_4_gib() {
    ring_attack("txlen", |v| {
        v.post_raw(TX_QUEUE, &[desc(0, BUF, 0xffff_ffff, 0, 0)], &[0], 0);
    });
}

#[test]
fn tx_descriptor_that_is_device_writable() {
    ring_attack("txwrite", |v| {
        v.post_raw(
            TX_QUEUE,
            &[desc(0, BUF, 60, VIRTQ_DESC_F_WRITE, 0)],
            &[0],
            0,
        );
    });
}

#[test]
fn avail_index_moved_past_the_ring_size() {
    ring_attack("availidx", |v| {
        v.post_raw(TX_QUEUE, &[desc(0, BUF, 72, 0, 0)], &[], QUEUE + 1);
    });
}

#[test]
fn avail_ring_head_out_of_range() {
    ring_attack("availhead", |v| {
        v.post_raw(TX_QUEUE, &[], &[QUEUE + 44], 0);
    });
}

/// RX attacks need a frame for the victim: c broadcasts until the victim
/// is cut off.
fn rx_attack(name: &str, attack: impl Fn(&mut VhostFrontend)) {
    let mut lab = Lab3::start(name);
    let mut v = connect(&lab.victim);
    wait_for("the victim up", || lab.lab.port("v").unwrap().up);
    assert!(Lab3::pass(&mut lab.c, &mut v, C, V, 0xa2));
    let before = lab.victim_counters();
    attack(&mut v);
    let deadline = Instant::now() + WAIT;
    let mut seq = 0;
    while v.is_connected() {
        assert!(
            Instant::now() < deadline,
            "{name}: the victim was not cut off"
        );
        lab.c.send(&[&frame([0xff; 6], C, 0xbc, seq)]);
        seq += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_for("the victim port down", || !lab.lab.port("v").unwrap().up);
    drop(v);
    lab.after_attack(name, &before);
    lab.finish();
}

#[test]
fn rx_descriptors_that_are_device_readable() {
    // Every RX buffer is posted: make them all read-only for the device.
    rx_attack("rxread", |v| {
        let all: Vec<RawDesc> = (0..QUEUE)
            .map(|i| desc(i, BUF + 2048 * u64::from(i), 2048, 0, 0))
            .collect();
        v.post_raw(RX_QUEUE, &all, &[], 0);
    });
}

#[test]
fn rx_descriptors_outside_guest_memory() {
    rx_attack("rxout", |v| {
        let past = v.memory_len() as u64;
        let all: Vec<RawDesc> = (0..QUEUE)
            .map(|i| desc(i, past + 4096 * u64::from(i), 2048, VIRTQ_DESC_F_WRITE, 0))
            .collect();
        v.post_raw(RX_QUEUE, &all, &[], 0);
    });
}

#[test]
fn rx_descriptor_loop() {
    rx_attack("rxloop", |v| {
        // Every buffer continues into descriptor 200, an empty buffer
        // that continues into itself: the chain never ends.
        let all: Vec<RawDesc> = (0..QUEUE)
            .map(|i| {
                let len = if i == 200 { 0 } else { 12 };
                desc(i, BUF, len, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 200)
            })
            .collect();
        v.post_raw(RX_QUEUE, &all, &[], 0);
    });
}

/// A frontend that never reads its RX ring while c floods it: frames
/// beyond its buffers and the port's backlog are dropped and counted; c
/// (the sender) loses nothing, the bystanders neither, and the victim's
/// session goes on (a full ring is no protocol error).
#[test]
fn frontend_that_never_reads_its_rx_ring() {
    let mut lab = Lab3::start("norx");
    let mut v = connect(&lab.victim);
    wait_for("the victim up", || lab.lab.port("v").unwrap().up);
    // The switch learns the victim's address: the flood is unicast to it.
    assert!(Lab3::pass(&mut v, &mut lab.c, V, C, 0xa3));
    let c_before = lab.lab.port_stats("c").unwrap().counters;
    let v_before = lab.victim_counters();
    let mut sent = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent < 3000 {
        assert!(Instant::now() < deadline, "c could not send its flood");
        let burst: Vec<Vec<u8>> = (0..64).map(|k| frame(V, C, 0xf0, sent + k)).collect();
        let refs: Vec<&[u8]> = burst.iter().map(|f| f.as_slice()).collect();
        sent += lab.c.send(&refs) as u32;
        let _ = lab.c.wait_tx(Duration::from_millis(50));
    }
    assert!(lab.c.flush_tx(WAIT).unwrap(), "c's TX ring was not drained");
    // Counters are published per batch: wait until the last is in.
    let sent64 = u64::from(sent);
    wait_for("the flood to be accounted for", || {
        let vc = lab.victim_counters();
        let done =
            vc.tx_frames - v_before.tx_frames + vc.tx_drop_queue_full - v_before.tx_drop_queue_full;
        done + 256 >= sent64
    });
    let vc = lab.victim_counters();
    let cc = lab.lab.port_stats("c").unwrap().counters;
    let delivered = vc.tx_frames - v_before.tx_frames;
    let full = vc.tx_drop_queue_full - v_before.tx_drop_queue_full;
    assert!(full > 0, "no queue-full drops: {vc:?}");
    assert!(
        delivered <= u64::from(QUEUE),
        "more frames than buffers: {vc:?}"
    );
    // The rest waits in the port's backlog (256 frames).
    assert!(
        delivered + full <= sent64 && delivered + full + 256 >= sent64,
        "frames unaccounted for: sent {sent}, {vc:?}"
    );
    assert_eq!(
        cc.rx_frames - c_before.rx_frames,
        u64::from(sent),
        "the sender lost frames: {cc:?}"
    );
    assert_eq!(cc.rx_dropped, c_before.rx_dropped, "{cc:?}");
    assert_eq!(vc.protocol_errors, 0, "{vc:?}");
    assert!(v.is_connected() && lab.lab.port("v").unwrap().up);
    lab.bystanders().still_flow(32, "the flood");
    // The victim reads at last: its ring holds frames, the session works.
    let mut got = 0;
    v.recv(|f| {
        if parse(f).is_some_and(|(src, tag, _)| src == C && tag == 0xf0) {
            got += 1;
        }
    });
    assert!(got > 0 && got <= u64::from(QUEUE), "victim read {got}");
    assert!(Lab3::pass(&mut lab.c, &mut v, C, V, 0xa4));
    drop(v);
    wait_for("the victim gone", || !lab.lab.port("v").unwrap().up);
    lab.survives("norx");
    lab.finish();
}

// ---- protocol attacks: a raw socket ----

fn hdr(req: u32, size: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&req.to_ne_bytes());
    v.extend_from_slice(&1u32.to_ne_bytes());
    v.extend_from_slice(&size.to_ne_bytes());
    v
}

fn msg(req: u32, body: &[u8]) -> Vec<u8> {
    let mut v = hdr(req, body.len() as u32);
    v.extend_from_slice(body);
    v
}

fn raw(path: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// The backend closed the socket: a read ends (0 bytes or reset), it
/// does not time out. Replies already sent are skipped.
fn closed_by_backend(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Sends the attack on a raw connection; `close` says whether the
/// attacker hangs up itself (then only the counter can tell it was
/// caught) or waits for the backend to close.
fn protocol_attack(name: &str, close: bool, attack: impl Fn(&UnixStream)) {
    let mut lab = Lab3::start(name);
    let before = lab.victim_counters();
    let mut s = raw(&lab.victim);
    attack(&s);
    if close {
        drop(s);
        wait_for("the counter to rise", || {
            lab.victim_counters().protocol_errors > before.protocol_errors
        });
    } else {
        assert!(
            closed_by_backend(&mut s),
            "{name}: the backend did not close the session"
        );
    }
    lab.after_attack(name, &before);
    lab.finish();
}

fn write(s: &UnixStream, bytes: &[u8]) {
    send_with_fds(s, bytes, &[]).unwrap();
}

#[test]
fn partial_header_then_close() {
    protocol_attack("parthdr", true, |s| write(s, &hdr(GET_FEATURES, 0)[..7]));
}

#[test]
fn header_then_close() {
    protocol_attack("hdrclose", true, |s| write(s, &hdr(SET_VRING_NUM, 8)));
}

#[test]
fn wrong_body_size_for_set_vring_num() {
    protocol_attack("numsize", false, |s| {
        write(s, &msg(SET_VRING_NUM, &[0, 0, 0, 0]));
    });
}

#[test]
fn set_vring_enable_with_a_short_body() {
    protocol_attack("enablesize", false, |s| {
        write(s, &msg(SET_VRING_ENABLE, &[0, 0, 0, 0]));
    });
}

#[test]
fn message_larger_than_the_protocol_allows() {
    protocol_attack("toobig", false, |s| {
        write(s, &hdr(SET_VRING_ADDR, 0x10_0000))
    });
}

#[test]
fn set_vring_kick_without_fd_and_without_nofd_bit() {
    protocol_attack("kicknofd", false, |s| {
        write(s, &msg(SET_OWNER, &[]));
        write(s, &msg(SET_VRING_KICK, &1u64.to_ne_bytes()));
    });
}

/// A header promising a body that never comes: the port's control thread
/// waits for it, the data plane and every other port go on; when the
/// attacker gives up the port is free again. Both for a message the
/// `vhost` crate reads and for SET_VRING_ENABLE (which ulan reads itself).
#[test]
fn header_promising_more_body_then_stall() {
    let mut lab = Lab3::start("stall");
    // The crate reads a body with one recvmsg: any part of it would end
    // the wait at once, so nothing after the header. ulan reads
    // SET_VRING_ENABLE whole: half its body makes it wait.
    for (req, size, part) in [(SET_VRING_ADDR, 40, 0), (SET_VRING_ENABLE, 8, 4)] {
        let before = lab.victim_counters();
        let s = raw(&lab.victim);
        let mut body = hdr(req, size);
        body.extend_from_slice(&vec![0u8; part]);
        write(&s, &body);
        // While it stalls: the lab answers, the bystanders' frames flow.
        let t = Instant::now();
        lab.bystanders().still_flow(64, "a stalled control thread");
        assert!(t.elapsed() < WAIT);
        assert!(lab.lab.port_stats("v").is_ok());
        assert!(!lab.lab.port("v").unwrap().up);
        std::thread::sleep(Duration::from_millis(300));
        // Still waiting: nothing was judged yet.
        assert_eq!(
            lab.victim_counters().protocol_errors,
            before.protocol_errors,
            "the port did not wait for the rest of the message"
        );
        drop(s);
        wait_for("the counter to rise", || {
            lab.victim_counters().protocol_errors > before.protocol_errors
        });
        lab.after_attack("stall", &before);
    }
    lab.finish();
}

// ---- memory tables that lie ----

fn memfd(len: u64, sealed: bool) -> OwnedFd {
    // SAFETY: a valid C string; the fd is ours when non-negative.
    let raw = unsafe {
        libc::memfd_create(
            c"hostile".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(raw >= 0);
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscalls on our fd.
    unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
        if sealed {
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
        }
    }
    fd
}

/// The vhost crate's own frontend up to SET_MEM_TABLE with `region`.
fn mem_table_attack(name: &str, file_len: u64, sealed: bool, region_len: u64) {
    let mut lab = Lab3::start(name);
    let before = lab.victim_counters();
    let s = raw(&lab.victim);
    let mut watch = s.try_clone().unwrap();
    let mut fe = Frontend::from_stream(s, 2);
    fe.get_features().unwrap();
    fe.set_owner().unwrap();
    let fd = memfd(file_len, sealed);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: region_len,
        userspace_addr: 0x7000_0000,
        mmap_offset: 0,
        mmap_handle: fd.as_raw_fd(),
    };
    // Without REPLY_ACK no answer comes: the backend's verdict is the
    // closed socket and the counter.
    let _ = fe.set_mem_table(&[region]);
    assert!(
        closed_by_backend(&mut watch),
        "{name}: the backend did not close the session"
    );
    let _ = fe.get_protocol_features();
    lab.after_attack(name, &before);
    lab.finish();
}

#[test]
fn memory_region_larger_than_its_memfd() {
    mem_table_attack("memsize", 1 << 20, true, 2 << 20);
}

#[test]
fn memory_region_in_an_unsealed_memfd() {
    mem_table_attack("unsealed", 1 << 20, false, 1 << 20);
}

/// SET_MEM_TABLE with two regions and one fd, and one region with two.
#[test]
fn memory_table_with_the_wrong_number_of_fds() {
    let mut lab = Lab3::start("fdcount");
    for (regions, fds) in [(2u32, 1usize), (1, 2), (1, 0)] {
        let before = lab.victim_counters();
        let mut s = raw(&lab.victim);
        write(&s, &msg(SET_OWNER, &[]));
        let mut body = Vec::new();
        body.extend_from_slice(&regions.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for i in 0..u64::from(regions) {
            for v in [i << 20, 1 << 20, 0x7000_0000 + (i << 20), 0] {
                body.extend_from_slice(&v.to_ne_bytes());
            }
        }
        let files: Vec<OwnedFd> = (0..fds).map(|_| memfd(1 << 20, true)).collect();
        let raw_fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        send_with_fds(&s, &msg(SET_MEM_TABLE, &body), &raw_fds).unwrap();
        assert!(
            closed_by_backend(&mut s),
            "{regions} regions, {fds} fds: the backend did not close the session"
        );
        lab.after_attack(&format!("{regions} regions with {fds} fds"), &before);
    }
    lab.finish();
}

/// SET_VRING_ENABLE for a ring that does not exist is refused (logged,
/// the stream is still in step, so the session goes on), and the
/// wrong-size message after it ends the session, counted.
#[test]
fn set_vring_enable_for_a_ring_that_does_not_exist() {
    protocol_attack("enableidx", false, |s| {
        let mut body = Vec::new();
        body.extend_from_slice(&7u32.to_ne_bytes());
        body.extend_from_slice(&1u32.to_ne_bytes());
        // With protocol features in use the refusal goes back as an ack
        // (not asked for here); the session survives that, so follow with
        // a wrong-size message that must end it.
        write(s, &msg(SET_VRING_ENABLE, &body));
        write(s, &msg(SET_VRING_NUM, &[1]));
    });
}

/// A frontend stalled mid-message does not hold up removing its port: the
/// port goes at once, the stalled frontend sees its socket closed, and a
/// port of the same name works again.
#[test]
fn a_stalled_frontend_does_not_hold_up_removing_its_port() {
    let mut lab = Lab3::start("stallrm");
    let mut s = raw(&lab.victim);
    write(&s, &hdr(SET_VRING_ADDR, 40));
    std::thread::sleep(Duration::from_millis(200));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = Instant::now();
    rt.block_on(async {
        tokio::time::timeout(WAIT, lab.lab.remove_port("v"))
            .await
            .expect("removing the port hung")
            .unwrap()
    });
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "removal took {:?}",
        t.elapsed()
    );
    assert!(!lab.victim.exists(), "the socket file stayed");
    assert!(
        closed_by_backend(&mut s),
        "the stalled frontend was not let go"
    );
    lab.bystanders().still_flow(32, "removing a stalled port");
    let info = lab
        .lab
        .add_port("v", PortKind::VhostUser, Some("l"))
        .unwrap();
    lab.victim = PathBuf::from(info.path);
    lab.survives("stallrm");
    lab.finish();
}

/// An honest but enormous table: 4 regions of 15 TiB of one sealed sparse
/// memfd. Mapped, it takes half of ulan's 128 TiB of address space: two
/// such frontends (or one table sized to what is left) and every later
/// mapping in the daemon (another guest's memory, a thread's stack, a
/// large allocation) fails, and ulan aborts. It is refused.
#[test]
fn memory_table_too_large_for_the_address_space() {
    let mut lab = Lab3::start("huge");
    let before = lab.victim_counters();
    let s = raw(&lab.victim);
    let mut watch = s.try_clone().unwrap();
    let fe = Frontend::from_stream(s, 2);
    fe.get_features().unwrap();
    fe.set_owner().unwrap();
    let region_len = 15u64 << 40;
    let fd = memfd(region_len, true);
    let regions: Vec<VhostUserMemoryRegionInfo> = (0..4u64)
        .map(|i| VhostUserMemoryRegionInfo {
            guest_phys_addr: i * (16 << 40),
            memory_size: region_len,
            userspace_addr: (1 << 47) + i * (16 << 40),
            mmap_offset: 0,
            mmap_handle: fd.as_raw_fd(),
        })
        .collect();
    let _ = fe.set_mem_table(&regions);
    assert!(
        closed_by_backend(&mut watch),
        "a 60 TiB memory table was accepted"
    );
    lab.after_attack("huge", &before);
    lab.finish();
}

const SET_VRING_CALL: u32 = 13;

/// Raw messages that make ring 1 ready to start but for its kick: 1 MiB
/// of sealed memory at frontend address 0x7000_0000, a ring of 8 at its
/// start. Returns the memfd (kept open by the caller).
fn ring_one_ready(s: &UnixStream) -> OwnedFd {
    let ua = 0x7000_0000u64;
    let u64s = |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_ne_bytes()).collect() };
    write(s, &msg(SET_OWNER, &[]));
    write(s, &msg(2, &u64s(&[1 << 32]))); // SET_FEATURES: VERSION_1
    let mem = memfd(1 << 20, true);
    let mut table = vec![1, 0, 0, 0, 0, 0, 0, 0];
    table.extend(u64s(&[0, 1 << 20, ua, 0]));
    send_with_fds(s, &msg(SET_MEM_TABLE, &table), &[mem.as_raw_fd()]).unwrap();
    let state = |n: u32| [1u32.to_ne_bytes(), n.to_ne_bytes()].concat();
    write(s, &msg(SET_VRING_NUM, &state(8)));
    let mut addr = state(0);
    addr.extend(u64s(&[ua, ua + 0x2000, ua + 0x1000, 0]));
    write(s, &msg(SET_VRING_ADDR, &addr));
    mem
}

/// Kick and call fds are used on the data plane: one that is not an
/// eventfd (a pipe, a file that may block or grow) is refused.
#[test]
fn kick_and_call_fds_that_are_not_eventfds() {
    protocol_attack("kickpipe", false, |s| {
        let mut p = [0i32; 2];
        // SAFETY: pipe writes two new fds into p.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: both fds are new and ours.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // Everything else in order, so only the fd is wrong.
        let _mem = ring_one_ready(s);
        send_with_fds(
            s,
            &msg(SET_VRING_KICK, &1u64.to_ne_bytes()),
            &[r.as_raw_fd()],
        )
        .unwrap();
    });
    protocol_attack("callfile", false, |s| {
        let f = memfd(4096, false);
        write(s, &msg(SET_OWNER, &[]));
        send_with_fds(
            s,
            &msg(SET_VRING_CALL, &0u64.to_ne_bytes()),
            &[f.as_raw_fd()],
        )
        .unwrap();
    });
}

/// A frontend that floods valid messages, each a change the data plane
/// applies (SET_VRING_ENABLE, SET_MEM_TABLE): the data plane shares its
/// time with the bystanders, which keep flowing throughout; the session
/// itself is legal and stays up.
#[test]
fn a_flood_of_valid_messages_does_not_starve_the_data_plane() {
    let lab = Lab3::start("msgflood");
    let s = raw(&lab.victim);
    let mem = ring_one_ready(&s);
    let enable = [1u32.to_ne_bytes(), 1u32.to_ne_bytes()].concat();
    let mut table = vec![1, 0, 0, 0, 0, 0, 0, 0];
    for v in [0u64, 1 << 20, 0x7000_0000, 0] {
        table.extend_from_slice(&v.to_ne_bytes());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let s = s.try_clone().unwrap();
        let stop = stop.clone();
        let mem_fd = mem.as_raw_fd();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let r = if sent % 16 == 0 {
                    send_with_fds(&s, &msg(SET_MEM_TABLE, &table), &[mem_fd])
                } else {
                    send_with_fds(&s, &msg(SET_VRING_ENABLE, &enable), &[])
                };
                if r.is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        lab.bystanders().still_flow(32, "a message flood");
    }
    stop.store(true, Ordering::SeqCst);
    let sent = flood.join().unwrap();
    assert!(sent > 1000, "the flood sent only {sent} messages");
    let c = lab.victim_counters();
    assert_eq!(c.protocol_errors, 0, "a legal flood was cut off: {c:?}");
    drop(s);
    drop(mem);
    let mut lab = lab;
    lab.survives("msgflood");
    lab.finish();
}

/// A chain of 300 descriptors on a ring of 1024: legal by the spec, but
/// more than ulan walks for one frame (`MAX_CHAIN`, 256, as DPDK's vhost
/// library): the frontend is cut off and the others go on.
#[test]
fn tx_chain_longer_than_ulan_walks() {
    let mut lab = Lab3::start("txlong");
    let mut v = VhostFrontend::builder(&lab.victim)
        .memory_size(4 * MEM)
        .queue_size(1024)
        .connect()
        .unwrap();
    wait_for("the victim up", || lab.lab.port("v").unwrap().up);
    assert!(Lab3::pass(&mut v, &mut lab.c, V, C, 0xa2));
    let before = lab.victim_counters();
    let chain: Vec<RawDesc> = (0..300u16)
        .map(|i| {
            let last = i == 299;
            let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
            desc(i, BUF + 64 * u64::from(i), 12, flags, i + 1)
        })
        .collect();
    v.post_raw(TX_QUEUE, &chain, &[0], 0);
    wait_eof(&v, "txlong");
    wait_for("the victim port down", || !lab.lab.port("v").unwrap().up);
    drop(v);
    lab.after_attack("txlong", &before);
    lab.finish();
}
