//! Link state and impairments from a lab file, through the real `ulan`
//! binary and its daemon, with socket ports (no guest): `ulan up` makes a
//! port down and impaired, `save` writes both back, `apply` brings the
//! link up without remaking the port.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::cli::CliUser;
use common::{QUIET, WAIT};
use ulan::ports::PortKind;
use ulan::testkit::{frame, mac, tag_of, Endpoint};

struct User(CliUser);

impl std::ops::Deref for User {
    type Target = CliUser;
    fn deref(&self) -> &CliUser {
        &self.0
    }
}

impl User {
    fn new() -> User {
        User(CliUser::new("links"))
    }

    fn port(&self, name: &str) -> serde_json::Value {
        let ports: serde_json::Value =
            serde_json::from_str(&self.ok(&["--json", "port", "ls"])).unwrap();
        ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no port {name} in {ports}"))
            .clone()
    }

    fn connect(&self, port: &str) -> Endpoint {
        let path = PathBuf::from(self.port(port)["path"].as_str().unwrap());
        let ep = Endpoint::connect(PortKind::Stream, &path, self.home()).unwrap();
        let deadline = Instant::now() + WAIT;
        while self.port(port)["up"] != true {
            assert!(Instant::now() < deadline, "port {port} never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        ep
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = self.ulan(&["down"]);
    }
}

const DOWN: &str = "\
name: links
lans: [l]
ports:
  - {name: a, kind: stream, lan: l}
  - {name: b, kind: stream, lan: l, link: down,
     impairments: {egress: {delay_ms: 40}, ingress: {loss_pct: 0.5}}}
";

/// a -> b, and b -> a: whether each frame arrived within `wait`.
fn both_ways(a: &mut Endpoint, b: &mut Endpoint, tag: u32, wait: Duration) -> (bool, bool) {
    a.send(&frame(mac(2), mac(1), 60, tag)).unwrap();
    let ab = b.recv(wait).unwrap().map(|f| tag_of(&f)) == Some(Some(tag));
    b.send(&frame(mac(1), mac(2), 60, tag + 1)).unwrap();
    let ba = a.recv(wait).unwrap().map(|f| tag_of(&f)) == Some(Some(tag + 1));
    (ab, ba)
}

#[test]
fn a_lab_file_port_down_and_impaired_until_apply_brings_it_up() {
    let u = User::new();
    let file = u.write("down.yaml", DOWN);
    u.ok(&["up", &file]);

    let b = u.port("b");
    assert_eq!(b["link"], "down", "{b}");
    assert_eq!(b["impaired"], true, "{b}");
    assert_eq!(u.port("a")["link"], "up");
    // What acts, as the API shows it.
    let saved = u.ok(&["save"]);
    assert!(saved.contains("link: down"), "{saved}");
    assert!(saved.contains("delay_ms: 40"), "{saved}");
    assert!(saved.contains("loss_pct: 0.5"), "{saved}");
    let back = ulan::labfile::parse(&saved, "saved").unwrap();
    let want = ulan::labfile::parse(DOWN, "file").unwrap();
    assert_eq!(back, want, "{saved}");

    let mut ea = u.connect("a");
    let mut eb = u.connect("b");
    // Down: nothing either way.
    assert_eq!(both_ways(&mut ea, &mut eb, 10, QUIET * 3), (false, false));
    // The file unchanged: nothing to do.
    let again = u.ok(&["apply", &file]);
    assert!(again.contains("already matches"), "{again}");

    // The same file with b's link up (impairments kept): the port is set,
    // not remade, so the clients stay connected.
    let up = u.write("up.yaml", &DOWN.replace("link: down,", ""));
    let out = u.ok(&["--json", "apply", &up]);
    let steps: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(steps["steps"], serde_json::json!(["~ port b: link up"]));
    assert_eq!(u.port("b")["link"], "up");
    assert_eq!(u.port("b")["up"], true, "b's client was cut off");
    // Frames pass; b's egress is 40 ms late. Ingress loses 0.5%: a few
    // tries make a lost one harmless.
    let passed = (0..5).any(|i| {
        let t = Instant::now();
        let (ab, ba) = both_ways(&mut ea, &mut eb, 100 + 2 * i, WAIT);
        ab && ba && t.elapsed() >= Duration::from_millis(40)
    });
    assert!(passed, "frames did not pass once the link was up");

    // Impairments cleared by the file too, leaving b as a plain port.
    let plain = u.write(
        "plain.yaml",
        "name: links\nlans: [l]\nports:\n  - {name: a, kind: stream, lan: l}\n  - {name: b, kind: stream, lan: l}\n",
    );
    let out: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "apply", &plain])).unwrap();
    assert_eq!(
        out["steps"],
        serde_json::json!(["~ port b: no impairments"])
    );
    assert_eq!(u.port("b")["impaired"], false);
    let saved = u.ok(&["save"]);
    for absent in ["link:", "impairments"] {
        assert!(!saved.contains(absent), "{absent} in {saved}");
    }
}

#[test]
fn bad_impairments_in_a_lab_file_are_refused_before_anything_starts() {
    let u = User::new();
    let file = u.write(
        "bad.yaml",
        "name: links\nlans: [l]\nports:\n  - {name: b, kind: stream, lan: l, impairments: {egress: {loss_pct: 101}}}\n",
    );
    let out = u.ulan(&["up", &file]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("port \"b\": impairments: egress.loss_pct is 101"),
        "{err}"
    );
    // No daemon was started for it.
    assert!(!u.ulan(&["lab"]).status.success());
}

#[test]
fn a_port_added_down_forwards_nothing_until_its_link_is_up() {
    let u = User::new();
    // `up` starts the daemon.
    let file = u.write(
        "one.yaml",
        "name: links\nlans: [l]\nports:\n  - {name: a, kind: stream, lan: l}\n",
    );
    u.ok(&["up", &file]);
    let out = u.ok(&[
        "port", "add", "b", "--kind", "stream", "--lan", "l", "--down",
    ]);
    assert!(out.contains("port b"), "{out}");
    assert_eq!(u.port("b")["link"], "down");
    let mut ea = u.connect("a");
    let mut eb = u.connect("b");
    assert_eq!(both_ways(&mut ea, &mut eb, 10, QUIET * 3), (false, false));
    u.ok(&["link", "b", "up"]);
    assert_eq!(both_ways(&mut ea, &mut eb, 20, WAIT), (true, true));
}
