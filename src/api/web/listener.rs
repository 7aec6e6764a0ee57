//! `ulan web`'s TCP listener: the page and the API for a browser, behind
//! the token and the Host/Origin checks of [`super::guard`].
//!
//! It runs in the `ulan web` process, not in the daemon: the daemon never
//! opens a network socket, the listener lives exactly as long as the
//! command a user started (Ctrl-C closes it), and its token dies with it.
//! Every request that passes the guard is relayed as is to the lab's Unix
//! socket (which serves the page too), event streams included; only
//! `/ws/console/{node}` is answered here: a WebSocket to the node's
//! console, shared among viewers by [`super::console`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::console::{Consoles, EndReason};
use super::guard::{self, HostPolicy, Proof, Token};
use crate::api::client::Client;
use crate::api::error::ApiError;

/// Body of every answer: relayed from the daemon, or made here.
pub type WebBody = UnsyncBoxBody<Bytes, hyper::Error>;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("refusing to listen on {addr}: it is not a loopback address, and anyone who can reach it could try the token; pass --allow-remote if that is what you want")]
    NotLoopback { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot make a token from /dev/urandom: {0}")]
    Token(std::io::Error),
}

/// How `ulan web` listens.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen` address.
    pub allow_remote: bool,
    /// Host names (besides localhost and IP literals) requests may use.
    pub hosts: Vec<String>,
    /// The lab's API socket.
    pub api_socket: PathBuf,
    pub lab: String,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Output chunks a console viewer may have queued before it is
    /// dropped as too slow.
    pub viewer_queue: usize,
    /// How long one console write to a browser may take.
    pub viewer_send_timeout: Duration,
    /// A fixed token (tests); `None` makes a random one.
    pub token: Option<Token>,
}

impl WebConfig {
    pub fn new(listen: SocketAddr, api_socket: PathBuf, lab: &str) -> WebConfig {
        WebConfig {
            listen,
            allow_remote: false,
            hosts: Vec::new(),
            api_socket,
            lab: lab.into(),
            max_connections: 64,
            viewer_queue: 256,
            viewer_send_timeout: Duration::from_secs(10),
            token: None,
        }
    }
}

/// A bound listener, not serving yet.
pub struct WebServer {
    listener: TcpListener,
    addr: SocketAddr,
    ctx: Arc<Ctx>,
}

struct Ctx {
    token: Token,
    hosts: HostPolicy,
    api_socket: PathBuf,
    client: Client,
    consoles: Consoles,
    config: WebConfig,
}

/// The largest WebSocket frame and message a viewer may send (keys and
/// pastes are small).
pub const MAX_WS_FRAME: usize = 64 * 1024;

impl WebServer {
    /// Binds `config.listen`: a loopback address, or any with
    /// `allow_remote`. Port 0 picks a free port.
    pub async fn bind(config: WebConfig) -> Result<WebServer, WebError> {
        let addr = config.listen;
        if !addr.ip().is_loopback() && !config.allow_remote {
            return Err(WebError::NotLoopback { addr });
        }
        let token = match &config.token {
            Some(t) => t.clone(),
            None => Token::generate().map_err(WebError::Token)?,
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| WebError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| WebError::Bind { addr, source })?;
        let ctx = Arc::new(Ctx {
            token,
            hosts: HostPolicy {
                port: addr.port(),
                names: config.hosts.clone(),
            },
            api_socket: config.api_socket.clone(),
            client: Client::new(config.api_socket.clone(), config.lab.clone()),
            consoles: Consoles::new(config.viewer_queue),
            config,
        });
        Ok(WebServer {
            listener,
            addr,
            ctx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn token(&self) -> &Token {
        &self.ctx.token
    }

    /// The URL to open: the page, with the token.
    pub fn url(&self) -> String {
        let host = if self.addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else if self.addr.is_ipv6() {
            format!("[{}]", self.addr.ip())
        } else {
            self.addr.ip().to_string()
        };
        format!(
            "http://{host}:{}/?token={}",
            self.addr.port(),
            self.ctx.token.as_str()
        )
    }

    /// Serves until `shutdown` becomes true or its sender is dropped.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.ctx.config.max_connections.max(1)));
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            tracing::info!(%peer, "web connection refused: too many connections");
                            continue;
                        };
                        let ctx = self.ctx.clone();
                        conns.spawn(async move {
                            let _permit = permit;
                            let service = service_fn(move |req| {
                                let ctx = ctx.clone();
                                async move { Ok::<_, Infallible>(handle(ctx, req).await) }
                            });
                            let conn = http1::Builder::new()
                                .timer(TokioTimer::new())
                                .header_read_timeout(Duration::from_secs(10))
                                .max_buf_size(64 * 1024)
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades();
                            if let Err(e) = conn.await {
                                tracing::debug!(%peer, "web connection ended: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("web accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        conns.shutdown().await;
    }
}

/// Resolves once the stop flag is true or its sender is gone.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn full(body: impl Into<Bytes>) -> WebBody {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn error(e: &ApiError) -> Response<WebBody> {
    let mut body = e.body_json().into_bytes();
    body.push(b'\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = e.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<WebBody> {
    let proof = match guard::check(req.headers(), req.uri().query(), &ctx.hosts, &ctx.token) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(path = ?req.uri().path(), code = e.code, "web request refused");
            return error(&e);
        }
    };
    let path = req.uri().path().to_string();
    let mut resp = if proof == Proof::Query && req.method() == hyper::Method::GET && path == "/" {
        // Take the token out of the address bar (and of history): the
        // cookie carries it from now on.
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/"));
        r
    } else if let Some(node) = path.strip_prefix("/ws/console/") {
        match console(&ctx, node, req).await {
            Ok(r) => r,
            Err(e) => error(&e),
        }
    } else {
        match relay(&ctx, req).await {
            Ok(r) => r,
            Err(e) => error(&e),
        }
    };
    if proof == Proof::Query {
        if let Ok(v) = HeaderValue::from_str(&guard::set_cookie(&ctx.token)) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// Headers not passed on: this hop's own, and the token's carriers.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "cookie",
    "authorization",
    "host",
];

/// Relays one request to the daemon's socket and streams its answer back.
async fn relay(ctx: &Ctx, req: Request<Incoming>) -> Result<Response<WebBody>, ApiError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "no_daemon",
            format!(
                "the lab's daemon does not answer at {}: {e}",
                ctx.api_socket.display()
            ),
        )
    };
    let stream = UnixStream::connect(&ctx.api_socket)
        .await
        .map_err(|e| unavailable(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unavailable(&e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("web relay connection: {e}");
        }
    });
    let (mut parts, body) = req.into_parts();
    for name in DROPPED {
        parts.headers.remove(*name);
    }
    parts
        .headers
        .insert(header::HOST, HeaderValue::from_static("ulan"));
    // Only the path and query go on (the request line of a proxy
    // request may hold a whole URL), without the token.
    let path = parts.uri.path();
    let kept: Vec<&str> = parts
        .uri
        .query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.starts_with("token="))
                .collect()
        })
        .unwrap_or_default();
    let pq = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    parts.uri = pq
        .parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("{e}")))?;
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(resp.map(|b| b.boxed_unsync()))
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// `GET /ws/console/{node}`: upgrades to a WebSocket relayed to the
/// node's console.
async fn console(
    ctx: &Arc<Ctx>,
    node: &str,
    req: Request<Incoming>,
) -> Result<Response<WebBody>, ApiError> {
    let bad = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg);
    crate::names::check_name(node).map_err(|e| {
        ApiError::no_route(format!(
            "no route for {}: not a node name ({e})",
            crate::api::error::truncate(req.uri().path(), 100)
        ))
    })?;
    if req.method() != hyper::Method::GET {
        return Err(ApiError::method_not_allowed(
            req.method().as_str(),
            req.uri().path(),
            "GET".into(),
        ));
    }
    if !header_has(&req, header::UPGRADE, "websocket")
        || !header_has(&req, header::CONNECTION, "upgrade")
    {
        return Err(bad(
            "this is a WebSocket endpoint: send Upgrade: websocket".into()
        ));
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(bad("Sec-WebSocket-Version must be 13".into()));
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec())
        .ok_or_else(|| bad("Sec-WebSocket-Key is missing".into()))?;
    let info = ctx.client.node(node).await.map_err(|e| match e {
        crate::api::ClientError::Api {
            status,
            code,
            message,
        } => ApiError::new(status, leak_code(&code), message),
        other => ApiError::new(StatusCode::BAD_GATEWAY, "no_daemon", other.to_string()),
    })?;
    let viewer = ctx
        .consoles
        .attach(node, std::path::Path::new(&info.console))
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "console_unavailable", e.to_string()))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let send_timeout = ctx.config.viewer_send_timeout;
    let node_name = node.to_string();
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .max_frame_size(Some(MAX_WS_FRAME))
                    .max_message_size(Some(MAX_WS_FRAME));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                view(ws, viewer, send_timeout).await;
            }
            Err(e) => tracing::debug!(node = %node_name, "console upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok(resp)
}

/// An API error code as a `&'static str` (the codes are a small set;
/// unknown ones become `error`).
fn leak_code(code: &str) -> &'static str {
    match code {
        "not_found" => "not_found",
        "no_route" => "no_route",
        _ => "error",
    }
}

/// One browser's console session: output to it, its keys to the console.
async fn view<S>(
    mut ws: WebSocketStream<S>,
    mut viewer: super::console::Viewer,
    send_timeout: Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let close = |code: CloseCode, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if !viewer.send(Bytes::copy_from_slice(t.as_bytes())).await {
                        break;
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if !viewer.send(b).await {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    // Unmasked, oversized, bad opcodes: the codec refuses
                    // them; this viewer ends, the others go on.
                    tracing::info!("console viewer sent a bad frame: {e}");
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        ws.send(close(CloseCode::Protocol, "bad frame")),
                    )
                    .await;
                    break;
                }
            },
            out = viewer.recv() => match out {
                Ok(chunk) => {
                    match tokio::time::timeout(send_timeout, ws.send(Message::Binary(chunk))).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
                Err(why) => {
                    let frame = match why {
                        EndReason::ConsoleClosed => close(CloseCode::Normal, "console closed"),
                        EndReason::TooSlow => close(CloseCode::Policy, "too slow: output dropped"),
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.send(frame)).await;
                    break;
                }
            },
        }
    }
}
