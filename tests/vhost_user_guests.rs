//! Real QEMU guests (TCG) whose NICs are ulan vhost-user ports: ulan
//! serves their virtqueues in shared memory.

mod common;

use std::time::Duration;

use common::guests::*;
use ulan::vmlaunch::spec::{NodeSpec, Transport};

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

/// Two vhost-user guests and a stream guest on one lan: every pair pings,
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
