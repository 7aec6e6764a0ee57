//! ulan's software segmentation (`wire::offload::Segmenter`) against the
//! Linux kernel's own: in a user + network namespace (no real root), a
//! TCP super-frame with its virtio-net header is written into tap `t1`
//! (IFF_VNET_HDR), which a bridge forwards to tap `t2`. `t2` was given no
//! offloads, so the kernel segments the frame and fills the checksums in
//! software (`skb_gso_segment`, `tcp_gso_segment`, `skb_checksum_help`);
//! the frames read from `t2` must be byte for byte what ulan makes of the
//! same input (TCP over IPv4 with and without options, over IPv6, with a
//! VLAN tag, CWR/FIN/PSH, a 32-byte gso_size, a payload that fits one
//! segment, and UDP/TCP frames that only ask for the checksum).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ulan::testkit::offload_check::{partial_frame, TcpSpec};
use ulan::wire::offload::{Offload, Segmenter};

const INSIDE: &str = "ULAN_OFFLOAD_KERNEL_NETNS";
const TEST: &str = "kernel_segments_super_frames_as_ulan_does";

/// Why the namespace cannot be had here, if it cannot.
fn usable() -> Result<(), String> {
    for tool in ["unshare", "ip"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!("{tool} is not installed"));
        }
    }
    let ns = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net"])
        .args([
            "sh",
            "-c",
            "ip link add b0 type bridge && ip tuntap add t0 mode tap",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if !ns.status.success() {
        return Err(format!(
            "cannot make a bridge and a tap in a user namespace: {}",
            String::from_utf8_lossy(&ns.stderr).trim()
        ));
    }
    Ok(())
}

#[test]
fn kernel_segments_super_frames_as_ulan_does() {
    if std::env::var_os(INSIDE).is_some() {
        inside_namespace();
        return;
    }
    if let Err(why) = usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot run under CI: {why}"
        );
        ulan::testkit::skipped(format_args!(
            "the kernel segmentation cross-check needs unshare, ip and user namespaces: {why}"
        ));
        return;
    }
    // This same test, run again inside the namespace.
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net"])
        .arg(exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "inside the namespace:\n{text}"
    );
    assert_eq!(text.matches("CROSS-CHECKED").count(), 11, "{text}");
    println!("{text}");
}

fn sh(script: &str) {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// _IOW('T', 202, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap device `name`, its queue open on the returned file.
fn tap(name: &str, flags: libc::c_short) -> File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays
    // out (40 bytes); the fd is open.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    f
}

/// Our frames read from `t2`: once `want` have come, until none comes for
/// 200 ms (so extra segments are seen); at most 5 s.
fn read_frames(t2: &mut File, want: usize) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut pfd = libc::pollfd {
            fd: t2.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait = if frames.len() >= want { 200 } else { 1000 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, wait) };
        if n <= 0 {
            if frames.len() >= want || Instant::now() > deadline {
                return frames;
            }
            continue;
        }
        let len = t2.read(&mut buf).unwrap();
        let f = &buf[..len];
        // Only our test traffic (from the builder's source MAC), nothing
        // the kernel may say on its own.
        if f.get(6..12) == Some(&[2, 0, 0, 0, 0, 1][..]) {
            frames.push(f.to_vec());
        }
    }
}

/// The virtio-net header (legacy, 10 bytes, little-endian) for `off`.
fn virtio_header(off: &Offload) -> [u8; 10] {
    let (flags, gso_type, hdr_len, gso_size, start, offset) = off.to_virtio();
    let mut h = [0u8; 10];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&offset.to_le_bytes());
    h
}

fn inside_namespace() {
    sh("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
        echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6");
    let mut t1 = tap("t1", IFF_VNET_HDR);
    let mut t2 = tap("t2", 0);
    sh("ip link add b0 type bridge stp_state 0 && \
        ip link set t1 mtu 9000 && ip link set t2 mtu 9000 && \
        ip link set t1 master b0 && ip link set t2 master b0 && \
        ip link set b0 up && ip link set t1 up && ip link set t2 up");
    let base = TcpSpec::default();
    let specs = [
        TcpSpec { ..base.clone() },
        TcpSpec {
            payload_len: 30_001,
            gso_size: 536,
            ip_option_words: 10,
            tcp_option_words: 10,
            flags: 0x80 | 0x19, // CWR PSH ACK FIN
            ecn: true,
            ..base.clone()
        },
        TcpSpec {
            v6: true,
            payload_len: 20_000,
            gso_size: 1428,
            flags: 0x19,
            ..base.clone()
        },
        TcpSpec {
            v6: true,
            payload_len: 7_777,
            gso_size: 1000,
            tcp_option_words: 0,
            flags: 0x80 | 0x10,
            ecn: true,
            ..base.clone()
        },
        TcpSpec {
            vlan: true,
            payload_len: 10_000,
            gso_size: 1448,
            ..base.clone()
        },
        TcpSpec {
            payload_len: 1_000,
            gso_size: 32,
            ..base.clone()
        },
        // Fits one segment: the kernel only fills the checksum.
        TcpSpec {
            v6: true,
            payload_len: 500,
            ..base.clone()
        },
    ];
    let mut seg = Segmenter::new();
    let mut inputs: Vec<(String, Vec<u8>, Offload)> = specs
        .iter()
        .map(|spec| {
            let (frame, off) = spec.build();
            (format!("{spec:?}"), frame, off)
        })
        .collect();
    // Checksum only, no segmentation.
    for (v6, proto, len) in [
        (false, 17, 999),
        (true, 17, 1200),
        (false, 6, 77),
        (true, 6, 3),
    ] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
        let (frame, off) = partial_frame(v6, false, proto, &payload);
        inputs.push((format!("v6 {v6} proto {proto} len {len}"), frame, off));
    }
    for (spec, frame, off) in &inputs {
        let (frame, off) = (frame.as_slice(), *off);
        let mine: Vec<Vec<u8>> = seg
            .finish(frame, &off)
            .unwrap()
            .map(<[u8]>::to_vec)
            .collect();
        let mut msg = virtio_header(&off).to_vec();
        msg.extend_from_slice(frame);
        t1.write_all(&msg).unwrap();
        let kernel = read_frames(&mut t2, mine.len());
        assert_eq!(
            kernel.len(),
            mine.len(),
            "{spec}: the kernel made {} segments, ulan {}",
            kernel.len(),
            mine.len()
        );
        let at = usize::from(off.csum_start + off.csum_offset);
        for (i, (k, m)) in kernel.iter().zip(&mine).enumerate() {
            // 0 and 0xffff are the same TCP checksum; Linux writes 0xffff.
            let same_but_zero = k.len() == m.len()
                && k[..at] == m[..at]
                && k[at + 2..] == m[at + 2..]
                && k[at..at + 2] == [0xff, 0xff]
                && m[at..at + 2] == [0, 0];
            if k != m && !same_but_zero {
                let at = k.iter().zip(m).position(|(a, b)| a != b);
                panic!(
                    "{spec} segment {i}: kernel {} bytes, ulan {}; first difference at {at:?}",
                    k.len(),
                    m.len()
                );
            }
        }
        println!("CROSS-CHECKED {} frames of {spec}", mine.len());
    }
}
