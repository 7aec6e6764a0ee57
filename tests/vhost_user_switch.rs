//! ulan's vhost-user ports driven by the project's own vhost-user frontend
//! (no guest): exact delivery between two ports, offloads finished for a
//! socket port and passed on to a guest that takes them, and a port moved
//! between lans under traffic.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ulan::lab::{Lab, LabConfig};
use ulan::ports::PortKind;
use ulan::testkit::offload_check::{check, TcpSpec};
use ulan::testkit::vhost_frontend::features::*;
use ulan::testkit::vhost_frontend::{NetHeader, VhostFrontend};
use ulan::testkit::{frame, mac, tag_of, Endpoint};
use ulan::wire::MacAddr;

fn lab(dir: &Path) -> Arc<Lab> {
    Lab::start(LabConfig::new("vusw", &dir.join("run"))).unwrap()
}

fn port_path(lab: &Lab, name: &str) -> std::path::PathBuf {
    lab.ports_dir().join(name)
}

fn wait_up(lab: &Lab, ports: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ports.iter().all(|p| lab.port(p).unwrap().up) {
        assert!(Instant::now() < deadline, "ports {ports:?} not up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Receives on `fe` until `want` frames came or nothing came for a second.
fn collect(fe: &mut VhostFrontend, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut last = Instant::now();
    while got.len() < want && last.elapsed() < Duration::from_secs(1) {
        if fe.recv(|f| got.push(f.to_vec())) > 0 {
            last = Instant::now();
        } else {
            let _ = fe.wait_rx(Duration::from_millis(20));
        }
    }
    got
}

/// 20,000 frames of every size from 60 to 1514 bytes from one vhost-user
/// port to another: each arrives once, intact and in order, and the
/// counters of both ports say exactly that.
#[test]
fn frames_between_two_vhost_user_ports_arrive_intact_in_order_with_exact_counters() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    lab.add_lan("l").unwrap();
    lab.add_port("a", PortKind::VhostUser, Some("l")).unwrap();
    lab.add_port("b", PortKind::VhostUser, Some("l")).unwrap();
    let mut fa = VhostFrontend::connect(port_path(&lab, "a")).unwrap();
    let mut fb = VhostFrontend::connect(port_path(&lab, "b")).unwrap();
    wait_up(&lab, &["a", "b"]);
    // b speaks first, so the switch knows where its address is.
    assert_eq!(fb.send(&[&frame(mac(1), mac(2), 60, 0)]), 1);
    let hello = collect(&mut fa, 1);
    assert_eq!(hello.len(), 1, "b's first frame floods to a");

    const N: u32 = 20_000;
    let sizes = |i: u32| 60 + (i as usize * 7) % (1514 - 60 + 1);
    let mut next = 0u32;
    let mut got = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got < N {
        assert!(
            Instant::now() < deadline,
            "only {got} of {N} frames arrived (sent {next}): a {:?} b {:?} fa {:?} fb {:?}",
            lab.port_stats("a").unwrap().counters,
            lab.port_stats("b").unwrap().counters,
            fa.stats(),
            fb.stats()
        );
        // send reclaims what the switch gave back, then posts what fits.
        // At most 200 frames in flight: the switch drops (and counts) what
        // a receiver has no room for, and this test wants none dropped.
        while next < N && next - got < 200 {
            let f = frame(mac(2), mac(1), sizes(next), next);
            if fa.send(&[&f]) == 0 {
                break;
            }
            next += 1;
        }
        let mut order_ok = true;
        let n = fb.recv(|f| {
            let want = frame(mac(2), mac(1), sizes(got), got);
            order_ok &= f == want.as_slice();
            got += 1;
        });
        assert!(order_ok, "frame {got} arrived changed or out of order");
        if n == 0 {
            let _ = fb.wait_rx(Duration::from_millis(5));
        }
    }
    assert!(collect(&mut fb, 1).is_empty(), "a frame arrived twice");
    std::thread::sleep(Duration::from_millis(1100)); // counters reach the API per batch
    let a = lab.port_stats("a").unwrap().counters;
    let b = lab.port_stats("b").unwrap().counters;
    let bytes: u64 = (0..N).map(|i| sizes(i) as u64).sum();
    assert_eq!(
        (a.rx_frames, a.rx_bytes, a.rx_dropped),
        (u64::from(N), bytes, 0),
        "{a:?}"
    );
    assert_eq!(
        (b.tx_frames, b.tx_bytes, b.tx_dropped),
        (u64::from(N), bytes, 0),
        "{b:?}"
    );
    assert_eq!((a.tx_frames, b.rx_frames), (1, 1));
    assert_eq!(a.protocol_errors + b.protocol_errors, 0);
    lab.shutdown();
}

/// A TCP super-frame (30 KB, TSO) from a vhost-user guest floods to a
/// stream port, which gets it cut into valid segments (checked by an
/// independent verifier), and to a vhost-user guest that acked
/// GUEST_TSO4, which gets it whole with the request in its header.
#[test]
fn a_tso_frame_is_segmented_for_a_socket_port_and_passed_whole_to_a_tso_guest() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    lab.add_lan("l").unwrap();
    lab.add_port("a", PortKind::VhostUser, Some("l")).unwrap();
    lab.add_port("b", PortKind::VhostUser, Some("l")).unwrap();
    let s = lab.add_port("s", PortKind::Stream, Some("l")).unwrap();
    let offloads = VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_HOST_TSO4
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_GUEST_TSO4;
    let mut fa = VhostFrontend::builder(port_path(&lab, "a"))
        .features(offloads)
        .big_frames(true)
        .connect()
        .unwrap();
    let mut fb = VhostFrontend::builder(port_path(&lab, "b"))
        .features(offloads)
        .big_frames(true)
        .connect()
        .unwrap();
    let mut es = Endpoint::connect(PortKind::Stream, Path::new(&s.path), dir.path()).unwrap();
    wait_up(&lab, &["a", "b", "s"]);
    assert!(
        fa.negotiated().has(VIRTIO_NET_F_HOST_TSO4),
        "TSO not negotiated"
    );

    let (sup, off) = TcpSpec {
        payload_len: 30_000,
        gso_size: 1448,
        ..TcpSpec::default()
    }
    .build();
    let (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) = off.to_virtio();
    let hdr = NetHeader {
        flags,
        gso_type,
        hdr_len,
        gso_size,
        csum_start,
        csum_offset,
        num_buffers: 0,
    };
    assert!(fa.max_tx_frame() >= sup.len());
    assert_eq!(fa.send_with_header(&[(hdr, &sup)]), 1);

    // The stream port: complete segments, each checksummed.
    let mut segs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while segs.len() < 21 && Instant::now() < deadline {
        if let Some(f) = es.recv(Duration::from_millis(100)).unwrap() {
            segs.push(f);
        }
    }
    let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
    check(&sup, &off, &refs).unwrap_or_else(|e| panic!("segments from ulan: {e}"));
    assert_eq!(segs.len(), 30_000usize.div_ceil(1448));

    // The TSO guest: the frame whole, with the request to do the rest.
    let mut whole = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while whole.is_empty() && Instant::now() < deadline {
        fb.recv_with_header(|h, f| whole.push((*h, f.to_vec())));
        let _ = fb.wait_rx(Duration::from_millis(20));
    }
    assert_eq!(whole.len(), 1, "the TSO guest gets one frame");
    let (h, f) = &whole[0];
    assert_eq!(f, &sup, "the super-frame unchanged");
    assert_eq!(
        (h.gso_type, h.gso_size, h.flags & 1),
        (gso_type, gso_size, 1)
    );
    assert_eq!(lab.port_stats("a").unwrap().counters.rx_drop_bad_offload, 0);
    lab.shutdown();
}

/// A vhost-user port moved to another lan while it sends: frames tagged
/// before the move reach the old lan only, frames sent after it the new
/// lan only, none reaches both, and the other ports are untouched.
#[test]
fn moving_a_vhost_user_port_between_lans_under_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    lab.add_lan("l1").unwrap();
    lab.add_lan("l2").unwrap();
    lab.add_port("a", PortKind::VhostUser, Some("l1")).unwrap();
    lab.add_port("b", PortKind::VhostUser, Some("l1")).unwrap();
    let c = lab.add_port("c", PortKind::Stream, Some("l2")).unwrap();
    let mut fa = VhostFrontend::connect(port_path(&lab, "a")).unwrap();
    let mut fb = VhostFrontend::connect(port_path(&lab, "b")).unwrap();
    let mut ec = Endpoint::connect(PortKind::Stream, Path::new(&c.path), dir.path()).unwrap();
    wait_up(&lab, &["a", "b", "c"]);

    let mut at_b = Vec::new();
    let mut at_c = Vec::new();
    let mut tag = 0u32;
    let mut moved_at = None;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        // About 20,000 frames a second: what a socket client can read.
        let due = start.elapsed().as_micros() as u32 / 50;
        if tag < due && fa.send(&[&frame(MacAddr::BROADCAST, mac(1), 100, tag)]) == 1 {
            tag += 1;
        }
        if moved_at.is_none() && start.elapsed() > Duration::from_millis(500) {
            lab.move_port("a", Some("l2")).unwrap();
            moved_at = Some(tag);
        }
        fb.recv(|f| at_b.extend(tag_of(f)));
        while let Some(f) = ec.recv(Duration::ZERO).unwrap() {
            at_c.extend(tag_of(&f));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    fb.recv(|f| at_b.extend(tag_of(f)));
    while let Some(f) = ec.recv(Duration::from_millis(100)).unwrap() {
        at_c.extend(tag_of(&f));
    }
    let moved_at = moved_at.unwrap();
    assert!(
        !at_b.is_empty() && !at_c.is_empty(),
        "b {} c {}: a {:?} c {:?}",
        at_b.len(),
        at_c.len(),
        lab.port_stats("a").unwrap().counters,
        lab.port_stats("c").unwrap().counters
    );
    // Before the move only l1 heard a; after it only l2. The boundary is
    // where the data plane read a's ring, not where the test called move:
    // up to a ring's worth (256) of frames either way.
    assert!(
        at_b.iter().all(|&t| t < moved_at + 256),
        "b heard a long after the move"
    );
    assert!(
        at_c.iter().all(|&t| t + 256 >= moved_at),
        "c heard a long before the move"
    );
    assert!(
        at_b.iter().any(|&t| t + 256 < moved_at),
        "b heard nothing early"
    );
    assert!(
        at_c.iter().any(|&t| t > moved_at + 256),
        "c heard nothing late"
    );
    let mut all: Vec<u32> = at_b.iter().chain(&at_c).copied().collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "a frame reached both lans");
    // Both sides in order.
    assert!(at_b.windows(2).all(|w| w[0] < w[1]));
    assert!(at_c.windows(2).all(|w| w[0] < w[1]));
    lab.shutdown();
}

/// Frames whose virtio-net header asks for work ulan does not do (UDP
/// segmentation, unknown flags) or that the frame does not allow (a
/// checksum offset past its end) are dropped and counted, one by one; the
/// good frame after them goes through.
#[test]
fn bad_offload_requests_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    lab.add_lan("l").unwrap();
    lab.add_port("a", PortKind::VhostUser, Some("l")).unwrap();
    let s = lab.add_port("s", PortKind::Stream, Some("l")).unwrap();
    let mut fa = VhostFrontend::builder(port_path(&lab, "a"))
        .features(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4)
        .connect()
        .unwrap();
    let mut es = Endpoint::connect(PortKind::Stream, Path::new(&s.path), dir.path()).unwrap();
    wait_up(&lab, &["a", "s"]);
    let f = frame(MacAddr::BROADCAST, mac(1), 200, 7);
    let bad = [
        // UDP segmentation is not offered.
        NetHeader {
            gso_type: NetHeader::GSO_UDP,
            gso_size: 1000,
            ..NetHeader::default()
        },
        // Flag bits that mean nothing.
        NetHeader {
            flags: 0x40,
            ..NetHeader::default()
        },
        // A checksum to fill past the end of the frame.
        NetHeader {
            flags: NetHeader::F_NEEDS_CSUM,
            csum_start: 190,
            csum_offset: 16,
            ..NetHeader::default()
        },
    ];
    for h in bad {
        assert_eq!(fa.send_with_header(&[(h, &f)]), 1);
    }
    assert_eq!(fa.send(&[&f]), 1);
    let got = es
        .recv(Duration::from_secs(2))
        .unwrap()
        .expect("the good frame");
    assert_eq!(got, f);
    assert!(es.recv(Duration::from_millis(200)).unwrap().is_none());
    std::thread::sleep(Duration::from_millis(1100));
    let c = lab.port_stats("a").unwrap().counters;
    // A header refused on its own is not a received frame (like a runt);
    // the frame whose checksum cannot be filled was received, and dropped
    // when it was to be finished for the stream port.
    assert_eq!(
        (c.rx_drop_bad_offload, c.rx_dropped, c.rx_frames),
        (3, 3, 2),
        "{c:?}"
    );
    assert_eq!(c.protocol_errors, 0, "a bad request is not a broken ring");
    lab.shutdown();
}
