//! ulan's vhost-user frontend (ulan::testkit::vhost_frontend) against a
//! third-party backend: DPDK's vhost PMD in `dpdk-testpmd`, io-forwarding
//! port 0 (socket s0) to port 1 (s1). Frames sent into s0 must arrive at s1
//! intact, in order, and exactly as many as were sent.

use std::time::{Duration, Instant};

use ulan::testkit::mac;
use ulan::testkit::vhost_frontend::testpmd::{self, Testpmd};
use ulan::testkit::vhost_frontend::traffic::{build_frame, Blaster, FrameSpec, Sink, Verify};
use ulan::testkit::vhost_frontend::{features, VhostFrontend};

/// Skips with the reason printed; under CI a missing tool is a failure,
/// since CI installs it (scripts/setup-debian.sh).
fn have_testpmd(test: &str) -> bool {
    if testpmd::available() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {} missing under CI: scripts/setup-debian.sh installs dpdk-dev",
        testpmd::TESTPMD
    );
    ulan::testkit::skipped(format_args!(
        "{test}: {} is not installed (apt-get install dpdk-dev)",
        testpmd::TESTPMD
    ));
    false
}

/// One testpmd at a time: each busy-polls a CPU, and there are two.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn spec(size: usize) -> FrameSpec {
    FrameSpec {
        size,
        dst: mac(2),
        src: mac(1),
        stream: 1,
    }
}

/// Sends `n` frames at a modest rate (a batch, then wait for the sink to
/// catch up), checks every one at the other side.
fn round_trip(
    builder: impl Fn(&std::path::Path) -> ulan::testkit::vhost_frontend::VhostFrontendBuilder,
    size: usize,
    n: u64,
) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let pmd = Testpmd::start(dir.path(), None).unwrap();
    // Receiver first: testpmd drops what it cannot forward to a port
    // without a frontend.
    let mut rx = builder(&pmd.s1()).connect().unwrap();
    let mut tx = builder(&pmd.s0()).connect().unwrap();
    assert!(rx.negotiated().has(features::VIRTIO_F_VERSION_1));
    assert!(tx.is_connected() && rx.is_connected());
    let mut blaster = Blaster::new(spec(size)).unwrap();
    blaster.prepare(&mut tx).unwrap();
    let mut sink = Sink::new(Verify::Full);
    let deadline = Instant::now() + Duration::from_secs(30);
    while blaster.sent() < n {
        assert!(Instant::now() < deadline, "stuck: {:?}", sink.report());
        let want = (n - blaster.sent()).min(32) as usize;
        if blaster.pump(&mut tx, want) == 0 {
            tx.wait_tx(Duration::from_millis(10)).unwrap();
        }
        // Modest: never more than one batch in flight.
        let until = Instant::now() + Duration::from_secs(2);
        while sink.report().frames + sink.report().corrupt < blaster.sent()
            && Instant::now() < until
        {
            if sink.poll(&mut rx) == 0 {
                rx.wait_rx(Duration::from_millis(10)).unwrap();
            }
        }
    }
    sink.drain(&mut rx, Duration::from_millis(200), Duration::from_secs(2))
        .unwrap();
    sink.finish(1, blaster.sent());
    let r = sink.report();
    let log = pmd.stop();
    assert_eq!(r.frames, n, "{r:?}\n{log}");
    assert_eq!(r.bytes, n * size as u64);
    assert_eq!(
        (r.lost, r.out_of_order, r.corrupt, r.foreign),
        (0, 0, 0, 0),
        "{r:?}"
    );
    let (ts, rs) = (tx.stats(), rx.stats());
    assert_eq!(ts.tx_frames, n);
    assert_eq!(rs.rx_frames, n);
    assert_eq!(
        ts.bad_used + rs.bad_used + rs.rx_malformed,
        0,
        "{ts:?} {rs:?}"
    );
    // testpmd's own count at exit: port 0 received n, port 1 sent n.
    assert!(
        log.contains(&format!("RX-packets: {n} ")),
        "testpmd did not count {n}: {log}"
    );
}

#[test]
fn frames_cross_testpmd_intact_and_in_order() {
    if !have_testpmd("frames_cross_testpmd_intact_and_in_order") {
        return;
    }
    round_trip(|p| VhostFrontend::builder(p), 64, 20_000);
}

#[test]
fn full_size_frames_without_event_idx_or_mergeable_buffers() {
    if !have_testpmd("full_size_frames_without_event_idx_or_mergeable_buffers") {
        return;
    }
    round_trip(
        |p| {
            VhostFrontend::builder(p)
                .event_idx(false)
                .mrg_rxbuf(false)
                .queue_size(1024)
        },
        1514,
        5_000,
    );
}

#[test]
fn copying_send_and_recv_with_headers() {
    if !have_testpmd("copying_send_and_recv_with_headers") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let pmd = Testpmd::start(dir.path(), None).unwrap();
    let mut rx = VhostFrontend::connect(pmd.s1()).unwrap();
    let mut tx = VhostFrontend::connect(pmd.s0()).unwrap();
    let frames: Vec<Vec<u8>> = (0..100u64)
        .map(|i| build_frame(&spec(60 + i as usize * 13), i).unwrap())
        .collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
    let mut sent = 0;
    while sent < refs.len() {
        sent += tx.send(&refs[sent..]);
        if sent < refs.len() {
            tx.wait_tx(Duration::from_millis(100)).unwrap();
        }
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < frames.len() && Instant::now() < deadline {
        rx.wait_rx(Duration::from_millis(100)).unwrap();
        rx.recv_with_header(|h, f| got.push((*h, f.to_vec())));
    }
    assert_eq!(got.len(), frames.len());
    for ((h, f), want) in got.iter().zip(&frames) {
        assert_eq!(f, want);
        // testpmd io forwarding sets no offload flags.
        assert_eq!((h.flags, h.gso_type), (0, 0));
        if rx.negotiated().mrg_rxbuf {
            assert_eq!(h.num_buffers, 1);
        }
    }
    assert!(tx.flush_tx(Duration::from_secs(2)).unwrap());
    drop(pmd);
    // testpmd gone: the frontends notice.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.is_connected() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!rx.is_connected());
}
