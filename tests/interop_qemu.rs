//! Real user-mode network stacks on ulan ports, no guest needed.
//!
//! QEMU (7.2+): QEMU's user-mode
//! network (slirp, `restrict=on`: nothing leaves the machine) is put on a
//! QEMU hub with a `stream` or `vde` netdev plugged into ulan. A synthetic
//! client on the same lan asks slirp's gateway address by ARP; the answer
//! comes from QEMU through its netdev and ulan's port.
//!
//! vde2's `slirpvde` (a VDE client with its own slirp) answers the same
//! question through a `vde` port.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ulan::ports::PortKind;
use ulan::testkit::{mac, Endpoint};
use ulan::wire::{write_header, EthernetFrame, MacAddr};

const SLIRP_GW_MAC: &str = "52:55:0a:00:02:02";

fn qemu_usable() -> Result<(), String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
    if !out.status.success() {
        return Err("qemu-system-x86_64 --version failed".into());
    }
    Ok(())
}

fn arp_who_has_gateway(src: MacAddr) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    write_header(&mut f, MacAddr::BROADCAST, src, 0x0806);
    let arp = &mut f[14..42];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    arp[8..14].copy_from_slice(&src.0);
    arp[14..18].copy_from_slice(&[10, 0, 2, 15]);
    arp[24..28].copy_from_slice(&[10, 0, 2, 2]);
    f
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_with(netdev: String) -> Qemu {
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-nodefaults", "-display", "none"])
        .args(["-netdev", "user,id=u0,restrict=on"])
        .args(["-netdev", "hubport,id=h0,hubid=0,netdev=u0"])
        .args(["-netdev", &netdev])
        .args(["-netdev", "hubport,id=h1,hubid=0,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu");
    Qemu(child)
}

/// Sends an ARP request for 10.0.2.2 from `me` and returns the reply.
fn ask_gateway(me: &mut Endpoint) -> Vec<u8> {
    me.send(&arp_who_has_gateway(mac(0x99))).unwrap();
    loop {
        let f = me.recv(WAIT).unwrap().expect("no ARP reply");
        let eth = EthernetFrame::new_checked(&f).unwrap();
        if eth.ethertype() == 0x0806 && f[20..22] == 2u16.to_be_bytes() {
            assert_eq!(eth.dst(), mac(0x99), "reply not unicast to the asker");
            assert_eq!(&f[28..32], &[10, 0, 2, 2]);
            return f;
        }
    }
}

#[test]
fn slirpvde_answers_through_a_vde_port() {
    let found = Command::new("sh")
        .args(["-c", "command -v slirpvde"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "slirpvde missing under CI"
        );
        ulan::testkit::skipped(format_args!(
            "slirpvde is not installed (apt-get install vde2)"
        ));
        return;
    }
    let fx = Fixture::new();
    fx.lan("l");
    let v = fx.lab.add_port("v", PortKind::Vde, Some("l")).unwrap();
    let _slirp = Qemu(
        Command::new("slirpvde")
            .args(["-s", &v.path])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start slirpvde"),
    );
    fx.wait_up("v", true);
    let mut me = fx.plug("me", PortKind::Stream, Some("l"));
    let reply = ask_gateway(&mut me);
    let gw = EthernetFrame::new_checked(&reply).unwrap().src();
    let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
    assert!(
        fdb.iter().any(|e| e.mac == gw.to_string() && e.port == "v"),
        "{fdb:?}"
    );
}

#[test]
fn qemu_stream_and_vde_netdevs_answer_through_ulan() {
    if let Err(why) = qemu_usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot run under CI: {why}"
        );
        ulan::testkit::skipped(format_args!("QEMU interop needs qemu-system-x86_64: {why}"));
        return;
    }
    for kind in [PortKind::Stream, PortKind::Vde] {
        let fx = Fixture::new();
        fx.lan("l");
        let q = fx.lab.add_port("q", kind, Some("l")).unwrap();
        let netdev = match kind {
            PortKind::Stream => format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                q.path
            ),
            _ => format!("vde,id=n0,sock={}", q.path),
        };
        let _qemu = qemu_with(netdev);
        fx.wait_up("q", true);
        let mut me: Endpoint = fx.plug("me", PortKind::Dgram, Some("l"));
        let reply = ask_gateway(&mut me);
        let eth = EthernetFrame::new_checked(&reply).unwrap();
        assert_eq!(eth.src().to_string(), SLIRP_GW_MAC, "{kind:?}");
        let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
        assert!(
            fdb.iter().any(|e| e.mac == SLIRP_GW_MAC && e.port == "q"),
            "{kind:?}: {fdb:?}"
        );
    }
}

/// QEMU with slirp on a hub, a `dgram` netdev `n0` bound at `own` and
/// sending to the ulan port at `port`, and a second dgram netdev bound at
/// `inject` on the same hub: a datagram sent there comes out of `n0` as
/// QEMU's own frame (what a guest would send at boot).
fn qemu_dgram(own: &std::path::Path, port: &str, inject: &std::path::Path) -> Qemu {
    let n0 = format!(
        "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={port}",
        own.display()
    );
    // QEMU wants a remote; nobody is bound there, and QEMU ignores that.
    let inj = format!(
        "dgram,id=inj,local.type=unix,local.path={},remote.type=unix,remote.path={}.nobody",
        inject.display(),
        inject.display()
    );
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-nodefaults", "-display", "none"])
        .args(["-netdev", "user,id=u0,restrict=on"])
        .args(["-netdev", "hubport,id=h0,hubid=0,netdev=u0"])
        .args(["-netdev", &n0])
        .args(["-netdev", "hubport,id=h1,hubid=0,netdev=n0"])
        .args(["-netdev", &inj])
        .args(["-netdev", "hubport,id=h2,hubid=0,netdev=inj"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu");
    Qemu(child)
}

/// Waits until someone is bound at `path` (a connect succeeds: a stale
/// socket file refuses it); returns when that happened.
fn wait_bound(path: &std::path::Path) -> std::time::Instant {
    use ulan::ports::sys;
    let probe = sys::unix_socket(libc::SOCK_DGRAM).unwrap();
    let addr = sys::UnixAddr::from_path(path).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while sys::connect(&probe, &addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU never bound {path:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::time::Instant::now()
}

/// Waits for the event saying port `q` came up with `peer` as its
/// client; returns when it was seen. `inject`, if given, is sent a frame
/// every 20 ms meanwhile (QEMU speaking, as a booting guest would).
fn wait_client(
    events: &mut tokio::sync::broadcast::Receiver<ulan::events::EventRecord>,
    peer: &std::path::Path,
    inject: Option<&std::path::Path>,
) -> std::time::Instant {
    use ulan::events::Event;
    let want = peer.display().to_string();
    let injector = ulan::ports::sys::unix_socket(libc::SOCK_DGRAM).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        while let Ok(rec) = events.try_recv() {
            if let Event::PortUp { port, peer } = rec.event {
                if port == "q" && peer.as_deref() == Some(want.as_str()) {
                    return std::time::Instant::now();
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "port q never took {want}"
        );
        if let Some(path) = inject {
            let to = ulan::ports::sys::UnixAddr::from_path(path).unwrap();
            let _ = ulan::ports::sys::send_batch(
                &injector,
                &[&arp_who_has_gateway(mac(0x77))],
                Some(&to),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills QEMU (SIGKILL: no word, its socket file stays); returns when.
fn kill(q: Qemu) -> std::time::Instant {
    drop(q);
    std::time::Instant::now()
}

/// QEMU's dgram netdev on a ulan `dgram` port, killed and restarted, with
/// nothing sent on the lan meanwhile: the port lets the dead one go within
/// a second, takes a QEMU restarted on the same path within a second of
/// its socket appearing without waiting for it to speak, and one on a new
/// path within a second, at its first frame. Frames flow each time (slirp
/// answers ARP through the port).
#[test]
fn qemu_dgram_netdev_restarted_reattaches_within_a_second() {
    if let Err(why) = qemu_usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot run under CI: {why}"
        );
        ulan::testkit::skipped(format_args!("QEMU interop needs qemu-system-x86_64: {why}"));
        return;
    }
    let second = Duration::from_secs(1);
    let fx = Fixture::new();
    fx.lan("l");
    let q = fx.lab.add_port("q", PortKind::Dgram, Some("l")).unwrap();
    let mut me: Endpoint = fx.plug("me", PortKind::Stream, Some("l"));
    let mut events = fx.lab.events().subscribe();
    let own = fx.scratch.join("qemu.sock");
    let inject = fx.scratch.join("inject.sock");

    // First start: QEMU speaks first (the port does not know its path).
    let qemu = qemu_dgram(&own, &q.path, &inject);
    wait_bound(&inject);
    wait_client(&mut events, &own, Some(&inject));
    ask_gateway(&mut me);
    let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
    assert!(
        fdb.iter().any(|e| e.mac == SLIRP_GW_MAC && e.port == "q"),
        "{fdb:?}"
    );

    // Killed: let go within a second, with no traffic.
    let died = kill(qemu);
    fx.wait_up("q", false);
    eprintln!("dead QEMU let go after {:?}", died.elapsed());
    assert!(
        died.elapsed() < second,
        "dead QEMU held the port {:?}",
        died.elapsed()
    );
    assert!(
        own.exists(),
        "QEMU's socket file went away (the test wants it stale)"
    );

    // Restarted on the same path: back without a frame from anyone.
    let qemu = qemu_dgram(&own, &q.path, &inject);
    let bound = wait_bound(&own);
    let up = wait_client(&mut events, &own, None);
    let took = up.duration_since(bound);
    eprintln!("same path: reattached {took:?} after QEMU bound it");
    assert!(took < second, "same path: reattached after {took:?}");
    ask_gateway(&mut me);

    // Killed again, restarted on a new path: taken at its first frame.
    let died = kill(qemu);
    fx.wait_up("q", false);
    eprintln!("dead QEMU let go after {:?}", died.elapsed());
    assert!(
        died.elapsed() < second,
        "dead QEMU held the port {:?}",
        died.elapsed()
    );
    let own2 = fx.scratch.join("qemu-new.sock");
    let inject2 = fx.scratch.join("inject-new.sock");
    let _qemu = qemu_dgram(&own2, &q.path, &inject2);
    let bound = wait_bound(&inject2);
    let up = wait_client(&mut events, &own2, Some(&inject2));
    let took = up.duration_since(bound);
    eprintln!("new path: reattached {took:?} after QEMU started");
    assert!(took < second, "new path: reattached after {took:?}");
    ask_gateway(&mut me);
    let s = fx.stats("q");
    assert_eq!((s.connects, s.disconnects), (3, 2), "{s:?}");
}
