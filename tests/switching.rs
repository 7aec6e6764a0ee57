//! Forwarding through real sockets of every port kind: learning, flooding,
//! isolation, aging, moves under traffic, detached ports, exact counters.

mod common;

use std::time::Duration;

use common::*;
use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, tag_of, Endpoint};
use ulan::wire::MacAddr;

/// For each kind as the port under test, with the other two roles on other
/// kinds, so every kind sends and receives to every other.
fn roles() -> Vec<[PortKind; 3]> {
    let k = ALL_KINDS;
    (0..4)
        .map(|i| [k[i], k[(i + 1) % 4], k[(i + 2) % 4]])
        .collect()
}

#[test]
fn learning_then_unicast_reaches_only_its_port() {
    for [ka, kb, kc] in roles() {
        let fx = Fixture::new();
        fx.lan("l");
        let mut a = fx.plug("a", ka, Some("l"));
        let mut b = fx.plug("b", kb, Some("l"));
        let mut c = fx.plug("c", kc, Some("l"));
        // Unknown destination: flooded to b and c, not back to a.
        a.send(&frame(mac(2), mac(1), 60, 1)).unwrap();
        assert_eq!(
            tag_of(&b.recv(WAIT).unwrap().unwrap()),
            Some(1),
            "{ka:?}->{kb:?}"
        );
        assert_eq!(tag_of(&c.recv(WAIT).unwrap().unwrap()), Some(1));
        assert!(a.recv(QUIET).unwrap().is_none(), "flooded back to ingress");
        // b answers a: a's MAC was learned, so only a gets it.
        b.send(&frame(mac(1), mac(2), 60, 2)).unwrap();
        assert_eq!(tag_of(&a.recv(WAIT).unwrap().unwrap()), Some(2));
        assert!(
            c.recv(QUIET).unwrap().is_none(),
            "{kc:?} saw a learned unicast"
        );
        // And now both are learned: a -> b is unicast too.
        a.send(&frame(mac(2), mac(1), 1500, 3)).unwrap();
        let got = b.recv(WAIT).unwrap().unwrap();
        assert_eq!((tag_of(&got), got.len()), (Some(3), 1500));
        assert!(c.recv(QUIET).unwrap().is_none());
        let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
        let row = |m: MacAddr| {
            fdb.iter()
                .find(|e| e.mac == m.to_string())
                .map(|e| e.port.clone())
        };
        assert_eq!(row(mac(1)).as_deref(), Some("a"));
        assert_eq!(row(mac(2)).as_deref(), Some("b"));
    }
}

#[test]
fn broadcast_multicast_and_unknown_flood_to_every_other_port() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut eps: Vec<_> = ALL_KINDS
        .iter()
        .enumerate()
        .map(|(i, k)| fx.plug(&format!("p{i}"), *k, Some("l")))
        .collect();
    let dsts = [
        MacAddr::BROADCAST,
        MacAddr([0x01, 0x00, 0x5e, 0, 0, 9]),
        mac(99),
    ];
    for (i, dst) in dsts.iter().enumerate() {
        let src = i % eps.len();
        eps[src]
            .send(&frame(*dst, mac(src as u32 + 10), 100, i as u32))
            .unwrap();
        for (j, ep) in eps.iter_mut().enumerate() {
            if j == src {
                assert!(
                    ep.recv(QUIET).unwrap().is_none(),
                    "frame came back to its sender"
                );
            } else {
                assert_eq!(tag_of(&ep.recv(WAIT).unwrap().unwrap()), Some(i as u32));
            }
        }
    }
}

#[test]
fn frames_never_cross_lans() {
    let fx = Fixture::new();
    fx.lan("red");
    fx.lan("blue");
    let mut r1 = fx.plug("r1", PortKind::Stream, Some("red"));
    let mut r2 = fx.plug("r2", PortKind::Vde, Some("red"));
    let mut b1 = fx.plug("b1", PortKind::Dgram, Some("blue"));
    let mut b2 = fx.plug("b2", PortKind::Bess, Some("blue"));
    r1.send(&frame(MacAddr::BROADCAST, mac(1), 60, 1)).unwrap();
    b1.send(&frame(MacAddr::BROADCAST, mac(3), 60, 2)).unwrap();
    assert_eq!(tag_of(&r2.recv(WAIT).unwrap().unwrap()), Some(1));
    assert_eq!(tag_of(&b2.recv(WAIT).unwrap().unwrap()), Some(2));
    assert!(r2.recv(QUIET).unwrap().is_none());
    assert!(b2.recv(QUIET).unwrap().is_none());
    // A MAC learned on red is unknown on blue: flooded within blue only.
    b1.send(&frame(mac(1), mac(3), 60, 3)).unwrap();
    assert_eq!(tag_of(&b2.recv(WAIT).unwrap().unwrap()), Some(3));
    assert!(r1.recv(QUIET).unwrap().is_none());
    assert!(r2.recv(QUIET).unwrap().is_none());
}

#[test]
fn learned_entries_age_out() {
    let fx = Fixture::with_aging(1);
    fx.lan("l");
    let mut a = fx.plug("a", PortKind::Dgram, Some("l"));
    let mut b = fx.plug("b", PortKind::Stream, Some("l"));
    let mut c = fx.plug("c", PortKind::Bess, Some("l"));
    b.send(&frame(MacAddr::BROADCAST, mac(2), 60, 1)).unwrap();
    a.recv(WAIT).unwrap().unwrap();
    c.recv(WAIT).unwrap().unwrap();
    a.send(&frame(mac(2), mac(1), 60, 2)).unwrap();
    assert_eq!(tag_of(&b.recv(WAIT).unwrap().unwrap()), Some(2));
    assert!(c.recv(QUIET).unwrap().is_none(), "learned unicast leaked");
    std::thread::sleep(Duration::from_millis(2300));
    let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
    assert!(fdb.is_empty(), "entries did not age out: {fdb:?}");
    a.send(&frame(mac(2), mac(1), 60, 3)).unwrap();
    assert_eq!(tag_of(&b.recv(WAIT).unwrap().unwrap()), Some(3));
    assert_eq!(
        tag_of(&c.recv(WAIT).unwrap().unwrap()),
        Some(3),
        "aged entry not flooded"
    );
}

#[test]
fn a_mac_that_moves_port_is_relearned() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut a = fx.plug("a", PortKind::Stream, Some("l"));
    let mut b = fx.plug("b", PortKind::Vde, Some("l"));
    let mut c = fx.plug("c", PortKind::Dgram, Some("l"));
    b.send(&frame(MacAddr::BROADCAST, mac(7), 60, 1)).unwrap();
    a.drain(QUIET).unwrap();
    c.drain(QUIET).unwrap();
    // mac(7) now shows up behind c.
    c.send(&frame(MacAddr::BROADCAST, mac(7), 60, 2)).unwrap();
    a.drain(QUIET).unwrap();
    b.drain(QUIET).unwrap();
    a.send(&frame(mac(7), mac(1), 60, 3)).unwrap();
    assert_eq!(tag_of(&c.recv(WAIT).unwrap().unwrap()), Some(3));
    assert!(b.recv(QUIET).unwrap().is_none());
}

#[test]
fn detached_port_drops_and_counts() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut a = fx.plug("a", PortKind::Bess, None);
    let mut b = fx.plug("b", PortKind::Stream, Some("l"));
    let before = fx.stats("a");
    for i in 0..10 {
        a.send(&frame(MacAddr::BROADCAST, mac(1), 60, i)).unwrap();
    }
    let s = fx.wait_stats("a", |s| s.rx_frames >= before.rx_frames + 10);
    assert_eq!(s.rx_drop_no_lan - before.rx_drop_no_lan, 10);
    assert_eq!(s.rx_dropped - before.rx_dropped, 10);
    assert!(b.recv(QUIET).unwrap().is_none());
    // Frames towards it are not delivered either.
    b.send(&frame(MacAddr::BROADCAST, mac(2), 60, 99)).unwrap();
    assert!(a.recv(QUIET).unwrap().is_none());
}

#[test]
fn stats_add_up_exactly() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut a = fx.plug("a", PortKind::Vde, Some("l"));
    let mut b = fx.plug("b", PortKind::Stream, Some("l"));
    let (a0, b0) = (fx.stats("a"), fx.stats("b"));
    // Learn b first so a's frames are unicast.
    b.send(&frame(MacAddr::BROADCAST, mac(2), 64, 0)).unwrap();
    a.recv(WAIT).unwrap().unwrap();
    let sizes = [60usize, 64, 128, 512, 1500, 9000, 65535];
    // Receive while sending, at most 8 frames behind: the output queue is
    // bounded (1 MiB for stream), so a client that falls further behind
    // would (rightly) lose frames.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = progress.clone();
    let receiver = std::thread::spawn(move || {
        let (mut got, mut got_bytes) = (0usize, 0u64);
        while let Some(f) = b.recv(WAIT).unwrap() {
            assert_eq!(tag_of(&f), Some(got as u32), "out of order or lost");
            got += 1;
            seen.store(got, std::sync::atomic::Ordering::Release);
            got_bytes += f.len() as u64;
            if got == 700 {
                break;
            }
        }
        (got, got_bytes)
    });
    let mut bytes = 0u64;
    for (i, &n) in sizes.iter().cycle().take(700).enumerate() {
        while i > progress.load(std::sync::atomic::Ordering::Acquire) + 8 {
            std::thread::yield_now();
        }
        a.send(&frame(mac(2), mac(1), n, i as u32)).unwrap();
        bytes += n as u64;
    }
    let (got, got_bytes) = receiver.join().unwrap();
    assert_eq!((got, got_bytes), (700, bytes));
    let a1 = fx.wait_stats("a", |s| s.rx_frames - a0.rx_frames == 700);
    let b1 = fx.wait_stats("b", |s| s.tx_frames - b0.tx_frames == 700);
    assert_eq!(a1.rx_bytes - a0.rx_bytes, bytes);
    assert_eq!(b1.tx_bytes - b0.tx_bytes, bytes);
    assert_eq!(a1.tx_frames - a0.tx_frames, 1);
    assert_eq!(a1.tx_bytes - a0.tx_bytes, 64);
    assert_eq!(b1.rx_frames - b0.rx_frames, 1);
    assert_eq!(a1.rx_dropped, a0.rx_dropped);
    assert_eq!(b1.tx_dropped, b0.tx_dropped);
}

#[test]
fn moving_a_port_under_traffic_leaves_other_ports_untouched() {
    let fx = Fixture::new();
    fx.lan("x");
    fx.lan("y");
    let mut s = fx.plug("s", PortKind::Dgram, Some("x"));
    let mut r = fx.plug("r", PortKind::Stream, Some("x"));
    let mut m = fx.plug("m", PortKind::Vde, Some("x"));
    let mut other = fx.plug("o", PortKind::Bess, Some("y"));
    r.send(&frame(MacAddr::BROADCAST, mac(2), 60, 0)).unwrap();
    s.drain(QUIET).unwrap();
    m.drain(QUIET).unwrap();
    const N: u32 = 20_000;
    let lab = fx.lab.clone();
    let mover = std::thread::spawn(move || {
        for i in 0..200 {
            let to = if i % 2 == 0 { "y" } else { "x" };
            lab.move_port("m", Some(to)).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let receiver = std::thread::spawn(move || {
        let mut next = 0u32;
        while let Some(f) = r.recv(WAIT).unwrap() {
            assert_eq!(tag_of(&f), Some(next), "lost or reordered at {next}");
            next += 1;
            if next == N {
                break;
            }
        }
        next
    });
    for i in 0..N {
        s.send(&frame(mac(2), mac(1), 128, i)).unwrap();
    }
    mover.join().unwrap();
    assert_eq!(receiver.join().unwrap(), N);
    assert_eq!(fx.stats("r").tx_dropped, 0);
    // m ends on x (200 moves); frames it got were unicast to r? No: s->r is
    // learned unicast, so m and o see none of them.
    assert!(m.drain(QUIET).unwrap().is_empty());
    assert!(other.drain(QUIET).unwrap().is_empty());
}

#[test]
fn removing_a_port_removes_its_socket() {
    let fx = Fixture::new();
    for k in ALL_KINDS {
        let name = format!("p-{}", k.as_str());
        let info = fx.lab.add_port(&name, k, None).unwrap();
        let path = std::path::PathBuf::from(&info.path);
        assert!(path.exists());
        rt().block_on(fx.lab.remove_port(&name)).unwrap();
        assert!(!path.exists(), "{} left behind", path.display());
    }
    assert_eq!(std::fs::read_dir(fx.lab.ports_dir()).unwrap().count(), 0);
}

#[test]
fn a_port_going_down_forgets_its_addresses() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut a = fx.plug("a", PortKind::Stream, Some("l"));
    let mut b = fx.plug("b", PortKind::Vde, Some("l"));
    a.send(&frame(MacAddr::BROADCAST, mac(1), 60, 1)).unwrap();
    b.recv(WAIT).unwrap().unwrap();
    let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
    assert!(fdb.iter().any(|e| e.port == "a"));
    drop(a);
    fx.wait_up("a", false);
    let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
    assert!(fdb.iter().all(|e| e.port != "a"), "{fdb:?}");
}

/// A dgram port `name` on lan `l`, told its client binds `client_path`
/// (as ulan does for the QEMU guests it launches).
fn dgram_port_expecting(
    fx: &Fixture,
    name: &str,
    client_path: &std::path::Path,
) -> ulan::lab::PortInfo {
    fx.lab
        .add_port_with(
            name,
            PortKind::Dgram,
            Some("l"),
            &ulan::ports::PortOptions {
                dgram_peer: Some(client_path.to_path_buf()),
            },
        )
        .unwrap()
}

/// A dgram port told its client's socket path (as ulan does for the QEMU
/// guests it launches) comes up as soon as that socket exists and delivers
/// frames to it before the client has sent anything.
#[test]
fn dgram_port_with_expected_peer_delivers_before_the_client_speaks() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut sender = fx.plug("s", PortKind::Stream, Some("l"));
    let client_path = fx.scratch.join("guest.sock");
    let info = dgram_port_expecting(&fx, "g", &client_path);
    assert!(!fx.lab.port("g").unwrap().up);
    // The client binds exactly the expected path and never sends.
    let mut client =
        Endpoint::connect_bound(PortKind::Dgram, info.path.as_ref(), &client_path).unwrap();
    fx.wait_up("g", true);
    let f = frame(MacAddr::BROADCAST, mac(1), 100, 7);
    sender.send(&f).unwrap();
    assert_eq!(client.recv(WAIT).unwrap(), Some(f));
}

/// The expected client's socket file outlives the client (a stopped guest
/// leaves it until its next start): the port goes down once and stays
/// down, then comes up for the next client bound there.
#[test]
fn dgram_port_ignores_a_stale_socket_file_of_its_expected_client() {
    use ulan::ports::sys;
    let fx = Fixture::new();
    fx.lan("l");
    let mut sender = fx.plug("s", PortKind::Stream, Some("l"));
    let client_path = fx.scratch.join("guest.sock");
    let info = dgram_port_expecting(&fx, "g", &client_path);
    // A client that binds the path, then closes without removing it.
    let gone = sys::bound_socket(libc::SOCK_DGRAM, &client_path).unwrap();
    fx.wait_up("g", true);
    drop(gone);
    let mut n = 0;
    let mut flood = |sender: &mut Endpoint| {
        n += 1;
        sender
            .send(&frame(MacAddr::BROADCAST, mac(1), 100, n))
            .unwrap();
    };
    let deadline = std::time::Instant::now() + WAIT;
    while fx.lab.port("g").unwrap().up {
        assert!(std::time::Instant::now() < deadline, "port stayed up");
        flood(&mut sender);
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = fx.stats("g");
    // Three ticks with traffic: no flapping.
    for _ in 0..30 {
        flood(&mut sender);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !fx.lab.port("g").unwrap().up,
            "port came up for a dead socket"
        );
    }
    let after = fx.stats("g");
    assert_eq!(
        after.connects, before.connects,
        "connects while nobody is there"
    );
    assert_eq!(after.disconnects, before.disconnects);
    // The next client bound at the path gets the port and the frames.
    std::fs::remove_file(&client_path).unwrap();
    let mut client =
        Endpoint::connect_bound(PortKind::Dgram, info.path.as_ref(), &client_path).unwrap();
    fx.wait_up("g", true);
    let f = frame(MacAddr::BROADCAST, mac(1), 100, 999);
    sender.send(&f).unwrap();
    assert_eq!(client.recv(WAIT).unwrap(), Some(f));
}

/// A stuck client's queued frames stay on the lan it leaves: after a move,
/// it gets only what had already gone to the kernel before the move, then
/// the new lan's traffic; the rest is counted as `tx_drop_moved`.
#[test]
fn frames_queued_for_a_port_do_not_follow_it_to_another_lan() {
    for kind in [PortKind::Stream, PortKind::Vde] {
        let fx = Fixture::new();
        fx.lan("a");
        fx.lan("b");
        let mut src_a = fx.plug("src-a", PortKind::Dgram, Some("a"));
        let mut src_b = fx.plug("src-b", PortKind::Dgram, Some("b"));
        let mut stuck = fx.plug("stuck", kind, Some("a"));
        // Fill the client's socket and then the port's queue: the client
        // does not read.
        let mut tag = 0u32;
        loop {
            for _ in 0..64 {
                tag += 1;
                src_a
                    .send(&frame(MacAddr::BROADCAST, mac(1), 1400, tag))
                    .unwrap();
            }
            std::thread::sleep(Duration::from_millis(2));
            if fx.stats("stuck").tx_drop_queue_full > 0 {
                break;
            }
            assert!(tag < 200_000, "{}: the queue never filled", kind.as_str());
        }
        let sent_before_move = fx.stats("stuck").tx_frames;
        fx.lab.move_port("stuck", Some("b")).unwrap();
        let moved = fx.wait_stats("stuck", |s| s.tx_drop_moved > 0);
        assert_eq!(
            moved.tx_frames,
            sent_before_move,
            "{}: nothing left for the old lan",
            kind.as_str()
        );
        // Now read: lan a's frames that were already in the socket, then
        // lan b's.
        src_b
            .send(&frame(MacAddr::BROADCAST, mac(2), 100, 0xb0b))
            .unwrap();
        let mut from_a = 0u64;
        loop {
            let f = stuck
                .recv(WAIT)
                .unwrap()
                .unwrap_or_else(|| panic!("{}: lan b's frame never came", kind.as_str()));
            if f.len() == 1400 {
                from_a += 1;
            } else {
                assert_eq!(tag_of(&f), Some(0xb0b));
                break;
            }
        }
        // A stream record half written at the move is finished (a torn
        // record would break the stream); nothing else of lan a follows.
        let started = u64::from(kind == PortKind::Stream);
        assert!(
            (sent_before_move..=sent_before_move + started).contains(&from_a),
            "{}: {from_a} lan a frames after the move, {sent_before_move} had gone before",
            kind.as_str()
        );
        let s = fx.stats("stuck");
        assert_eq!(s.tx_frames, from_a + 1, "{}", kind.as_str());
        assert_eq!(
            s.tx_dropped,
            s.tx_drop_queue_full + s.tx_drop_moved + s.tx_drop_no_peer + s.tx_drop_error
        );
    }
}

/// Environment of [`helper_dgram_client_process`] when it runs as a child.
const CLIENT_OWN: &str = "ULAN_TEST_DGRAM_CLIENT_OWN";
const CLIENT_PORT: &str = "ULAN_TEST_DGRAM_CLIENT_PORT";
const CLIENT_MAC: &str = "ULAN_TEST_DGRAM_CLIENT_MAC";
const CLIENT_AWAIT: &str = "ULAN_TEST_DGRAM_CLIENT_AWAIT";
const CLIENT_FRAMES: u32 = 30;

/// Not a test of its own: the body of the client process the tests below
/// start (this test binary run again with only this test and the
/// environment above; without it, it returns at once). Like a simple
/// one-frame-per-syscall generator: binds a socket, connects it to the
/// port (exit 2 if refused), sends [`CLIENT_FRAMES`] broadcast frames
/// tagged 0.., optionally waits for one frame back (exit 3 if none
/// comes), and exits without removing its socket file.
#[test]
fn helper_dgram_client_process() {
    use ulan::ports::sys::{self, UnixAddr};
    let (Some(own), Some(port), Some(n)) = (
        std::env::var_os(CLIENT_OWN),
        std::env::var_os(CLIENT_PORT),
        std::env::var(CLIENT_MAC).ok().and_then(|m| m.parse().ok()),
    ) else {
        return;
    };
    let fd = sys::unix_socket(libc::SOCK_DGRAM).unwrap();
    sys::bind(&fd, &UnixAddr::from_path(own.as_ref()).unwrap()).unwrap();
    if let Err(e) = sys::connect(&fd, &UnixAddr::from_path(port.as_ref()).unwrap()) {
        eprintln!("connect: {e}");
        std::process::exit(2);
    }
    for k in 0..CLIENT_FRAMES {
        let f = frame(MacAddr::BROADCAST, mac(n), 60, k);
        loop {
            match sys::send_batch(&fd, &[&f], None) {
                Ok(1) => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => {
                    eprintln!("send: {e}");
                    std::process::exit(4);
                }
            }
        }
    }
    if std::env::var_os(CLIENT_AWAIT).is_some() {
        let deadline = std::time::Instant::now() + WAIT;
        let mut buf = [0u8; 2048];
        loop {
            match sys::read(&fd, &mut buf) {
                Ok(_) => break,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => {
                    eprintln!("nothing came back: {e}");
                    std::process::exit(3);
                }
            }
        }
    }
    // No unlink, no goodbye: the socket file stays behind.
    std::process::exit(0);
}

/// Runs [`helper_dgram_client_process`] as a child process to the end;
/// returns its exit code and what it said.
fn run_client(own: &std::path::Path, port: &str, n: u32, wait_back: bool) -> (i32, String) {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "helper_dgram_client_process", "--test-threads=1"])
        .env(CLIENT_OWN, own)
        .env(CLIENT_PORT, port)
        .env(CLIENT_MAC, n.to_string())
        .stdin(std::process::Stdio::null());
    if wait_back {
        cmd.env(CLIENT_AWAIT, "1");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tags of the [`CLIENT_FRAMES`] frames from client `n`, as `peer`
/// got them.
fn frames_from(peer: &mut Endpoint, n: u32) -> Vec<u32> {
    let mut tags = Vec::new();
    while tags.len() < CLIENT_FRAMES as usize {
        let f = peer.recv(WAIT).unwrap().expect("client frames missing");
        let eth = ulan::wire::EthernetFrame::new_checked(&f).unwrap();
        if eth.src() == mac(n) {
            tags.push(tag_of(&f).unwrap());
        }
    }
    tags
}

/// The issue's scenario: a generator process sends to a dgram port on a
/// lan where nothing is sent towards that port, and exits without removing
/// its socket file; a second run, on a new socket path and started right
/// after, connects and gets its frames through, and the port names it.
#[test]
fn a_dgram_client_that_dies_without_a_word_does_not_hold_a_quiet_port() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut peer = fx.plug("peer", PortKind::Stream, Some("l"));
    let port = fx
        .lab
        .add_port("d", PortKind::Dgram, Some("l"))
        .unwrap()
        .path;
    let all: Vec<u32> = (0..CLIENT_FRAMES).collect();
    let first = fx.scratch.join("first.sock");
    assert_eq!(run_client(&first, &port, 1, false), (0, String::new()));
    assert_eq!(frames_from(&mut peer, 1), all);
    assert!(first.exists(), "the first client's socket file is gone");
    let second = fx.scratch.join("second.sock");
    let (code, said) = run_client(&second, &port, 2, false);
    assert_eq!(code, 0, "second client refused: {said}");
    assert_eq!(frames_from(&mut peer, 2), all);
    let info = fx.lab.port("d").unwrap();
    assert!(info.up);
    let s = fx.stats("d");
    assert_eq!((s.connects, s.disconnects), (2, 1), "{s:?}");
    assert_eq!(
        s.rx_drop_stranger, 0,
        "the second client counted as a stranger"
    );
    assert_eq!(s.rx_frames, 2 * CLIENT_FRAMES as u64);
}

/// The same with traffic towards the first client (so the port's socket
/// is connected to it): once it is dead the port lets go within a check,
/// with nothing sent on the lan, and the next run gets the port.
#[test]
fn a_dgram_client_that_dies_without_a_word_is_let_go_with_no_traffic() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut peer = fx.plug("peer", PortKind::Stream, Some("l"));
    let port = fx
        .lab
        .add_port("d", PortKind::Dgram, Some("l"))
        .unwrap()
        .path;
    let first = fx.scratch.join("first.sock");
    let child = {
        let (first, port) = (first.clone(), port.clone());
        std::thread::spawn(move || run_client(&first, &port, 1, true))
    };
    let all: Vec<u32> = (0..CLIENT_FRAMES).collect();
    assert_eq!(frames_from(&mut peer, 1), all);
    // Learned on d: unicast to the client, which then exits.
    peer.send(&frame(mac(1), mac(9), 60, 77)).unwrap();
    assert_eq!(child.join().unwrap(), (0, String::new()));
    let died = std::time::Instant::now();
    fx.wait_up("d", false);
    let took = died.elapsed();
    assert!(took < Duration::from_secs(1), "let go after {took:?}");
    let second = fx.scratch.join("second.sock");
    let (code, said) = run_client(&second, &port, 2, false);
    assert_eq!(code, 0, "second client refused: {said}");
    assert_eq!(frames_from(&mut peer, 2), all);
    assert!(fx.lab.port("d").unwrap().up);
    let s = fx.stats("d");
    assert_eq!((s.connects, s.disconnects, s.tx_frames), (2, 1, 1), "{s:?}");
}
