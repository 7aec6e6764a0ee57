//! The HTTP/1.1 server on the lab's Unix socket: accept loop, connection
//! limits, request reading, responses and the `/v1/events` stream.
//!
//! Connection slots are for requests, not for sockets that sit there: a
//! connection that has not sent a whole request header within
//! [`ServerConfig::header_timeout`] is closed, and when every slot is taken
//! a new connection takes the slot of the connection idle the longest
//! (waiting for a request header, then waiting for a request body), so
//! idle sockets, however many, never lock out a client that sends its
//! request. Only when every slot is serving a request or an event stream
//! is a new connection answered 503.
//!
//! A request whose header is too large (431) or malformed (400) is
//! answered after the rest of what the client sent is read (bounded), so
//! closing does not reset the connection before the client reads the
//! answer.
//!
//! Shutdown is a `tokio::sync::watch::Receiver<bool>`: the server stops
//! when the value becomes `true` **or when every sender is dropped**. It
//! then stops accepting, tells each connection to finish (idle keep-alive
//! connections close at once, in-flight requests complete, event streams
//! end), waits up to [`ServerConfig::shutdown_grace`] and drops whatever
//! is left.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::error::ApiError;
use super::routes::{self, Input, Reply};
use super::OPENAPI;
use crate::lab::Lab;

/// Response body type of every route.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Limits and timings of the server. [`serve`] uses the defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once (event streams included). One more
    /// takes the place of the connection idle the longest; when none is
    /// idle it is answered with a 503 `too_many_connections` and closed.
    pub max_connections: usize,
    /// Event streams open at once, fewer than `max_connections` so that
    /// readers that never leave cannot take every slot from requests. One
    /// more gets a 503 `too_many_connections`.
    pub max_event_streams: usize,
    /// Largest request body; larger ones get 413 `body_too_large`.
    pub max_body: usize,
    /// A request's headers must arrive within this long from the
    /// connection or the previous response (so also how long an idle
    /// keep-alive connection is kept).
    pub header_timeout: Duration,
    /// A request's body must arrive within this long after its headers, or
    /// 408 `timeout`.
    pub body_timeout: Duration,
    /// Interval of `: keepalive` comments on event streams.
    pub keepalive: Duration,
    /// How long in-flight requests get to finish on shutdown.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            max_event_streams: 48,
            max_body: 64 * 1024,
            header_timeout: Duration::from_secs(3),
            body_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

struct Ctx {
    lab: Arc<Lab>,
    config: ServerConfig,
    stop: watch::Receiver<bool>,
    streams: Arc<Semaphore>,
}

/// What a connection is doing, in the order connections are closed to
/// make room: idle first, then those waiting for a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Activity {
    /// Waiting for a request header (new, or kept alive after a response).
    Idle,
    /// Has sent a header, its body is still coming.
    ReadingBody,
    /// A request is being served or an event stream is open.
    Busy,
}

struct Slot {
    activity: Activity,
    since: Instant,
    evict: Arc<Notify>,
}

/// Every connection being served, to choose which one makes room.
struct ConnTable {
    max: usize,
    inner: Mutex<(u64, HashMap<u64, Slot>)>,
}

impl ConnTable {
    fn new(max: usize) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            max: max.max(1),
            inner: Mutex::new((0, HashMap::new())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Slot>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection: a free one, or the one of the
    /// connection idle the longest (told to close). None when every
    /// connection is busy.
    fn admit(self: &Arc<Self>) -> Option<ConnRef> {
        let mut g = self.lock();
        let (next, slots) = &mut *g;
        if slots.len() >= self.max {
            let victim = slots
                .iter()
                .filter(|(_, s)| s.activity != Activity::Busy)
                .min_by_key(|(_, s)| (s.activity, s.since))
                .map(|(id, _)| *id)?;
            if let Some(s) = slots.remove(&victim) {
                tracing::debug!(activity = ?s.activity, idle_ms = s.since.elapsed().as_millis() as u64, "API connection closed to make room");
                s.evict.notify_one();
            }
        }
        *next += 1;
        let id = *next;
        let evict = Arc::new(Notify::new());
        slots.insert(
            id,
            Slot {
                activity: Activity::Idle,
                since: Instant::now(),
                evict: evict.clone(),
            },
        );
        Some(ConnRef {
            table: self.clone(),
            id,
            evict,
        })
    }
}

/// A connection's place in the [`ConnTable`]; given back when dropped.
struct ConnRef {
    table: Arc<ConnTable>,
    id: u64,
    evict: Arc<Notify>,
}

impl ConnRef {
    fn set(&self, activity: Activity) {
        if let Some(s) = self.table.lock().1.get_mut(&self.id) {
            s.activity = activity;
            s.since = Instant::now();
        }
    }

    /// Marks the connection idle again when dropped (with the response
    /// body, once it is written).
    fn idle_on_drop(self: &Arc<Self>) -> IdleOnDrop {
        IdleOnDrop(self.clone())
    }
}

impl Drop for ConnRef {
    fn drop(&mut self) {
        self.table.lock().1.remove(&self.id);
    }
}

struct IdleOnDrop(Arc<ConnRef>);

impl Drop for IdleOnDrop {
    fn drop(&mut self) {
        self.0.set(Activity::Idle);
    }
}

/// Resolves once the stop flag is `true` or its sender is gone.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Serves the API on `listener` until `shutdown` becomes `true` (or its
/// sender is dropped) with [`ServerConfig::default`].
pub async fn serve(listener: UnixListener, lab: Arc<Lab>, shutdown: watch::Receiver<bool>) {
    serve_with(listener, lab, shutdown, ServerConfig::default()).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: UnixListener,
    lab: Arc<Lab>,
    shutdown: watch::Receiver<bool>,
    config: ServerConfig,
) {
    let slots = ConnTable::new(config.max_connections);
    // Refusing takes a moment too; never more than a few at once.
    let refusals = Arc::new(Semaphore::new(8));
    let grace = config.shutdown_grace;
    let streams = Arc::new(Semaphore::new(config.max_event_streams.max(1)));
    let ctx = Arc::new(Ctx {
        lab,
        config,
        stop: shutdown.clone(),
        streams,
    });
    let mut stop = shutdown;
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!("an API connection task panicked: {e}");
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.admit() {
                    Some(slot) => {
                        conns.spawn(connection(stream, ctx.clone(), slot));
                    }
                    None => {
                        let limit = ctx.config.max_connections;
                        tracing::info!(limit, "API connection refused: too many connections");
                        if let Ok(permit) = refusals.clone().try_acquire_owned() {
                            conns.spawn(refuse(stream, ApiError::too_many_connections(limit), permit));
                        }
                    }
                },
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    tracing::warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    tracing::debug!(connections = conns.len(), "API server stopping");
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::info!(
            connections = conns.len(),
            "API connections still busy after the grace period; closing them"
        );
    }
    conns.shutdown().await;
}

/// Largest request header; larger ones get 431.
const MAX_HEADER: usize = 16 * 1024;

async fn connection(stream: UnixStream, ctx: Arc<Ctx>, slot: ConnRef) {
    let mut stop = ctx.stop.clone();
    let slot = Arc::new(slot);
    // A second handle on the socket, to read what is left of a rejected
    // request after hyper has answered it.
    let spare = stream
        .into_std()
        .and_then(|s| Ok((s.try_clone()?, s)))
        .and_then(|(a, b)| Ok((UnixStream::from_std(a)?, UnixStream::from_std(b)?)));
    let (spare, stream) = match spare {
        Ok((spare, stream)) => (Some(spare), stream),
        Err(e) => {
            tracing::warn!("API connection dropped: {e}");
            return;
        }
    };
    let svc_ctx = ctx.clone();
    let svc_slot = slot.clone();
    let service = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let slot = svc_slot.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, &slot, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.config.header_timeout)
        .max_header_size(MAX_HEADER)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let evict = slot.evict.clone();
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!("API connection ended: {e}");
                if e.is_parse() || e.is_parse_too_large() {
                    if let Some(spare) = spare {
                        drain(spare).await;
                    }
                }
            }
        }
        // Idle the longest while all slots were taken: make room.
        _ = evict.notified() => {}
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!("API connection ended during shutdown: {e}");
            }
        }
    }
}

/// Reads and discards what a client still sends after its request was
/// refused (until it pauses, stops, or a bound is reached), so that
/// closing does not reset the connection before it reads the answer.
async fn drain(mut s: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = 8 * 1024 * 1024usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while left > 0 {
        let pause = tokio::time::Instant::now() + Duration::from_millis(200);
        match tokio::time::timeout_at(pause.min(deadline), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut stream: UnixStream, err: ApiError, _permit: OwnedSemaphorePermit) {
    let body = err.body_json();
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // Take what the client sent first, so closing does not reset the
        // connection before it reads the answer.
        let mut buf = [0u8; 8192];
        let _ = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await;
        stream.write_all(msg.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn handle(ctx: &Ctx, slot: &Arc<ConnRef>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    slot.set(Activity::Busy);
    let resp = match respond(ctx, slot, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(
                method = %method,
                path = ?path,
                status = e.status.as_u16(),
                code = e.code,
                message = ?e.message,
                "API request failed"
            );
            error_response(&e)
        }
    };
    tracing::debug!(
        method = %method,
        path = ?path,
        status = resp.status().as_u16(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "API request"
    );
    // Idle again once the response body is written and dropped.
    let idle = slot.idle_on_drop();
    resp.map(|inner| Tracked { inner, _idle: idle }.boxed_unsync())
}

/// A response body that marks its connection idle when dropped; length
/// and end as the body it wraps.
struct Tracked {
    inner: Body,
    _idle: IdleOnDrop,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn respond(
    ctx: &Ctx,
    slot: &ConnRef,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let m = routes::match_route(&method, &path)?;
    let input = if m.route.op.takes_body() {
        slot.set(Activity::ReadingBody);
        let body = read_body(ctx, req).await;
        slot.set(Activity::Busy);
        routes::decode_body(m.route.op, &body?)?
    } else {
        Input::None
    };
    let reply = routes::execute(&ctx.lab, &m, input).await?;
    // A change is on disk before it is answered.
    if method != "GET" {
        if let Some(p) = ctx.lab.persister() {
            p.flush().await;
        }
    }
    Ok(match reply {
        Reply::Json {
            status,
            body,
            location,
        } => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = status;
            set(&mut resp, header::CONTENT_TYPE, "application/json");
            if let Some(loc) = location {
                if let Ok(v) = HeaderValue::from_str(&loc) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
            }
            resp
        }
        Reply::NoContent => {
            let mut resp = Response::new(full(Vec::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        Reply::OpenApi => {
            let mut resp = Response::new(full(OPENAPI.as_bytes().to_vec()));
            set(&mut resp, header::CONTENT_TYPE, "application/json");
            resp
        }
        Reply::Asset(asset) => {
            let mut resp = Response::new(Full::new(Bytes::from_static(asset.body)).boxed_unsync());
            set(&mut resp, header::CONTENT_TYPE, asset.content_type);
            for (name, value) in super::web::assets::SECURITY_HEADERS {
                resp.headers_mut()
                    .insert(*name, HeaderValue::from_static(value));
            }
            resp
        }
        Reply::Text { content_type, body } => {
            let mut resp = Response::new(full(body));
            set(&mut resp, header::CONTENT_TYPE, content_type);
            resp
        }
        Reply::Events => {
            let Ok(permit) = ctx.streams.clone().try_acquire_owned() else {
                return Err(ApiError::too_many_event_streams(
                    ctx.config.max_event_streams,
                ));
            };
            events_response(ctx, permit)
        }
        Reply::Capture(rx) => {
            let Ok(permit) = ctx.streams.clone().try_acquire_owned() else {
                return Err(ApiError::too_many_event_streams(
                    ctx.config.max_event_streams,
                ));
            };
            capture_response(rx, permit)
        }
    })
}

/// `GET /v1/captures/{id}/stream`: pcapng as the capture's writer makes
/// it. Ends when the capture does; a client that hangs up ends the
/// capture (its writer sees the stream gone).
fn capture_response(
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<Body> {
    let stream = futures_util::stream::unfold((rx, permit), |(mut rx, permit)| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), (rx, permit)))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    set(&mut resp, header::CONTENT_TYPE, "application/x-pcapng");
    set(&mut resp, header::CACHE_CONTROL, "no-cache");
    resp
}

/// Checks the content type and reads the body within the size and time
/// limits.
async fn read_body(ctx: &Ctx, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = ctx.config.max_body;
    routes::check_content_type(
        req.headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
    )?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::body_too_large(limit));
    }
    let collect = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(ctx.config.body_timeout, collect).await {
        Err(_) => Err(ApiError::body_timeout()),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::body_too_large(limit))
        }
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("cannot read the request body: {e}"),
        )),
    }
}

fn full(body: Vec<u8>) -> Body {
    Full::new(Bytes::from(body)).boxed_unsync()
}

fn set(resp: &mut Response<Body>, name: header::HeaderName, value: &'static str) {
    resp.headers_mut()
        .insert(name, HeaderValue::from_static(value));
}

/// The JSON error response for `e`.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut body = e.body_json().into_bytes();
    body.push(b'\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = e.status;
    set(&mut resp, header::CONTENT_TYPE, "application/json");
    if let Some(allow) = e
        .allow
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        resp.headers_mut().insert(header::ALLOW, allow);
    }
    resp
}

/// One server-sent event. `data` must be a single line (compact JSON is).
fn sse(id: Option<u64>, event: &str, data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 48);
    if let Some(id) = id {
        s.push_str(&format!("id: {id}\n"));
    }
    s.push_str(&format!("event: {event}\ndata: {data}\n\n"));
    Bytes::from(s)
}

struct EventFeed {
    /// This stream's place among the event streams, given back when it ends.
    _permit: tokio::sync::OwnedSemaphorePermit,
    hello: Option<Bytes>,
    rx: broadcast::Receiver<crate::events::EventRecord>,
    stop: watch::Receiver<bool>,
    keepalive: tokio::time::Interval,
}

impl EventFeed {
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(hello) = self.hello.take() {
            return Some(hello);
        }
        tokio::select! {
            biased;
            _ = stopped(&mut self.stop) => None,
            rec = self.rx.recv() => match rec {
                Ok(rec) => match serde_json::to_string(&rec) {
                    Ok(data) => Some(sse(Some(rec.seq), rec.event.name(), &data)),
                    Err(e) => {
                        tracing::warn!("cannot encode event {}: {e}", rec.seq);
                        Some(Bytes::from_static(b": unencodable event skipped\n\n"))
                    }
                },
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Some(sse(None, "lagged", &format!("{{\"missed\":{missed}}}")))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = self.keepalive.tick() => Some(Bytes::from_static(b": keepalive\n\n")),
        }
    }
}

/// `GET /v1/events`: subscribes first, then takes the `hello` snapshot, so
/// no change is lost between the two (one may show in both).
fn events_response(ctx: &Ctx, permit: tokio::sync::OwnedSemaphorePermit) -> Response<Body> {
    let rx = ctx.lab.events().subscribe();
    let hello = serde_json::json!({
        "lab": ctx.lab.info(),
        "lans": ctx.lab.lans(),
        "ports": ctx.lab.ports(),
        "nodes": ctx.lab.nodes(),
    });
    let period = ctx.config.keepalive.max(Duration::from_millis(10));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let feed = EventFeed {
        _permit: permit,
        hello: Some(sse(None, "hello", &hello.to_string())),
        rx,
        stop: ctx.stop.clone(),
        keepalive,
    };
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        let chunk = feed.next().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), feed))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    set(&mut resp, header::CONTENT_TYPE, "text/event-stream");
    set(&mut resp, header::CACHE_CONTROL, "no-cache");
    resp
}
