//! The route table, path matching, request-body decoding and the handlers.
//! Nothing here does I/O on the connection: [`super::server`] reads the
//! request, calls [`match_route`], [`check_content_type`],
//! [`decode_body`] and [`execute`], and writes what comes back.
//!
//! [`ROUTES`] is the dispatcher's own table (not a copy of it), so the
//! contract test can hold it against `api/openapi.json`.

use std::sync::Arc;

use hyper::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use super::error::{truncate, ApiError};
use crate::lab::{CaptureRequest, LinkState};
use crate::lab::{Lab, LabError};
use crate::names::check_name;
use crate::ports::PortKind;
use crate::switch::impair::ImpairSpec;
use crate::vmlaunch::spec::NodeSpec;

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    GetLab,
    ListLans,
    AddLan,
    GetLan,
    RemoveLan,
    GetFdb,
    ListPorts,
    AddPort,
    GetPort,
    MovePort,
    RemovePort,
    GetPortStats,
    GetImpairments,
    SetImpairments,
    ClearImpairments,
    ListCaptures,
    AddCapture,
    GetCapture,
    RemoveCapture,
    CaptureStream,
    ListNodes,
    AddNode,
    GetNode,
    RemoveNode,
    StartNode,
    StopNode,
    ExecNode,
    CommitNode,
    GetLabSpec,
    GetLabGraph,
    Events,
    OpenApi,
    Metrics,
    UiIndex,
    UiAsset,
}

impl Op {
    /// Whether the route reads a JSON request body.
    pub fn takes_body(self) -> bool {
        matches!(
            self,
            Op::AddLan
                | Op::AddPort
                | Op::MovePort
                | Op::SetImpairments
                | Op::AddCapture
                | Op::AddNode
                | Op::StopNode
                | Op::ExecNode
                | Op::CommitNode
        )
    }
}

/// One entry of the route table. `path` uses OpenAPI template syntax; a
/// `{lan}` or `{port}` segment matches one path segment that is a valid
/// name (see [`crate::names::check_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub op: Op,
}

const fn route(method: &'static str, path: &'static str, op: Op) -> Route {
    Route { method, path, op }
}

/// Every route the server answers, in the order the dispatcher tries them.
pub const ROUTES: &[Route] = &[
    route("GET", "/v1/lab", Op::GetLab),
    route("GET", "/v1/lans", Op::ListLans),
    route("POST", "/v1/lans", Op::AddLan),
    route("GET", "/v1/lans/{lan}", Op::GetLan),
    route("DELETE", "/v1/lans/{lan}", Op::RemoveLan),
    route("GET", "/v1/lans/{lan}/fdb", Op::GetFdb),
    route("GET", "/v1/ports", Op::ListPorts),
    route("POST", "/v1/ports", Op::AddPort),
    route("GET", "/v1/ports/{port}", Op::GetPort),
    route("PATCH", "/v1/ports/{port}", Op::MovePort),
    route("DELETE", "/v1/ports/{port}", Op::RemovePort),
    route("GET", "/v1/ports/{port}/stats", Op::GetPortStats),
    route("GET", "/v1/ports/{port}/impairments", Op::GetImpairments),
    route("PUT", "/v1/ports/{port}/impairments", Op::SetImpairments),
    route(
        "DELETE",
        "/v1/ports/{port}/impairments",
        Op::ClearImpairments,
    ),
    route("GET", "/v1/captures", Op::ListCaptures),
    route("POST", "/v1/captures", Op::AddCapture),
    route("GET", "/v1/captures/{capture}", Op::GetCapture),
    route("DELETE", "/v1/captures/{capture}", Op::RemoveCapture),
    route("GET", "/v1/captures/{capture}/stream", Op::CaptureStream),
    route("GET", "/v1/nodes", Op::ListNodes),
    route("POST", "/v1/nodes", Op::AddNode),
    route("GET", "/v1/nodes/{node}", Op::GetNode),
    route("DELETE", "/v1/nodes/{node}", Op::RemoveNode),
    route("POST", "/v1/nodes/{node}/start", Op::StartNode),
    route("POST", "/v1/nodes/{node}/stop", Op::StopNode),
    route("POST", "/v1/nodes/{node}/exec", Op::ExecNode),
    route("POST", "/v1/nodes/{node}/commit", Op::CommitNode),
    route("GET", "/v1/lab/spec", Op::GetLabSpec),
    route("GET", "/v1/lab/graph", Op::GetLabGraph),
    route("GET", "/v1/events", Op::Events),
    route("GET", "/v1/openapi.json", Op::OpenApi),
    route("GET", "/metrics", Op::Metrics),
    // The web page (see `api::web`).
    route("GET", "/", Op::UiIndex),
    route("GET", "/ui/{asset}", Op::UiAsset),
];

/// A request matched to a route, with its path parameters in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched<'a> {
    pub route: &'static Route,
    pub params: Vec<&'a str>,
}

impl Matched<'_> {
    /// The first (in every current route: the only) path parameter.
    fn name(&self) -> &str {
        self.params.first().copied().unwrap_or("")
    }
}

/// Structural match of a template against a path: literal segments equal,
/// parameter segments non-empty. Returns the parameters with their names.
fn match_template<'p>(
    template: &'static str,
    path: &'p str,
) -> Option<Vec<(&'static str, &'p str)>> {
    let mut params = Vec::new();
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(params),
            (Some(ts), Some(ps)) => {
                if let Some(what) = ts.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    if ps.is_empty() {
                        return None;
                    }
                    params.push((what, ps));
                } else if ts != ps {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

/// Finds the route for `method` and `path` (the raw, still percent-encoded
/// path without the query). Parameter segments are checked as names
/// without decoding them: a name never needs escaping, so anything with
/// `%`, `/`, `..` or upper case cannot name a lan or port and the path is
/// a 404 `no_route`. A path that exists with another method is a 405 with
/// the methods it takes.
pub fn match_route<'p>(method: &str, path: &'p str) -> Result<Matched<'p>, ApiError> {
    let mut allowed: Vec<&'static str> = Vec::new();
    let mut bad_name = None;
    for r in ROUTES {
        let Some(params) = match_template(r.path, path) else {
            continue;
        };
        if let Some((what, value, e)) = params
            .iter()
            .find_map(|(what, value)| check_name(value).err().map(|e| (what, value, e)))
        {
            bad_name.get_or_insert_with(|| {
                ApiError::no_route(format!(
                    "no route for {} {}: {:?} is not a valid {what} name ({e})",
                    truncate(method, 16),
                    truncate(path, 100),
                    truncate(value, 40),
                ))
            });
            continue;
        }
        if r.method == method {
            return Ok(Matched {
                route: r,
                params: params.into_iter().map(|(_, v)| v).collect(),
            });
        }
        if !allowed.contains(&r.method) {
            allowed.push(r.method);
        }
    }
    if allowed.is_empty() {
        if let Some(e) = bad_name {
            return Err(e);
        }
        return Err(ApiError::no_route(format!(
            "no route for {} {} (see GET /v1/openapi.json)",
            truncate(method, 16),
            truncate(path, 100)
        )));
    }
    Err(ApiError::method_not_allowed(
        &truncate(method, 16),
        &truncate(path, 100),
        allowed.join(", "),
    ))
}

/// Accepts a request body's Content-Type: none at all, `application/json`
/// (any parameters, e.g. a charset), `application/<something>+json`, and,
/// because `curl -d` sends it by default, `application/x-www-form-urlencoded`
/// (the body must still be JSON). Anything else is 415.
pub fn check_content_type(value: Option<&[u8]>) -> Result<(), ApiError> {
    let Some(raw) = value else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(raw);
    let media = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let ok = media == "application/json"
        || media == "application/x-www-form-urlencoded"
        || (media.starts_with("application/") && media.ends_with("+json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(&text))
    }
}

/// `POST /v1/lans`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLan {
    pub name: String,
}

/// `POST /v1/ports`. `kind` is a string here so that an unknown kind is a
/// 422 `invalid_kind` rather than a JSON error; `lan` may be missing or
/// null (the port starts on no lan); `link` and `impairments` are the
/// port's from birth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPort {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub lan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impairments: Option<ImpairSpec>,
}

/// `PATCH /v1/ports/{port}`: `lan` (a lan name moves the port there,
/// `null` takes it off any lan) and/or `link` ("up" or "down"); at least
/// one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortPatch {
    #[serde(
        default,
        deserialize_with = "present_nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub lan: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkState>,
}

/// A key that may be missing (outer `None`) or `null` (inner `None`).
fn present_nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `POST /v1/nodes/{node}/stop`, body optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the guest gets to power off before QEMU is told to quit.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

pub const MAX_EXEC_ARGS: usize = 1024;
pub const MAX_EXEC_TIMEOUT_S: u64 = 3600;
pub const DEFAULT_EXEC_TIMEOUT_S: u64 = 60;

/// `POST /v1/nodes/{node}/exec`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// `POST /v1/nodes/{node}/commit`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    pub image: String,
}

/// A decoded, validated request body.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    None,
    NewLan {
        name: String,
    },
    NewPort {
        name: String,
        kind: PortKind,
        lan: Option<String>,
        link: Option<LinkState>,
        impairments: Option<Box<ImpairSpec>>,
    },
    PatchPort {
        lan: Option<Option<String>>,
        link: Option<LinkState>,
    },
    Impairments(Box<ImpairSpec>),
    NewCapture(CaptureRequest),
    NewNode(Box<NodeSpec>),
    Stop {
        grace: Option<std::time::Duration>,
    },
    Exec {
        argv: Vec<String>,
        timeout: std::time::Duration,
    },
    Commit {
        image: String,
    },
}

/// Parses a JSON object into `T`. serde would also take a JSON array for
/// a struct (by field position); a body must be an object.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let bad = |e: serde_json::Error| {
        ApiError::bad_json(format!(
            "invalid JSON body: {}",
            truncate(&e.to_string(), 300)
        ))
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        let what = match serde_json::from_slice::<serde_json::Value>(body).map_err(bad)? {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Null => "null",
            serde_json::Value::Object(_) => "an object",
        };
        return Err(ApiError::bad_json(format!(
            "invalid JSON body: expected a JSON object, got {what}"
        )));
    }
    serde_json::from_slice(body).map_err(bad)
}

fn invalid_name(what: &'static str, name: &str) -> Result<(), ApiError> {
    check_name(name).map_err(|source| ApiError::from(&LabError::InvalidName { what, source }))
}

/// Decodes and validates the body for `op`: 400 `bad_json` for anything
/// serde refuses, 422 `invalid_name` / `invalid_kind` for values that are
/// well-typed but unusable. Routes without a body get [`Input::None`]
/// whatever was sent. Never panics, whatever the bytes (the fuzz target
/// in `fuzz/` calls this).
pub fn decode_body(op: Op, body: &[u8]) -> Result<Input, ApiError> {
    match op {
        Op::AddLan => {
            let b: NewLan = parse_json(body)?;
            invalid_name("lan", &b.name)?;
            Ok(Input::NewLan { name: b.name })
        }
        Op::AddPort => {
            let b: NewPort = parse_json(body)?;
            invalid_name("port", &b.name)?;
            let kind = b.kind.parse::<PortKind>().map_err(|_| {
                ApiError::invalid_kind(format!(
                    "unknown port kind {:?} (stream, dgram, vde, bess, vhost-user, tap)",
                    truncate(&b.kind, 40)
                ))
            })?;
            if let Some(lan) = &b.lan {
                invalid_name("lan", lan)?;
            }
            if let Some(spec) = &b.impairments {
                spec.validate()
                    .map_err(|e| ApiError::invalid_value(e.to_string()))?;
            }
            Ok(Input::NewPort {
                name: b.name,
                kind,
                lan: b.lan,
                link: b.link,
                impairments: b.impairments.map(Box::new),
            })
        }
        Op::MovePort => {
            let b: PortPatch = parse_json(body)?;
            if let Some(Some(lan)) = &b.lan {
                invalid_name("lan", lan)?;
            }
            if b.lan.is_none() && b.link.is_none() {
                return Err(ApiError::bad_json(
                    "invalid JSON body: give \"lan\" (a name or null) or \"link\" (\"up\" or \"down\")",
                ));
            }
            Ok(Input::PatchPort {
                lan: b.lan,
                link: b.link,
            })
        }
        Op::SetImpairments => {
            let spec: ImpairSpec = parse_json(body)?;
            spec.validate()
                .map_err(|e| ApiError::invalid_value(e.to_string()))?;
            Ok(Input::Impairments(Box::new(spec)))
        }
        Op::AddCapture => {
            let b: CaptureRequest = parse_json(body)?;
            for (what, name) in [("port", &b.port), ("lan", &b.lan)] {
                if let Some(n) = name {
                    invalid_name(what, n)?;
                }
            }
            Ok(Input::NewCapture(b))
        }
        Op::AddNode => {
            let spec: NodeSpec = parse_json(body)?;
            spec.validate().map_err(|e| {
                ApiError::from(&LabError::Node(crate::vmlaunch::node::NodeError::Spec(e)))
            })?;
            Ok(Input::NewNode(Box::new(spec)))
        }
        Op::StopNode => {
            let b: StopRequest = if body.iter().all(u8::is_ascii_whitespace) {
                StopRequest::default()
            } else {
                parse_json(body)?
            };
            if b.timeout_s.is_some_and(|t| t > MAX_EXEC_TIMEOUT_S) {
                return Err(ApiError::invalid_value(format!(
                    "timeout_s must be at most {MAX_EXEC_TIMEOUT_S}"
                )));
            }
            Ok(Input::Stop {
                grace: b.timeout_s.map(std::time::Duration::from_secs),
            })
        }
        Op::ExecNode => {
            let b: ExecRequest = parse_json(body)?;
            if b.argv.is_empty() || b.argv.len() > MAX_EXEC_ARGS {
                return Err(ApiError::invalid_value(format!(
                    "argv must have 1 to {MAX_EXEC_ARGS} words"
                )));
            }
            if b.argv.iter().any(|a| a.contains('\0')) {
                return Err(ApiError::invalid_value("argv words must not contain NUL"));
            }
            let t = b.timeout_s.unwrap_or(DEFAULT_EXEC_TIMEOUT_S);
            if !(1..=MAX_EXEC_TIMEOUT_S).contains(&t) {
                return Err(ApiError::invalid_value(format!(
                    "timeout_s must be between 1 and {MAX_EXEC_TIMEOUT_S}"
                )));
            }
            Ok(Input::Exec {
                argv: b.argv,
                timeout: std::time::Duration::from_secs(t),
            })
        }
        Op::CommitNode => {
            let b: CommitRequest = parse_json(body)?;
            invalid_name("image", &b.image)?;
            Ok(Input::Commit { image: b.image })
        }
        _ => Ok(Input::None),
    }
}

/// What a handler produced; the server turns it into a response.
#[derive(Debug)]
pub enum Reply {
    /// A JSON body (already serialized) with its status, and for 201 the
    /// new resource's path.
    Json {
        status: StatusCode,
        body: Vec<u8>,
        location: Option<String>,
    },
    /// 204, no body.
    NoContent,
    /// The server opens the event stream.
    Events,
    /// A capture's pcapng stream.
    Capture(tokio::sync::mpsc::Receiver<bytes::Bytes>),
    /// The OpenAPI document.
    OpenApi,
    /// One of the web page's embedded files.
    Asset(&'static super::web::assets::Asset),
    /// A body that is not JSON, with its content type (`/metrics`).
    Text {
        content_type: &'static str,
        body: Vec<u8>,
    },
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Result<Reply, ApiError> {
    let mut body = serde_json::to_vec(value)
        .map_err(|e| ApiError::internal(format!("cannot encode the response: {e}")))?;
    body.push(b'\n');
    Ok(Reply::Json {
        status,
        body,
        location: None,
    })
}

fn created<T: Serialize>(value: &T, location: String) -> Result<Reply, ApiError> {
    let mut reply = json(StatusCode::CREATED, value)?;
    if let Reply::Json { location: l, .. } = &mut reply {
        *l = Some(location);
    }
    Ok(reply)
}

#[derive(Serialize)]
struct FdbReply<'a> {
    lan: &'a str,
    entries: Vec<crate::lab::FdbEntryInfo>,
}

/// The lab file as the API shows it: `lans`, `nodes` and `ports` always
/// there (the YAML form leaves empty ones out).
fn lab_spec_body(spec: &crate::labfile::LabFile) -> Result<serde_json::Value, ApiError> {
    let mut v = serde_json::to_value(spec)
        .map_err(|e| ApiError::internal(format!("cannot encode the lab: {e}")))?;
    if let Some(map) = v.as_object_mut() {
        for key in ["lans", "nodes", "ports"] {
            map.entry(key)
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        }
    }
    Ok(v)
}

/// Runs a node lifecycle operation as a task of its own. hyper drops a
/// handler whose client hangs up; a start, stop, add or remove cut off
/// halfway would leave a node half-made, so the task runs to the end and
/// the handler only waits for it.
async fn detached<T, F>(op: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, LabError>> + Send + 'static,
{
    match tokio::spawn(op).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(format!("the operation failed: {e}"))),
    }
}

/// Runs the operation against the lab.
pub async fn execute(lab: &Arc<Lab>, m: &Matched<'_>, input: Input) -> Result<Reply, ApiError> {
    let ok = StatusCode::OK;
    match (m.route.op, input) {
        (Op::GetLab, _) => json(ok, &lab.info()),
        (Op::ListLans, _) => json(ok, &lab.lans()),
        (Op::AddLan, Input::NewLan { name }) => {
            let info = lab.add_lan(&name)?;
            created(&info, format!("/v1/lans/{name}"))
        }
        (Op::GetLan, _) => json(ok, &lab.lan(m.name())?),
        (Op::RemoveLan, _) => {
            lab.remove_lan(m.name())?;
            Ok(Reply::NoContent)
        }
        (Op::GetFdb, _) => {
            let entries = lab.fdb(m.name()).await?;
            json(
                ok,
                &FdbReply {
                    lan: m.name(),
                    entries,
                },
            )
        }
        (Op::ListPorts, _) => json(ok, &lab.ports()),
        (
            Op::AddPort,
            Input::NewPort {
                name,
                kind,
                lan,
                link,
                impairments,
            },
        ) => {
            let info = if link.is_none() && impairments.is_none() {
                lab.add_port(&name, kind, lan.as_deref())?
            } else {
                // Born off any lan, given its link and impairments, then
                // put on its lan: no frame crosses it before they hold.
                lab.add_port(&name, kind, None)?;
                let set = || {
                    if let Some(spec) = impairments {
                        lab.set_impairments(&name, *spec)?;
                    }
                    if let Some(link) = link {
                        lab.set_switch_link(&name, link)?;
                    }
                    match &lan {
                        Some(lan) => lab.move_port(&name, Some(lan)),
                        None => lab.port(&name),
                    }
                };
                match set() {
                    Ok(info) => info,
                    Err(e) => {
                        let (lab, name) = (lab.clone(), name.clone());
                        let _ = detached(async move { lab.remove_port(&name).await }).await;
                        return Err(e.into());
                    }
                }
            };
            created(&info, format!("/v1/ports/{name}"))
        }
        (Op::GetPort, _) => json(ok, &lab.port(m.name())?),
        (Op::MovePort, Input::PatchPort { lan, link }) => {
            let mut info = lab.port(m.name())?;
            if let Some(lan) = lan {
                info = lab.move_port(m.name(), lan.as_deref())?;
            }
            if let Some(link) = link {
                let (lab, name) = (lab.clone(), m.name().to_string());
                let (port, carrier) =
                    detached(async move { lab.set_port_link(&name, link).await }).await?;
                info = port;
                if let Some(why) = carrier {
                    tracing::debug!(port = m.name(), "carrier: {why}");
                }
            }
            json(ok, &info)
        }
        (Op::GetImpairments, _) => json(ok, &lab.impairments(m.name())?),
        (Op::SetImpairments, Input::Impairments(spec)) => {
            json(ok, &lab.set_impairments(m.name(), *spec)?)
        }
        (Op::ClearImpairments, _) => {
            lab.set_impairments(m.name(), ImpairSpec::default())?;
            Ok(Reply::NoContent)
        }
        (Op::ListCaptures, _) => json(ok, &lab.capture_list()),
        (Op::AddCapture, Input::NewCapture(req)) => {
            let info = lab.start_capture(req)?;
            let location = format!("/v1/captures/{}", info.id);
            created(&info, location)
        }
        (Op::GetCapture, _) => json(ok, &lab.capture(m.name())?),
        (Op::RemoveCapture, _) => {
            let (lab, id) = (lab.clone(), m.name().to_string());
            json(
                ok,
                &detached(async move { lab.stop_capture(&id).await }).await?,
            )
        }
        (Op::CaptureStream, _) => Ok(Reply::Capture(lab.capture_stream(m.name())?)),
        (Op::RemovePort, _) => {
            if let Some(node) = lab.port_node(m.name()) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "port_of_node",
                    format!(
                        "port {:?} is a NIC of node {node:?}; it goes away with the node",
                        m.name()
                    ),
                ));
            }
            let (lab, name) = (lab.clone(), m.name().to_string());
            detached(async move { lab.remove_port(&name).await }).await?;
            Ok(Reply::NoContent)
        }
        (Op::GetPortStats, _) => json(ok, &lab.port_stats(m.name())?),
        (Op::ListNodes, _) => json(ok, &lab.nodes()),
        (Op::AddNode, Input::NewNode(spec)) => {
            let name = spec.name.clone();
            let lab = lab.clone();
            let info = detached(async move { lab.add_node(*spec).await }).await?;
            created(&info, format!("/v1/nodes/{name}"))
        }
        (Op::GetNode, _) => json(ok, &lab.node(m.name())?),
        (Op::RemoveNode, _) => {
            let (lab, name) = (lab.clone(), m.name().to_string());
            detached(async move { lab.remove_node(&name).await }).await?;
            Ok(Reply::NoContent)
        }
        (Op::StartNode, _) => {
            let (lab, name) = (lab.clone(), m.name().to_string());
            json(
                ok,
                &detached(async move { lab.start_node(&name).await }).await?,
            )
        }
        (Op::StopNode, Input::Stop { grace }) => {
            let (lab, name) = (lab.clone(), m.name().to_string());
            json(
                ok,
                &detached(async move { lab.stop_node(&name, grace).await }).await?,
            )
        }
        (Op::ExecNode, Input::Exec { argv, timeout }) => {
            json(ok, &lab.exec_node(m.name(), &argv, timeout).await?)
        }
        (Op::CommitNode, Input::Commit { image }) => {
            let (lab, name, target) = (lab.clone(), m.name().to_string(), image.clone());
            let img = detached(async move { lab.commit_node(&name, &target).await }).await?;
            // No Location: images have no route of their own yet.
            json(StatusCode::CREATED, &img.view())
        }
        (Op::GetLabSpec, _) => json(ok, &lab_spec_body(&lab.spec())?),
        (Op::GetLabGraph, _) => json(
            ok,
            &super::web::graph::build(&lab.info().name, &lab.lans(), &lab.ports(), &lab.nodes()),
        ),
        (Op::Events, _) => Ok(Reply::Events),
        (Op::OpenApi, _) => Ok(Reply::OpenApi),
        (Op::Metrics, _) => Ok(Reply::Text {
            content_type: crate::metrics::CONTENT_TYPE,
            body: crate::metrics::render(&lab.metrics().await).into_bytes(),
        }),
        (Op::UiIndex, _) => Ok(Reply::Asset(&super::web::assets::INDEX)),
        (Op::UiAsset, _) => match super::web::assets::find(m.name()) {
            Some(a) => Ok(Reply::Asset(a)),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no web asset {:?}", m.name()),
            )),
        },
        (op, input) => Err(ApiError::internal(format!(
            "{op:?} got the wrong input {input:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_literal_and_param_routes() {
        let m = match_route("GET", "/v1/lans").unwrap();
        assert_eq!(m.route.op, Op::ListLans);
        let m = match_route("PATCH", "/v1/ports/p0").unwrap();
        assert_eq!(m.route.op, Op::MovePort);
        assert_eq!(m.params, vec!["p0"]);
        let m = match_route("GET", "/v1/ports/p0/stats").unwrap();
        assert_eq!(m.route.op, Op::GetPortStats);
    }

    #[test]
    fn bad_paths_are_no_route() {
        for p in [
            "",
            "/v1",
            "/v1/",
            "/v1/lans/",
            "/v1/lans//fdb",
            "/v1/lans/..",
            "/v1/lans/%2e%2e",
            "/v1/lans/..%2Fx",
            "/v1/lans/a%2Fb",
            "/v1/lans/LAN",
            "/v1/lans/a/b/c",
            "/v2/lab",
            "/v1/lab/",
            "*",
        ] {
            let e = match_route("GET", p).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (404, "no_route"), "{p}");
        }
        let long = format!("/v1/lans/{}", "a".repeat(100));
        assert_eq!(match_route("GET", &long).unwrap_err().code, "no_route");
    }

    #[test]
    fn wrong_method_lists_allowed() {
        let e = match_route("PUT", "/v1/ports/p0").unwrap_err();
        assert_eq!(e.status.as_u16(), 405);
        assert_eq!(e.allow.as_deref(), Some("GET, PATCH, DELETE"));
        let e = match_route("DELETE", "/v1/lans").unwrap_err();
        assert_eq!(e.allow.as_deref(), Some("GET, POST"));
    }

    #[test]
    fn content_types() {
        for ok in [
            None,
            Some(&b"application/json"[..]),
            Some(b"Application/JSON; charset=utf-8"),
            Some(b"application/x-www-form-urlencoded"),
            Some(b"application/merge-patch+json"),
        ] {
            check_content_type(ok).unwrap();
        }
        for bad in [
            &b"text/plain"[..],
            b"multipart/form-data; boundary=x",
            b"",
            b"\xff",
        ] {
            assert_eq!(
                check_content_type(Some(bad)).unwrap_err().status.as_u16(),
                415
            );
        }
    }

    #[test]
    fn patch_takes_lan_or_link() {
        let e = decode_body(Op::MovePort, b"{}").unwrap_err();
        assert_eq!(e.code, "bad_json");
        assert!(e.message.contains("give \"lan\""), "{}", e.message);
        assert_eq!(
            decode_body(Op::MovePort, br#"{"lan":null}"#).unwrap(),
            Input::PatchPort {
                lan: Some(None),
                link: None
            }
        );
        assert_eq!(
            decode_body(Op::MovePort, br#"{"lan":"x","link":"down"}"#).unwrap(),
            Input::PatchPort {
                lan: Some(Some("x".into())),
                link: Some(LinkState::Down)
            }
        );
        assert_eq!(
            decode_body(Op::MovePort, br#"{"link":"up"}"#).unwrap(),
            Input::PatchPort {
                lan: None,
                link: Some(LinkState::Up)
            }
        );
        for bad in [
            r#"{"link":"sideways"}"#,
            r#"{"link":null}"#,
            r#"{"link":1}"#,
        ] {
            assert_eq!(
                decode_body(Op::MovePort, bad.as_bytes()).unwrap_err().code,
                "bad_json"
            );
        }
    }

    #[test]
    fn impairment_and_capture_bodies_are_checked() {
        let code = |op, b: &str| decode_body(op, b.as_bytes()).unwrap_err().code;
        assert_eq!(
            code(Op::SetImpairments, r#"{"egress":{"loss_pct":150}}"#),
            "invalid_value"
        );
        assert_eq!(
            code(Op::SetImpairments, r#"{"egress":{"rate_kbps":0}}"#),
            "invalid_value"
        );
        assert_eq!(
            code(Op::SetImpairments, r#"{"egress":{"delay_ms":-1}}"#),
            "invalid_value"
        );
        assert_eq!(
            code(Op::SetImpairments, r#"{"egress":{"rate_kbps":-5}}"#),
            "bad_json"
        );
        assert_eq!(code(Op::SetImpairments, r#"{"sideways":{}}"#), "bad_json");
        assert_eq!(
            code(Op::SetImpairments, r#"{"egress":{"delay":5}}"#),
            "bad_json"
        );
        assert_eq!(code(Op::AddCapture, r#"{"port":"P"}"#), "invalid_name");
        assert_eq!(code(Op::AddCapture, r#"{"port":"p","x":1}"#), "bad_json");
        assert!(decode_body(
            Op::SetImpairments,
            br#"{"ingress":{"delay_ms":50,"jitter_ms":5}}"#
        )
        .is_ok());
    }

    #[test]
    fn body_errors() {
        let code = |op, b: &str| decode_body(op, b.as_bytes()).unwrap_err().code;
        assert_eq!(code(Op::AddLan, ""), "bad_json");
        assert_eq!(code(Op::AddLan, "name=x"), "bad_json");
        assert_eq!(code(Op::AddLan, r#"{"name":1}"#), "bad_json");
        assert_eq!(code(Op::AddLan, r#"{"name":"a","x":1}"#), "bad_json");
        assert_eq!(code(Op::AddLan, r#"{"name":"A"}"#), "invalid_name");
        assert_eq!(code(Op::AddLan, r#"["a"]"#), "bad_json");
        assert_eq!(code(Op::MovePort, "[null]"), "bad_json");
        assert_eq!(code(Op::MovePort, "null"), "bad_json");
        assert_eq!(
            code(Op::AddPort, r#"{"name":"p","kind":"macvtap"}"#),
            "invalid_kind"
        );
        assert_eq!(
            code(Op::AddPort, r#"{"name":"p","kind":"stream","lan":"../x"}"#),
            "invalid_name"
        );
        assert_eq!(code(Op::AddPort, r#"{"name":"p"}"#), "bad_json");
        let deep = "[".repeat(10_000);
        assert_eq!(code(Op::AddLan, &deep), "bad_json");
        assert_eq!(
            decode_body(Op::AddPort, br#"{"name":"p","kind":"dgram","lan":null}"#).unwrap(),
            Input::NewPort {
                name: "p".into(),
                kind: PortKind::Dgram,
                lan: None,
                link: None,
                impairments: None,
            }
        );
    }
}
