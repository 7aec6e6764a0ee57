//! The single-page app's files, embedded in the binary: the page works
//! offline and needs nothing at run time. `web/` holds the sources;
//! `web/vendor/` the pinned third-party release files
//! (`scripts/vendor-web.sh` fetched them once).

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const fn asset(name: &'static str, content_type: &'static str, body: &'static [u8]) -> Asset {
    Asset {
        name,
        content_type,
        body,
    }
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The page itself, served at `/`.
pub const INDEX: Asset = asset(
    "index.html",
    "text/html; charset=utf-8",
    include_bytes!("../../../web/index.html"),
);

/// Everything under `/ui/`.
pub const ASSETS: &[Asset] = &[
    asset("app.js", JS, include_bytes!("../../../web/app.js")),
    asset("app.css", CSS, include_bytes!("../../../web/app.css")),
    asset(
        "cytoscape.min.js",
        JS,
        include_bytes!("../../../web/vendor/cytoscape.min.js"),
    ),
    asset(
        "xterm.js",
        JS,
        include_bytes!("../../../web/vendor/xterm.js"),
    ),
    asset(
        "xterm.css",
        CSS,
        include_bytes!("../../../web/vendor/xterm.css"),
    ),
    asset(
        "addon-fit.js",
        JS,
        include_bytes!("../../../web/vendor/addon-fit.js"),
    ),
];

/// The asset named `name`, if there is one.
pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// Headers every page response carries: only this origin's scripts and
/// connections, no framing (clickjacking), no MIME sniffing.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-cache"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_route_names_and_files_are_there() {
        for a in ASSETS {
            crate::names::check_name(a.name).unwrap();
            assert!(!a.body.is_empty(), "{}", a.name);
        }
        assert!(find("app.js").is_some());
        assert!(find("../app.js").is_none());
        let index = std::str::from_utf8(INDEX.body).unwrap();
        // Every asset the page loads is embedded.
        for part in index.split("/ui/").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| *c != '"' && *c != '\'')
                .collect();
            assert!(
                find(&name).is_some(),
                "index.html loads {name}, not embedded"
            );
        }
    }
}
