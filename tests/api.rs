//! The HTTP API end to end: a real server on a Unix socket in a temporary
//! run directory, driven with `ulan::api::Client` and with raw bytes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use ulan::api::routes::{decode_body, Op};
use ulan::api::{self, Client, ClientError, ServerConfig, SseEvent, ROUTES};
use ulan::lab::{Lab, LabConfig};
use ulan::ports::PortKind;

const WAIT: Duration = Duration::from_secs(10);

struct Api {
    dir: tempfile::TempDir,
    sock: PathBuf,
    lab: Arc<Lab>,
    client: Client,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl Api {
    async fn start() -> Api {
        Api::start_with(ServerConfig::default()).await
    }

    async fn start_with(config: ServerConfig) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        // An empty image store: node requests never find a built image.
        let mut config_lab = LabConfig::new("t", &run);
        config_lab.nodes.images_dir = dir.path().join("images");
        config_lab.nodes.data_dir = dir.path().join("data");
        let lab = Lab::start(config_lab).unwrap();
        let sock = run.join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (stop, rx) = watch::channel(false);
        let server = tokio::spawn(api::serve_with(listener, lab.clone(), rx, config));
        let client = Client::new(&sock, "t").with_timeout(Some(WAIT));
        Api {
            dir,
            sock,
            lab,
            client,
            stop,
            server: Some(server),
        }
    }

    /// Stops the server and waits for it.
    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            tokio::time::timeout(WAIT, server)
                .await
                .expect("server did not stop")
                .unwrap();
        }
    }

    /// Everything observable: lans, ports, and every file under the
    /// temporary directory (the run dir and its parent).
    async fn state(&self) -> (Value, Value, BTreeSet<PathBuf>) {
        let lans = self
            .client
            .call(Method::GET, "/v1/lans", None)
            .await
            .unwrap();
        let ports = self
            .client
            .call(Method::GET, "/v1/ports", None)
            .await
            .unwrap();
        (lans, ports, files(self.dir.path()))
    }

    async fn raw(&self, request: &[u8]) -> RawResponse {
        raw_exchange(&self.sock, request).await
    }

    /// One request with an explicit content type and body bytes.
    async fn http(
        &self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: &[u8],
    ) -> RawResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(ct) = ctype {
            req.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PATCH" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.raw(&bytes).await
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.lab.shutdown();
    }
}

fn files(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Writes `request`, reads until the server closes, and splits the answer.
async fn raw_exchange(sock: &Path, request: &[u8]) -> RawResponse {
    let mut s = UnixStream::connect(sock).await.unwrap();
    // The server may answer (a 413, say) and close before it has read a
    // large request whole: the answer is still there to read.
    if let Err(e) = s.write_all(request).await {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "writing the request: {e}"
        );
    }
    parse_raw(&read_all(&mut s).await)
}

/// Reads until the server closes. A reset after the answer (the server
/// closed with part of our request unread) is not an error here.
async fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let res = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("the server did not close the connection");
    if let Err(e) = res {
        assert!(!buf.is_empty(), "read failed before any answer: {e}");
    }
    buf
}

fn parse_raw(buf: &[u8]) -> RawResponse {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    RawResponse {
        status,
        head,
        body: buf[split + 4..].to_vec(),
    }
}

fn openapi() -> Value {
    serde_json::from_str(api::OPENAPI).expect("api/openapi.json is not JSON")
}

/// Property names of a component schema (following allOf is not needed:
/// every schema lists its properties).
fn schema_props(doc: &Value, name: &str) -> BTreeSet<String> {
    let s = &doc["components"]["schemas"][name];
    let props: BTreeSet<String> = s["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has no properties"))
        .keys()
        .cloned()
        .collect();
    props
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// The object has exactly the schema's properties, and the schema requires
/// them all (the server always sends every field).
fn assert_schema(doc: &Value, name: &str, v: &Value) {
    assert_eq!(keys(v), schema_props(doc, name), "{name} vs {v}");
    let required: BTreeSet<String> = doc["components"]["schemas"][name]["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert_eq!(required, schema_props(doc, name), "{name}: required");
}

async fn next_event(events: &mut api::EventStream) -> SseEvent {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("no event in time")
        .unwrap()
        .expect("event stream ended")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_happy_path() {
    let api = Api::start().await;
    let c = &api.client;
    let doc = openapi();

    let lab = c.lab().await.unwrap();
    assert_eq!((lab.name.as_str(), lab.lans, lab.ports), ("t", 0, 0));
    assert_eq!(lab.api_socket, api.sock.display().to_string());
    assert_schema(
        &doc,
        "Lab",
        &c.call(Method::GET, "/v1/lab", None).await.unwrap(),
    );
    assert!(c.lans().await.unwrap().is_empty());
    assert!(c.ports().await.unwrap().is_empty());
    // The lab as a lab file: every key the schema requires, even empty.
    let spec = c.call(Method::GET, "/v1/lab/spec", None).await.unwrap();
    for key in doc["components"]["schemas"]["LabSpec"]["required"]
        .as_array()
        .unwrap()
    {
        let key = key.as_str().unwrap();
        assert_eq!(spec[key], json!([]), "{key} in {spec}");
    }

    // POST /v1/lans: 201 with Location.
    let r = api
        .http(
            "POST",
            "/v1/lans",
            Some("application/json"),
            br#"{"name":"l1"}"#,
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location").as_deref(), Some("/v1/lans/l1"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.json(), json!({"name": "l1", "ports": []}));
    assert_schema(&doc, "Lan", &r.json());
    let l2 = c.add_lan("l2").await.unwrap();
    assert_eq!(l2.name, "l2");
    assert_eq!(c.lan("l1").await.unwrap().ports, Vec::<String>::new());
    let names: Vec<_> = c
        .lans()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["l1", "l2"]);

    // Ports.
    let p = c
        .add_port("p1", PortKind::Stream, Some("l1"))
        .await
        .unwrap();
    assert_eq!(
        (p.kind, p.lan.as_deref(), p.up),
        (PortKind::Stream, Some("l1"), false)
    );
    assert!(Path::new(&p.path).exists(), "{} missing", p.path);
    assert!(Path::new(&p.path).starts_with(api.dir.path()));
    let p2 = c.add_port("p2", PortKind::Dgram, None).await.unwrap();
    assert_eq!(p2.lan, None);
    let (status, body) = c
        .request(
            Method::POST,
            "/v1/ports",
            Some(json!({"name": "p3", "kind": "vde", "lan": null})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_schema(&doc, "Port", &body);
    c.add_port("p4", PortKind::Bess, Some("l2")).await.unwrap();
    assert_eq!(c.port("p1").await.unwrap(), p);
    assert_eq!(c.ports().await.unwrap().len(), 4);
    assert_eq!(c.lan("l1").await.unwrap().ports, ["p1"]);

    // PATCH: to another lan, to none, and to the same lan again.
    let moved = c.move_port("p1", Some("l2")).await.unwrap();
    assert_eq!(moved.lan.as_deref(), Some("l2"));
    assert_eq!(c.lan("l2").await.unwrap().ports, ["p1", "p4"]);
    assert_eq!(c.move_port("p1", None).await.unwrap().lan, None);
    assert_eq!(c.move_port("p1", None).await.unwrap().lan, None);
    assert_eq!(
        c.move_port("p1", Some("l1")).await.unwrap().lan.as_deref(),
        Some("l1")
    );

    // Stats: every counter, all zero.
    let stats = c
        .call(Method::GET, "/v1/ports/p1/stats", None)
        .await
        .unwrap();
    assert_schema(&doc, "PortStats", &stats);
    let typed = c.port_stats("p1").await.unwrap();
    assert_eq!(typed.name, "p1");
    assert!(typed.counters.len() >= 18, "{:?}", typed.counters);
    assert!(typed.counters.values().all(|&v| v == 0));

    // FDB: plug a client into p1 and let the switch learn its address.
    let scratch = api.dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let mut ep =
        ulan::testkit::Endpoint::connect(PortKind::Stream, Path::new(&p.path), &scratch).unwrap();
    let src = ulan::testkit::mac(7);
    let deadline = Instant::now() + WAIT;
    let fdb = loop {
        ep.send(&ulan::testkit::frame(
            ulan::wire::MacAddr::BROADCAST,
            src,
            60,
            1,
        ))
        .unwrap();
        let fdb = c.fdb("l1").await.unwrap();
        if !fdb.entries.is_empty() {
            break fdb;
        }
        assert!(Instant::now() < deadline, "address never learned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(fdb.lan, "l1");
    assert_eq!(fdb.entries[0].port, "p1");
    assert_eq!(fdb.entries[0].mac, src.to_string());
    let raw_fdb = c.call(Method::GET, "/v1/lans/l1/fdb", None).await.unwrap();
    assert_schema(&doc, "Fdb", &raw_fdb);
    assert_schema(&doc, "FdbEntry", &raw_fdb["entries"][0]);
    assert!(c.port("p1").await.unwrap().up);
    assert!(c.port_stats("p1").await.unwrap().counters["rx_frames"] >= 1);
    assert!(c.fdb("l2").await.unwrap().entries.is_empty());
    drop(ep);

    // DELETE: 204 and no body; the socket is gone.
    let r = api.http("DELETE", "/v1/ports/p1", None, b"").await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert!(!Path::new(&p.path).exists());
    for name in ["p2", "p3", "p4"] {
        c.remove_port(name).await.unwrap();
    }
    c.remove_lan("l1").await.unwrap();
    let (status, body) = c
        .request(Method::DELETE, "/v1/lans/l2", None)
        .await
        .unwrap();
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    assert!(c.lans().await.unwrap().is_empty());
    assert!(c.ports().await.unwrap().is_empty());

    // The OpenAPI document, byte for byte.
    let r = api.http("GET", "/v1/openapi.json", None, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, api::OPENAPI.as_bytes());
    assert_eq!(c.openapi().await.unwrap(), doc);
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_match_the_openapi_document() {
    let doc = openapi();
    assert_eq!(doc["openapi"], "3.0.3");
    let methods = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (m, op) in item.as_object().unwrap() {
            if methods.contains(&m.as_str()) {
                documented.insert((m.to_uppercase(), path.clone()));
                // Path parameters are declared.
                for param in path.split('/').filter_map(|s| s.strip_prefix('{')) {
                    let param = param.trim_end_matches('}');
                    let declared = op["parameters"].to_string();
                    assert!(
                        declared.contains(&format!("parameters/{param}")),
                        "{m} {path}: {param}"
                    );
                }
                // Every $ref resolves.
                assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            }
        }
    }
    let table: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(table.len(), ROUTES.len(), "duplicate routes");
    assert_eq!(table, documented, "ROUTES and api/openapi.json differ");

    // Every $ref points at something.
    let text = api::OPENAPI;
    for piece in text.split("\"$ref\": \"#/").skip(1) {
        let target = &piece[..piece.find('"').unwrap()];
        let mut node = &doc;
        for part in target.split('/') {
            node = &node[part];
        }
        assert!(!node.is_null(), "dangling $ref #/{target}");
    }

    // Each route is served: no no_route and no 405.
    let api = Api::start().await;
    for r in ROUTES {
        let path = r
            .path
            .replace("{lan}", "ghost")
            .replace("{port}", "ghost")
            .replace("{node}", "ghost")
            .replace("{capture}", "ghost")
            .replace("{asset}", "ghost");
        if r.path == "/v1/events" {
            let mut events = api.client.events().await.unwrap();
            assert_eq!(next_event(&mut events).await.event, "hello");
            continue;
        }
        if r.path == "/" {
            let r = api.http("GET", "/", None, b"").await;
            assert_eq!(r.status, 200);
            assert!(r.header("content-type").unwrap().starts_with("text/html"));
            continue;
        }
        if r.path == "/metrics" {
            let text = api.client.metrics_text().await.unwrap();
            assert!(text.contains("# TYPE ulan_build_info gauge"), "{text}");
            continue;
        }
        let body = if matches!(r.method, "POST" | "PATCH" | "PUT") {
            Some(json!({}))
        } else {
            None
        };
        let method = Method::from_bytes(r.method.as_bytes()).unwrap();
        let (status, value) = api.client.request(method, &path, body).await.unwrap();
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{} {path}",
            r.method
        );
        assert_ne!(value["error"]["code"], "no_route", "{} {path}", r.method);
        // Whatever it says is documented for that operation.
        let op = &doc["paths"][r.path][r.method.to_lowercase()];
        assert!(
            !op["responses"][status.as_str()].is_null(),
            "{} {path} answered {status}, not in the document",
            r.method
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_change_nothing() {
    let api = Api::start().await;
    let c = &api.client;
    c.add_lan("l1").await.unwrap();
    c.add_lan("l2").await.unwrap();
    c.add_port("p1", PortKind::Stream, Some("l1"))
        .await
        .unwrap();
    let before = api.state().await;
    assert!(before.2.iter().any(|p| p.ends_with("ports/p1")));

    struct Case {
        method: &'static str,
        path: String,
        ctype: Option<&'static str>,
        body: Vec<u8>,
        status: u16,
        code: &'static str,
    }
    let json_ct = Some("application/json");
    let mut cases = Vec::new();
    // JSON content type: (method, path, body, status, code).
    let with_json: &[(&str, &str, &str, u16, &str)] = &[
        // Node requests are checked before anything is made.
        ("POST", "/v1/nodes", "{}", 400, "bad_json"),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","memroy_mb":5}"#,
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","nics":"l1"}"#,
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","nics":[{"lan":"l1","ip":"10.0.0.1"}]}"#,
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","kind":"docker"}"#,
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"../h"}"#,
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","memory_mb":1}"#,
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","cpus":0}"#,
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","nics":[{"lan":"l1","transport":"bess"}]}"#,
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","nics":[{"lan":"l1","mac":"01:00:00:00:00:01"}]}"#,
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","image":"../../etc"}"#,
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","nics":[{"lan":"nolan"}]}"#,
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","image":"nope"}"#,
            422,
            "invalid_image",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","nics":[{"lan":"l1"}]}"#,
            422,
            "invalid_image",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","kernel":"/nonexistent/k"}"#,
            422,
            "missing_file",
        ),
        (
            "POST",
            "/v1/nodes",
            r#"{"name":"h1","kernel":"/etc/hostname","binary":"/nonexistent/qemu"}"#,
            422,
            "missing_file",
        ),
        (
            "POST",
            "/v1/nodes/ghost/exec",
            r#"{"argv":[]}"#,
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/nodes/ghost/exec",
            r#"{"argv":"ls"}"#,
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/nodes/ghost/exec",
            r#"{"argv":["ls"],"timeout_s":0}"#,
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/nodes/ghost/exec",
            r#"{"argv":["ls"]}"#,
            404,
            "not_found",
        ),
        ("POST", "/v1/nodes/ghost/stop", "not json", 400, "bad_json"),
        (
            "POST",
            "/v1/nodes/ghost/stop",
            r#"{"timeout_s":99999}"#,
            422,
            "invalid_value",
        ),
        ("POST", "/v1/nodes/ghost/stop", "", 404, "not_found"),
        (
            "POST",
            "/v1/nodes/ghost/commit",
            r#"{"image":"../x"}"#,
            422,
            "invalid_name",
        ),
        (
            "POST",
            "/v1/nodes/ghost/commit",
            r#"{"image":"x"}"#,
            404,
            "not_found",
        ),
        // Not JSON, wrong types, unknown and missing fields.
        ("POST", "/v1/lans", "not json", 400, "bad_json"),
        ("POST", "/v1/lans", "name=x", 400, "bad_json"),
        ("POST", "/v1/lans", "", 400, "bad_json"),
        ("POST", "/v1/lans", r#"{"name":5}"#, 400, "bad_json"),
        ("POST", "/v1/lans", r#"["x"]"#, 400, "bad_json"),
        ("POST", "/v1/lans", r#""x""#, 400, "bad_json"),
        (
            "POST",
            "/v1/lans",
            r#"{"name":"x","ports":[]}"#,
            400,
            "bad_json",
        ),
        ("POST", "/v1/lans", "{}", 400, "bad_json"),
        (
            "POST",
            "/v1/lans",
            r#"{"name":"x"} trailing"#,
            400,
            "bad_json",
        ),
        ("POST", "/v1/ports", r#"{"name":"x"}"#, 400, "bad_json"),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"x","kind":1}"#,
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"x","kind":"dgram","up":true}"#,
            400,
            "bad_json",
        ),
        // Names that are no names.
        (
            "POST",
            "/v1/lans",
            r#"{"name":"../x"}"#,
            422,
            "invalid_name",
        ),
        (
            "POST",
            "/v1/lans",
            r#"{"name":"%2e%2e%2f"}"#,
            422,
            "invalid_name",
        ),
        ("POST", "/v1/lans", r#"{"name":".."}"#, 422, "invalid_name"),
        ("POST", "/v1/lans", r#"{"name":"LAN"}"#, 422, "invalid_name"),
        ("POST", "/v1/lans", r#"{"name":""}"#, 422, "invalid_name"),
        (
            "POST",
            "/v1/lans",
            r#"{"name":"a\u0000b"}"#,
            422,
            "invalid_name",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"../../evil","kind":"stream"}"#,
            422,
            "invalid_name",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"api.sock/x","kind":"stream"}"#,
            422,
            "invalid_name",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"Evil","kind":"stream"}"#,
            422,
            "invalid_name",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"x","kind":"vde","lan":"../l1"}"#,
            422,
            "invalid_name",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"x","kind":"macvtap"}"#,
            422,
            "invalid_kind",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"x","kind":"STREAM"}"#,
            422,
            "invalid_kind",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"x","kind":"vde","lan":"nolan"}"#,
            404,
            "not_found",
        ),
        // PATCH.
        ("PATCH", "/v1/ports/p1", "{}", 400, "bad_json"),
        ("PATCH", "/v1/ports/p1", r#"{"lan":5}"#, 400, "bad_json"),
        (
            "PATCH",
            "/v1/ports/p1",
            r#"{"lan":null,"name":"q"}"#,
            400,
            "bad_json",
        ),
        (
            "PATCH",
            "/v1/ports/p1",
            r#"{"lan":"nolan"}"#,
            404,
            "not_found",
        ),
        (
            "PATCH",
            "/v1/ports/p1",
            r#"{"lan":"../l2"}"#,
            422,
            "invalid_name",
        ),
        (
            "PATCH",
            "/v1/ports/nope",
            r#"{"lan":null}"#,
            404,
            "not_found",
        ),
        ("PATCH", "/v1/ports/..", r#"{"lan":null}"#, 404, "no_route"),
        // Duplicates.
        (
            "POST",
            "/v1/lans",
            r#"{"name":"l1"}"#,
            409,
            "already_exists",
        ),
        (
            "POST",
            "/v1/ports",
            r#"{"name":"p1","kind":"dgram"}"#,
            409,
            "already_exists",
        ),
        // Wrong methods.
        (
            "PUT",
            "/v1/lans",
            r#"{"name":"x"}"#,
            405,
            "method_not_allowed",
        ),
        ("POST", "/v1/events", "{}", 405, "method_not_allowed"),
        (
            "POST",
            "/v1/ports/p1",
            r#"{"lan":null}"#,
            405,
            "method_not_allowed",
        ),
    ];
    for &(method, path, body, status, code) in with_json {
        cases.push(Case {
            method,
            path: path.into(),
            ctype: json_ct,
            body: body.as_bytes().to_vec(),
            status,
            code,
        });
    }
    // Content types that are not JSON.
    for ct in [
        "text/plain",
        "multipart/form-data; boundary=a",
        "application/xml",
    ] {
        cases.push(Case {
            method: "POST",
            path: "/v1/lans".into(),
            ctype: Some(ct),
            body: br#"{"name":"x"}"#.to_vec(),
            status: 415,
            code: "unsupported_media_type",
        });
    }
    let long_name = format!(r#"{{"name":"{}"}}"#, "a".repeat(100));
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(70 * 1024));
    for (body, status, code) in [
        (long_name.into_bytes(), 422, "invalid_name"),
        (b"\xff\xfe\x00".to_vec(), 400, "bad_json"),
        ("[".repeat(50_000).into_bytes(), 400, "bad_json"),
        // Too big (Content-Length says so).
        (big.into_bytes(), 413, "body_too_large"),
    ] {
        cases.push(Case {
            method: "POST",
            path: "/v1/lans".into(),
            ctype: json_ct,
            body,
            status,
            code,
        });
    }
    // No body: (method, path, status, code); an empty code is not checked.
    let long_path = format!("/v1/ports/{}", "a".repeat(100));
    let without: &[(&str, &str, u16, &str)] = &[
        ("DELETE", "/v1/lans/l1", 409, "lan_not_empty"),
        ("GET", "/v1/lans/nope", 404, "not_found"),
        ("DELETE", "/v1/ports/nope", 404, "not_found"),
        ("GET", "/v1/ports/nope/stats", 404, "not_found"),
        ("GET", "/v1/lans/nope/fdb", 404, "not_found"),
        ("GET", "/v1/nothing", 404, "no_route"),
        ("GET", "/ui/../app.js", 404, "no_route"),
        ("GET", "/ui/nothing.js", 404, "not_found"),
        ("POST", "/", 405, "method_not_allowed"),
        ("GET", "/v1/lans/", 404, "no_route"),
        ("GET", "/v1/lans/l1/", 404, "no_route"),
        ("GET", "/v1/lans/L1", 404, "no_route"),
        ("GET", "/v1/lans/..", 404, "no_route"),
        ("GET", "/v1/lans/%2e%2e", 404, "no_route"),
        ("GET", "/v1/lans/%2e%2e%2fapi.sock", 404, "no_route"),
        ("DELETE", "/v1/lans/..%2F..%2Frun", 404, "no_route"),
        ("DELETE", "/v1/ports/../api.sock", 404, "no_route"),
        ("DELETE", "/v1/ports/%2E%2E%2Fapi.sock", 404, "no_route"),
        ("DELETE", "/v1/ports/p1%00", 404, "no_route"),
        ("GET", &long_path, 404, "no_route"),
        ("GET", "/v1/lab?x=../../etc", 200, ""),
        ("DELETE", "/v1/lab", 405, "method_not_allowed"),
        ("BREW", "/v1/lans", 405, "method_not_allowed"),
        ("HEAD", "/v1/lans", 405, ""),
    ];
    for &(method, path, status, code) in without {
        cases.push(Case {
            method,
            path: path.into(),
            ctype: None,
            body: Vec::new(),
            status,
            code,
        });
    }
    for Case {
        method,
        path,
        ctype,
        body,
        status,
        code,
    } in cases
    {
        let r = api.http(method, &path, ctype, &body).await;
        let what = format!(
            "{method} {path} {:?}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if !code.is_empty() {
            assert_eq!(r.code(), code, "{what}");
            let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(!msg.is_empty() && msg.len() < 1000, "{what}: {msg}");
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/json")
            );
        }
        if status == 405 {
            assert!(r.header("allow").is_some(), "{what}: no Allow header");
        }
        assert_eq!(api.state().await, before, "{what} changed something");
        assert!(api.lab.nodes().is_empty(), "{what} left a node");
    }

    // Specific messages.
    let r = api.http("PATCH", "/v1/ports/p1", json_ct, b"{}").await;
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("give \"lan\""));
    let r = api.http("DELETE", "/v1/lab", None, b"").await;
    assert_eq!(r.header("allow").as_deref(), Some("GET"));
    let r = api.http("PUT", "/v1/ports/p1", None, b"").await;
    assert_eq!(r.header("allow").as_deref(), Some("GET, PATCH, DELETE"));
    let r = api.http("DELETE", "/v1/lans/l1", None, b"").await;
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("p1"));

    // A big body sent chunked (no Content-Length) is cut off too.
    let mut req = b"POST /v1/lans HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..80 {
        req.extend_from_slice(format!("400\r\n{}\r\n", " ".repeat(1024)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = api.raw(&req).await;
    assert_eq!((r.status, r.code().as_str()), (413, "body_too_large"));
    assert_eq!(api.state().await, before);

    // The typed client reports API errors with code and message.
    match c.add_lan("BAD").await {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => {
            assert_eq!((status.as_u16(), code.as_str()), (422, "invalid_name"));
            assert!(message.contains("lan"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.lan("../l1").await.unwrap_err().code(), Some("no_route"));
    assert_eq!(
        c.remove_lan("..").await.unwrap_err().code(),
        Some("no_route")
    );
    assert_eq!(
        c.move_port("p1", Some("zz")).await.unwrap_err().code(),
        Some("not_found")
    );
    assert_eq!(
        c.remove_lan("l1").await.unwrap_err().code(),
        Some("lan_not_empty")
    );
    assert_eq!(api.state().await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn lenient_content_types() {
    let api = Api::start().await;
    for (i, ct) in [
        None,
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("APPLICATION/JSON"),
        Some("application/x-www-form-urlencoded"),
        Some("application/merge-patch+json"),
    ]
    .into_iter()
    .enumerate()
    {
        let body = format!(r#"{{"name":"l{i}"}}"#);
        let r = api.http("POST", "/v1/lans", ct, body.as_bytes()).await;
        assert_eq!(
            r.status,
            201,
            "{ct:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(api.client.lans().await.unwrap().len(), 6);
    // Whitespace around the JSON is fine.
    let r = api
        .http("PATCH", "/v1/ports/x", None, b"  {\"lan\": null}\n")
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn events_stream_in_order() {
    let api = Api::start().await;
    let c = &api.client;
    let doc = openapi();
    c.add_lan("before").await.unwrap();

    let mut events = c.events().await.unwrap();
    let hello = next_event(&mut events).await;
    assert_eq!(hello.event, "hello");
    assert_eq!(hello.id, None);
    assert_schema(&doc, "Hello", &hello.data);
    assert_schema(&doc, "Lab", &hello.data["lab"]);
    assert_eq!(hello.data["lans"], json!([{"name": "before", "ports": []}]));
    assert_eq!(hello.data["ports"], json!([]));

    c.add_lan("l1").await.unwrap();
    c.add_port("p1", PortKind::Stream, Some("l1"))
        .await
        .unwrap();
    c.move_port("p1", None).await.unwrap();
    c.remove_port("p1").await.unwrap();
    c.remove_lan("l1").await.unwrap();

    let expected = [
        ("lan_added", "LanAddedEvent"),
        ("port_added", "PortAddedEvent"),
        ("port_moved", "PortMovedEvent"),
        ("port_removed", "PortRemovedEvent"),
        ("lan_removed", "LanRemovedEvent"),
    ];
    let mut last_seq = 0;
    for (name, schema) in expected {
        let ev = next_event(&mut events).await;
        assert_eq!(ev.event, name, "{ev:?}");
        let seq = ev.id.expect("event without id");
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        last_seq = seq;
        assert_eq!(ev.data["seq"], seq);
        assert_eq!(ev.data["type"], name);
        assert_schema(&doc, schema, &ev.data);
        match name {
            "lan_added" => assert_eq!(ev.data["lan"], "l1"),
            "port_added" => {
                assert_eq!(ev.data["kind"], "stream");
                assert_eq!(ev.data["lan"], "l1");
            }
            "port_moved" => {
                assert_eq!(ev.data["from"], "l1");
                assert_eq!(ev.data["to"], Value::Null);
            }
            _ => {}
        }
    }
    // The event names in the document's discriminator are the real ones.
    let mapping = doc["components"]["schemas"]["Event"]["discriminator"]["mapping"]
        .as_object()
        .unwrap();
    for (name, _) in expected {
        assert!(mapping.contains_key(name), "{name}");
    }
    // Eight topology and port events (port_refused: tests/tap.rs makes
    // them), three node events (tests/guests.rs sees those from real
    // guests).
    assert_eq!(mapping.len(), 11);
    for node_event in ["node_added", "node_removed", "node_state"] {
        assert!(mapping.contains_key(node_event), "{node_event}");
    }

    // A second subscriber sees the same stream; port_up shows too.
    let mut second = c.events().await.unwrap();
    assert_eq!(next_event(&mut second).await.event, "hello");
    let p = c.add_port("p2", PortKind::Stream, None).await.unwrap();
    let scratch = api.dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let ep =
        ulan::testkit::Endpoint::connect(PortKind::Stream, Path::new(&p.path), &scratch).unwrap();
    for stream in [&mut events, &mut second] {
        assert_eq!(next_event(stream).await.event, "port_added");
        let up = next_event(stream).await;
        assert_eq!(up.event, "port_up");
        assert_schema(&doc, "PortUpEvent", &up.data);
    }
    drop(ep);
    let down = next_event(&mut events).await;
    assert_eq!(down.event, "port_down");
    assert_schema(&doc, "PortDownEvent", &down.data);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_event_readers_are_told_they_lagged() {
    let api = Api::start().await;
    let mut events = api.client.events().await.unwrap();
    assert_eq!(next_event(&mut events).await.event, "hello");
    // Far more than the socket, hyper's buffer and the 1024-event queue
    // hold while nobody reads.
    for i in 0..20_000 {
        api.lab.events().emit(ulan::events::Event::PortDown {
            port: format!("p{i}"),
            reason: "x".repeat(64),
        });
    }
    let mut last = 0;
    let mut lagged = None;
    while let Some(ev) = tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap()
        .unwrap()
    {
        if ev.event == "lagged" {
            lagged = Some(ev.data["missed"].as_u64().unwrap());
            continue;
        }
        let seq = ev.id.unwrap();
        assert!(seq > last);
        last = seq;
        if seq == 20_000 {
            break;
        }
    }
    assert!(lagged.unwrap_or(0) > 0, "never lagged");
    assert_eq!(last, 20_000, "did not catch up");
}

#[tokio::test(flavor = "multi_thread")]
async fn event_stream_sends_keepalives() {
    let api = Api::start_with(ServerConfig {
        keepalive: Duration::from_millis(100),
        ..ServerConfig::default()
    })
    .await;
    let mut s = UnixStream::connect(&api.sock).await.unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !String::from_utf8_lossy(&seen).contains(": keepalive\n\n") {
        assert!(
            Instant::now() < deadline,
            "no keepalive: {}",
            String::from_utf8_lossy(&seen)
        );
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed");
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text
        .to_ascii_lowercase()
        .contains("content-type: text/event-stream"));
    assert!(text.contains("event: hello\ndata: {"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_silent_clients_do_not_block_others() {
    let api = Api::start_with(ServerConfig {
        header_timeout: Duration::from_secs(2),
        body_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    })
    .await;
    let before = api.state().await;

    // Half a request line, then silence.
    let mut half_head = UnixStream::connect(&api.sock).await.unwrap();
    half_head.write_all(b"POST /v1/la").await.unwrap();
    // Full head, half a body, then silence.
    let mut half_body = UnixStream::connect(&api.sock).await.unwrap();
    half_body
        .write_all(b"POST /v1/lans HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"na")
        .await
        .unwrap();
    // Connected, nothing sent.
    let silent = UnixStream::connect(&api.sock).await.unwrap();

    // Garbage: the server answers 400 (or just closes) and goes on.
    for garbage in [
        &b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /v1/lab HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /v1/lab HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"\r\n\r\n\r\n\r\n",
    ] {
        let mut s = UnixStream::connect(&api.sock).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("garbage connection not closed");
        if !buf.is_empty() {
            let r = parse_raw(&buf);
            assert!((400..500).contains(&r.status), "{garbage:?}: {}", r.head);
        }
    }
    // A body-less route with a body that never finishes: answered, then
    // closed (not left hanging on the rest of the body).
    let mut s = UnixStream::connect(&api.sock).await.unwrap();
    s.write_all(b"GET /v1/lab HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        .await
        .unwrap();
    let t = Instant::now();
    assert_eq!(parse_raw(&read_all(&mut s).await).status, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Huge header.
    let mut huge = b"GET /v1/lab HTTP/1.1\r\nX-A: ".to_vec();
    huge.extend_from_slice(&[b'a'; 100_000]);
    huge.extend_from_slice(b"\r\n\r\n");
    let mut s = UnixStream::connect(&api.sock).await.unwrap();
    let _ = s.write_all(&huge).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap();

    // Meanwhile normal requests are answered at once.
    for _ in 0..5 {
        let t = Instant::now();
        api.client.lab().await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "slow: {:?}",
            t.elapsed()
        );
    }

    // The half body times out with 408 and changes nothing.
    let r = parse_raw(&read_all(&mut half_body).await);
    assert_eq!(r.status, 408);
    assert_eq!(r.code(), "timeout");
    // The silent ones are closed after the header timeout.
    for mut s in [half_head, silent] {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("silent connection kept open");
    }
    assert_eq!(api.state().await, before);
}

/// Opens an event stream with raw bytes and reads up to its `hello`;
/// returns the status and the connection.
async fn raw_event_stream(sock: &Path) -> (u16, UnixStream) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if text.starts_with("HTTP/1.1 503") && text.contains("}") {
            return (503, s);
        }
        if text.contains("event: hello") {
            return (parse_raw(&got).status, s);
        }
        assert!(Instant::now() < deadline, "no answer: {text}");
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("event stream silent")
            .unwrap();
        assert!(n > 0, "event stream closed: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_limit_get_503() {
    let api = Api::start_with(ServerConfig {
        max_connections: 4,
        max_event_streams: 4,
        ..ServerConfig::default()
    })
    .await;
    // Connections all busy (event streams): nobody can be closed to make
    // room.
    let mut held = Vec::new();
    for _ in 0..4 {
        let (status, s) = raw_event_stream(&api.sock).await;
        assert_eq!(status, 200);
        held.push(s);
    }
    let r = api.http("GET", "/v1/lab", None, b"").await;
    assert_eq!((r.status, r.code().as_str()), (503, "too_many_connections"));
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = api
            .client
            .request(Method::GET, "/v1/lab", None)
            .await
            .unwrap();
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Idle connections (never a byte, half a header, kept alive after an
/// answer, refused event streams) make room for requests: with 200 idle
/// sockets, more opened all the time, and 64 event streams (48 served, 16
/// refused), every request of the client is answered at once, and the
/// event streams keep their place.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_never_lock_out_requests() {
    let api = Api::start().await;
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = UnixStream::connect(&api.sock).await.unwrap();
        if i % 4 == 1 {
            s.write_all(b"GET /v1/la").await.unwrap();
        }
        idle.push(s);
    }
    let mut streams = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..64 {
        match raw_event_stream(&api.sock).await {
            (200, s) => streams.push(s),
            (503, s) => refused.push(s),
            (other, _) => panic!("event stream answered {other}"),
        }
    }
    assert_eq!((streams.len(), refused.len()), (48, 16));
    // Someone opening idle connections all the time.
    let sock = api.sock.clone();
    let churn = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok(s) = UnixStream::connect(&sock).await {
                held.push(s);
            }
            if held.len() > 300 {
                held.drain(..100);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    for i in 0..30 {
        let t = Instant::now();
        assert_eq!(api.client.lab().await.unwrap().name, "t");
        if i % 10 == 0 {
            api.client.add_lan(&format!("l{i}")).await.unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "slow: {:?}",
            t.elapsed()
        );
    }
    churn.abort();
    // Every served event stream is still there and got the changes.
    for s in &mut streams {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        while !String::from_utf8_lossy(&got).contains("\"lan\":\"l20\"") {
            let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .expect("an event stream went silent")
                .unwrap();
            assert!(n > 0, "an event stream was closed to make room");
            got.extend_from_slice(&buf[..n]);
        }
    }
}

/// Headers too large get 431, whatever their size, and the client reads
/// it: the server takes the rest of the request before closing, so the
/// connection is not reset under the client.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431_not_a_reset() {
    let api = Api::start().await;
    for size in [20_000usize, 64 * 1024, 100_000, 1024 * 1024] {
        let mut req = b"GET /v1/lab HTTP/1.1\r\nHost: x\r\nX-A: ".to_vec();
        req.resize(req.len() + size, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        let mut s = UnixStream::connect(&api.sock).await.unwrap();
        s.write_all(&req)
            .await
            .unwrap_or_else(|e| panic!("{size}: writing the request: {e}"));
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("no answer")
            .unwrap_or_else(|e| panic!("{size}: reading the answer: {e}"));
        assert_eq!(parse_raw(&buf).status, 431, "{size}");
    }
    assert_eq!(api.client.lab().await.unwrap().name, "t");
}

/// Event readers that never leave take at most their own share of the
/// connection slots: requests still get in.
#[tokio::test(flavor = "multi_thread")]
async fn event_streams_cannot_take_every_slot() {
    let api = Api::start_with(ServerConfig {
        max_connections: 4,
        max_event_streams: 2,
        ..ServerConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut ev = api.client.events().await.unwrap();
        assert_eq!(next_event(&mut ev).await.event, "hello");
        held.push(ev);
    }
    let r = api.http("GET", "/v1/events", None, b"").await;
    assert_eq!((r.status, r.code().as_str()), (503, "too_many_connections"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("event streams"));
    // Requests are served meanwhile.
    assert_eq!(api.client.lab().await.unwrap().name, "t");
    // A stream that ends gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        match api.client.events().await {
            Ok(mut ev) => {
                assert_eq!(next_event(&mut ev).await.event, "hello");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "stream slot never freed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_in_flight_requests_and_ends_streams() {
    let mut api = Api::start().await;
    let mut events = api.client.events().await.unwrap();
    assert_eq!(next_event(&mut events).await.event, "hello");
    // A request whose body is still on its way when the stop comes.
    let mut slow = UnixStream::connect(&api.sock).await.unwrap();
    let body = br#"{"name":"late"}"#;
    slow.write_all(
        format!(
            "POST /v1/lans HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    slow.write_all(&body[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = api.stop.send(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    slow.write_all(&body[5..]).await.unwrap();
    assert_eq!(parse_raw(&read_all(&mut slow).await).status, 201);

    // The event stream ends (after the lan_added of the late request).
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
            Ok(None) => break,
            Ok(Some(ev)) => assert_eq!(ev.event, "lan_added"),
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline);
    }
    api.stop().await;
    // Nobody listens any more.
    match api.client.lab().await {
        Err(e @ ClientError::NoDaemon { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("ulan daemon --lab t"), "{msg}");
            assert!(msg.contains(&api.sock.display().to_string()), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(&api.sock).unwrap();
    assert!(matches!(
        api.client.lab().await,
        Err(ClientError::NoDaemon { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_stop_sender_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(LabConfig::new("d", dir.path())).unwrap();
    let listener = UnixListener::bind(dir.path().join("api.sock")).unwrap();
    let (tx, rx) = watch::channel(false);
    let server = tokio::spawn(api::serve(listener, lab.clone(), rx));
    let client = Client::new(dir.path().join("api.sock"), "d");
    client.lab().await.unwrap();
    drop(tx);
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    lab.shutdown();
}

/// A cheap stand-in for the cargo-fuzz target: mutated bodies never panic
/// the decoder and always give a documented error code.
#[test]
fn decoding_random_bodies_never_panics() {
    let doc = openapi();
    let codes: BTreeSet<String> = doc["components"]["schemas"]["Error"]["properties"]["error"]
        ["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let seeds: [&[u8]; 10] = [
        br#"{"name":"h1","nics":[{"lan":"a","ip":["10.0.0.1/24"],"transport":"dgram"}],"routes":[{"to":"default","via":"10.0.0.9"}]}"#,
        br#"{"argv":["ip","a"],"timeout_s":5}"#,
        br#"{"timeout_s":3}"#,
        br#"{"image":"base1"}"#,
        br#"{"name":"lan0"}"#,
        br#"{"name":"p0","kind":"stream","lan":"lan0"}"#,
        br#"{"name":"p0","kind":"vde","lan":null}"#,
        br#"{"lan":"x"}"#,
        br#"{"lan":null}"#,
        b"[{\"\\u0000\":1e999}]",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000 {
        let mut body = seeds[i % seeds.len()].to_vec();
        for _ in 0..(rand() % 4 + 1) {
            let pos = (rand() as usize) % (body.len() + 1);
            match rand() % 3 {
                0 if pos < body.len() => body[pos] = rand() as u8,
                1 => body.insert(pos, b"{}[]\":,\\nul0e-9aZ/."[(rand() % 19) as usize]),
                _ if pos < body.len() => {
                    body.remove(pos);
                }
                _ => {}
            }
        }
        for op in [
            Op::AddLan,
            Op::AddPort,
            Op::MovePort,
            Op::SetImpairments,
            Op::AddCapture,
            Op::AddNode,
            Op::StopNode,
            Op::ExecNode,
            Op::CommitNode,
        ] {
            if let Err(e) = decode_body(op, &body) {
                assert!(codes.contains(e.code), "{} undocumented", e.code);
                assert!(e.status.is_client_error());
            }
        }
    }
}

/// POST /v1/ports with `link` and `impairments`: the port is born with
/// them (and before it joins its lan, so a port born down forwards
/// nothing); a bad value or an unknown lan makes no port at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_port_is_born_with_its_link_and_impairments() {
    use ulan::testkit::{frame, mac, Endpoint};
    let api = Api::start().await;
    let c = &api.client;
    c.add_lan("l").await.unwrap();
    let body = json!({
        "name": "b", "kind": "dgram", "lan": "l", "link": "down",
        "impairments": {"egress": {"delay_ms": 5.0}, "ingress": {"loss_pct": 1.0}}
    });
    let v = c.call(Method::POST, "/v1/ports", Some(body)).await.unwrap();
    assert_eq!(v["link"], "down", "{v}");
    assert_eq!(v["lan"], "l", "{v}");
    let imp = c.impairments("b").await.unwrap();
    assert_eq!(imp.egress.and_then(|d| d.delay_ms), Some(5.0));
    assert_eq!(imp.ingress.and_then(|d| d.loss_pct), Some(1.0));
    let a = c.add_port("a", PortKind::Dgram, Some("l")).await.unwrap();
    let b = c.port("b").await.unwrap();
    let scratch = api.dir.path().join("ends");
    std::fs::create_dir(&scratch).unwrap();
    let mut ea = Endpoint::connect(PortKind::Dgram, Path::new(&a.path), &scratch).unwrap();
    let mut eb = Endpoint::connect(PortKind::Dgram, Path::new(&b.path), &scratch).unwrap();
    // Down from birth: nothing crosses either way.
    eb.send(&frame(mac(1), mac(2), 64, 1)).unwrap();
    ea.send(&frame(mac(2), mac(1), 64, 2)).unwrap();
    assert!(ea.recv(Duration::from_millis(300)).unwrap().is_none());
    assert!(eb.recv(Duration::from_millis(300)).unwrap().is_none());
    c.set_link("b", ulan::lab::LinkState::Up).await.unwrap();
    ea.send(&frame(mac(2), mac(1), 64, 3)).unwrap();
    let got = eb
        .recv(Duration::from_secs(2))
        .unwrap()
        .expect("a frame once up");
    assert_eq!(ulan::testkit::tag_of(&got), Some(3));

    // Refused before anything is made.
    let before = api.state().await;
    for (body, code) in [
        (
            json!({"name": "x", "kind": "dgram", "impairments": {"egress": {"loss_pct": 150}}}),
            "invalid_value",
        ),
        (
            json!({"name": "x", "kind": "dgram", "link": "sideways"}),
            "bad_json",
        ),
        (
            json!({"name": "x", "kind": "dgram", "lan": "nope", "link": "down"}),
            "not_found",
        ),
        (
            json!({"name": "a", "kind": "dgram", "link": "down"}),
            "already_exists",
        ),
    ] {
        match c.call(Method::POST, "/v1/ports", Some(body.clone())).await {
            Err(ClientError::Api { code: got, .. }) => assert_eq!(got, code, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
        assert_eq!(api.state().await, before, "{body} changed something");
    }
}
