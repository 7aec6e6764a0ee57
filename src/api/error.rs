//! API errors: one status and one stable `code` per failure, sent as
//! `{"error":{"code":"...","message":"..."}}`. Every [`LabError`] variant
//! is mapped here and nowhere else.

use hyper::StatusCode;
use serde::Serialize;

use crate::lab::{CaptureError, LabError};
use crate::ports::PortError;
use crate::vmlaunch::container::ContainerError;
use crate::vmlaunch::node::NodeError;

/// An error response. `code` is for scripts (it never changes for a given
/// failure), `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For 405: the methods the path does take (the `Allow` header).
    pub allow: Option<String>,
}

/// The JSON shape of an error body, also what the client parses.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    /// 400 `bad_json`: not JSON, wrong types, unknown or missing fields.
    pub fn bad_json(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_json", message)
    }

    /// 404 `no_route`: no such path (or a path segment that can never be a
    /// name).
    pub fn no_route(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "no_route", message)
    }

    /// 405 `method_not_allowed`, with the `Allow` header value.
    pub fn method_not_allowed(method: &str, path: &str, allow: String) -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: format!("{path} does not take {method} (allowed: {allow})"),
            allow: Some(allow),
        }
    }

    /// 413 `body_too_large`.
    pub fn body_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "request bodies must be JSON (Content-Type: application/json), not {:?}",
                truncate(content_type, 80)
            ),
        )
    }

    /// 422 `invalid_kind`.
    pub fn invalid_kind(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_kind", message)
    }

    /// 422 `invalid_value`.
    pub fn invalid_value(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message)
    }

    /// 408 `timeout`: the request body did not arrive in time.
    pub fn body_timeout() -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request body did not arrive in time",
        )
    }

    /// 503 `too_many_connections`.
    pub fn too_many_connections(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!("the daemon already serves {limit} API connections; try again later"),
        )
    }

    /// 503 `too_many_connections`, for event streams.
    pub fn too_many_event_streams(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!("the daemon already serves {limit} event streams; try again later"),
        )
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The response body, as JSON text.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        })
        .unwrap_or_else(|_| r#"{"error":{"code":"internal","message":"unprintable error"}}"#.into())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// The one place lab errors become statuses and codes.
impl From<&LabError> for ApiError {
    fn from(e: &LabError) -> ApiError {
        let (status, code) = match e {
            LabError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            LabError::Exists { .. } => (StatusCode::CONFLICT, "already_exists"),
            LabError::LanNotEmpty { .. } => (StatusCode::CONFLICT, "lan_not_empty"),
            LabError::InvalidName { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_name"),
            // Something other than this lab left a file where the port's
            // socket goes.
            LabError::Port(PortError::PathTaken { .. }) => (StatusCode::CONFLICT, "path_taken"),
            LabError::Port(PortError::Socket { .. }) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            LabError::DataPlane(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            LabError::Node(n) => node_status(n),
            LabError::Impairment(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value"),
            LabError::Capture(c) => capture_status(c),
        };
        ApiError::new(status, code, e.to_string())
    }
}

fn capture_status(e: &CaptureError) -> (StatusCode, &'static str) {
    match e {
        CaptureError::Target | CaptureError::Snaplen | CaptureError::RelativePath(_) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value")
        }
        CaptureError::File { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "capture_file"),
        CaptureError::NotAStream(_) | CaptureError::StreamTaken(_) => {
            (StatusCode::CONFLICT, "capture_busy")
        }
        CaptureError::Writer(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

fn container_status(e: &ContainerError) -> (StatusCode, &'static str) {
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    match e {
        ContainerError::Image(_)
        | ContainerError::ImageDir { .. }
        | ContainerError::NotContainerImage(_) => (unprocessable, "invalid_image"),
        ContainerError::NoSuchCommand { .. } => (unprocessable, "invalid_value"),
        ContainerError::NoCrun | ContainerError::NoTool { .. } => {
            (unprocessable, "runtime_unavailable")
        }
        ContainerError::NotRunning { .. } => (StatusCode::CONFLICT, "node_busy"),
        ContainerError::Files { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        ContainerError::Exec(_) => (StatusCode::BAD_GATEWAY, "exec_error"),
    }
}

fn node_status(e: &NodeError) -> (StatusCode, &'static str) {
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    match e {
        NodeError::Spec(_) | NodeError::Qemu(_) | NodeError::Uml(_) => {
            (unprocessable, "invalid_value")
        }
        NodeError::Image(crate::vmlaunch::image::ImageError::Exists(_)) => {
            (StatusCode::CONFLICT, "already_exists")
        }
        NodeError::Image(_) => (unprocessable, "invalid_image"),
        NodeError::MissingFile { .. } => (unprocessable, "missing_file"),
        NodeError::Accel(_) => (unprocessable, "accel_unavailable"),
        NodeError::Busy { .. } => (StatusCode::CONFLICT, "node_busy"),
        NodeError::NoAgent(_) => (StatusCode::CONFLICT, "no_agent"),
        NodeError::NoDisk(_) | NodeError::NoLayer(_) => (StatusCode::CONFLICT, "no_disk"),
        NodeError::Agent { .. } => (StatusCode::BAD_GATEWAY, "agent_error"),
        NodeError::Launch { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "launch_failed"),
        NodeError::Disk { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "disk_error"),
        NodeError::Files { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        NodeError::Link { .. } => (StatusCode::CONFLICT, "link_unavailable"),
        NodeError::Container(c) => container_status(c),
    }
}

impl From<LabError> for ApiError {
    fn from(e: LabError) -> ApiError {
        ApiError::from(&e)
    }
}

/// At most `max` characters of `s`, for echoing client input in messages.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::NameError;
    use crate::switch::dataplane::DataPlaneGone;
    use crate::vmlaunch::node::NodeState;

    #[test]
    fn every_lab_error_has_a_status() {
        let cases: Vec<(LabError, u16, &str)> = vec![
            (
                LabError::NotFound {
                    what: "lan",
                    name: "x".into(),
                },
                404,
                "not_found",
            ),
            (
                LabError::Exists {
                    what: "lan",
                    name: "x".into(),
                },
                409,
                "already_exists",
            ),
            (
                LabError::LanNotEmpty {
                    lan: "x".into(),
                    ports: vec!["p".into()],
                },
                409,
                "lan_not_empty",
            ),
            (
                LabError::InvalidName {
                    what: "port",
                    source: NameError::Empty,
                },
                422,
                "invalid_name",
            ),
            (
                LabError::Port(PortError::PathTaken { path: "/x".into() }),
                409,
                "path_taken",
            ),
            (
                LabError::Port(PortError::Socket {
                    path: "/x".into(),
                    source: std::io::Error::other("boom"),
                }),
                500,
                "internal",
            ),
            (LabError::DataPlane(DataPlaneGone), 503, "unavailable"),
            (
                LabError::Node(NodeError::Spec(crate::vmlaunch::spec::SpecError::Memory(1))),
                422,
                "invalid_value",
            ),
            (
                LabError::Node(NodeError::MissingFile {
                    what: "kernel",
                    path: "/nope".into(),
                }),
                422,
                "missing_file",
            ),
            (
                LabError::Node(NodeError::Busy {
                    node: "h1".into(),
                    state: NodeState::Running,
                    hint: "stop it first",
                }),
                409,
                "node_busy",
            ),
            (
                LabError::Node(NodeError::NoAgent("h1".into())),
                409,
                "no_agent",
            ),
            (
                LabError::Node(NodeError::Launch {
                    binary: "qemu".into(),
                    source: std::io::Error::other("no such file"),
                }),
                500,
                "launch_failed",
            ),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(&e);
            assert_eq!(a.status.as_u16(), status, "{e}");
            assert_eq!(a.code, code, "{e}");
            let v: serde_json::Value = serde_json::from_str(&a.body_json()).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["message"], e.to_string());
        }
    }

    #[test]
    fn truncate_marks_cuts() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc…");
    }
}
