//! Tap ports against the real kernel, rootless: taps made in user + network
//! namespaces by an unprivileged user (`ulan-test` when the tests run as
//! root) and handed to the daemon, which runs as that user too.
//!
//! - two namespaces, each with a tap on one lan (`ulan tap-attach`), ping
//!   each other and run iperf3 (the daemon a real `ulan daemon` process);
//! - in one namespace (this test binary run again inside it, the lab in
//!   process): a tap and a socket endpoint exchange ARP and UDP; a TCP
//!   super-frame sent out of a tap reaches a vhost-user guest that took
//!   TSO whole and one that did not segmented; hostile handovers are
//!   refused with their reasons while the switch keeps forwarding; a later
//!   handover replaces the tap and deleting it takes the port down.

mod common;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::CliUser;
use common::unprivileged::{test_user, TestUser};
use common::Fixture;
use ulan::ports::tap::client::{self, create_tap, hand_over, hand_over_with, TapError};
use ulan::ports::tap::handover;
use ulan::ports::tap::tun;
use ulan::ports::PortKind;
use ulan::testkit::offload_check::{check, TcpSpec};
use ulan::testkit::vhost_frontend::features::*;
use ulan::testkit::vhost_frontend::VhostFrontend;
use ulan::testkit::Endpoint;
use ulan::wire::MacAddr;

const BIN: &str = env!("CARGO_BIN_EXE_ulan");
const INSIDE: &str = "ULAN_TAP_TEST_NETNS";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The user to run as, or why these tests cannot run here.
fn usable(tools: &[&str]) -> Result<TestUser, String> {
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing (modprobe tun)".into());
    }
    for t in ["unshare", "ip"].iter().chain(tools) {
        if !have(t) {
            return Err(format!("{t} is not installed"));
        }
    }
    let user = test_user()?;
    let out = user
        .command("unshare")
        .args(["--user", "--map-root-user", "--net"])
        .args(["sh", "-c", "ip tuntap add t0 mode tap"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "uid {} cannot make a tap in a user namespace: {}",
            user.uid,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(user)
}

/// Skips loudly (fails under CI) when the tests cannot run.
fn user_or_skip(tools: &[&str]) -> Option<TestUser> {
    match usable(tools) {
        Ok(u) => Some(u),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot run under CI: {why}"
            );
            ulan::testkit::skipped(format_args!("tap tests need {why}"));
            None
        }
    }
}

/// True inside the namespace (run the body). Outside, runs test `name`
/// of this binary again inside a fresh user + network namespace as the
/// test user, checks that it passed, and returns false.
fn inside(name: &str) -> bool {
    if std::env::var(INSIDE).as_deref() == Ok(name) {
        return true;
    }
    let Some(user) = user_or_skip(&[]) else {
        return false;
    };
    let exe = std::env::current_exe().unwrap();
    let out = user
        .command("unshare")
        .args(["--user", "--map-root-user", "--net"])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(INSIDE, name)
        .env("TMPDIR", "/tmp")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "inside the namespace (uid {}):\n{text}",
        user.uid
    );
    false
}

fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tap_path(fx: &Fixture, port: &str) -> PathBuf {
    fx.lab.ports_dir().join(port)
}

const MAC_T: [u8; 6] = [0x02, 0x7a, 0, 0, 0, 1];
const MAC_E: [u8; 6] = [0x02, 0x7e, 0, 0, 0, 2];
const IP_T: [u8; 4] = [10, 77, 0, 1];
const IP_E: [u8; 4] = [10, 77, 0, 2];

fn arp(op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4], dst: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend(dst);
    f.extend(sha);
    f.extend(0x0806u16.to_be_bytes());
    f.extend([0, 1, 8, 0, 6, 4]);
    f.extend(op.to_be_bytes());
    f.extend(sha);
    f.extend(spa);
    f.extend(tha);
    f.extend(tpa);
    f.resize(60, 0);
    f
}

/// A tap (kernel side in this namespace) and a dgram endpoint of the
/// testkit on one lan: the kernel's ARP request reaches the endpoint, the
/// endpoint's ARP reply reaches the kernel (which then sends its UDP
/// datagram to the endpoint's MAC), and both ports count it.
#[test]
fn a_tap_and_a_dgram_endpoint_exchange_arp_and_udp() {
    const NAME: &str = "a_tap_and_a_dgram_endpoint_exchange_arp_and_udp";
    if !inside(NAME) {
        return;
    }
    let fx = Fixture::new();
    fx.lan("l");
    fx.lab.add_port("t", PortKind::Tap, Some("l")).unwrap();
    let mut ep = fx.plug("e", PortKind::Dgram, Some("l"));
    let tap = create_tap("t0", MAC_T, Some(1500)).unwrap();
    hand_over(&tap_path(&fx, "t"), tap.as_fd()).unwrap();
    fx.wait_up("t", true);
    sh("ip addr add 10.77.0.1/24 dev t0");

    let udp = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
    udp.send_to(b"hello over a tap", "10.77.0.2:9").unwrap();
    let (mut arp_requests, mut datagram) = (0, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while datagram.is_none() && Instant::now() < deadline {
        let Some(f) = ep.recv(Duration::from_millis(100)).unwrap() else {
            continue;
        };
        if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == IP_E {
            assert_eq!(&f[6..12], &MAC_T, "the tap's MAC is the one create_tap set");
            arp_requests += 1;
            ep.send(&arp(2, MAC_E, IP_E, MAC_T, IP_T, MAC_T)).unwrap();
        } else if f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 {
            assert_eq!(
                &f[..6],
                &MAC_E,
                "sent to the MAC the endpoint answered with"
            );
            datagram = Some(f[42..].to_vec());
        }
    }
    assert!(arp_requests >= 1, "no ARP request came out of the tap");
    assert_eq!(datagram.as_deref(), Some(&b"hello over a tap"[..]));
    let neigh = sh("ip neigh show 10.77.0.2 dev t0");
    assert!(neigh.contains("02:7e:00:00:00:02"), "{neigh}");
    let t = fx.wait_stats("t", |c| c.rx_frames >= 2 && c.tx_frames >= 1);
    let e = fx.stats("e");
    assert!(e.tx_frames >= 2 && e.rx_frames >= 2, "{e:?}");
    assert_eq!(t.connects, 1);
    assert_eq!(t.rx_dropped + t.tx_dropped, 0, "{t:?}");
    fx.lab.shutdown();
}

/// Sends `frame` with virtio-net header `hdr` out of interface `ifname`
/// (AF_PACKET with PACKET_VNET_HDR), as the kernel's own TCP would hand
/// a super-frame to the device.
fn send_with_vnet(ifname: &str, hdr: [u8; 10], frame: &[u8]) {
    // SAFETY: plain socket call; owned at once.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: raw is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let on: libc::c_int = 1;
    // SAFETY: an int option.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&on as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(r, 0, "PACKET_VNET_HDR: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0);
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = index as i32;
    sll.sll_protocol = 0x0800u16.to_be();
    let mut msg = hdr.to_vec();
    msg.extend_from_slice(frame);
    // SAFETY: msg and sll are valid for their sizes.
    let r = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        r as usize,
        msg.len(),
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// The test's own frames: the kernel also sends IPv6 router and
/// multicast listener messages out of a tap that comes up.
fn is_ipv4_tcp(f: &[u8]) -> bool {
    f.len() > 34 && f[12..14] == [0x08, 0x00] && f[23] == 6
}

/// A TCP super-frame (30 KB) leaves the kernel through a tap with its
/// request in the vnet header: a vhost-user guest that acked TSO gets it
/// whole with the same request, one that did not gets valid segments.
/// And back: the TSO guest's super-frame enters the tap's kernel side as
/// one GSO packet.
#[test]
fn a_gso_frame_from_a_tap_reaches_vhost_user_whole_or_segmented_as_negotiated() {
    const NAME: &str = "a_gso_frame_from_a_tap_reaches_vhost_user_whole_or_segmented_as_negotiated";
    if !inside(NAME) {
        return;
    }
    let fx = Fixture::new();
    fx.lan("l");
    fx.lab.add_port("t", PortKind::Tap, Some("l")).unwrap();
    fx.lab
        .add_port("vt", PortKind::VhostUser, Some("l"))
        .unwrap();
    fx.lab
        .add_port("vn", PortKind::VhostUser, Some("l"))
        .unwrap();
    let tso = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4;
    let mut fvt = VhostFrontend::builder(tap_path(&fx, "vt"))
        .features(tso)
        .big_frames(true)
        .connect()
        .unwrap();
    let mut fvn = VhostFrontend::builder(tap_path(&fx, "vn"))
        .features(0)
        .connect()
        .unwrap();
    let tap = create_tap("t0", MAC_T, None).unwrap();
    hand_over(&tap_path(&fx, "t"), tap.as_fd()).unwrap();
    for p in ["t", "vt", "vn"] {
        fx.wait_up(p, true);
    }
    assert!(fvt.negotiated().has(VIRTIO_NET_F_GUEST_TSO4));
    assert!(!fvn.negotiated().has(VIRTIO_NET_F_GUEST_TSO4));

    let (sup, off) = TcpSpec {
        payload_len: 30_000,
        gso_size: 1448,
        ..TcpSpec::default()
    }
    .build();
    let (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) = off.to_virtio();
    let mut hdr = [0u8; 10];
    hdr[0] = flags;
    hdr[1] = gso_type;
    hdr[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    hdr[4..6].copy_from_slice(&gso_size.to_le_bytes());
    hdr[6..8].copy_from_slice(&csum_start.to_le_bytes());
    hdr[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    send_with_vnet("t0", hdr, &sup);

    let mut whole = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while whole.is_empty() && Instant::now() < deadline {
        fvt.recv_with_header(|h, f| {
            if is_ipv4_tcp(f) {
                whole.push((*h, f.to_vec()))
            }
        });
        let _ = fvt.wait_rx(Duration::from_millis(20));
    }
    assert_eq!(whole.len(), 1, "the TSO guest gets one frame");
    let (h, f) = &whole[0];
    assert_eq!(f, &sup, "the super-frame unchanged");
    assert_eq!(
        (h.gso_type, h.gso_size, h.flags & 1),
        (gso_type, gso_size, 1)
    );

    let want = 30_000usize.div_ceil(1448);
    let mut segs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while segs.len() < want && Instant::now() < deadline {
        fvn.recv(|f| {
            if is_ipv4_tcp(f) {
                segs.push(f.to_vec())
            }
        });
        let _ = fvn.wait_rx(Duration::from_millis(20));
    }
    let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
    check(&sup, &off, &refs).unwrap_or_else(|e| panic!("segments from ulan: {e}"));
    assert_eq!(segs.len(), want);
    let t = fx.stats("t");
    assert_eq!(t.rx_drop_bad_offload, 0, "{t:?}");

    // The other way: the TSO guest's super-frame goes into the tap whole,
    // with its request in the vnet header, and the kernel takes it as one
    // GSO packet (a packet socket on t0 sees it with the same request).
    let watch = packet_socket("t0");
    let nh = ulan::testkit::vhost_frontend::NetHeader {
        flags,
        gso_type,
        hdr_len,
        gso_size,
        csum_start,
        csum_offset,
        num_buffers: 0,
    };
    assert!(fvt.max_tx_frame() >= sup.len());
    assert_eq!(fvt.send_with_header(&[(nh, &sup)]), 1);
    let (h, f) = recv_incoming(&watch, Duration::from_secs(5))
        .expect("the super-frame never reached the tap's kernel side");
    assert_eq!(f.len(), sup.len(), "one packet, not segments");
    assert_eq!(&f[14..], &sup[14..], "the packet unchanged");
    assert_eq!(h[1], gso_type, "the kernel kept the segmentation request");
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), gso_size);
    let t = fx.wait_stats("t", |c| c.tx_frames >= 1);
    assert_eq!(t.tx_dropped, 0, "{t:?}");
    assert!(t.tx_bytes >= sup.len() as u64, "{t:?}");
    fx.lab.shutdown();
}

/// A packet socket on `ifname` that receives with vnet headers.
fn packet_socket(ifname: &str) -> OwnedFd {
    // SAFETY: plain socket call; owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: raw is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let on: libc::c_int = 1;
    // SAFETY: an int option.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&on as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(r, 0);
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: sockaddr_ll is plain old data; the name is NUL-terminated.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: sll is valid for its size.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    sock
}

/// The next incoming IPv4 TCP packet on a [`packet_socket`]: its vnet
/// header and the frame (outgoing ones, and other traffic, are skipped).
fn recv_incoming(sock: &OwnedFd, within: Duration) -> Option<([u8; 10], Vec<u8>)> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 70_000];
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: sockaddr_ll is plain old data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buf and from are valid for their sizes.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 10 || from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let n = n as usize;
        let f = &buf[10..n];
        if is_ipv4_tcp(f) {
            let mut h = [0u8; 10];
            h.copy_from_slice(&buf[..10]);
            return Some((h, f.to_vec()));
        }
    }
    None
}

/// A tun (layer 3) device, a tap without IFF_NO_PI, or one without a
/// vnet header: what a careless or hostile client might hand over.
fn raw_tun(name: &str, flags: i16) -> OwnedFd {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let fd = OwnedFd::from(f);
    tun::set_iff(fd.as_fd(), name, flags).unwrap();
    fd
}

fn refused(r: Result<(), TapError>, needle: &str) -> String {
    match r {
        Err(TapError::Refused(why)) => why,
        other => panic!("expected a refusal ({needle}), got {other:?}"),
    }
}

/// Every kind of bad handover is refused with its reason, counted, and
/// leaves the port's tap and the rest of the switch alone; a good second
/// handover replaces the tap; deleting the tap takes the port down.
#[test]
fn hostile_handovers_are_refused_while_the_switch_keeps_forwarding() {
    const NAME: &str = "hostile_handovers_are_refused_while_the_switch_keeps_forwarding";
    if !inside(NAME) {
        return;
    }
    let fx = Fixture::new();
    fx.lan("l");
    fx.lab.add_port("t", PortKind::Tap, Some("l")).unwrap();
    let path = tap_path(&fx, "t");
    let mut events = fx.lab.events().subscribe();
    let mut e1 = fx.plug("e1", PortKind::Stream, Some("l"));
    let mut e2 = fx.plug("e2", PortKind::Stream, Some("l"));
    let good = create_tap("t0", MAC_T, None).unwrap();
    hand_over(&path, good.as_fd()).unwrap();
    fx.wait_up("t", true);

    // Meanwhile the switch forwards between e1 and e2.
    let mut tag = 0u32;
    let mut forwards = |e1: &mut Endpoint, e2: &mut Endpoint| {
        tag += 1;
        let f = ulan::testkit::frame(MacAddr(MAC_E), MacAddr([2, 0, 0, 0, 0, 0xe1]), 80, tag);
        e1.send(&f).unwrap();
        // Skip what else is flooded to e2 meanwhile (the kernel's IPv6
        // router and listener messages from the tap, e1's broadcast).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "frame {tag} never reached e2");
            let Some(got) = e2.recv(Duration::from_millis(100)).unwrap() else {
                continue;
            };
            if got[6..12] == [2, 0, 0, 0, 0, 0xe1] && ulan::testkit::tag_of(&got) == Some(tag) {
                break;
            }
        }
    };
    forwards(&mut e1, &mut e2);

    // A client that connects and says nothing: refused on the timer, in a
    // slot of its own while the others go on.
    let silent_path = path.clone();
    let silent = std::thread::spawn(move || {
        let conn = client::connect(&silent_path).unwrap();
        let t0 = Instant::now();
        let answer = client::read_answer(&conn).unwrap();
        (handover::parse_reply(&answer), t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));

    let hdr = client::header_for(good.as_fd());
    let mut expected_refusals = 0;
    let mut expect = |r: Result<(), TapError>, needle: &str| {
        let why = refused(r, needle);
        assert!(why.contains(needle), "{needle:?} not in {why:?}");
        expected_refusals += 1;
    };
    expect(hand_over_with(&path, &hdr, None), "no file descriptor");
    let file = tempfile::tempfile().unwrap();
    expect(
        hand_over_with(&path, &hdr, Some(file.as_fd())),
        "not a tap device",
    );
    let (s1, _s2) = std::os::unix::net::UnixStream::pair().unwrap();
    expect(
        hand_over_with(&path, &hdr, Some(s1.as_fd())),
        "not a tap device",
    );
    let l3 = raw_tun("tun9", tun::IFF_TUN | tun::IFF_NO_PI);
    expect(hand_over(&path, l3.as_fd()), "is a tun (layer 3) device");
    // (A tap without IFF_NO_PI is refused where TUNGETIFF tells: the
    // Linux measured here, 6.18, reports IFF_NO_PI for every tap, so it
    // is not tried.)
    let plain = raw_tun("tpl9", tun::IFF_TAP | tun::IFF_NO_PI);
    expect(
        hand_over_with(&path, &hdr, Some(plain.as_fd())),
        "vnet header",
    );
    // Two fds, garbage, a short header: sent raw.
    let raw_send = |bytes: &[u8], fds: &[i32]| {
        let conn = client::connect(&path).unwrap();
        handover::send_raw(conn.as_fd(), bytes, fds.iter().copied()).unwrap();
        let a = client::read_answer(&conn).unwrap();
        handover::parse_reply(&a)
            .map(drop)
            .map_err(TapError::Refused)
    };
    let two = [good.as_raw_fd(), good.as_raw_fd()];
    expect(raw_send(&hdr.encode(), &two), "2 file descriptors");
    expect(
        raw_send(b"GET / HTTP/1.1\r\n", &[good.as_raw_fd()]),
        "bad magic",
    );
    expect(
        raw_send(&hdr.encode()[..7], &[good.as_raw_fd()]),
        "header is 7 bytes",
    );
    let mut v2 = hdr.encode();
    v2[4] = 2;
    expect(raw_send(&v2, &[good.as_raw_fd()]), "version 2");
    // One that leaves before sending: no answer to give, but counted.
    drop(client::connect(&path).unwrap());
    forwards(&mut e1, &mut e2);

    let (answer, waited) = silent.join().unwrap();
    let why = answer.unwrap_err();
    assert!(why.contains("no handover within"), "{why}");
    assert!(waited >= Duration::from_secs(4), "{waited:?}");
    let want = expected_refusals + 2;
    let c = fx.wait_stats("t", |c| c.rejected_clients >= want);
    assert_eq!(c.rejected_clients, want, "{c:?}");
    assert_eq!((c.connects, c.disconnects), (1, 0), "the tap stayed: {c:?}");
    // Each refusal is an event with its reason.
    let mut reasons = Vec::new();
    while let Ok(rec) = events.try_recv() {
        if let ulan::events::Event::PortRefused { port, reason } = rec.event {
            assert_eq!(port, "t");
            reasons.push(reason);
        }
    }
    assert_eq!(reasons.len() as u64, want, "{reasons:#?}");
    assert!(reasons
        .iter()
        .any(|r| r.contains("is a tun (layer 3) device")));
    assert!(reasons.iter().any(|r| r.contains("disconnected before")));
    assert!(fx.lab.port("t").unwrap().up);
    // The tap still carries frames: e1's broadcast is written into it.
    e1.send(&ulan::testkit::frame(
        MacAddr::BROADCAST,
        MacAddr([2, 0, 0, 0, 0, 0xe1]),
        80,
        999,
    ))
    .unwrap();
    fx.wait_stats("t", |c| c.tx_frames >= 1);
    forwards(&mut e1, &mut e2);

    // A second good handover replaces the first tap.
    let next = create_tap("t1", [2, 0x7a, 0, 0, 0, 9], None).unwrap();
    hand_over(&path, next.as_fd()).unwrap();
    let c = fx.wait_stats("t", |c| c.connects == 2);
    assert_eq!(c.disconnects, 1, "{c:?}");
    assert!(fx.lab.port("t").unwrap().up);
    // Deleting the tap (what ending its namespace does) takes the port down.
    drop(next);
    sh("ip link del t0");
    let _ = std::process::Command::new("ip")
        .args(["link", "del", "t1"])
        .status();
    fx.wait_up("t", false);
    let c = fx.stats("t");
    assert_eq!(c.disconnects, 2, "{c:?}");
    forwards(&mut e1, &mut e2);
    fx.lab.shutdown();
}

/// The daemon and the CLI as the test user (lab "tap").
struct Daemon(common::cli::Daemon);

impl std::ops::Deref for Daemon {
    type Target = common::cli::Daemon;
    fn deref(&self) -> &common::cli::Daemon {
        &self.0
    }
}

impl Daemon {
    fn start(user: TestUser) -> Daemon {
        Daemon(common::cli::Daemon::start(CliUser::as_account("tap", user)))
    }

    fn stats(&self, port: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["--json", "port", "stats", port])).unwrap()
    }

    fn socket(&self, port: &str) -> PathBuf {
        self.run_dir().join("ulan/tap/ports").join(port)
    }

    /// `script` in a new user + network namespace, as the test user.
    fn netns(&self, script: &str) -> Child {
        self.account()
            .expect("run as the test user")
            .command("timeout")
            .args(["60", "unshare", "--user", "--map-root-user", "--net"])
            .args(["sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// Kills a namespace's script if the test fails before it ends.
struct Reap(Option<Child>);

impl Reap {
    fn output(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The receiver's rate in an iperf3 report, Mbit/s.
fn iperf_receiver_mbits(report: &str) -> Option<f64> {
    let line = report.lines().rev().find(|l| l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {v}"))
}

/// Two namespaces of the unprivileged user, each with a tap from `ulan
/// tap-attach` on one lan of a daemon run by that user: they ping each
/// other, and iperf3 moves a TCP stream between them in super-frames.
#[test]
fn two_namespaces_ping_and_run_iperf3_through_tap_ports() {
    let Some(user) = user_or_skip(&["ping", "iperf3", "timeout"]) else {
        return;
    };
    let d = Daemon::start(user);
    d.ok(&["lan", "add", "l"]);
    d.ok(&["port", "add", "a", "--kind", "tap", "--lan", "l"]);
    d.ok(&["port", "add", "b", "--kind", "tap", "--lan", "l"]);
    let a = d.socket("a");
    assert!(a.exists(), "{} missing", a.display());
    let server = Reap(Some(d.netns(&format!(
        "set -e
        {BIN} tap-attach --socket {} --ifname eth0 --mac 02:66:00:00:00:01
        ip link set lo up
        ip addr add 10.66.0.1/24 dev eth0
        exec iperf3 -s -1 -B 10.66.0.1",
        a.display()
    ))));
    let client = Reap(Some(d.netns(&format!(
        "set -e
        {BIN} tap-attach --socket {} --ifname eth0 --mtu 1500
        ip addr add 10.66.0.2/24 dev eth0
        ping -c 3 -i 0.2 -W 5 10.66.0.1
        for i in $(seq 100); do
            iperf3 -c 10.66.0.1 -t 2 -f m && exit 0
            sleep 0.1
        done
        exit 1",
        d.socket("b").display()
    ))));
    let out = client.output();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client namespace: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(" 0% packet loss"), "{text}");
    let mbits = iperf_receiver_mbits(&text).unwrap_or_else(|| panic!("no rate in {text}"));
    assert!(mbits > 0.0, "{text}");
    let out = server.output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("iperf3 between two namespaces through tap ports: {mbits} Mbit/s");

    // Both taps came up once; towards the server the stream went in
    // TCP super-frames, passed whole from tap to tap.
    let sa = d.stats("a");
    for (p, s) in [("a", &sa), ("b", &d.stats("b"))] {
        assert_eq!(counter(s, "connects"), 1, "{p}: {s}");
        assert_eq!(counter(s, "rx_dropped"), 0, "{p}: {s}");
        assert!(
            counter(s, "rx_frames") > 0 && counter(s, "tx_frames") > 0,
            "{p}: {s}"
        );
    }
    let avg = counter(&sa, "tx_bytes") / counter(&sa, "tx_frames");
    assert!(
        avg > 1514,
        "frames into the server's tap average {avg} bytes: {sa}"
    );
    let ls = d.ok(&["port", "ls"]);
    assert!(ls.contains("tap"), "{ls}");
}

/// `ulan tap-attach` outside a namespace of its own, as an ordinary user:
/// one clear line and a non-zero exit, nothing made.
#[test]
fn tap_attach_without_privilege_or_with_bad_arguments_fails_clearly() {
    let Some(user) = user_or_skip(&[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none");
    let run = |args: &[&str]| {
        let o = user
            .command(BIN)
            .arg("tap-attach")
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    let err = run(&["--ifname", "eth0"]);
    // As root this machine may let the tap be made: then the missing
    // socket is the error.
    assert!(
        err.contains("CAP_NET_ADMIN") || err.contains("cannot connect to the tap port"),
        "{err}"
    );
    assert!(run(&["--mac", "zz:00:00:00:00:01"]).contains("six hex bytes"));
    assert!(run(&["--mac", "01:00:00:00:00:01"]).contains("multicast"));
    assert!(run(&["--ifname", "a/b"]).contains("interface name"));
    assert!(run(&["--mtu", "20"]).contains("MTU 20"));
}

#[test]
fn iperf_report_parsing() {
    let r = "[  5]   0.00-2.00   sec   571 MBytes  2393 Mbits/sec    1   sender\n\
             [  5]   0.00-2.01   sec   570 MBytes  2381.5 Mbits/sec        receiver\n";
    assert_eq!(iperf_receiver_mbits(r), Some(2381.5));
    assert_eq!(iperf_receiver_mbits("nothing"), None);
}
