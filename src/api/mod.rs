//! The HTTP/JSON API on the lab's Unix socket (`<run dir>/api.sock`), and
//! the client the CLI uses to talk to it.
//!
//! * [`serve`] / [`serve_with`]: the server (hyper 1, HTTP/1.1). It stops
//!   when a `tokio::sync::watch::Receiver<bool>` becomes `true` or its
//!   sender is dropped.
//! * [`ROUTES`]: the route table the dispatcher uses, held against
//!   `api/openapi.json` ([`OPENAPI`]) by the contract test.
//! * [`Client`]: typed calls and the event stream, for `ulan` subcommands.
//!
//! Every error is `{"error":{"code":"...","message":"..."}}`; see
//! [`ApiError`] and the OpenAPI document for the codes.

pub mod client;
pub mod error;
pub mod routes;
pub mod server;
pub mod web;

pub use client::{ByteStream, Client, ClientError, EventStream, SseEvent};
pub use error::ApiError;
pub use routes::{Route, ROUTES};
pub use server::{serve, serve_with, ServerConfig};

/// The OpenAPI 3.0.3 description of this API, served at
/// `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../api/openapi.json");
