//! Two Linux network stacks, each in its own user + network namespace
//! (`unshare --user --map-root-user --net`, no real root needed), with a
//! tap device bridged to a ulan port by `vde_plug` (its `tap://` module),
//! ping each other through the switch, each on its own `vde` port.

mod common;

use std::process::{Command, Stdio};

use common::*;
use ulan::ports::PortKind;

fn usable() -> Result<(), String> {
    for tool in ["vde_plug", "unshare", "ip", "ping"] {
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
        .args([
            "--user",
            "--map-root-user",
            "--net",
            "ip",
            "tuntap",
            "add",
            "t0",
            "mode",
            "tap",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if !ns.status.success() {
        return Err(format!(
            "cannot make a tap in a user namespace: {}",
            String::from_utf8_lossy(&ns.stderr).trim()
        ));
    }
    Ok(())
}

/// A shell script run in a new user+net namespace: plugs a tap into the
/// ulan port at `url`, gives it `addr`, then runs `then`.
fn ns_script(url: &str, mac: &str, addr: &str, then: &str) -> String {
    format!(
        "set -e
vde_plug {url} tap://u0 &
plug=$!
for i in $(seq 100); do ip link show u0 >/dev/null 2>&1 && break; sleep 0.05; done
ip link set u0 address {mac}
ip link set u0 up
ip addr add {addr}/24 dev u0
{then}
kill $plug"
    )
}

#[test]
fn kernel_stacks_in_namespaces_ping_through_ulan() {
    if let Err(why) = usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot run under CI: {why}"
        );
        ulan::testkit::skipped(format_args!(
            "kernel interop needs vde_plug, unshare, ip, ping and user namespaces: {why}"
        ));
        return;
    }
    let fx = Fixture::new();
    fx.lan("l");
    let a = fx.lab.add_port("a", PortKind::Vde, Some("l")).unwrap();
    let b = fx.lab.add_port("b", PortKind::Vde, Some("l")).unwrap();
    let mut server = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-c"])
        .arg(ns_script(
            &format!("vde://{}", a.path),
            "02:00:00:00:0a:01",
            "10.77.0.1",
            "sleep 30",
        ))
        .spawn()
        .unwrap();
    fx.wait_up("a", true);
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-c"])
        .arg(ns_script(
            &format!("vde://{}", b.path),
            "02:00:00:00:0b:01",
            "10.77.0.2",
            "ping -c 3 -i 0.2 -W 5 10.77.0.1",
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("3 received"),
        "ping through ulan failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The pinging side has left (its port went down and was flushed from
    // the table); the other is still learned on its port.
    fx.wait_up("b", false);
    let fdb = rt().block_on(fx.lab.fdb("l")).unwrap();
    let port_of = |m: &str| fdb.iter().find(|e| e.mac == m).map(|e| e.port.as_str());
    assert_eq!(port_of("02:00:00:00:0a:01"), Some("a"));
    assert_eq!(port_of("02:00:00:00:0b:01"), None);
    let (sa, sb) = (fx.stats("a"), fx.stats("b"));
    assert!(sa.rx_frames >= 4 && sb.rx_frames >= 4, "{sa:?} {sb:?}");
    let _ = server.kill();
    let _ = server.wait();
}
