//! What stands between a TCP client and the lab on `ulan web`'s listener:
//! a secret token, and the Host and Origin checks that keep other web
//! sites out (DNS rebinding, cross-site requests).
//!
//! * The token is 32 random bytes from `/dev/urandom`, in hex. It comes in
//!   the URL `ulan web` prints (`?token=`), then as the `ulan_token` cookie
//!   the first answer sets (HttpOnly, SameSite=Strict), or as
//!   `Authorization: Bearer`. It is compared in constant time.
//! * Host must name the listener: `localhost` or an IP literal, with the
//!   listener's port, or a name given with `--host`. A rebinding attack
//!   needs the browser to send the attacker's domain name as Host.
//! * Origin, when a browser sends one, must be `http://` + that Host;
//!   `Sec-Fetch-Site: cross-site` is refused too.

use std::io::Read;
use std::net::IpAddr;

use hyper::header::{self, HeaderMap};
use hyper::StatusCode;

use crate::api::error::ApiError;

/// The cookie that carries the token after the first visit.
pub const COOKIE: &str = "ulan_token";

/// A secret of 256 bits, as 64 lowercase hex digits.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A fresh token from the kernel's random source.
    pub fn generate() -> std::io::Result<Token> {
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
        Ok(Token::from_bytes(&raw))
    }

    pub fn from_bytes(raw: &[u8]) -> Token {
        Token(raw.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this token; the time taken depends only on the
    /// lengths (the length is public: always 64).
    pub fn matches(&self, given: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), given.as_bytes())
    }
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from ending the fold early.
    std::hint::black_box(diff) == 0
}

/// Which Host values the listener answers to.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    pub port: u16,
    /// Extra host names (without port) given with `--host`.
    pub names: Vec<String>,
}

impl HostPolicy {
    /// Whether a Host header value (`name:port`) names this listener.
    pub fn allows(&self, host: &str) -> bool {
        let (name, port) = match split_host_port(host) {
            Some(v) => v,
            None => return false,
        };
        if port != self.port {
            return false;
        }
        let name = name.to_ascii_lowercase();
        name == "localhost"
            || name.parse::<IpAddr>().is_ok()
            || self.names.iter().any(|n| n.eq_ignore_ascii_case(&name))
    }
}

/// `name:port`, `[v6]:port` into the name (brackets off) and the port. A
/// Host without a port is refused: the listener never runs on port 80.
fn split_host_port(host: &str) -> Option<(&str, u16)> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        (v6, after.strip_prefix(':')?)
    } else {
        host.rsplit_once(':')?
    };
    if name.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, port.parse().ok()?))
}

/// How a request proved it holds the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// In the query: the answer sets the cookie.
    Query,
    Cookie,
    Bearer,
}

fn refuse(status: StatusCode, code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(status, code, msg.into())
}

/// The value of `name` in a query string, if any.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Checks Host, Origin and the token of a request; the error is the
/// answer to send (400 bad_host, 403 foreign_origin, 401 token_required,
/// 403 bad_token).
pub fn check(
    headers: &HeaderMap,
    query: Option<&str>,
    hosts: &HostPolicy,
    token: &Token,
) -> Result<Proof, ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !hosts.allows(host) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "bad_host",
            format!(
                "Host {:?} does not name this listener (use localhost or an address, port {}; --host adds names)",
                crate::api::error::truncate(host, 80),
                hosts.port
            ),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origin.eq_ignore_ascii_case(&format!("http://{host}")) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "foreign_origin",
                format!(
                    "requests from origin {:?} are refused: only pages served by this listener may call it",
                    crate::api::error::truncate(origin, 80)
                ),
            ));
        }
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "foreign_origin",
            "cross-site requests are refused",
        ));
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let candidates = [
        (Proof::Bearer, bearer),
        (Proof::Cookie, cookie_value(headers, COOKIE)),
        (Proof::Query, query.and_then(|q| query_param(q, "token"))),
    ];
    let mut seen = false;
    for (proof, given) in candidates {
        if let Some(given) = given {
            seen = true;
            if token.matches(given) {
                return Ok(proof);
            }
        }
    }
    if seen {
        Err(refuse(
            StatusCode::FORBIDDEN,
            "bad_token",
            "the token is wrong: use the URL `ulan web` printed",
        ))
    } else {
        Err(refuse(
            StatusCode::UNAUTHORIZED,
            "token_required",
            "a token is required: open the URL `ulan web` printed (it has ?token=...)",
        ))
    }
}

/// The `Set-Cookie` value that keeps the token for later requests.
pub fn set_cookie(token: &Token) -> String {
    format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        token.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn token() -> Token {
        Token::from_bytes(&[7u8; 32])
    }

    fn hosts() -> HostPolicy {
        HostPolicy {
            port: 8080,
            names: vec!["lab.example".into()],
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn tokens_are_random_and_long() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_eq!(a.as_str().len(), 64);
        assert_ne!(a.as_str(), b.as_str());
        assert!(a.matches(a.as_str()));
        assert!(!a.matches(b.as_str()));
        assert!(!a.matches(&a.as_str()[..63]));
        assert!(!a.matches(""));
        assert_eq!(format!("{a:?}"), "Token(..)");
    }

    #[test]
    fn host_must_name_the_listener() {
        let h = hosts();
        for ok in [
            "localhost:8080",
            "LOCALHOST:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "10.1.2.3:8080",
            "lab.example:8080",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "",
            "localhost",
            "localhost:80",
            "evil.example:8080",
            "127.0.0.1.evil.example:8080",
            "localhost:8080x",
            "[::1]8080",
            ":8080",
            "localhost:99999",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
    }

    #[test]
    fn check_order_and_codes() {
        let t = token();
        let good = t.as_str().to_string();
        let code = |hs: &[(&'static str, &str)], q: Option<&str>| {
            check(&headers(hs), q, &hosts(), &t).map_err(|e| (e.status.as_u16(), e.code))
        };
        let host = ("host", "127.0.0.1:8080");
        assert_eq!(code(&[host], None), Err((401, "token_required")));
        assert_eq!(
            code(&[host], Some(&format!("token={good}"))),
            Ok(Proof::Query)
        );
        assert_eq!(
            code(&[host, ("cookie", &format!("a=b; {COOKIE}={good}"))], None),
            Ok(Proof::Cookie)
        );
        let bearer = format!("Bearer {good}");
        assert_eq!(
            code(&[host, ("authorization", &bearer)], None),
            Ok(Proof::Bearer)
        );
        assert_eq!(code(&[host], Some("token=00")), Err((403, "bad_token")));
        // A wrong cookie and a right query token: the right one wins.
        assert_eq!(
            code(
                &[host, ("cookie", "ulan_token=0")],
                Some(&format!("x=1&token={good}"))
            ),
            Ok(Proof::Query)
        );
        // Host and Origin are checked before the token.
        assert_eq!(
            code(
                &[("host", "evil.example:8080")],
                Some(&format!("token={good}"))
            ),
            Err((400, "bad_host"))
        );
        assert_eq!(
            code(
                &[host, ("origin", "http://evil.example")],
                Some(&format!("token={good}"))
            ),
            Err((403, "foreign_origin"))
        );
        assert_eq!(
            code(
                &[host, ("origin", "http://127.0.0.1:8080")],
                Some(&format!("token={good}"))
            ),
            Ok(Proof::Query)
        );
        assert_eq!(
            code(
                &[host, ("sec-fetch-site", "cross-site")],
                Some(&format!("token={good}"))
            ),
            Err((403, "foreign_origin"))
        );
    }

    #[test]
    fn random_headers_never_panic_or_pass() {
        // xorshift: reproducible pseudo-random bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let t = token();
        let alphabet = b"[]:;=,. \t\"%/?&abcdefxyzULAN_token0123456789-\xff\x00";
        for _ in 0..20_000 {
            let mut field = |max: u64| {
                let n = (next() % max) as usize;
                (0..n)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect::<Vec<u8>>()
            };
            let mut h = HeaderMap::new();
            for name in [
                "host",
                "origin",
                "cookie",
                "authorization",
                "sec-fetch-site",
            ] {
                if let Ok(v) = HeaderValue::from_bytes(&field(60)) {
                    h.insert(name, v);
                }
            }
            let q = String::from_utf8_lossy(&field(80)).to_string();
            // Random bytes never hold the 64-digit token.
            assert!(check(&h, Some(&q), &hosts(), &t).is_err());
        }
    }

    #[test]
    fn cookie_is_strict_and_http_only() {
        let c = set_cookie(&token());
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
    }
}
