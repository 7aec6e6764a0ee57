//! Real QEMU guests (TCG) whose NICs are ulan vhost-user ports: ulan
//! serves their virtqueues in shared memory.

mod common;

use std::time::Duration;

use common::guests::*;
use ulan::ports::PortKind;
use ulan::testkit::Endpoint;
use ulan::vmlaunch::spec::{NodeSpec, Transport};
use ulan::wire::MacAddr;

/// An ARP request from `mac`/`ip` for `target`.
fn arp_request(mac: MacAddr, ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

fn vhost_spec(name: &str, lan: &str, ip: &str) -> NodeSpec {
    let mut spec = GuestLab::spec(name, &[lan]);
    spec.nics[0].ip = vec![ip.parse().unwrap()];
    spec.nics[0].transport = Some(Transport::VhostUser);
    spec
}

fn iperf(g: &GuestLab, server: &str, client: &str, ip: &str) -> f64 {
    let s = g.exec(server, &["iperf3", "-s", "-D", "-1"]);
    assert_eq!(s.exit_code, 0, "{s:?}");
    std::thread::sleep(Duration::from_millis(500));
    let c = g.exec(client, &["iperf3", "-c", ip, "-t", "3", "-J"]);
    assert_eq!(c.exit_code, 0, "{c:?}\n{}", g.console_tail(client));
    let report: serde_json::Value = serde_json::from_str(&c.stdout).unwrap();
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
}

/// Two vhost-user guests, a stream guest and a vde client on one lan: every
/// pair of guests pings, the vde client reaches a vhost-user and a stream guest,
/// iperf3 runs between the vhost-user guests and from a vhost-user guest
/// to the stream guest, and the counters saw it.
#[test]
fn vhost_user_guests_ping_and_iperf_with_a_stream_guest_on_the_lan() {
    if skip_without_guests("vhost_user_guests_ping_and_iperf") {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "ulan=info".into()),
        ))
        .with_test_writer()
        .try_init();
    let g = GuestLab::new("vu");
    g.lab.add_lan("l").unwrap();
    g.add(vhost_spec("v1", "l", "10.9.0.1/24"));
    g.add(vhost_spec("v2", "l", "10.9.0.2/24"));
    let mut s = GuestLab::spec("s3", &["l"]);
    s.nics[0].ip = vec!["10.9.0.3/24".parse().unwrap()];
    s.nics[0].transport = Some(Transport::Stream);
    g.add(s);
    g.wait_running(&["v1", "v2", "s3"]);

    for (from, to) in [
        ("v1", "10.9.0.2"),
        ("v2", "10.9.0.1"),
        ("s3", "10.9.0.1"),
        ("v1", "10.9.0.3"),
    ] {
        assert!(
            g.ping(from, to, 5),
            "{from} cannot ping {to}\n{}",
            g.console_tail(from)
        );
    }
    let port = g.lab.port("v1.eth0").unwrap();
    assert!(port.up, "the vhost-user port is not up");
    let stats = g.lab.port_stats("v1.eth0").unwrap().counters;
    assert!(stats.rx_frames > 0 && stats.tx_frames > 0, "{stats:?}");
    assert_eq!(stats.protocol_errors, 0, "{stats:?}");

    // A vde client on the same lan (a synthetic one of the testkit): it
    // asks for both guests' MACs by ARP and both answer, so frames go
    // vde -> vhost-user, vde -> stream and back.
    let vde = g.lab.add_port("x.vde", PortKind::Vde, Some("l")).unwrap();
    let mut ep =
        Endpoint::connect(PortKind::Vde, std::path::Path::new(&vde.path), g.dir.path()).unwrap();
    let me = ulan::testkit::mac(0x77);
    for (ip, guest_mac) in [([10, 9, 0, 1], "v1"), ([10, 9, 0, 3], "s3")] {
        ep.send(&arp_request(me, [10, 9, 0, 99], ip)).unwrap();
        let want = g.lab.node(guest_mac).unwrap().nics[0].mac;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut answered = false;
        while !answered && std::time::Instant::now() < deadline {
            if let Some(f) = ep.recv(Duration::from_millis(200)).unwrap() {
                // An ARP reply (EtherType 0x0806, op 2) from the guest to us.
                answered = f.len() >= 42
                    && f[12..14] == [0x08, 0x06]
                    && f[20..22] == [0, 2]
                    && f[6..12] == want.0
                    && f[0..6] == me.0;
            }
        }
        assert!(answered, "{guest_mac} did not answer the vde client's ARP");
    }

    // The cable pulled on v1's NIC: the guest sees its carrier go down
    // (virtio-net LINK_UP cleared, config interrupt) and cannot ping; put
    // back, the carrier returns and so does the ping.
    let carrier = |g: &GuestLab| {
        g.exec("v1", &["cat", "/sys/class/net/eth0/carrier"])
            .stdout
            .trim()
            .to_string()
    };
    assert_eq!(carrier(&g), "1");
    g.rt.block_on(g.lab.set_nic_link("v1", 0, false)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while carrier(&g) != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "v1 still sees a carrier"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!g.ping("v1", "10.9.0.2", 1), "ping with the cable pulled");
    g.rt.block_on(g.lab.set_nic_link("v1", 0, true)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while carrier(&g) != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "v1's carrier did not return"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(g.ping("v1", "10.9.0.2", 8), "no ping with the cable back");
    assert!(g.rt.block_on(g.lab.set_nic_link("v1", 3, false)).is_err());

    let vv = iperf(&g, "v2", "v1", "10.9.0.2");
    eprintln!("iperf3 vhost-user -> vhost-user: {:.0} Mbit/s", vv / 1e6);
    assert!(vv > 1e6, "iperf3 moved only {vv} bit/s");
    let vs = iperf(&g, "s3", "v1", "10.9.0.3");
    eprintln!("iperf3 vhost-user -> stream: {:.0} Mbit/s", vs / 1e6);
    assert!(vs > 1e6, "iperf3 moved only {vs} bit/s");
    let sv = iperf(&g, "v2", "s3", "10.9.0.2");
    eprintln!("iperf3 stream -> vhost-user: {:.0} Mbit/s", sv / 1e6);
    assert!(sv > 1e6, "iperf3 moved only {sv} bit/s");
}
