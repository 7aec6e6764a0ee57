//! The API client: one HTTP/1.1 connection per call over the lab's Unix
//! socket. [`Client::request`] is the raw call (any status is `Ok`); the
//! typed helpers turn error responses into [`ClientError::Api`].

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::ports::PortKind;
use crate::switch::impair::ImpairSpec;
use crate::vmlaunch::spec::{NodeKind, NodeSpec, Transport};

/// Largest response body the client reads (a list of many ports).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// Largest single server-sent event.
const MAX_EVENT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is missing or nobody listens on it.
    #[error("no ulan daemon for this lab at {}; start one with `ulan daemon --lab {lab}`", socket.display())]
    NoDaemon { socket: PathBuf, lab: String },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The daemon's answer was not what the API promises.
    #[error("API protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The API error code, if this is an error response.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn protocol(e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// `GET /v1/lab`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabView {
    pub name: String,
    pub version: String,
    pub pid: u32,
    pub run_dir: String,
    pub api_socket: String,
    pub uptime_s: u64,
    pub aging_s: u64,
    pub lans: usize,
    pub ports: usize,
    pub ports_up: usize,
}

/// A lan and the ports on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanView {
    pub name: String,
    pub ports: Vec<String>,
}

/// A port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortView {
    pub name: String,
    pub kind: PortKind,
    pub lan: Option<String>,
    pub path: String,
    pub up: bool,
    #[serde(default)]
    pub link: crate::lab::LinkState,
    #[serde(default)]
    pub impaired: bool,
}

/// `GET /v1/ports/{port}/stats`: every counter by name, so new counters
/// show up without a client change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatsView {
    pub name: String,
    pub up: bool,
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
}

/// `GET /v1/lans/{lan}/fdb`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FdbView {
    pub lan: String,
    pub entries: Vec<FdbEntryView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FdbEntryView {
    pub mac: String,
    pub port: String,
    pub age_s: f64,
}

/// One NIC of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicView {
    pub index: usize,
    pub port: String,
    pub lan: Option<String>,
    pub mac: String,
    pub transport: Transport,
    pub ip: Vec<String>,
    pub up: bool,
}

/// `GET /v1/nodes/{node}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub kind: NodeKind,
    /// starting, running, stopping, stopped or crashed.
    pub state: String,
    pub pid: Option<u32>,
    pub accel: Option<String>,
    /// A container's root: `overlay` or `btrfs-snapshot`.
    #[serde(default)]
    pub rootfs: Option<String>,
    pub console: String,
    pub console_log: String,
    pub agent: bool,
    pub exit: Option<String>,
    pub warning: Option<String>,
    pub started_ms: Option<u64>,
    /// The cgroups a running container's limits apply in.
    #[serde(default)]
    pub cgroups: Vec<String>,
    pub nics: Vec<NicView>,
    pub spec: NodeSpec,
}

/// What `POST /v1/nodes/{node}/exec` returns.
pub use crate::vmlaunch::agent::ExecOutput;

/// One server-sent event: `hello`, `lagged` or an event name such as
/// `port_added`, with its JSON data (a string if it was not JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
}

/// Talks to one lab's daemon.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    lab: String,
    timeout: Option<Duration>,
}

/// Percent-encodes a path segment. Valid names pass unchanged; anything
/// else stays one segment and the server answers 404 `no_route`.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // `.` and `..` must not reach the path as such.
    if out == "." || out == ".." {
        out = out.replace('.', "%2E");
    }
    out
}

impl Client {
    /// A client for the daemon at `socket`; `lab` is only used in the
    /// [`ClientError::NoDaemon`] message. Calls time out after 30 s
    /// (the event stream does not).
    pub fn new(socket: impl Into<PathBuf>, lab: impl Into<String>) -> Client {
        Client {
            socket: socket.into(),
            lab: lab.into(),
            timeout: Some(Duration::from_secs(30)),
        }
    }

    /// Sets the per-call timeout (`None`: wait forever).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn lab_name(&self) -> &str {
        &self.lab
    }

    async fn connect(&self) -> Result<(SendRequest<Full<Bytes>>, JoinHandle<()>), ClientError> {
        use std::io::ErrorKind;
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound | ErrorKind::ConnectionRefused => ClientError::NoDaemon {
                    socket: self.socket.clone(),
                    lab: self.lab.clone(),
                },
                _ => ClientError::Io(e),
            })?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(protocol)?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("API client connection: {e}");
            }
        });
        Ok((sender, driver))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(Response<Incoming>, JoinHandle<()>), ClientError> {
        let (mut sender, driver) = self.connect().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "ulan");
        let bytes = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(v).map_err(protocol)?)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| ClientError::Protocol(format!("bad request {path:?}: {e}")))?;
        match sender.send_request(req).await {
            Ok(resp) => Ok((resp, driver)),
            Err(e) => {
                driver.abort();
                Err(protocol(e))
            }
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let (resp, _driver) = self.send(method, path, body.as_ref()).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(protocol)?
            .to_bytes();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok((status, Value::Null));
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!("the daemon sent a non-JSON body ({status}): {e}"))
        })?;
        Ok((status, value))
    }

    /// Sends one request and returns the status and JSON body (`null` when
    /// empty) whatever the status. `path` is sent as is (encode names).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let call = self.request_inner(method, path, body);
        match self.timeout {
            Some(t) => tokio::time::timeout(t, call).await.map_err(|_| {
                ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the daemon at {} did not answer in {t:?}",
                        self.socket.display()
                    ),
                ))
            })?,
            None => call.await,
        }
    }

    /// Like [`Client::request`], but an error status becomes
    /// [`ClientError::Api`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let (status, value) = self.request(method, path, body).await?;
        if status.is_success() {
            return Ok(value);
        }
        Err(api_error(status, &value))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        typed(self.call(Method::GET, path, None).await?)
    }

    pub async fn lab(&self) -> Result<LabView, ClientError> {
        self.get("/v1/lab").await
    }

    pub async fn lans(&self) -> Result<Vec<LanView>, ClientError> {
        self.get("/v1/lans").await
    }

    pub async fn lan(&self, name: &str) -> Result<LanView, ClientError> {
        self.get(&format!("/v1/lans/{}", segment(name))).await
    }

    pub async fn add_lan(&self, name: &str) -> Result<LanView, ClientError> {
        typed(
            self.call(Method::POST, "/v1/lans", Some(json!({ "name": name })))
                .await?,
        )
    }

    pub async fn remove_lan(&self, name: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/v1/lans/{}", segment(name)), None)
            .await
            .map(drop)
    }

    pub async fn fdb(&self, lan: &str) -> Result<FdbView, ClientError> {
        self.get(&format!("/v1/lans/{}/fdb", segment(lan))).await
    }

    pub async fn ports(&self) -> Result<Vec<PortView>, ClientError> {
        self.get("/v1/ports").await
    }

    pub async fn port(&self, name: &str) -> Result<PortView, ClientError> {
        self.get(&format!("/v1/ports/{}", segment(name))).await
    }

    pub async fn add_port(
        &self,
        name: &str,
        kind: PortKind,
        lan: Option<&str>,
    ) -> Result<PortView, ClientError> {
        let body = json!({ "name": name, "kind": kind.as_str(), "lan": lan });
        typed(self.call(Method::POST, "/v1/ports", Some(body)).await?)
    }

    /// A port born with `link` and `impairments` (set before it joins
    /// `lan`, so nothing crosses it before they hold).
    pub async fn add_port_with(
        &self,
        name: &str,
        kind: PortKind,
        lan: Option<&str>,
        link: crate::lab::LinkState,
        impairments: &ImpairSpec,
    ) -> Result<PortView, ClientError> {
        let mut body = json!({ "name": name, "kind": kind.as_str(), "lan": lan });
        if link != crate::lab::LinkState::Up {
            body["link"] = json!(link);
        }
        if !impairments.is_empty() {
            body["impairments"] = json!(impairments);
        }
        typed(self.call(Method::POST, "/v1/ports", Some(body)).await?)
    }

    pub async fn remove_port(&self, name: &str) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/ports/{}", segment(name)),
            None,
        )
        .await
        .map(drop)
    }

    /// Puts the port on `lan`, or on no lan with `None`.
    pub async fn move_port(&self, name: &str, lan: Option<&str>) -> Result<PortView, ClientError> {
        let path = format!("/v1/ports/{}", segment(name));
        typed(
            self.call(Method::PATCH, &path, Some(json!({ "lan": lan })))
                .await?,
        )
    }

    /// Sets the port's link up or down.
    pub async fn set_link(
        &self,
        name: &str,
        link: crate::lab::LinkState,
    ) -> Result<PortView, ClientError> {
        let path = format!("/v1/ports/{}", segment(name));
        typed(
            self.call(Method::PATCH, &path, Some(json!({ "link": link })))
                .await?,
        )
    }

    pub async fn impairments(&self, port: &str) -> Result<ImpairSpec, ClientError> {
        self.get(&format!("/v1/ports/{}/impairments", segment(port)))
            .await
    }

    /// Replaces the port's impairments; returns what now applies.
    pub async fn set_impairments(
        &self,
        port: &str,
        spec: &ImpairSpec,
    ) -> Result<ImpairSpec, ClientError> {
        let path = format!("/v1/ports/{}/impairments", segment(port));
        let body = serde_json::to_value(spec).map_err(|e| ClientError::Protocol(e.to_string()))?;
        typed(self.call(Method::PUT, &path, Some(body)).await?)
    }

    pub async fn clear_impairments(&self, port: &str) -> Result<(), ClientError> {
        let path = format!("/v1/ports/{}/impairments", segment(port));
        self.call(Method::DELETE, &path, None).await.map(drop)
    }

    pub async fn start_capture(
        &self,
        req: &crate::lab::CaptureRequest,
    ) -> Result<crate::lab::CaptureInfo, ClientError> {
        let body = serde_json::to_value(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        typed(self.call(Method::POST, "/v1/captures", Some(body)).await?)
    }

    pub async fn captures(&self) -> Result<Vec<crate::lab::CaptureInfo>, ClientError> {
        self.get("/v1/captures").await
    }

    /// Stops a capture; returns its final counts once its file is whole.
    pub async fn stop_capture(&self, id: &str) -> Result<crate::lab::CaptureInfo, ClientError> {
        let path = format!("/v1/captures/{}", segment(id));
        typed(self.call(Method::DELETE, &path, None).await?)
    }

    /// Opens a stream capture's pcapng stream.
    pub async fn capture_stream(&self, id: &str) -> Result<ByteStream, ClientError> {
        let path = format!("/v1/captures/{}/stream", segment(id));
        let (resp, driver) = self.send(Method::GET, &path, None).await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = Limited::new(resp.into_body(), MAX_EVENT)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            driver.abort();
            return Err(api_error(status, &value));
        }
        Ok(ByteStream {
            body: resp.into_body(),
            driver,
        })
    }

    pub async fn port_stats(&self, name: &str) -> Result<PortStatsView, ClientError> {
        self.get(&format!("/v1/ports/{}/stats", segment(name)))
            .await
    }

    /// `GET /metrics`: the Prometheus exposition, as text.
    pub async fn metrics_text(&self) -> Result<String, ClientError> {
        let call = async {
            let (resp, _driver) = self.send(Method::GET, "/metrics", None).await?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(protocol)?
                .to_bytes();
            if !status.is_success() {
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                return Err(api_error(status, &body));
            }
            String::from_utf8(bytes.to_vec())
                .map_err(|_| ClientError::Protocol("/metrics is not UTF-8".into()))
        };
        match self.timeout {
            Some(t) => tokio::time::timeout(t, call).await.map_err(|_| {
                ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the daemon at {} did not answer in {t:?}",
                        self.socket.display()
                    ),
                ))
            })?,
            None => call.await,
        }
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Result<crate::metrics::Exposition, ClientError> {
        let text = self.metrics_text().await?;
        crate::metrics::parse(&text)
            .map_err(|e| ClientError::Protocol(format!("bad /metrics from the daemon: {e}")))
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        self.get("/v1/nodes").await
    }

    pub async fn node(&self, name: &str) -> Result<NodeView, ClientError> {
        self.get(&format!("/v1/nodes/{}", segment(name))).await
    }

    /// Makes the node and starts it; returns while it boots (`starting`).
    pub async fn add_node(&self, spec: &NodeSpec) -> Result<NodeView, ClientError> {
        let body = serde_json::to_value(spec).map_err(protocol)?;
        typed(self.call(Method::POST, "/v1/nodes", Some(body)).await?)
    }

    pub async fn remove_node(&self, name: &str) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/nodes/{}", segment(name)),
            None,
        )
        .await
        .map(drop)
    }

    pub async fn start_node(&self, name: &str) -> Result<NodeView, ClientError> {
        let path = format!("/v1/nodes/{}/start", segment(name));
        typed(self.call(Method::POST, &path, None).await?)
    }

    /// Powers the guest off (QMP `quit` after `timeout_s`, default 10 s).
    pub async fn stop_node(
        &self,
        name: &str,
        timeout_s: Option<u64>,
    ) -> Result<NodeView, ClientError> {
        let path = format!("/v1/nodes/{}/stop", segment(name));
        let body = json!({ "timeout_s": timeout_s });
        typed(self.call(Method::POST, &path, Some(body)).await?)
    }

    /// Runs `argv` in the guest; waits up to `timeout_s` for it (and longer
    /// for a guest still booting).
    pub async fn exec(
        &self,
        name: &str,
        argv: &[String],
        timeout_s: u64,
    ) -> Result<ExecOutput, ClientError> {
        let path = format!("/v1/nodes/{}/exec", segment(name));
        let body = json!({ "argv": argv, "timeout_s": timeout_s });
        let patient = Client {
            timeout: None,
            ..self.clone()
        };
        typed(patient.call(Method::POST, &path, Some(body)).await?)
    }

    /// Turns a stopped node's disk into image `image` in the store.
    pub async fn commit_node(&self, name: &str, image: &str) -> Result<Value, ClientError> {
        let path = format!("/v1/nodes/{}/commit", segment(name));
        self.call(Method::POST, &path, Some(json!({ "image": image })))
            .await
    }

    /// The running lab as a lab file (what `ulan save` prints).
    pub async fn lab_spec(&self) -> Result<crate::labfile::LabFile, ClientError> {
        self.get("/v1/lab/spec").await
    }

    /// The running lab as a graph (what `ulan graph` renders).
    pub async fn graph(&self) -> Result<crate::api::web::graph::Graph, ClientError> {
        self.get("/v1/lab/graph").await
    }

    /// The OpenAPI document the daemon serves.
    pub async fn openapi(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/v1/openapi.json", None).await
    }

    /// Subscribes to `/v1/events`. The first event is `hello` with the
    /// current lab, lans and ports. Connecting is subject to the call
    /// timeout; reading events is not.
    pub async fn events(&self) -> Result<EventStream, ClientError> {
        let open = self.send(Method::GET, "/v1/events", None);
        let (resp, driver) = match self.timeout {
            Some(t) => tokio::time::timeout(t, open).await.map_err(|_| {
                ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the daemon did not answer the event subscription",
                ))
            })??,
            None => open.await?,
        };
        let status = resp.status();
        if !status.is_success() {
            let bytes = Limited::new(resp.into_body(), MAX_EVENT)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            driver.abort();
            return Err(api_error(status, &value));
        }
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            driver.abort();
            return Err(ClientError::Protocol(
                "/v1/events did not answer with text/event-stream".into(),
            ));
        }
        Ok(EventStream {
            body: resp.into_body(),
            buf: Vec::new(),
            ready: VecDeque::new(),
            driver,
            ended: false,
        })
    }
}

fn typed<T: DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Protocol(format!("unexpected answer: {e}")))
}

fn api_error(status: StatusCode, body: &Value) -> ClientError {
    let err = &body["error"];
    ClientError::Api {
        status,
        code: err["code"].as_str().unwrap_or("unknown").to_string(),
        message: err["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("the daemon answered {status}")),
    }
}

/// A response body read as it arrives (a capture's pcapng). Dropping it
/// closes the connection.
pub struct ByteStream {
    body: Incoming,
    driver: JoinHandle<()>,
}

impl Drop for ByteStream {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl ByteStream {
    /// The next chunk; `Ok(None)` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(protocol(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// An open `/v1/events` subscription. Dropping it closes the connection.
pub struct EventStream {
    body: Incoming,
    buf: Vec<u8>,
    ready: VecDeque<SseEvent>,
    driver: JoinHandle<()>,
    ended: bool,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("buffered", &self.buf.len())
            .field("ready", &self.ready.len())
            .finish()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl EventStream {
    /// The next event; `Ok(None)` once the daemon ends the stream.
    /// Keepalive comments are skipped.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, ClientError> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Ok(Some(ev));
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(e)) => {
                    self.ended = true;
                    return Err(protocol(e));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        self.split_events()?;
                    }
                }
            }
        }
    }

    /// Turns the stream into a `futures` stream of events.
    pub fn into_stream(self) -> impl Stream<Item = Result<SseEvent, ClientError>> + Send {
        futures_util::stream::unfold(self, |mut s| async move {
            match s.next().await {
                Ok(Some(ev)) => Some((Ok(ev), s)),
                Ok(None) => None,
                Err(e) => Some((Err(e), s)),
            }
        })
    }

    fn split_events(&mut self) -> Result<(), ClientError> {
        let mut start = 0;
        while let Some((text_end, next)) = find_blank_line(&self.buf[start..]) {
            if let Some(ev) = parse_event(&self.buf[start..start + text_end]) {
                self.ready.push_back(ev);
            }
            start += next;
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_EVENT {
            self.ended = true;
            return Err(ClientError::Protocol(format!(
                "an event is longer than {MAX_EVENT} bytes"
            )));
        }
        Ok(())
    }
}

/// Finds the end of the first event: returns (end of its text, end of the
/// blank line after it).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            let rest = &buf[i + 1..];
            if rest.first() == Some(&b'\n') {
                return Some((i, i + 2));
            }
            if rest.starts_with(b"\r\n") {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

/// Parses one event block (lines without the final blank line). Comment
/// lines start with `:`; a block of only comments yields nothing.
fn parse_event(block: &[u8]) -> Option<SseEvent> {
    let text = String::from_utf8_lossy(block);
    let mut id = None;
    let mut event = None;
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => id = value.parse().ok(),
            "event" => event = Some(value.to_string()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    if event.is_none() && data.is_none() {
        return None;
    }
    let data = data.unwrap_or_default();
    Some(SseEvent {
        id,
        event: event.unwrap_or_else(|| "message".into()),
        data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("lan0"), "lan0");
        assert_eq!(segment("../x"), "..%2Fx");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("a b/é"), "a%20b%2F%C3%A9");
    }

    #[test]
    fn parses_events() {
        let ev = parse_event(b"id: 7\nevent: lan_added\ndata: {\"lan\":\"a\"}").unwrap();
        assert_eq!(ev.id, Some(7));
        assert_eq!(ev.event, "lan_added");
        assert_eq!(ev.data, json!({"lan": "a"}));
        assert!(parse_event(b": keepalive").is_none());
        let ev = parse_event(b"data: a\r\ndata: b").unwrap();
        assert_eq!(ev.event, "message");
        assert_eq!(ev.data, Value::String("a\nb".into()));
        assert_eq!(find_blank_line(b"a\n\nb"), Some((1, 3)));
        assert_eq!(find_blank_line(b"a\r\n\r\nb"), Some((2, 5)));
        assert_eq!(find_blank_line(b"a\nb\n"), None);
    }

    #[test]
    fn no_daemon_message() {
        let e = ClientError::NoDaemon {
            socket: "/run/x/api.sock".into(),
            lab: "x".into(),
        };
        assert_eq!(
            e.to_string(),
            "no ulan daemon for this lab at /run/x/api.sock; start one with `ulan daemon --lab x`"
        );
    }
}
