//! `ulan web`'s listener against a real lab: the guard (token, cookie,
//! Host, Origin, loopback only unless asked), the relay to the Unix socket
//! (plain calls and the event stream), and the WebSocket consoles (fan-out
//! to many viewers, hostile frames, a viewer that never reads) on a UML
//! node whose "kernel" is a shell script, so no emulator is needed.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use ulan::api;
use ulan::api::web::listener::{WebConfig, WebError, WebServer};
use ulan::lab::{Lab, LabConfig};

const WAIT: Duration = Duration::from_secs(20);

struct Web {
    dir: tempfile::TempDir,
    lab: Arc<Lab>,
    sock: PathBuf,
    addr: SocketAddr,
    token: String,
    _stop: watch::Sender<bool>,
}

async fn start(tweak: impl FnOnce(&mut WebConfig)) -> Web {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let mut config = LabConfig::new("w", &run);
    config.nodes.images_dir = dir.path().join("images");
    config.nodes.data_dir = dir.path().join("data");
    let lab = Lab::start(config).unwrap();
    let sock = run.join("api.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (stop, rx) = watch::channel(false);
    tokio::spawn(api::serve(listener, lab.clone(), rx.clone()));
    let mut wc = WebConfig::new("127.0.0.1:0".parse().unwrap(), sock.clone(), "w");
    tweak(&mut wc);
    let server = WebServer::bind(wc).await.unwrap();
    let addr = server.local_addr();
    let token = server.token().as_str().to_string();
    assert_eq!(
        server.url(),
        format!("http://127.0.0.1:{}/?token={token}", addr.port())
    );
    tokio::spawn(server.serve(rx));
    Web {
        dir,
        lab,
        sock,
        addr,
        token,
        _stop: stop,
    }
}

struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        v["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

impl Web {
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }

    /// One request with exactly these extra header lines.
    async fn raw(&self, method: &str, target: &str, headers: &[String], body: &str) -> Resp {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let mut req = format!("{method} {target} HTTP/1.1\r\nconnection: close\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if !body.is_empty() {
            req.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Resp {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    }

    /// A request as the page makes it: right Host, the cookie.
    async fn get(&self, path: &str) -> Resp {
        let h = [
            format!("host: {}", self.host()),
            format!("cookie: ulan_token={}", self.token),
        ];
        self.raw("GET", path, &h, "").await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_host_and_origin_are_required() {
    let w = start(|_| {}).await;
    let host = format!("host: {}", w.host());
    let cookie = format!("cookie: ulan_token={}", w.token);

    // No token: 401, and nothing of the lab shows.
    for path in [
        "/",
        "/v1/lans",
        "/ui/app.js",
        "/v1/events",
        "/ws/console/n1",
    ] {
        let r = w.raw("GET", path, std::slice::from_ref(&host), "").await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (401, "token_required"),
            "{path}"
        );
        assert!(!r.body.contains("<html"), "{path}");
    }
    // A wrong token, in every carrier: 403. One character off, and one
    // of another length.
    let mut wrong = w.token.clone().into_bytes();
    wrong[10] = if wrong[10] == b'a' { b'b' } else { b'a' };
    let wrong = String::from_utf8(wrong).unwrap();
    for h in [
        format!("cookie: ulan_token={wrong}"),
        format!("authorization: Bearer {wrong}"),
        "cookie: ulan_token=".to_string(),
        format!("cookie: ulan_token={}", &w.token[..32]),
    ] {
        let r = w
            .raw("GET", "/v1/lans", &[host.clone(), h.clone()], "")
            .await;
        assert_eq!((r.status, r.code().as_str()), (403, "bad_token"), "{h}");
    }
    let r = w
        .raw(
            "GET",
            &format!("/v1/lans?token={wrong}"),
            std::slice::from_ref(&host),
            "",
        )
        .await;
    assert_eq!(r.status, 403);

    // The printed URL: 303 to / with the cookie, which then works alone.
    let r = w
        .raw(
            "GET",
            &format!("/?token={}", w.token),
            std::slice::from_ref(&host),
            "",
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.head);
    assert_eq!(r.header("location").as_deref(), Some("/"));
    let set = r.header("set-cookie").unwrap();
    assert!(
        set.starts_with(&format!("ulan_token={};", w.token)),
        "{set}"
    );
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
    let r = w.raw("GET", "/", &[host.clone(), cookie.clone()], "").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'self'"));
    assert!(r.body.contains("/ui/app.js"));
    let bearer = format!("authorization: Bearer {}", w.token);
    let r = w.raw("GET", "/v1/lab", &[host.clone(), bearer], "").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Host must name the listener: no DNS rebinding.
    for bad in [
        "host: evil.example:1".to_string(),
        format!("host: evil.example:{}", w.addr.port()),
        format!("host: 127.0.0.1.nip.io:{}", w.addr.port()),
        "host: 127.0.0.1:1".to_string(),
    ] {
        let r = w
            .raw("GET", "/v1/lans", &[bad.clone(), cookie.clone()], "")
            .await;
        assert_eq!((r.status, r.code().as_str()), (400, "bad_host"), "{bad}");
    }
    let r = w
        .raw("GET", "/v1/lans", std::slice::from_ref(&cookie), "")
        .await;
    assert_eq!(r.code(), "bad_host", "no Host at all");
    let local = format!("host: localhost:{}", w.addr.port());
    assert_eq!(
        w.raw("GET", "/v1/lans", &[local, cookie.clone()], "")
            .await
            .status,
        200
    );

    // A foreign Origin cannot change the lab, token or not.
    for origin in [
        "origin: http://evil.example".to_string(),
        format!("origin: http://localhost.evil.example:{}", w.addr.port()),
        "origin: null".to_string(),
        format!("origin: https://{}", w.host()),
    ] {
        let r = w
            .raw(
                "POST",
                "/v1/lans",
                &[host.clone(), cookie.clone(), origin.clone()],
                r#"{"name":"x"}"#,
            )
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "foreign_origin"),
            "{origin}"
        );
    }
    let r = w
        .raw(
            "POST",
            "/v1/lans",
            &[
                host.clone(),
                cookie.clone(),
                "sec-fetch-site: cross-site".into(),
            ],
            r#"{"name":"x"}"#,
        )
        .await;
    assert_eq!(r.code(), "foreign_origin");
    assert!(w.lab.lans().is_empty(), "a refused request changed the lab");

    // The page's own origin may.
    let own = format!("origin: http://{}", w.host());
    let r = w
        .raw(
            "POST",
            "/v1/lans",
            &[host.clone(), cookie.clone(), own],
            r#"{"name":"x"}"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(w.lab.lans().len(), 1);
    // API errors come through as the API words them.
    let r = w
        .raw(
            "POST",
            "/v1/lans",
            &[host.clone(), cookie.clone()],
            r#"{"name":"x"}"#,
        )
        .await;
    assert_eq!(r.status, 409);
    assert!(r.body.contains("already exists"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn loopback_only_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0", "10.0.0.1:0"] {
        let c = WebConfig::new(addr.parse().unwrap(), sock.clone(), "w");
        match WebServer::bind(c).await {
            Err(e @ WebError::NotLoopback { .. }) => {
                assert!(e.to_string().contains("--allow-remote"), "{e}")
            }
            Err(e) => panic!("{addr}: {e}"),
            Ok(s) => panic!("{addr}: bound {}", s.local_addr()),
        }
    }
    for addr in ["127.0.0.1:0", "127.0.0.2:0", "[::1]:0"] {
        let c = WebConfig::new(addr.parse().unwrap(), sock.clone(), "w");
        match WebServer::bind(c).await {
            Ok(s) => assert!(s.local_addr().ip().is_loopback()),
            // No IPv6 on this host: not what is tested here.
            Err(WebError::Bind { .. }) if addr.starts_with('[') => {}
            Err(e) => panic!("{addr}: {e}"),
        }
    }
    let mut c = WebConfig::new("0.0.0.0:0".parse().unwrap(), sock.clone(), "w");
    c.allow_remote = true;
    let s = WebServer::bind(c).await.unwrap();
    assert!(s.local_addr().ip().is_unspecified());

    // The CLI refuses too, before it binds anything.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ulan"))
        .args(["web", "--listen", "0.0.0.0:0"])
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Refused before it even looks for the daemon (there is none here).
    assert!(
        err.contains("not a loopback address") && err.contains("--allow-remote"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_serves_api_page_and_events() {
    let w = start(|_| {}).await;
    let r = w.get("/v1/lab").await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["name"], "w");
    let r = w.get("/ui/cytoscape.min.js").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    assert!(r.body.len() > 100_000);
    assert_eq!(w.get("/ui/nothing.js").await.code(), "not_found");
    assert_eq!(w.get("/v1/lab/graph").await.status, 200);

    // The event stream through the relay: a change made on the Unix
    // socket shows within a second.
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let req = format!(
        "GET /v1/events HTTP/1.1\r\nhost: {}\r\ncookie: ulan_token={}\r\n\r\n",
        w.host(),
        w.token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("event: hello") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let t0 = Instant::now();
    w.lab.add_lan("fresh").unwrap();
    while !seen.contains("event: lan_added") {
        let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
            .await
            .expect("lan_added not relayed within a second")
            .unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(seen.contains("\"lan\":\"fresh\""), "{seen}");

    // The daemon gone: a clear 502, not a hang.
    let _ = std::fs::remove_file(&w.sock);
    let r = w.get("/v1/lab").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (502, "no_daemon"),
        "{}",
        r.body
    );
    drop(w.dir);
}

/// A UML node whose "kernel" is a shell script: it answers each line with
/// `got:<line>`, and `flood` with 8 MB of x's then `flood-done`.
async fn echo_node(w: &Web) {
    let script = w.dir.path().join("emulator");
    std::fs::write(
        &script,
        "#!/bin/sh\nwhile read -r line; do\n  case \"$line\" in\n    flood) head -c 8000000 /dev/zero | tr '\\0' x; echo; echo flood-done;;\n    *) echo \"got:$line\";;\n  esac\ndone\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = w.dir.path().join("initrd");
    std::fs::write(&initrd, b"not really an initrd").unwrap();
    let spec = serde_json::from_value(serde_json::json!({
        "name": "n1",
        "kind": "uml",
        "binary": script.display().to_string(),
        "initrd": initrd.display().to_string(),
    }))
    .unwrap();
    w.lab.add_node(spec).await.unwrap();
    let console = PathBuf::from(w.lab.node("n1").unwrap().console);
    let deadline = Instant::now() + WAIT;
    while !console.exists() {
        assert!(Instant::now() < deadline, "no console socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn viewer(w: &Web) -> Ws {
    let mut req = format!("ws://{}/ws/console/n1", w.host())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("cookie", format!("ulan_token={}", w.token).parse().unwrap());
    req.headers_mut()
        .insert("origin", format!("http://{}", w.host()).parse().unwrap());
    let tcp = TcpStream::connect(w.addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// Reads from `ws` until `want` has been seen (in the whole output).
async fn read_until(ws: &mut Ws, want: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Only the new bytes (and a want's length before them) are searched:
    // the flood is megabytes.
    let mut from = 0;
    while !seen[from..].contains(want) {
        from = seen.len().saturating_sub(want.len());
        while !seen.is_char_boundary(from) {
            from -= 1;
        }
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("never saw {want:?}; got {:?}", tail(&seen)))
            .expect("console closed")
            .unwrap();
        match msg {
            Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Message::Text(t) => seen.push_str(t.as_str()),
            Message::Close(c) => panic!("closed {c:?} before {want:?}"),
            _ => {}
        }
    }
    seen
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(200)..]
}

#[tokio::test(flavor = "multi_thread")]
async fn consoles_fan_out_to_many_viewers() {
    let w = start(|_| {}).await;
    echo_node(&w).await;
    let mut viewers = Vec::new();
    for _ in 0..8 {
        viewers.push(viewer(&w).await);
    }
    // What one types, every viewer sees answered.
    viewers[3].send(Message::text("hello\n")).await.unwrap();
    for v in &mut viewers {
        read_until(v, "got:hello").await;
    }
    viewers[0]
        .send(Message::binary(b"second\n".to_vec()))
        .await
        .unwrap();
    for v in &mut viewers {
        read_until(v, "got:second").await;
    }
    // One leaves; the others go on. A late viewer gets the recent output.
    let gone = viewers.pop().unwrap();
    drop(gone);
    let mut late = viewer(&w).await;
    read_until(&mut late, "got:second").await;
    late.send(Message::text("third\n")).await.unwrap();
    for v in viewers.iter_mut().chain(std::iter::once(&mut late)) {
        read_until(v, "got:third").await;
    }

    // A console that is not there: a clear error, no upgrade.
    let r = w.get("/ws/console/ghost").await;
    assert_eq!(r.status, 400, "{}", r.body); // not an upgrade request
    let mut req = format!("ws://{}/ws/console/ghost", w.host())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("cookie", format!("ulan_token={}", w.token).parse().unwrap());
    let tcp = TcpStream::connect(w.addr).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 404)
        }
        other => panic!("ghost console: {other:?}"),
    }
}

/// Sends a raw WebSocket handshake and returns the stream after the 101.
async fn raw_ws(w: &Web) -> TcpStream {
    raw_ws_with(w, None).await
}

async fn raw_ws_with(w: &Web, rcvbuf: Option<u32>) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    let mut s = sock.connect(w.addr).await.unwrap();
    let req = format!(
        "GET /ws/console/n1 HTTP/1.1\r\nhost: {}\r\ncookie: ulan_token={}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        w.host(),
        w.token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1);
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // RFC 6455's own example key and answer.
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    s
}

/// Reads until the server closes the connection (or sends a close frame
/// and closes); true when it did within the time.
async fn closes(mut s: TcpStream) -> bool {
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_frames_end_only_their_viewer() {
    let w = start(|_| {}).await;
    echo_node(&w).await;
    let mut good = viewer(&w).await;

    let mask = [1u8, 2, 3, 4];
    let masked = |opcode: u8, payload: &[u8]| {
        let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // A client frame without a mask.
        ("unmasked", vec![0x81, 0x03, b'l', b's', b'\n']),
        // Opcodes 3 and 0xB are reserved.
        ("opcode 3", masked(0x3, b"x")),
        ("opcode 0xB", masked(0xB, b"x")),
        // RSV bits set without an extension.
        ("rsv1", {
            let mut f = masked(0x1, b"x");
            f[0] |= 0x40;
            f
        }),
        // A frame announcing 1 GiB.
        ("oversized", {
            let mut f = vec![0x82, 0x80 | 127];
            f.extend_from_slice(&(1u64 << 30).to_be_bytes());
            f.extend_from_slice(&mask);
            f.extend_from_slice(&[0u8; 1024]);
            f
        }),
        // A control frame longer than 125 bytes.
        ("long ping", {
            let mut f = vec![0x89, 0x80 | 126, 0x00, 200];
            f.extend_from_slice(&mask);
            f.extend_from_slice(&[0u8; 200]);
            f
        }),
        // Text that is not UTF-8.
        ("bad utf-8", masked(0x1, &[0xff, 0xfe])),
        // A continuation with nothing to continue.
        ("stray continuation", masked(0x0, b"x")),
    ];
    for (what, bytes) in cases {
        let mut s = raw_ws(&w).await;
        s.write_all(&bytes).await.unwrap();
        assert!(closes(s).await, "{what}: the connection stayed open");
        // The good viewer is unaffected.
        good.send(Message::text(format!("after-{}\n", what.replace(' ', "-"))))
            .await
            .unwrap();
        read_until(&mut good, &format!("got:after-{}", what.replace(' ', "-"))).await;
    }
    // Garbage instead of a frame, and a client that hangs up mid-frame.
    let mut s = raw_ws(&w).await;
    s.write_all(&[0x81, 0xfe, 0x01]).await.unwrap();
    drop(s);
    let mut s = raw_ws(&w).await;
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closes(s).await);
    good.send(Message::text("still\n")).await.unwrap();
    read_until(&mut good, "got:still").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_that_never_reads_is_dropped_alone() {
    // 2 MiB of queue: a reader that reads keeps up on a loaded machine;
    // one that never reads overflows it (or blocks a send past the
    // timeout, whichever comes first).
    let w = start(|c| {
        c.viewer_queue = 512;
        c.viewer_send_timeout = Duration::from_secs(2);
    })
    .await;
    echo_node(&w).await;
    let mut fast = viewer(&w).await;
    // Handshake done, then never read, with a small receive buffer: its
    // socket fills, then its queue, and the hub drops it.
    let stalled = raw_ws_with(&w, Some(4096)).await;
    fast.send(Message::text("flood\n")).await.unwrap();
    let t0 = Instant::now();
    let seen = read_until(&mut fast, "flood-done").await;
    assert!(
        seen.matches('x').count() >= 8_000_000,
        "the fast viewer lost output"
    );
    eprintln!("8 MB through the console in {:?}", t0.elapsed());
    fast.send(Message::text("after\n")).await.unwrap();
    read_until(&mut fast, "got:after").await;
    // The stalled viewer was cut off (its queue overflowed or a send
    // took longer than the timeout), without stalling anyone.
    assert!(
        closes(stalled).await,
        "the stalled viewer is still attached"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_tcp_port_is_refused_and_harmless() {
    let w = start(|_| {}).await;
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: {}\r\nx: {}\r\n\r\n",
        w.host(),
        "a".repeat(200_000)
    );
    let cases: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), // a TLS hello
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET /../../etc/passwd HTTP/1.1\r\n\r\n".to_vec(),
        huge.into_bytes(),
        vec![0u8; 4096],
    ];
    for bytes in cases {
        let mut s = TcpStream::connect(w.addr).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        // Whatever the answer, it is never the lab.
        assert!(
            !text.contains("\"lans\"") && !text.contains("<html"),
            "{text}"
        );
    }
    // Path tricks with a good token reach no file and no other route.
    for path in [
        "/ui/..%2f..%2fetc%2fpasswd",
        "/ui/../../Cargo.toml",
        "//v1/lans",
        "/ws/console/../x",
    ] {
        let r = w.get(path).await;
        assert_eq!(r.status / 100, 4, "{path}: {}", r.body);
    }
    assert_eq!(w.get("/v1/lab").await.status, 200);
}
