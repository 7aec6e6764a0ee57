//! Interop with a real third-party client: `vde_plug` (Debian's vdeplug4)
//! on a ulan `vde` port, exchanging frames with a `dgram` and a `stream`
//! port. vde_plug bridges the switch to its stdin/stdout, each frame
//! preceded by a 2-byte big-endian length.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, tag_of};
use ulan::wire::MacAddr;

/// Skips with the reason printed; under CI a missing tool is a failure,
/// since .ci/run installs it.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} missing under CI: .ci/run should install it"
        );
        ulan::testkit::skipped(format_args!(
            "{tool} is not installed (apt-get install vde2 vdeplug)"
        ));
    }
    found
}

struct Plug {
    child: Child,
    frames: mpsc::Receiver<Vec<u8>>,
}

impl Plug {
    fn start(dir: &str) -> Plug {
        let mut child = Command::new("vde_plug")
            .arg(format!("vde://{dir}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vde_plug");
        let mut out = child.stdout.take().unwrap();
        let (tx, frames) = mpsc::channel();
        std::thread::spawn(move || loop {
            let mut len = [0u8; 2];
            if out.read_exact(&mut len).is_err() {
                return;
            }
            let mut f = vec![0u8; u16::from_be_bytes(len) as usize];
            if out.read_exact(&mut f).is_err() || tx.send(f).is_err() {
                return;
            }
        });
        Plug { child, frames }
    }

    fn send(&mut self, f: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(&(f.len() as u16).to_be_bytes()).unwrap();
        stdin.write_all(f).unwrap();
        stdin.flush().unwrap();
    }

    fn recv(&self, t: Duration) -> Option<Vec<u8>> {
        self.frames.recv_timeout(t).ok()
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn vde_plug_talks_to_dgram_and_stream_ports() {
    if !have("vde_plug") {
        return;
    }
    let fx = Fixture::new();
    fx.lan("l");
    let info = fx.lab.add_port("v", PortKind::Vde, Some("l")).unwrap();
    let mut plug = Plug::start(&info.path);
    fx.wait_up("v", true);
    let mut d = fx.plug("d", PortKind::Dgram, Some("l"));
    let mut s = fx.plug("s", PortKind::Stream, Some("l"));

    // vde_plug -> both (broadcast), learning vde_plug's MAC.
    plug.send(&frame(MacAddr::BROADCAST, mac(1), 98, 11));
    assert_eq!(tag_of(&d.recv(WAIT).unwrap().unwrap()), Some(11));
    assert_eq!(tag_of(&s.recv(WAIT).unwrap().unwrap()), Some(11));

    // dgram -> vde_plug, unicast to the learned MAC: the stream port must
    // not see it.
    d.send(&frame(mac(1), mac(2), 1500, 12)).unwrap();
    let got = plug
        .recv(WAIT)
        .expect("vde_plug got nothing from the dgram port");
    assert_eq!((tag_of(&got), got.len()), (Some(12), 1500));
    assert!(s.recv(QUIET).unwrap().is_none());

    // stream -> vde_plug, and vde_plug -> stream, unicast both ways.
    s.send(&frame(mac(1), mac(3), 60, 13)).unwrap();
    assert_eq!(tag_of(&plug.recv(WAIT).unwrap()), Some(13));
    plug.send(&frame(mac(3), mac(1), 60, 14));
    assert_eq!(tag_of(&s.recv(WAIT).unwrap().unwrap()), Some(14));
    assert!(
        d.recv(QUIET).unwrap().is_none(),
        "learned unicast leaked to dgram"
    );

    // A burst, in order, read while it is sent (a client that does not
    // read loses frames once the bounded queues are full, by design).
    let reader = std::thread::spawn(move || {
        (0..500u32)
            .map(|_| tag_of(&d.recv(WAIT).unwrap().unwrap()).unwrap())
            .collect::<Vec<_>>()
    });
    for i in 0..500 {
        plug.send(&frame(mac(2), mac(1), 256, 1000 + i));
        if i % 8 == 7 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert_eq!(reader.join().unwrap(), (1000..1500).collect::<Vec<_>>());
    let st = fx.stats("v");
    assert_eq!(st.rx_dropped, 0);
    assert_eq!(st.tx_dropped, 0);

    // vde_plug going away takes the port down; the port takes a new one.
    drop(plug);
    fx.wait_up("v", false);
    let mut plug = Plug::start(&info.path);
    fx.wait_up("v", true);
    plug.send(&frame(MacAddr::BROADCAST, mac(1), 60, 15));
    assert_eq!(tag_of(&s.recv(WAIT).unwrap().unwrap()), Some(15));
}
