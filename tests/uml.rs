//! UML on ulan ports.
//!
//! - A synthetic client that does exactly what UML's `daemon` transport
//!   does (arch/um/drivers/daemon_user.c) against a real `vde` port: no
//!   UML needed, always runs.
//! - The UML probe on this host.
//! - A real UML guest with one NIC per UML transport (daemon, vde, bess)
//!   on ulan ports, pinging a synthetic host on each lan. It skips loudly,
//!   even under CI, with the probe's reason when UML cannot boot here.

mod common;

use std::ffi::OsString;
use std::io::Write;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, tag_of};
use ulan::vmlaunch::spec::{stable_mac, NicSpec, NodeKind, NodeSpec, Transport};
use ulan::vmlaunch::uml::{self, UmlNic, UmlPaths, UmlStatus};
use ulan::wire::{write_header, MacAddr};

const SWITCH_MAGIC: u32 = 0xfeed_face;

/// UML tests one at a time: the probe test looks for stray probe
/// processes, which the other test's probe would look like.
static UML_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn uml_lock() -> std::sync::MutexGuard<'static, ()> {
    UML_TESTS.lock().unwrap_or_else(|e| e.into_inner())
}
const SWITCH_VERSION: u32 = 3;
const REQ_NEW_CONTROL: u32 = 0;

fn cvt(r: libc::c_int, what: &str) -> libc::c_int {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

fn sockaddr_path(path: &Path) -> libc::sockaddr_un {
    // SAFETY: plain old data.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_encoded_bytes();
    assert!(b.len() < a.sun_path.len());
    for (d, s) in a.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    a
}

fn as_bytes(a: &libc::sockaddr_un) -> &[u8] {
    // SAFETY: plain old data viewed as bytes.
    unsafe {
        std::slice::from_raw_parts(
            (a as *const libc::sockaddr_un).cast::<u8>(),
            size_of::<libc::sockaddr_un>(),
        )
    }
}

/// UML's daemon transport, step by step as daemon_user.c does it, with
/// blocking sockets and the uninitialised bytes UML leaves in its
/// addresses modelled as garbage.
struct DaemonClient {
    _control: OwnedFd,
    data: OwnedFd,
    switch_data: libc::sockaddr_un,
}

impl DaemonClient {
    fn connect(ctl_path: &Path, seed: u8) -> DaemonClient {
        // SAFETY (whole fn): socket calls on fds we own, with buffers of
        // the sizes we pass.
        unsafe {
            let control = OwnedFd::from_raw_fd(cvt(
                libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0),
                "control socket",
            ));
            let ctl = sockaddr_path(ctl_path);
            cvt(
                libc::connect(
                    control.as_raw_fd(),
                    (&ctl as *const libc::sockaddr_un).cast(),
                    size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ),
                "control connect",
            );
            let data = OwnedFd::from_raw_fd(cvt(
                libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0),
                "data socket",
            ));
            // new_addr(&name, sizeof(name)) into a kmalloc'd sockaddr_un:
            // name = { char zero; int pid; int usecs; }, the rest garbage.
            let mut local: libc::sockaddr_un = std::mem::zeroed();
            local.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, c) in local.sun_path.iter_mut().enumerate() {
                *c = (seed as usize * 31 + i * 7 + 1) as u8 as libc::c_char;
            }
            let usecs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_micros() as i32;
            let mut name = [0u8; 12];
            name[0] = 0; // abstract
            name[1..4].copy_from_slice(&[0xa5, 0x5a, seed]); // padding garbage
            name[4..8].copy_from_slice(&(std::process::id() as i32).to_ne_bytes());
            name[8..12].copy_from_slice(&usecs.to_ne_bytes());
            for (d, s) in local.sun_path.iter_mut().zip(name) {
                *d = s as libc::c_char;
            }
            cvt(
                libc::bind(
                    data.as_raw_fd(),
                    (&local as *const libc::sockaddr_un).cast(),
                    size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ),
                "data bind",
            );
            // struct request_v3 { magic, version, enum type, sockaddr_un }
            let mut req = Vec::new();
            req.extend(SWITCH_MAGIC.to_ne_bytes());
            req.extend(SWITCH_VERSION.to_ne_bytes());
            req.extend(REQ_NEW_CONTROL.to_ne_bytes());
            req.extend_from_slice(as_bytes(&local));
            assert_eq!(req.len(), 122);
            let n = libc::write(control.as_raw_fd(), req.as_ptr().cast(), req.len());
            assert_eq!(n, req.len() as isize, "request write");
            let mut switch_data: libc::sockaddr_un = std::mem::zeroed();
            let n = libc::read(
                control.as_raw_fd(),
                (&mut switch_data as *mut libc::sockaddr_un).cast(),
                size_of::<libc::sockaddr_un>(),
            );
            assert_eq!(
                n,
                size_of::<libc::sockaddr_un>() as isize,
                "read of data socket"
            );
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                data.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
            DaemonClient {
                _control: control,
                data,
                switch_data,
            }
        }
    }

    /// daemon_user_write: net_sendto(fd, buf, len, data_addr, sizeof(*data_addr)).
    fn send(&self, f: &[u8]) {
        // SAFETY: buffer and address of the sizes passed.
        let n = unsafe {
            libc::sendto(
                self.data.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&self.switch_data as *const libc::sockaddr_un).cast(),
                size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        assert_eq!(n, f.len() as isize, "{}", std::io::Error::last_os_error());
    }

    /// daemon_read: net_recvfrom.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 1600];
        // SAFETY: buffer of the size passed; no address wanted.
        let n = unsafe {
            libc::recvfrom(
                self.data.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }
}

#[test]
fn vde_port_accepts_uml_daemon_transport_requests() {
    let fx = Fixture::new();
    fx.lan("l");
    let info = fx
        .lab
        .add_port("u1.eth0", PortKind::Vde, Some("l"))
        .unwrap();
    let mut host = fx.plug("h", PortKind::Dgram, Some("l"));

    let client = DaemonClient::connect(&PathBuf::from(&info.path).join("ctl"), 1);
    fx.wait_up("u1.eth0", true);

    // UML -> host (broadcast first, so the switch learns UML's MAC).
    client.send(&frame(MacAddr::BROADCAST, mac(1), 60, 1));
    assert_eq!(tag_of(&host.recv(WAIT).unwrap().unwrap()), Some(1));
    // host -> UML, unicast to the learned MAC, and a full-size frame.
    host.send(&frame(mac(1), mac(2), 1514, 2)).unwrap();
    let got = client.recv().expect("UML side got nothing");
    assert_eq!((tag_of(&got), got.len()), (Some(2), 1514));
    client.send(&frame(mac(2), mac(1), 1514, 3));
    let got = host.recv(WAIT).unwrap().unwrap();
    assert_eq!((tag_of(&got), got.len()), (Some(3), 1514));
    // Counters are published by the data plane a moment later.
    let st = fx.wait_stats("u1.eth0", |s| s.rx_frames >= 2 && s.tx_frames >= 1);
    assert_eq!((st.rx_frames, st.tx_frames), (2, 1));

    // A second UML NIC's request on another port works alongside.
    let info2 = fx
        .lab
        .add_port("u1.eth1", PortKind::Vde, Some("l"))
        .unwrap();
    let client2 = DaemonClient::connect(&PathBuf::from(&info2.path).join("ctl"), 2);
    fx.wait_up("u1.eth1", true);
    client2.send(&frame(mac(1), mac(3), 60, 4));
    assert_eq!(tag_of(&client.recv().unwrap()), Some(4));

    // UML going away (its control socket closes) takes the port down.
    drop(client);
    fx.wait_up("u1.eth0", false);
    assert!(fx.lab.port("u1.eth1").unwrap().up);
}

#[test]
fn uml_probe_on_this_host() {
    let _one = uml_lock();
    let t0 = Instant::now();
    let status = uml::probe_uml(
        Path::new(uml::DEFAULT_UML_BINARY),
        uml::DEFAULT_PROBE_TIMEOUT,
    );
    eprintln!("UML probe ({:?}): {status:?}", t0.elapsed());
    match &status {
        UmlStatus::Missing => {
            assert!(
                std::env::var_os("CI").is_none(),
                "linux.uml missing under CI: .ci/run should install user-mode-linux"
            );
            ulan::testkit::skipped(format_args!(
                "linux.uml is not installed (apt-get install user-mode-linux)"
            ));
        }
        UmlStatus::Fails { reason } => {
            assert!(!reason.is_empty());
            assert!(!reason.contains('\n'), "one line: {reason:?}");
        }
        UmlStatus::Boots => {}
    }
    assert!(t0.elapsed() < uml::DEFAULT_PROBE_TIMEOUT + Duration::from_secs(5));
    // No UML left behind (the probe kills its process group).
    std::thread::sleep(Duration::from_millis(200));
    let left = std::process::Command::new("pgrep")
        .args(["-f", "umid=ulan-probe"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert!(left.is_empty(), "probe leftovers: {left}");
}

/// The UML guest, killed with its whole process group when dropped.
struct Guest {
    child: Child,
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: signal to the group we created.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn lan_ip(lan: u8, host: u8) -> [u8; 4] {
    [10, 0, lan, host]
}

/// Answers ARP for 10.0.N.1 and ICMP echo requests to it, as a host on
/// lan N would. Returns what was answered.
fn answer(f: &[u8], me: MacAddr, my_ip: [u8; 4]) -> Option<(&'static str, MacAddr, Vec<u8>)> {
    if f.len() < 42 {
        return None;
    }
    let src = MacAddr(f[6..12].try_into().ok()?);
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    if ethertype == 0x0806 && f[20..22] == [0, 1] && f[38..42] == my_ip {
        let mut r = vec![0u8; 60];
        write_header(&mut r, src, me, 0x0806);
        r[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        r[22..28].copy_from_slice(&me.0);
        r[28..32].copy_from_slice(&my_ip);
        r[32..42].copy_from_slice(&f[22..32]); // their MAC and IP
        return Some(("arp", src, r));
    }
    if ethertype == 0x0800 && f[23] == 1 && f[30..34] == my_ip {
        let ihl = ((f[14] & 0x0f) as usize) * 4;
        let icmp = 14 + ihl;
        if f.len() < icmp + 8 || f[icmp] != 8 {
            return None;
        }
        let mut r = f.to_vec();
        write_header(&mut r, src, me, 0x0800);
        r.copy_within(26..30, 30);
        r[26..30].copy_from_slice(&my_ip);
        // Same addresses swapped: the IP header checksum still holds.
        r[icmp] = 0;
        r[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
        let ip_total = u16::from_be_bytes([f[16], f[17]]) as usize;
        let end = (14 + ip_total).min(r.len());
        let sum = checksum(&r[icmp..end]);
        r[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
        return Some(("icmp", src, r));
    }
    None
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[test]
fn uml_guest_on_daemon_vde_and_bess_ports() {
    let _one = uml_lock();
    let status = uml::probe_uml(
        Path::new(uml::DEFAULT_UML_BINARY),
        uml::DEFAULT_PROBE_TIMEOUT,
    );
    match status {
        UmlStatus::Boots => {}
        // UML boot tests skip even under CI: some hosts cannot run UML.
        UmlStatus::Fails { reason } => {
            ulan::testkit::skipped(format_args!(
                "uml_guest_on_daemon_vde_and_bess_ports: {reason}"
            ));
            return;
        }
        UmlStatus::Missing => {
            ulan::testkit::skipped(format_args!(
                "linux.uml is not installed (apt-get install user-mode-linux)"
            ));
            return;
        }
    }
    let Some(busybox) = uml::find_static_busybox() else {
        ulan::testkit::skipped(format_args!(
            "no static busybox (apt-get install busybox-static)"
        ));
        return;
    };

    let fx = Fixture::new();
    let transports = [Transport::Daemon, Transport::Vde, Transport::Bess];
    let mut spec = NodeSpec::new("u1", &["l0", "l1", "l2"]);
    spec.kind = NodeKind::Uml;
    spec.memory_mb = 64;
    for (n, t) in spec.nics.iter_mut().zip(transports) {
        *n = NicSpec {
            transport: Some(t),
            ..n.clone()
        };
    }
    spec.validate().unwrap();

    let mut nics = Vec::new();
    let mut hosts = Vec::new();
    for (i, t) in transports.into_iter().enumerate() {
        let lan = format!("l{i}");
        fx.lan(&lan);
        let port = spec.port_name(i);
        let info = fx.lab.add_port(&port, t.port_kind(), Some(&lan)).unwrap();
        nics.push(UmlNic {
            index: i,
            mac: stable_mac("test", "u1", i),
            transport: t,
            port_path: info.path.into(),
        });
        hosts.push(fx.plug(&format!("h{i}"), PortKind::Dgram, Some(&lan)));
    }

    // The guest: addresses on its three interfaces, two pings to the
    // synthetic host on each lan, a verdict line per lan, power off.
    let mut script = String::from("#!/bin/sh\nbb=/bin/busybox\n$bb mount -t proc proc /proc\n");
    for (i, t) in transports.into_iter().enumerate() {
        let ifname = uml::guest_ifname(t, i);
        script +=
            &format!("$bb ip link set {ifname} up\n$bb ip addr add 10.0.{i}.2/24 dev {ifname}\n");
    }
    for i in 0..transports.len() {
        script += &format!(
            "if $bb ping -c 2 -w 20 10.0.{i}.1 >/dev/null; then echo PING-OK-{i}; \
             else echo PING-FAIL-{i}; fi\n"
        );
    }
    script += "echo GUEST-DONE\n$bb poweroff -f\n";

    let node_dir = fx.dir.path().join("nodes").join("u1");
    let paths = UmlPaths::new(&node_dir);
    uml::prepare_run_dir(&paths, &nics).unwrap();
    let initrd = node_dir.join("initrd.cpio");
    std::fs::File::create(&initrd)
        .unwrap()
        .write_all(&uml::busybox_initramfs(&busybox, &script).unwrap())
        .unwrap();
    spec.initrd = Some(initrd.display().to_string());
    let binary = uml::find_in_path(Path::new(uml::DEFAULT_UML_BINARY)).unwrap();
    let argv: Vec<OsString> = uml::uml_argv(&spec, &binary, &nics, None, &paths, "").unwrap();
    eprintln!("{argv:?}");
    let mut cmd = uml::uml_command(&argv, &paths).unwrap();
    let mut guest = Guest {
        child: cmd.spawn().unwrap(),
    };
    let _console_input = guest.child.stdin.take();

    let mut was_up = [false; 3];
    let mut answered = [[0usize; 2]; 3];
    let deadline = Instant::now() + Duration::from_secs(90);
    let exited = loop {
        for (i, h) in hosts.iter_mut().enumerate() {
            was_up[i] |= fx.lab.port(&spec.port_name(i)).unwrap().up;
            let me = mac(100 + i as u32);
            while let Some(f) = h.recv(Duration::from_millis(5)).unwrap() {
                if let Some((what, from, reply)) = answer(&f, me, lan_ip(i as u8, 1)) {
                    assert_eq!(from, nics[i].mac, "lan {i}: {what} from a stranger");
                    answered[i][usize::from(what == "icmp")] += 1;
                    h.send(&reply).unwrap();
                }
            }
        }
        if let Some(st) = guest.child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    let console = std::fs::read_to_string(&paths.console_log).unwrap_or_default();
    let tail: String = console
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    for l in console
        .lines()
        .filter(|l| l.contains("PING-") || l.contains("GUEST-"))
    {
        eprintln!("guest: {l}");
    }
    assert!(exited.is_some(), "guest still running after 90 s:\n{tail}");
    assert!(
        console.contains("GUEST-DONE"),
        "guest never finished:\n{tail}"
    );
    for (i, t) in transports.into_iter().enumerate() {
        assert!(was_up[i], "{t} port never came up:\n{tail}");
        assert!(
            console.contains(&format!("PING-OK-{i}")),
            "{t}: ping failed (answered arp/icmp {:?}):\n{tail}",
            answered[i]
        );
        assert!(
            answered[i][0] >= 1 && answered[i][1] >= 2,
            "{t}: {:?}",
            answered[i]
        );
    }
    // Powered off: every NIC's port is down again.
    for i in 0..3 {
        fx.wait_up(&spec.port_name(i), false);
    }
    drop(guest);
}
