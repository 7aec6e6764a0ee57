//! The page in a real browser: headless Chromium driven by chromedriver
//! over the WebDriver protocol (a small JSON client below), against a
//! real lab: `ulan daemon` and `ulan web` run as the unprivileged test
//! user (rootless, as a user runs them). It sees the lab, adds a lan and
//! a node through the dialogs, connects a node's NIC by dragging the node
//! onto the lan, stops, starts and removes a node and removes a lan with
//! the panel's buttons, follows a change made by the CLI, and (with
//! QEMU) runs a command in a real guest's console in the page. The
//! topology screenshot lands in target/web-screenshot.png.
//!
//! Without chromium and chromedriver the tests skip loudly; under CI=true
//! they fail.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::cli::{give_to, uid_of_pid, Account, CliUser};

// Generous: the machine may be loaded; every wait polls.
const WAIT: Duration = Duration::from_secs(60);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Why the browser cannot run here, if it cannot.
fn browser_missing() -> Option<String> {
    for (bin, pkg) in [
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
    ] {
        let ok = Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("{bin} is not installed (apt-get install {pkg})"));
        }
    }
    None
}

fn skip_without_browser(test: &str) -> bool {
    match browser_missing() {
        None => false,
        Some(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: the browser cannot run under CI: {why}"
            );
            ulan::testkit::skipped(format_args!("{test}: {why}"));
            true
        }
    }
}

/// chromedriver and one browser session; both end when dropped.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    profile: tempfile::TempDir,
}

/// One WebDriver call: a JSON request, the `value` of the answer.
fn wd(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open whatever the request says:
    // read the header, then Content-Length bytes (it never chunks).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("chromedriver closed without an answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no Content-Length in {head}"))?;
    while buf.len() < header_end + len {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("chromedriver closed mid-answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[header_end..header_end + len]).to_string();
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {head} {body}"))?;
    if head.starts_with("HTTP/1.1 200") {
        Ok(v["value"].clone())
    } else {
        Err(format!("{method} {path}: {}", v["value"]))
    }
}

impl Browser {
    fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        // Made first, so that chromedriver is killed whatever fails next.
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            profile: tempfile::tempdir().unwrap(),
        };
        let deadline = Instant::now() + WAIT;
        while wd(port, "GET", "/status", None).map_or(true, |v| v["ready"] != true) {
            assert!(Instant::now() < deadline, "chromedriver never got ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,800",
                         format!("--user-data-dir={}", b.profile.path().display())],
            },
        }}});
        let v = wd(port, "POST", "/session", Some(&caps)).expect("a browser session");
        b.session = v["sessionId"].as_str().unwrap().to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let p = format!("/session/{}{path}", self.session);
        wd(self.port, method, &p, body.as_ref()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Polls `script` until it returns something truthy; returns that.
    fn wait_js(&self, what: &str, script: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.js(script);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?} (last {v})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Presses the mouse at `from`, moves to `to` in steps, releases.
    fn drag(&self, from: (f64, f64), to: (f64, f64)) {
        let mid = ((from.0 + to.0) / 2.0, (from.1 + to.1) / 2.0);
        let at = |p: (f64, f64), ms: u64| {
            json!({"type": "pointerMove", "duration": ms, "origin": "viewport",
                   "x": p.0.round() as i64, "y": p.1.round() as i64})
        };
        let actions = json!({"actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [
                at(from, 0),
                {"type": "pointerDown", "button": 0},
                {"type": "pause", "duration": 150},
                at(mid, 250),
                at(to, 250),
                {"type": "pause", "duration": 150},
                {"type": "pointerUp", "button": 0},
            ],
        }]});
        self.call("POST", "/actions", Some(actions));
        self.call("DELETE", "/actions", None);
    }

    /// Viewport coordinates of a graph element's centre.
    fn at(&self, id: &str) -> (f64, f64) {
        let v = self.js(&format!(
            "const cy = window.ulan.cy; const r = cy.container().getBoundingClientRect();\
             const p = cy.getElementById('{id}').renderedPosition(); return [r.left + p.x, r.top + p.y];"
        ));
        (v[0].as_f64().unwrap(), v[1].as_f64().unwrap())
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = wd(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A lab's daemon (`ulan daemon --detach`) and `ulan web`, both run by
/// the CLI as the unprivileged test user in its own XDG dirs: the page
/// is served rootless, as a user runs it.
struct Served {
    web: Child,
    url: String,
    u: CliUser,
}

impl Served {
    fn start(u: CliUser) -> Served {
        u.ok(&["daemon", "--detach"]);
        let mut web = u
            .cmd(&["web"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting ulan web");
        // The URL is its first line; EOF (an empty line) if it failed.
        let mut line = String::new();
        let read = BufReader::new(web.stdout.take().unwrap()).read_line(&mut line);
        let s = Served {
            web,
            url: line.trim().to_string(),
            u,
        };
        assert!(
            read.is_ok() && s.url.starts_with("http://127.0.0.1:"),
            "ulan web printed {line:?}"
        );
        s
    }

    fn account(&self) -> Account {
        *self.u.account().expect("an account")
    }

    /// The daemon's pid, from its lock file.
    fn daemon_pid(&self, lab: &str) -> u32 {
        let lock = self.u.run_dir().join("ulan").join(lab).join("lock");
        let text = std::fs::read_to_string(&lock).unwrap();
        text.trim().parse().unwrap()
    }

    /// Both the daemon and `ulan web` run as the test user, not root.
    fn assert_rootless(&self, lab: &str) {
        let want = self.account().uid;
        for (what, pid) in [
            ("the daemon", self.daemon_pid(lab)),
            ("ulan web", self.web.id()),
        ] {
            let uid = uid_of_pid(pid).unwrap_or_else(|| panic!("{what} (pid {pid}) is gone"));
            assert_eq!(uid, want, "{what} runs as uid {uid}, not the test user");
            assert_ne!(uid, 0, "{what} runs as root");
        }
    }

    /// `ulan --json node show NAME`, or None if there is no such node.
    fn node(&self, name: &str) -> Option<Value> {
        let out = self.u.ulan(&["--json", "node", "show", name]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn names(&self, what: &str) -> Vec<String> {
        let v = self.u.json(&[what, "ls"]);
        v.as_array()
            .unwrap_or_else(|| panic!("{what} ls: {v}"))
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The lan of `port`, from `ulan port ls`.
    fn port_lan(&self, port: &str) -> Option<String> {
        let v = self.u.json(&["port", "ls"]);
        let p = v.as_array()?.iter().find(|p| p["name"] == port)?;
        p["lan"].as_str().map(str::to_string)
    }
}

impl Drop for Served {
    /// `ulan web` gets Ctrl-C (SIGINT) and, if it lingers, SIGKILL; then
    /// the lab goes down and CliUser's drop stops the daemon.
    fn drop(&mut self) {
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(self.web.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.web.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.web.kill();
        let _ = self.web.wait();
        let _ = self.u.ulan(&["down"]);
    }
}

/// Polls `cond` (through the CLI: slow calls, so every 100 ms) until it
/// holds.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ids_script() -> &'static str {
    "return window.ulan && window.ulan.cy.elements().map(e => e.id()).sort().join(' ')"
}

/// The computed colour of a graph element, as cytoscape draws it.
fn colour_script(id: &str) -> String {
    format!("return window.ulan.cy.getElementById('{id}').style('background-color')")
}

/// `#rrggbb` as cytoscape reports a colour: `rgb(r,g,b)`.
fn rgb(hex: &str) -> String {
    let c = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).unwrap();
    format!("rgb({},{},{})", c(1), c(3), c(5))
}

const RUNNING: &str = "#2e8b57";
const STOPPED: &str = "#9aa1ad";

#[test]
fn browser_sees_builds_and_follows_the_lab() {
    let test = "browser_sees_builds_and_follows_the_lab";
    if skip_without_browser(test) {
        return;
    }
    let Some(account) = common::cli::unprivileged_or_skip(test) else {
        return;
    };
    let u = CliUser::as_account("w", account);
    // Nodes whose "kernel" is a script, so no emulator is needed: n1
    // names it as its binary; nodes added from the page find it as
    // `linux.uml` on the daemon's PATH, and boot the store's image
    // "fakeuml" (a manifest and an initrd).
    let emulator = "#!/bin/sh\nexec sleep 600\n";
    let script = u.write("emulator", emulator);
    let bin = u.home().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(bin.join("linux.uml"), emulator).unwrap();
    let store = u.home().join("images");
    std::fs::create_dir_all(store.join("fakeuml")).unwrap();
    std::fs::write(
        store.join("fakeuml/image.json"),
        r#"{"initrd": "initrd", "description": "a test's stand-in"}"#,
    )
    .unwrap();
    std::fs::write(store.join("fakeuml/initrd"), b"not really an initrd").unwrap();
    let initrd = u.write("initrd", "not really an initrd");
    give_to(u.home(), &account);
    for f in [Path::new(&script), &bin.join("linux.uml")] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let u = u.with_env("PATH", path).with_env("ULAN_IMAGES", &store);
    let s = Served::start(u);
    s.assert_rootless("w");
    let u = &s.u;
    u.ok(&["lan", "add", "red"]);
    u.ok(&["lan", "add", "blue"]);
    u.ok(&["port", "add", "p1", "--kind", "dgram", "--lan", "red"]);
    u.ok(&["port", "add", "p2", "--kind", "stream", "--lan", "blue"]);
    u.ok(&["port", "add", "p3", "--kind", "dgram"]);
    // n1 runs, with one NIC on red and one on no lan.
    u.ok(&[
        "node", "add", "n1", "--kind", "uml", "--binary", &script, "--initrd", &initrd, "--nic",
        "red", "--nic", "-",
    ]);
    let n1 = s.node("n1").expect("n1");
    let nic_port = |n: &Value, i: usize| n["nics"][i]["port"].as_str().unwrap().to_string();
    let (n1_eth0, free_nic) = (nic_port(&n1, 0), nic_port(&n1, 1));

    let b = Browser::start();
    b.go(&s.url);

    // The lab as it is: every lan, node, plain port and link.
    let want =
        format!("edge:{n1_eth0} edge:p1 edge:p2 lan:blue lan:red node:n1 port:p1 port:p2 port:p3");
    let mut want: Vec<&str> = want.split(' ').collect();
    want.sort();
    let want = want.join(" ");
    b.wait_js(
        "the page shows the lab",
        &format!("{} === '{want}'", ids_script()),
        WAIT,
    );
    // The token left the address bar for a cookie.
    let here = b.call("GET", "/url", None);
    assert!(!here.as_str().unwrap().contains("token="), "{here}");
    b.wait_js(
        "the event stream is live",
        "return document.getElementById('status').textContent === 'live'",
        WAIT,
    );
    let state = b.js("return window.ulan.cy.getElementById('node:n1').data('state')");
    assert_eq!(state, "running");

    // Add a lan through the dialog.
    b.click("#btn-add-lan");
    b.type_into("#lan-name", "web1");
    b.click("#lan-create");
    until("the dialog adds the lan", || {
        s.names("lan").iter().any(|l| l == "web1")
    });
    b.wait_js(
        "the new lan is drawn",
        "return !window.ulan.cy.getElementById('lan:web1').empty()",
        WAIT,
    );

    // Connect n1's free NIC by dragging n1 onto web1.
    b.fit();
    let from = b.at("node:n1");
    let to = b.at("lan:web1");
    b.drag(from, to);
    until(
        &format!("dragging n1 onto web1 connects {free_nic} (from {from:?} to {to:?})"),
        || s.port_lan(&free_nic).as_deref() == Some("web1"),
    );
    b.wait_js(
        "the new link is drawn",
        &format!(
            "return window.ulan.cy.getElementById('edge:{free_nic}').data('target') === 'lan:web1'"
        ),
        WAIT,
    );

    // A change made by the CLI shows within a second, without a reload.
    u.ok(&["lan", "add", "from-cli"]);
    let t0 = Instant::now();
    b.wait_js(
        "the CLI's lan is drawn",
        "return !window.ulan.cy.getElementById('lan:from-cli').empty()",
        Duration::from_secs(5),
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the CLI's change took {took:?}"
    );

    // An API error is shown as the API words it.
    b.click("#btn-add-lan");
    b.type_into("#lan-name", "red");
    b.click("#lan-create");
    let err = b.wait_js(
        "the API's error is shown",
        "const e = document.getElementById('error'); return !e.classList.contains('hidden') && e.textContent",
        WAIT,
    );
    assert!(err.as_str().unwrap().contains("already exists"), "{err}");

    // Add a node through its dialog: the request is made, and the API's
    // refusal (no such image) is shown in its words.
    b.click("#btn-add-node");
    b.type_into("#node-name", "n2");
    b.type_into("#node-image", "no-such-image");
    b.type_into("#node-nics", "red, web1");
    b.click("#node-create");
    let err = b.wait_js(
        "the node dialog's error is shown",
        "const e = document.getElementById('error'); return !e.classList.contains('hidden') && e.textContent.includes('no-such-image') && e.textContent",
        WAIT,
    );
    assert!(s.node("n2").is_none(), "a refused node was made: {err}");

    // Now for real: a UML node of the store's image, 96 MiB, a NIC on
    // blue and one on web1. It runs, as the API says and the page draws.
    b.click("#btn-add-node");
    for (field, text) in [
        ("#node-name", "n2"),
        ("#node-kind", "uml"),
        ("#node-image", "fakeuml"),
        ("#node-memory", "96"),
        ("#node-nics", "blue, web1"),
    ] {
        b.clear(field);
        b.type_into(field, text);
    }
    b.click("#node-create");
    let mut n2 = Value::Null;
    until("the dialog adds n2 and it runs", || {
        n2 = s.node("n2").unwrap_or_default();
        n2["state"] == "running"
    });
    assert_eq!(n2["kind"], "uml", "{n2}");
    assert_eq!(n2["spec"]["memory_mb"], 96, "{n2}");
    assert_eq!(n2["spec"]["image"], "fakeuml", "{n2}");
    let lans: Vec<&Value> = n2["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["lan"])
        .collect();
    assert_eq!(lans, [&json!("blue"), &json!("web1")], "{n2}");
    let n2_ports = [nic_port(&n2, 0), nic_port(&n2, 1)];
    b.wait_js(
        "n2 is drawn running, with its memory and both links",
        &format!(
            "const cy = window.ulan.cy; const n = cy.getElementById('node:n2');\
             return !n.empty() && n.data('state') === 'running' && n.data('memory_mb') === 96\
               && cy.getElementById('edge:{}').data('target') === 'lan:blue'\
               && cy.getElementById('edge:{}').data('target') === 'lan:web1'",
            n2_ports[0], n2_ports[1]
        ),
        WAIT,
    );
    assert_eq!(b.js(&colour_script("node:n2")), rgb(RUNNING));

    // Stop and start it with its panel's buttons: the API's state and
    // the page's label and colour follow.
    b.fit();
    b.click_at(b.at("node:n2"));
    b.wait_js(
        "n2's panel is open",
        "const h = document.querySelector('#details h2'); return h && h.textContent === 'node n2'",
        WAIT,
    );
    for (button, want, colour) in [("Stop", "stopped", STOPPED), ("Start", "running", RUNNING)] {
        b.click_xpath(&format!(
            "//aside[@id='details']//button[text()='{button}']"
        ));
        until(&format!("{button} makes n2 {want} in the API"), || {
            s.node("n2").is_some_and(|n| n["state"] == want)
        });
        b.wait_js(
            &format!("n2 is drawn {want}"),
            &format!(
                "const n = window.ulan.cy.getElementById('node:n2');\
                 return n.data('state') === '{want}' && n.data('label').endsWith('· {want}')\
                   && n.style('background-color') === '{}'",
                rgb(colour)
            ),
            WAIT,
        );
    }

    // Save the running lab as a lab file, and read it back as `ulan up` does.
    b.js("window.__saved = null; const orig = URL.createObjectURL; \
          URL.createObjectURL = (blob) => { blob.text().then((t) => { window.__saved = t; }); return orig(blob); };");
    b.click("#btn-save");
    let saved = b.wait_js("the lab file is made", "return window.__saved", WAIT);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("saved.json");
    std::fs::write(&file, saved.as_str().unwrap()).unwrap();
    let spec = ulan::labfile::load(&file).unwrap_or_else(|e| panic!("{e}: {saved}"));
    for want in ["red", "blue", "web1", "from-cli"] {
        assert!(
            spec.lans.iter().any(|l| l == want),
            "{want} not in {:?}",
            spec.lans
        );
    }
    let n1 = spec
        .nodes
        .iter()
        .find(|n| n.name == "n1")
        .expect("n1 saved");
    assert_eq!(
        n1.nics[1].lan.as_deref(),
        Some("web1"),
        "the dragged NIC's lan"
    );

    // Remove n2 with its panel's button: gone from the API (its NIC
    // ports too) and from the page.
    b.click_at(b.at("node:n2"));
    b.wait_js(
        "n2's panel is open again",
        "const h = document.querySelector('#details h2'); return h && h.textContent === 'node n2'",
        WAIT,
    );
    b.click_xpath("//aside[@id='details']//button[text()='Remove']");
    until("Remove removes n2 and its ports", || {
        let ports = s.names("port");
        s.node("n2").is_none() && !n2_ports.iter().any(|p| ports.contains(p))
    });
    b.wait_js(
        "n2 and its links are gone from the page",
        &format!(
            "const cy = window.ulan.cy; return cy.getElementById('node:n2').empty()\
               && cy.getElementById('edge:{}').empty() && cy.getElementById('edge:{}').empty()",
            n2_ports[0], n2_ports[1]
        ),
        WAIT,
    );

    // Remove a lan with its panel's button.
    b.click_at(b.at("lan:from-cli"));
    b.wait_js(
        "from-cli's panel is open",
        "const h = document.querySelector('#details h2'); return h && h.textContent === 'lan from-cli'",
        WAIT,
    );
    b.click_xpath("//aside[@id='details']//button[text()='Remove']");
    until("Remove removes the lan from-cli", || {
        !s.names("lan").iter().any(|l| l == "from-cli")
    });
    b.wait_js(
        "from-cli is gone from the page",
        "return window.ulan.cy.getElementById('lan:from-cli').empty()",
        WAIT,
    );

    // A lan's MAC table in its panel.
    b.js("window.ulan.cy.getElementById('lan:red').emit('tap');");
    b.wait_js(
        "the MAC table is shown",
        "const f = document.getElementById('fdb'); return f && f.textContent.startsWith('MAC table') && f.querySelector('table') !== null",
        WAIT,
    );

    // Remove a plain port from its panel.
    b.js("window.ulan.cy.getElementById('port:p3').emit('tap');");
    b.click_xpath("//aside[@id='details']//button[text()='Remove']");
    until("Remove removes p3", || {
        !s.names("port").iter().any(|p| p == "p3")
    });
    b.wait_js(
        "p3 is gone from the graph",
        "return window.ulan.cy.getElementById('port:p3').empty()",
        WAIT,
    );

    // Live counters of a port in its panel.
    b.js("const cy = window.ulan.cy; cy.getElementById('port:p1').emit('tap');");
    b.wait_js(
        "port counters are shown",
        "const s = document.getElementById('port-stats'); return s && s.textContent.includes('frames')",
        WAIT,
    );
    // Still the test user's, after all that.
    s.assert_rootless("w");
    b.js("window.ulan.cy.elements().unselect(); window.ulan.state.selected = null;");
    b.fit();
    let shot = target_dir().join("web-screenshot.png");
    b.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());
}

impl Browser {
    /// Types `text` into whatever has the focus, as key presses; `\n` is
    /// Enter.
    fn keys(&self, text: &str) {
        let mut acts = Vec::new();
        for c in text.chars() {
            let v = if c == '\n' {
                "\u{E007}".to_string()
            } else {
                c.to_string()
            };
            acts.push(json!({"type": "keyDown", "value": v}));
            acts.push(json!({"type": "keyUp", "value": v}));
        }
        self.call(
            "POST",
            "/actions",
            Some(json!({"actions": [{"type": "key", "id": "kb", "actions": acts}]})),
        );
        self.call("DELETE", "/actions", None);
    }

    fn click_at(&self, p: (f64, f64)) {
        let actions = json!({"actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [
                {"type": "pointerMove", "duration": 0, "origin": "viewport",
                 "x": p.0.round() as i64, "y": p.1.round() as i64},
                {"type": "pointerDown", "button": 0},
                {"type": "pointerUp", "button": 0},
            ],
        }]});
        self.call("POST", "/actions", Some(actions));
        self.call("DELETE", "/actions", None);
    }

    /// Clicks the element at `xpath`. The details panel is redrawn when
    /// the lab changes, so a button found may be replaced before the
    /// click lands: then it is found again.
    fn click_xpath(&self, xpath: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.call(
                "POST",
                "/element",
                Some(json!({"using": "xpath", "value": xpath})),
            );
            let e = v[ELEMENT]
                .as_str()
                .unwrap_or_else(|| panic!("no element {xpath}: {v}"))
                .to_string();
            let p = format!("/session/{}/element/{e}/click", self.session);
            match wd(self.port, "POST", &p, Some(&json!({}))) {
                Ok(_) => return,
                Err(err) if err.contains("stale element") && Instant::now() < deadline => {}
                Err(err) => panic!("clicking {xpath}: {err}"),
            }
        }
    }

    /// Empties an input.
    fn clear(&self, css: &str) {
        let e = self.find(css);
        self.call("POST", &format!("/element/{e}/clear"), Some(json!({})));
    }

    /// Clicks Fit and waits until the page has drawn two frames since.
    fn fit(&self) {
        self.click("#btn-fit");
        self.js("window.__frames = 0; const f = () => { if (++window.__frames < 2) requestAnimationFrame(f); }; requestAnimationFrame(f);");
        self.wait_js("the page redraws", "return window.__frames >= 2", WAIT);
    }
}

/// The terminal's text, as xterm.js holds it.
const TERM_TEXT: &str = "const t = window.ulan.term; if (!t) return ''; const b = t.buffer.active; \
    let s = ''; for (let i = 0; i < b.length; i++) { const l = b.getLine(i); if (l) s += l.translateToString(true) + '\\n'; } return s;";

#[test]
fn browser_console_runs_a_command_in_a_guest() {
    let test = "browser_console_runs_a_command_in_a_guest";
    if skip_without_browser(test) || common::guests::skip_without_guests(test) {
        return;
    }
    let Some(account) = common::cli::unprivileged_or_skip(test) else {
        return;
    };
    // The daemon, the guest's QEMU and `ulan web` all run as the test
    // user, with the shared store of the built-in image made readable.
    let images = common::guests::test_store();
    common::cli::give_read(&images);
    let s = Served::start(CliUser::as_account("wc", account).with_env("ULAN_IMAGES", &images));
    s.assert_rootless("wc");
    s.u.ok(&["lan", "add", "net"]);
    s.u.ok(&[
        "node",
        "add",
        "g1",
        "--accel",
        "tcg",
        "--memory",
        "192",
        "--nic",
        "net",
        "--no-wait",
    ]);
    let deadline = Instant::now() + common::guests::BOOT;
    loop {
        let g1 = s.node("g1").expect("g1");
        match g1["state"].as_str() {
            Some("running") => {
                let pid = g1["pid"].as_u64().unwrap() as u32;
                assert_eq!(uid_of_pid(pid), Some(s.account().uid), "QEMU's uid");
                break;
            }
            Some("starting") => {}
            _ => panic!("g1 did not boot: {g1}"),
        }
        assert!(
            Instant::now() < deadline,
            "g1 not running after {:?}",
            common::guests::BOOT
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let b = Browser::start();
    b.go(&s.url);
    b.wait_js(
        "the guest is drawn running",
        "return window.ulan && window.ulan.cy.getElementById('node:g1').data('state') === 'running'",
        WAIT,
    );
    // Click the node, then its Console button.
    b.fit();
    b.click_at(b.at("node:g1"));
    b.click_xpath("//aside[@id='details']//button[text()='Console']");
    b.wait_js(
        "the console's WebSocket opens",
        "return window.ulan.state.ws && window.ulan.state.ws.readyState === 1",
        WAIT,
    );
    // Enter first: a prompt, whatever the shell printed before.
    b.keys("\necho $((6*7))web-$(uname -s)\n");
    let text = b.wait_js(
        "the guest's answer in the terminal",
        &format!("const s = (() => {{ {TERM_TEXT} }})(); return s.includes('42web-Linux') && s"),
        Duration::from_secs(60),
    );
    // The command line echoed back and its output: typed keys went to the
    // guest, and what it printed came back.
    let text = text.as_str().unwrap();
    assert!(text.contains("echo $((6*7))web-$(uname -s)"), "{text}");
    b.screenshot(&target_dir().join("web-console-screenshot.png"));
}
