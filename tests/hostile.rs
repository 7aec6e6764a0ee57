//! Bad input on every port kind: the offending frame is dropped or that one
//! client is cut off, counted, and every other port goes on.

mod common;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ulan::ports::sys::{self, UnixAddr};
use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, tag_of, write_all, Endpoint};
use ulan::wire::MacAddr;

/// A bystander pair on another lan that must keep working throughout.
struct Bystanders {
    x: Endpoint,
    y: Endpoint,
    n: u32,
}

impl Bystanders {
    fn new(fx: &Fixture) -> Self {
        fx.lan("calm");
        Bystanders {
            x: fx.plug("calm-x", PortKind::Dgram, Some("calm")),
            y: fx.plug("calm-y", PortKind::Stream, Some("calm")),
            n: 0,
        }
    }
    fn check(&mut self) {
        self.n += 1;
        self.x
            .send(&frame(MacAddr::BROADCAST, mac(500), 60, self.n))
            .unwrap();
        assert_eq!(tag_of(&self.y.recv(WAIT).unwrap().unwrap()), Some(self.n));
    }
}

fn stream_record(len: u32, body: &[u8]) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn stream_bad_lengths_cut_off_only_that_client() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    fx.lan("l");
    let mut peer = fx.plug("peer", PortKind::Dgram, Some("l"));
    for (len, counter) in [
        (70_000u32, "oversized"),
        (65_536, "oversized"),
        (5, "runt"),
        (0, "runt"),
    ] {
        let _ = rt().block_on(fx.lab.remove_port("s"));
        let mut s = fx.plug("s", PortKind::Stream, Some("l"));
        let before = fx.stats("s");
        s.send_raw(&stream_record(len, &[0u8; 64])).unwrap();
        fx.wait_up("s", false);
        let after = fx.stats("s");
        assert_eq!(
            after.protocol_errors - before.protocol_errors,
            1,
            "len {len}"
        );
        let c = match counter {
            "runt" => after.rx_drop_runt - before.rx_drop_runt,
            _ => after.rx_drop_oversized - before.rx_drop_oversized,
        };
        assert_eq!(c, 1, "len {len} not counted as {counter}");
        assert!(matches!(s.recv(Duration::from_secs(1)), Err(_) | Ok(None)));
        assert!(peer.recv(QUIET).unwrap().is_none(), "bad record forwarded");
        calm.check();
        // The port takes the next client.
        let path = fx.lab.port("s").unwrap().path;
        let mut again = Endpoint::connect(PortKind::Stream, path.as_ref(), &fx.scratch).unwrap();
        fx.wait_up("s", true);
        again
            .send(&frame(MacAddr::BROADCAST, mac(1), 60, 7))
            .unwrap();
        assert_eq!(tag_of(&peer.recv(WAIT).unwrap().unwrap()), Some(7));
    }
}

#[test]
fn stream_garbage_and_mid_frame_close() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    fx.lan("l");
    let mut s = fx.plug("s", PortKind::Stream, Some("l"));
    // Half a record, then the client goes away.
    s.send_raw(&stream_record(100, &[1u8; 30])).unwrap();
    drop(s);
    fx.wait_up("s", false);
    calm.check();
    let path = fx.lab.port("s").unwrap().path;
    let mut s = Endpoint::connect(PortKind::Stream, path.as_ref(), &fx.scratch).unwrap();
    let mut junk = vec![0u8; 4096];
    for (i, b) in junk.iter_mut().enumerate() {
        *b = (i * 7919 % 251) as u8;
    }
    let _ = s.send_raw(&junk);
    fx.wait_stats("s", |s| s.protocol_errors == 1);
    fx.wait_up("s", false);
    calm.check();
}

#[test]
fn second_client_is_refused_and_first_keeps_working() {
    for kind in [PortKind::Stream, PortKind::Bess, PortKind::Vde] {
        let fx = Fixture::new();
        fx.lan("l");
        let mut first = fx.plug("p", kind, Some("l"));
        let mut peer = fx.plug("peer", PortKind::Dgram, Some("l"));
        let path = fx.lab.port("p").unwrap().path;
        let second = Endpoint::connect(kind, path.as_ref(), &fx.scratch);
        if let Ok(mut second) = second {
            // Connected at the socket level, then closed by the switch.
            assert!(matches!(
                second.recv(Duration::from_secs(2)),
                Err(_) | Ok(None)
            ));
            assert!(
                second
                    .send(&frame(MacAddr::BROADCAST, mac(9), 60, 9))
                    .is_err()
                    || peer.recv(QUIET).unwrap().is_none()
            );
        }
        fx.wait_stats("p", |s| s.rejected_clients == 1);
        first
            .send(&frame(MacAddr::BROADCAST, mac(1), 60, 1))
            .unwrap();
        assert_eq!(
            tag_of(&peer.recv(WAIT).unwrap().unwrap()),
            Some(1),
            "{kind:?}"
        );
        peer.send(&frame(mac(1), mac(2), 60, 2)).unwrap();
        assert_eq!(
            tag_of(&first.recv(WAIT).unwrap().unwrap()),
            Some(2),
            "{kind:?}"
        );
    }
}

#[test]
fn runt_and_oversized_datagrams_are_dropped_and_counted() {
    for kind in [PortKind::Dgram, PortKind::Bess, PortKind::Vde] {
        let fx = Fixture::new();
        let mut calm = Bystanders::new(&fx);
        fx.lan("l");
        let mut bad = fx.plug("bad", kind, Some("l"));
        let mut peer = fx.plug("peer", PortKind::Stream, Some("l"));
        let before = fx.stats("bad");
        bad.send_raw(&[0xffu8; 13]).unwrap();
        bad.send_raw(&[0xffu8; 1]).unwrap();
        bad.send_raw(&vec![0xffu8; 70_000]).unwrap();
        bad.send(&frame(MacAddr::BROADCAST, mac(1), 60, 42))
            .unwrap();
        assert_eq!(
            tag_of(&peer.recv(WAIT).unwrap().unwrap()),
            Some(42),
            "{kind:?}"
        );
        assert!(
            peer.recv(QUIET).unwrap().is_none(),
            "a bad datagram was forwarded"
        );
        let s = fx.wait_stats("bad", |s| s.rx_frames > before.rx_frames);
        assert_eq!(s.rx_drop_runt - before.rx_drop_runt, 2, "{kind:?}");
        assert_eq!(
            s.rx_drop_oversized - before.rx_drop_oversized,
            1,
            "{kind:?}"
        );
        assert_eq!(s.rx_dropped - before.rx_dropped, 3);
        assert_eq!(s.rx_frames - before.rx_frames, 1);
        assert!(
            fx.lab.port("bad").unwrap().up,
            "{kind:?} client was cut off for a bad datagram"
        );
        calm.check();
    }
}

fn raw_ctl(fx: &Fixture, port: &str) -> OwnedFd {
    let dir = std::path::PathBuf::from(fx.lab.port(port).unwrap().path);
    let fd = sys::unix_socket(libc::SOCK_STREAM).unwrap();
    sys::connect(&fd, &UnixAddr::from_path(&dir.join("ctl")).unwrap()).unwrap();
    fd
}

/// Waits for the switch to close `fd`'s connection.
fn closed_by_peer(fd: &OwnedFd, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 256];
    while std::time::Instant::now() < deadline {
        match sys::read(fd, &mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn bogus_vde_requests_are_refused() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    fx.lab.add_port("v", PortKind::Vde, None).unwrap();
    let mut bogus: Vec<Vec<u8>> = vec![
        vec![0u8; 200], // bad magic
        {
            let mut r = 0xfeedfaceu32.to_ne_bytes().to_vec();
            r.extend(2u32.to_ne_bytes()); // old version
            r.resize(200, 0);
            r
        },
        {
            let mut r = 0xfeedfaceu32.to_ne_bytes().to_vec();
            r.extend(3u32.to_ne_bytes());
            r.extend(0u32.to_ne_bytes());
            r.extend((libc::AF_UNIX as u16).to_ne_bytes());
            r.extend(b"/nonexistent/socket/path\0");
            r.resize(200, 0);
            r // valid form, but nothing to connect to
        },
    ];
    for (i, req) in bogus.drain(..).enumerate() {
        let before = fx.stats("v");
        let ctl = raw_ctl(&fx, "v");
        write_all(&ctl, &req).unwrap();
        assert!(closed_by_peer(&ctl, WAIT), "request {i} not refused");
        let s = fx.wait_stats("v", |s| s.rejected_clients > before.rejected_clients);
        assert_eq!(s.connects, before.connects, "request {i} attached");
        calm.check();
    }
    // A short request followed by close: nothing attached, nothing broken.
    let ctl = raw_ctl(&fx, "v");
    write_all(&ctl, &[0xce, 0xfa]).unwrap();
    drop(ctl);
    // And a real client still gets in.
    let path = fx.lab.port("v").unwrap().path;
    let _ok = Endpoint::connect(PortKind::Vde, path.as_ref(), &fx.scratch).unwrap();
    fx.wait_up("v", true);
    calm.check();
}

/// A request_v3 naming `data` as the client's data socket.
fn vde_request(data: &std::path::Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut r = 0xfeedfaceu32.to_ne_bytes().to_vec();
    r.extend(3u32.to_ne_bytes());
    r.extend(0u32.to_ne_bytes());
    r.extend((libc::AF_UNIX as u16).to_ne_bytes());
    r.extend(data.as_os_str().as_bytes());
    r.push(0);
    r.resize(12 + std::mem::size_of::<libc::sockaddr_un>(), 0);
    r.extend(b"hostile\0");
    r
}

#[test]
fn vde_requests_naming_the_labs_own_sockets_are_refused() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    fx.lab.add_port("v", PortKind::Vde, None).unwrap();
    fx.lab.add_port("d", PortKind::Dgram, Some("calm")).unwrap();
    let vdir = std::path::PathBuf::from(fx.lab.port("v").unwrap().path);
    let dgram_path = std::path::PathBuf::from(fx.lab.port("d").unwrap().path);
    // The data socket the port would make next (001), its own ctl, and
    // another port's socket: a loop into itself, or a bridge between lans.
    for target in [vdir.join("001"), vdir.join("ctl"), dgram_path] {
        let before = fx.stats("v");
        let ctl = raw_ctl(&fx, "v");
        write_all(&ctl, &vde_request(&target)).unwrap();
        assert!(
            closed_by_peer(&ctl, WAIT),
            "request naming {} not refused",
            target.display()
        );
        let s = fx.wait_stats("v", |s| s.rejected_clients > before.rejected_clients);
        assert_eq!(s.connects, before.connects, "{} attached", target.display());
        calm.check();
    }
    // A client's own socket in the port's directory (where libvdeplug
    // puts it, as a dot-file) is fine.
    let own = vdir.join(".12345-00000");
    let data = sys::bound_socket(libc::SOCK_DGRAM, &own).unwrap();
    let ctl = raw_ctl(&fx, "v");
    write_all(&ctl, &vde_request(&own)).unwrap();
    fx.wait_up("v", true);
    drop((ctl, data));
    fx.wait_up("v", false);
    calm.check();
}

/// Links elsewhere that lead to the lab's own sockets: a symlink to a dgram
/// port of the same lan that has no client yet (it would take the vde port
/// as its client: one broadcast would loop without end), a symlink to one
/// of another lan (a bridge), a hard link, a symlinked folder, a symlink to
/// the port's own `ctl` and to another vde port's data socket. Every one is
/// refused, and a broadcast afterwards is delivered once, not looped.
#[test]
fn vde_requests_reaching_the_labs_sockets_through_links_are_refused() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    fx.lan("l");
    fx.lab.add_port("v", PortKind::Vde, Some("l")).unwrap();
    let mut d = fx.plug("d", PortKind::Dgram, Some("l"));
    let _w = fx.plug("w", PortKind::Vde, Some("l"));
    fx.lab
        .add_port("lonely", PortKind::Dgram, Some("l"))
        .unwrap();
    fx.lab
        .add_port("far", PortKind::Dgram, Some("calm"))
        .unwrap();
    let path = |p: &str| std::path::PathBuf::from(fx.lab.port(p).unwrap().path);
    let links = fx.scratch.join("links");
    std::fs::create_dir(&links).unwrap();
    let mut targets = Vec::new();
    for (name, to, hard) in [
        ("same-lan", path("lonely"), false),
        ("other-lan", path("far"), false),
        ("hard-same-lan", path("lonely"), true),
        ("hard-other-lan", path("far"), true),
        ("same-lan-taken", path("d"), false),
        ("own-ctl", path("v").join("ctl"), false),
        ("other-vde-data", path("w").join("001"), false),
    ] {
        assert!(to.exists(), "{} missing", to.display());
        let link = links.join(name);
        if hard {
            std::fs::hard_link(&to, &link).unwrap();
        } else {
            std::os::unix::fs::symlink(&to, &link).unwrap();
        }
        targets.push(link);
    }
    // A symlinked folder holding the link, too.
    let via_dir = fx.scratch.join("via");
    std::os::unix::fs::symlink(fx.lab.ports_dir(), &via_dir).unwrap();
    targets.push(via_dir.join("lonely"));
    for target in targets {
        let before = fx.stats("v");
        let ctl = raw_ctl(&fx, "v");
        write_all(&ctl, &vde_request(&target)).unwrap();
        assert!(
            closed_by_peer(&ctl, WAIT),
            "request naming {} not refused",
            target.display()
        );
        let s = fx.wait_stats("v", |s| s.rejected_clients > before.rejected_clients);
        assert_eq!(s.connects, before.connects, "{} attached", target.display());
        calm.check();
    }
    // One broadcast on the lan reaches d once; nothing loops.
    let before = fx.stats("d");
    d.send(&frame(MacAddr::BROADCAST, mac(77), 60, 1)).unwrap();
    std::thread::sleep(QUIET);
    let after = fx.stats("d");
    assert_eq!(after.rx_frames - before.rx_frames, 1, "a frame looped");
    assert_eq!(
        after.tx_frames, before.tx_frames,
        "d got its own frame back"
    );
    for p in ["lonely", "far"] {
        assert!(!fx.lab.port(p).unwrap().up, "{p} took a client");
    }
    // A real client of v still gets in.
    let _ok = Endpoint::connect(PortKind::Vde, path("v").as_ref(), &fx.scratch).unwrap();
    fx.wait_up("v", true);
    calm.check();
}

/// Another port's client is not the vde client's to name either: a dgram
/// port's client that sends from an unconnected socket (as QEMU's dgram
/// netdev does) is claimed while it is that port's peer, so a vde request
/// naming it (or a link to it) cannot carry this lan's frames to it.
#[test]
fn vde_requests_naming_another_ports_client_are_refused() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    fx.lan("l");
    fx.lab.add_port("v", PortKind::Vde, Some("l")).unwrap();
    let guest = fx.scratch.join("guest.sock");
    let g = sys::bound_socket(libc::SOCK_DGRAM, &guest).unwrap();
    // A dgram port (on no lan while its client says hello) whose client
    // sends from an unconnected socket.
    fx.lab.add_port("gd", PortKind::Dgram, None).unwrap();
    let port_path = std::path::PathBuf::from(fx.lab.port("gd").unwrap().path);
    let dest = UnixAddr::from_path(&port_path).unwrap();
    let f = frame(MacAddr::BROADCAST, mac(3), 60, 1);
    sys::send_batch(&g, &[&f], Some(&dest)).unwrap();
    fx.wait_up("gd", true);
    fx.lab.move_port("gd", Some("calm")).unwrap();
    let link = fx.scratch.join("guest-link");
    std::os::unix::fs::symlink(&guest, &link).unwrap();
    for target in [&guest, &link] {
        let before = fx.stats("v");
        let ctl = raw_ctl(&fx, "v");
        write_all(&ctl, &vde_request(target)).unwrap();
        assert!(
            closed_by_peer(&ctl, WAIT),
            "request naming {} not refused",
            target.display()
        );
        let s = fx.wait_stats("v", |s| s.rejected_clients > before.rejected_clients);
        assert_eq!(s.connects, before.connects);
        calm.check();
    }
    // Once that port is gone its client is nobody's: the vde port may
    // take it.
    rt().block_on(fx.lab.remove_port("gd")).unwrap();
    let ctl = raw_ctl(&fx, "v");
    write_all(&ctl, &vde_request(&guest)).unwrap();
    fx.wait_up("v", true);
    drop((ctl, g));
}

/// A dgram port told to expect its client at a path that is a link to
/// another port's socket never connects there.
#[test]
fn a_dgram_peer_path_leading_to_the_labs_own_socket_is_refused() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    // A port with no client yet: its socket accepts a connect.
    fx.lab
        .add_port("far", PortKind::Dgram, Some("calm"))
        .unwrap();
    let other = std::path::PathBuf::from(fx.lab.port("far").unwrap().path);
    for (name, hard) in [("sym", false), ("hard", true)] {
        let link = fx.scratch.join(name);
        if hard {
            std::fs::hard_link(&other, &link).unwrap();
        } else {
            std::os::unix::fs::symlink(&other, &link).unwrap();
        }
        fx.lab
            .add_port_with(
                name,
                PortKind::Dgram,
                Some("calm"),
                &ulan::ports::PortOptions {
                    dgram_peer: Some(link.clone()),
                },
            )
            .unwrap();
        // Ticks come once a second: give it three.
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !fx.lab.port(name).unwrap().up,
            "{name}: connected to a port"
        );
        calm.check();
        // The real client bound there instead is taken.
        std::fs::remove_file(&link).unwrap();
        let mut client = Endpoint::connect_bound(
            PortKind::Dgram,
            fx.lab.port(name).unwrap().path.as_ref(),
            &link,
        )
        .unwrap();
        fx.wait_up(name, true);
        calm.x
            .send(&frame(MacAddr::BROADCAST, mac(9), 60, 5))
            .unwrap();
        assert_eq!(tag_of(&client.recv(WAIT).unwrap().unwrap()), Some(5));
        let _ = calm.y.recv(QUIET);
    }
}

#[test]
fn a_vde_client_chattering_on_its_control_connection_is_cut_off() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    fx.lab.add_port("v", PortKind::Vde, Some("calm")).unwrap();
    let own = fx.scratch.join("chatter.sock");
    let _data = sys::bound_socket(libc::SOCK_DGRAM, &own).unwrap();
    let ctl = raw_ctl(&fx, "v");
    write_all(&ctl, &vde_request(&own)).unwrap();
    fx.wait_up("v", true);
    let before = fx.stats("v");
    // Write on the control connection as fast as it takes it, from a
    // thread, while the bystanders must keep talking.
    let writer = {
        let ctl = ctl.try_clone().unwrap();
        std::thread::spawn(move || {
            let junk = [0x5au8; 16 * 1024];
            let deadline = std::time::Instant::now() + WAIT;
            while std::time::Instant::now() < deadline {
                match sys::write(&ctl, &junk) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => return true, // cut off
                }
            }
            false
        })
    };
    for _ in 0..20 {
        calm.check();
    }
    assert!(
        writer.join().unwrap(),
        "the chattering client was never cut off"
    );
    let s = fx.wait_stats("v", |s| s.rejected_clients > before.rejected_clients);
    assert_eq!(s.disconnects, before.disconnects + 1);
    fx.wait_up("v", false);
    // The port takes the next client.
    let path = fx.lab.port("v").unwrap().path;
    let _ok = Endpoint::connect(PortKind::Vde, path.as_ref(), &fx.scratch).unwrap();
    fx.wait_up("v", true);
    calm.check();
}

/// Clients connecting and hanging up in a loop on an occupied port: they
/// are refused and counted, the port's own client and everyone else keep
/// talking.
#[test]
fn a_connect_flood_on_an_occupied_port_slows_nobody() {
    let fx = Fixture::new();
    let mut calm = Bystanders::new(&fx);
    fx.lan("l");
    let mut owner = fx.plug("s", PortKind::Stream, Some("l"));
    let mut peer = fx.plug("p", PortKind::Dgram, Some("l"));
    let path = std::path::PathBuf::from(fx.lab.port("s").unwrap().path);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let fd = sys::unix_socket(libc::SOCK_STREAM).unwrap();
                    if sys::connect(&fd, &UnixAddr::from_path(&path).unwrap()).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    for i in 0..50u32 {
        calm.check();
        peer.send(&frame(MacAddr::BROADCAST, mac(7), 80, i))
            .unwrap();
        assert_eq!(tag_of(&owner.recv(WAIT).unwrap().unwrap()), Some(i));
    }
    stop.store(true, Ordering::Relaxed);
    let connected: u64 = flooders.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(connected > 0, "the flood never got through to the listener");
    let s = fx.wait_stats("s", |s| s.rejected_clients > 0);
    assert_eq!(s.connects, 1, "the owner stays the only client");
    assert!(fx.lab.port("s").unwrap().up);
}

#[test]
fn silent_vde_client_times_out_and_frees_the_port() {
    let fx = Fixture::new();
    fx.lab.add_port("v", PortKind::Vde, None).unwrap();
    let ctl = raw_ctl(&fx, "v");
    assert!(
        closed_by_peer(&ctl, Duration::from_secs(9)),
        "silent client kept the port"
    );
    assert_eq!(fx.stats("v").rejected_clients, 1);
    let path = fx.lab.port("v").unwrap().path;
    let _ok = Endpoint::connect(PortKind::Vde, path.as_ref(), &fx.scratch).unwrap();
    fx.wait_up("v", true);
}

#[test]
fn a_client_that_never_reads_loses_frames_and_slows_nobody() {
    for stuck_kind in [
        PortKind::Stream,
        PortKind::Vde,
        PortKind::Bess,
        PortKind::Dgram,
    ] {
        let fx = Fixture::new();
        fx.lan("l");
        let mut src = fx.plug("src", PortKind::Dgram, Some("l"));
        let good = fx.plug("good", PortKind::Stream, Some("l"));
        let stuck = fx.plug("stuck", stuck_kind, Some("l"));
        // Send until the stuck client's kernel buffer and our queue are
        // full and frames drop, while the good reader keeps up.
        let progress = Arc::new(AtomicUsize::new(0));
        let total = Arc::new(AtomicUsize::new(usize::MAX));
        let (seen, want) = (progress.clone(), total.clone());
        let mut good = good;
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            while got < want.load(Ordering::Acquire) {
                let Some(f) = good.recv(WAIT).unwrap() else {
                    break;
                };
                assert_eq!(tag_of(&f), Some(got as u32), "good port lost frame {got}");
                got += 1;
                seen.store(got, Ordering::Release);
            }
            got
        });
        let mut sent = 0usize;
        while sent < 200_000 {
            for _ in 0..1000 {
                while sent > progress.load(Ordering::Acquire) + 16 {
                    std::thread::yield_now();
                }
                src.send(&frame(MacAddr::BROADCAST, mac(1), 1500, sent as u32))
                    .unwrap();
                sent += 1;
            }
            if fx.stats("stuck").tx_drop_queue_full > 0 {
                break;
            }
        }
        total.store(sent, Ordering::Release);
        let n = sent;
        assert_eq!(reader.join().unwrap(), n, "{stuck_kind:?}");
        let s = fx.stats("stuck");
        assert!(
            s.tx_drop_queue_full > 0,
            "{stuck_kind:?}: nothing dropped? {s:?}"
        );
        // Once the stuck client goes, what was still queued for it counts
        // as lost: every frame is accounted for exactly.
        drop(stuck);
        fx.wait_up("stuck", false);
        let s = fx.wait_stats("stuck", |s| s.tx_frames + s.tx_dropped == n as u64);
        assert_eq!(s.tx_drop_queue_full + s.tx_drop_error, s.tx_dropped);
        assert_eq!(fx.stats("good").tx_dropped, 0);
    }
}

#[test]
fn source_mac_flood_is_bounded() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut a = fx.plug("a", PortKind::Dgram, Some("l"));
    let _b = fx.plug("b", PortKind::Dgram, Some("l"));
    for i in 0..20_000u32 {
        a.send(&frame(MacAddr::BROADCAST, mac(i + 1), 60, i))
            .unwrap();
    }
    let s = fx.wait_stats("a", |s| s.rx_frames >= 20_000);
    assert!(s.fdb_full > 0, "table grew without bound: {s:?}");
    let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
    assert!(fdb.len() <= ulan::switch::fdb::DEFAULT_FDB_CAPACITY);
}

/// Sends `n` frames from a stranger; returns how many the kernel took
/// (the rest it refused with EPERM: the port's socket was connected to
/// its client by then).
fn stranger_sends(stray: &mut Endpoint, n: u32, tag: u32) -> u64 {
    let mut taken = 0;
    for k in 0..n {
        match stray.send(&frame(MacAddr::BROADCAST, mac(66), 60, tag + k)) {
            Ok(()) => taken += 1,
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }
    taken
}

/// A stranger's datagrams do not displace a live client, whether the
/// port's socket is still unconnected (nothing sent to the client yet:
/// the stranger's frames are dropped and counted) or connected (the
/// kernel refuses them). Every stranger datagram the kernel took is in
/// `rx_drop_stranger`, and none reaches the lan.
#[test]
fn dgram_port_belongs_to_its_client_until_that_client_is_gone() {
    let fx = Fixture::new();
    fx.lan("l");
    let mut first = fx.plug("d", PortKind::Dgram, Some("l"));
    let mut peer = fx.plug("peer", PortKind::Stream, Some("l"));
    let path = fx.lab.port("d").unwrap().path;
    let mut stray = Endpoint::connect(PortKind::Dgram, path.as_ref(), &fx.scratch).unwrap();
    let before = fx.stats("d");
    // Nothing was sent to the client yet: the port's socket hears everyone.
    let taken = stranger_sends(&mut stray, 20, 100);
    assert_eq!(taken, 20, "an unconnected port refused a stranger");
    let s = fx.wait_stats("d", |s| {
        s.rx_drop_stranger - before.rx_drop_stranger == taken
    });
    assert_eq!(s.rx_dropped - before.rx_dropped, taken);
    assert_eq!(
        s.rx_frames, before.rx_frames,
        "a stranger's frame counted as the client's"
    );
    assert_eq!(
        (s.connects, s.disconnects),
        (before.connects, before.disconnects)
    );
    assert!(
        peer.recv(QUIET).unwrap().is_none(),
        "a stranger's frame was forwarded"
    );
    first
        .send(&frame(MacAddr::BROADCAST, mac(1), 60, 1))
        .unwrap();
    assert_eq!(tag_of(&peer.recv(WAIT).unwrap().unwrap()), Some(1));
    peer.send(&frame(mac(1), mac(2), 60, 2)).unwrap();
    assert_eq!(tag_of(&first.recv(WAIT).unwrap().unwrap()), Some(2));
    // Now connected to its client: the kernel refuses the stranger.
    let before = fx.stats("d");
    let taken = stranger_sends(&mut stray, 20, 200);
    assert_eq!(taken, 0, "a connected port let a stranger through");
    first
        .send(&frame(MacAddr::BROADCAST, mac(1), 60, 3))
        .unwrap();
    assert_eq!(tag_of(&peer.recv(WAIT).unwrap().unwrap()), Some(3));
    let s = fx.stats("d");
    assert_eq!(s.rx_drop_stranger, before.rx_drop_stranger);
    assert_eq!(
        s.disconnects, before.disconnects,
        "the client was displaced"
    );
    assert!(fx.lab.port("d").unwrap().up);
    // The client goes away (its socket file with it): within a check the
    // port lets go, and the next sender becomes its client.
    drop(first);
    fx.wait_up("d", false);
    stray
        .send(&frame(MacAddr::BROADCAST, mac(66), 60, 4))
        .unwrap();
    assert_eq!(tag_of(&peer.recv(WAIT).unwrap().unwrap()), Some(4));
    fx.wait_up("d", true);
    peer.send(&frame(mac(66), mac(2), 60, 5)).unwrap();
    assert_eq!(tag_of(&stray.recv(WAIT).unwrap().unwrap()), Some(5));
}
