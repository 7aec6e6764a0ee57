//! The guest's carrier follows its switch port's link state (QEMU TCG,
//! the built-in image): NICs down in their spec boot with carrier 0, and
//! `set_port_link` (what `ulan link` and the API call) takes a vhost-user
//! and a dgram NIC's carrier down and up again.

mod common;

use std::time::{Duration, Instant};

use common::guests::*;
use ulan::lab::LinkState;
use ulan::vmlaunch::spec::{NodeSpec, Transport};

fn spec(name: &str, ip: &str, transport: Transport) -> NodeSpec {
    let mut spec = GuestLab::spec(name, &["l"]);
    spec.nics[0].ip = vec![ip.parse().unwrap()];
    spec.nics[0].transport = Some(transport);
    spec.nics[0].link = LinkState::Down;
    spec
}

/// Polls the guest's eth0 carrier until it reads `want` (a few seconds).
fn wait_carrier(g: &GuestLab, node: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last;
    loop {
        let out = g.exec(node, &["cat", "/sys/class/net/eth0/carrier"]);
        last = format!("{out:?}");
        if out.exit_code == 0 && out.stdout.trim() == want {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{node}: carrier is not {want}: {last}\n{}",
                g.console_tail(node)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn set_link(g: &GuestLab, port: &str, link: LinkState) {
    let (info, carrier) =
        g.rt.block_on(g.lab.set_port_link(port, link))
            .unwrap_or_else(|e| panic!("link {port}: {e}"));
    assert_eq!(info.link, link);
    assert_eq!(carrier, None, "{port}: the guest's carrier was not set");
}

#[test]
fn guest_carriers_start_down_from_the_spec_and_follow_the_port_link() {
    if skip_without_guests("guest_carriers_follow_the_port_link") {
        return;
    }
    let g = GuestLab::new("carrier");
    g.lab.add_lan("l").unwrap();
    g.add(spec("v1", "10.8.0.1/24", Transport::VhostUser));
    g.add(spec("d2", "10.8.0.2/24", Transport::Dgram));
    g.wait_running(&["v1", "d2"]);

    // Booted with their ports down: no carrier, whatever QEMU did at start.
    for node in ["v1", "d2"] {
        let port = format!("{node}.eth0");
        assert_eq!(g.lab.port(&port).unwrap().link, LinkState::Down);
        wait_carrier(&g, node, "0");
    }
    // Up: carrier, and frames pass.
    set_link(&g, "v1.eth0", LinkState::Up);
    set_link(&g, "d2.eth0", LinkState::Up);
    wait_carrier(&g, "v1", "1");
    wait_carrier(&g, "d2", "1");
    assert!(
        g.ping("v1", "10.8.0.2", 5),
        "v1 cannot ping d2 once both links are up\n{}",
        g.console_tail("v1")
    );
    // Down and up again, each on its own.
    set_link(&g, "v1.eth0", LinkState::Down);
    wait_carrier(&g, "v1", "0");
    wait_carrier(&g, "d2", "1");
    set_link(&g, "d2.eth0", LinkState::Down);
    wait_carrier(&g, "d2", "0");
    assert!(!g.ping("d2", "10.8.0.1", 1), "frames passed a down link");
    set_link(&g, "v1.eth0", LinkState::Up);
    wait_carrier(&g, "v1", "1");
    // The lab as saved: d2's NIC down, v1's up (left out).
    let saved = g.lab.spec();
    let link = |n: &str| {
        saved
            .nodes
            .iter()
            .find(|s| s.name == n)
            .map(|s| s.nics[0].link)
    };
    assert_eq!(link("v1"), Some(LinkState::Up));
    assert_eq!(link("d2"), Some(LinkState::Down));
}
