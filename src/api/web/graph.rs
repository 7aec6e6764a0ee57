//! The lab as a graph (`GET /v1/lab/graph`, `ulan graph`): lans, nodes and
//! plain ports as vertices, one edge per port that sits on a lan. Modelled
//! on containerlab's `graph`: a JSON document for tools, and DOT and
//! Mermaid renderings of the same document for docs.
//!
//! A node's NICs are edges from the node to their lan (labelled with the
//! port); a NIC on no lan is listed on its node but has no edge. Kinds are
//! strings as the API spells them, so a new node or port kind needs no
//! change here.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::lab::{LanInfo, PortInfo};
use crate::vmlaunch::node::NodeInfo;

/// Format version of [`Graph`]; bumped when a field changes meaning.
pub const GRAPH_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub version: u32,
    pub lab: String,
    pub vertices: Vec<Vertex>,
    pub edges: Vec<Edge>,
}

/// What a vertex is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Lan,
    Node,
    Port,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vertex {
    /// Unique in the graph: `lan:NAME`, `node:NAME` or `port:NAME`.
    pub id: String,
    pub role: Role,
    pub name: String,
    /// Node kind (`qemu`, `uml`, ...) or port kind (`stream`, ...); none
    /// for a lan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Node state (`running`, `stopped`, ...); for a port `up` or `down`
    /// (a client attached or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// A node's NIC ports, in NIC order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// The node or plain port end.
    pub source: String,
    /// The lan end.
    pub target: String,
    /// The switch port this edge is.
    pub port: String,
    /// Port kind.
    pub kind: String,
    /// A client is attached to the port.
    pub up: bool,
    /// The port's link as the API set it (`up` or `down`).
    pub link: String,
    pub impaired: bool,
}

fn enum_str<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::from("?"),
    }
}

/// Builds the graph of a lab from what the API lists.
pub fn build(lab: &str, lans: &[LanInfo], ports: &[PortInfo], nodes: &[NodeInfo]) -> Graph {
    let mut vertices = Vec::new();
    let mut owner = std::collections::HashMap::new();
    for l in lans {
        vertices.push(Vertex {
            id: format!("lan:{}", l.name),
            role: Role::Lan,
            name: l.name.clone(),
            kind: None,
            state: None,
            image: None,
            memory_mb: None,
            ports: Vec::new(),
        });
    }
    for n in nodes {
        for nic in &n.nics {
            owner.insert(nic.port.clone(), format!("node:{}", n.name));
        }
        vertices.push(Vertex {
            id: format!("node:{}", n.name),
            role: Role::Node,
            name: n.name.clone(),
            kind: Some(enum_str(&n.kind)),
            state: Some(enum_str(&n.state)),
            image: n.spec.image.clone(),
            memory_mb: Some(n.spec.memory_mb),
            ports: n.nics.iter().map(|nic| nic.port.clone()).collect(),
        });
    }
    let mut edges = Vec::new();
    for p in ports {
        let source = match owner.get(&p.name) {
            Some(node) => node.clone(),
            None => {
                let id = format!("port:{}", p.name);
                vertices.push(Vertex {
                    id: id.clone(),
                    role: Role::Port,
                    name: p.name.clone(),
                    kind: Some(p.kind.as_str().to_string()),
                    state: Some(if p.up { "up" } else { "down" }.into()),
                    image: None,
                    memory_mb: None,
                    ports: Vec::new(),
                });
                id
            }
        };
        if let Some(lan) = &p.lan {
            edges.push(Edge {
                source,
                target: format!("lan:{lan}"),
                port: p.name.clone(),
                kind: p.kind.as_str().to_string(),
                up: p.up,
                link: enum_str(&p.link),
                impaired: p.impaired,
            });
        }
    }
    Graph {
        version: GRAPH_VERSION,
        lab: lab.to_string(),
        vertices,
        edges,
    }
}

/// A DOT string literal. Names are restricted already; this escapes
/// anyway so the output stays valid whatever a kind or image holds.
fn dot_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn label(v: &Vertex) -> String {
    let mut s = v.name.clone();
    if let Some(k) = &v.kind {
        s.push_str(&format!(" ({k})"));
    }
    s
}

/// Graphviz DOT (undirected): lans as ellipses, nodes as boxes, plain
/// ports as notes; dashed edges for ports whose link is down.
pub fn to_dot(g: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph {} {{", dot_quote(&g.lab));
    let _ = writeln!(out, "  graph [rankdir=LR];");
    for v in &g.vertices {
        let shape = match v.role {
            Role::Lan => "ellipse",
            Role::Node => "box",
            Role::Port => "note",
        };
        let mut attrs = format!("label={}, shape={shape}", dot_quote(&label(v)));
        if let Some(state) = &v.state {
            let _ = write!(attrs, ", tooltip={}", dot_quote(state));
        }
        let _ = writeln!(out, "  {} [{attrs}];", dot_quote(&v.id));
    }
    for e in &g.edges {
        let style = if e.link == "down" { "dashed" } else { "solid" };
        let _ = writeln!(
            out,
            "  {} -- {} [label={}, style={style}];",
            dot_quote(&e.source),
            dot_quote(&e.target),
            dot_quote(&e.port)
        );
    }
    out.push_str("}\n");
    out
}

/// Mermaid text for a label in `["..."]`: quotes become `#quot;`.
fn mermaid_text(s: &str) -> String {
    s.replace('"', "#quot;").replace(['\n', '\r'], " ")
}

/// A Mermaid flowchart. Vertex ids are `v0`, `v1`, ... (Mermaid ids
/// cannot hold every character a name or kind can); labels carry names.
pub fn to_mermaid(g: &Graph) -> String {
    let mut out = String::from("graph LR\n");
    let mut ids = std::collections::HashMap::new();
    for (i, v) in g.vertices.iter().enumerate() {
        let id = format!("v{i}");
        let text = mermaid_text(&label(v));
        let shape = match v.role {
            Role::Lan => format!("{id}((\"{text}\"))"),
            Role::Node => format!("{id}[\"{text}\"]"),
            Role::Port => format!("{id}>\"{text}\"]"),
        };
        let _ = writeln!(out, "  {shape}");
        ids.insert(v.id.as_str(), id);
    }
    for e in &g.edges {
        let (Some(a), Some(b)) = (ids.get(e.source.as_str()), ids.get(e.target.as_str())) else {
            continue;
        };
        let arrow = if e.link == "down" { "-.-" } else { "---" };
        let _ = writeln!(out, "  {a} {arrow}|\"{}\"| {b}", mermaid_text(&e.port));
    }
    out
}

/// The three output formats of `ulan graph`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Dot,
    Mermaid,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "json" => Ok(Format::Json),
            "dot" => Ok(Format::Dot),
            "mermaid" => Ok(Format::Mermaid),
            other => Err(format!(
                "unknown graph format {other:?} (json, dot, mermaid)"
            )),
        }
    }
}

/// Renders `g` in `format`.
pub fn render(g: &Graph, format: Format) -> String {
    match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(g).unwrap_or_else(|_| "{}".into());
            s.push('\n');
            s
        }
        Format::Dot => to_dot(g),
        Format::Mermaid => to_mermaid(g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Graph {
        Graph {
            version: GRAPH_VERSION,
            lab: "l\"ab".into(),
            vertices: vec![
                Vertex {
                    id: "lan:a".into(),
                    role: Role::Lan,
                    name: "a".into(),
                    kind: None,
                    state: None,
                    image: None,
                    memory_mb: None,
                    ports: vec![],
                },
                Vertex {
                    id: "node:n".into(),
                    role: Role::Node,
                    name: "n".into(),
                    kind: Some("con\"tainer".into()),
                    state: Some("running".into()),
                    image: None,
                    memory_mb: Some(256),
                    ports: vec!["n-eth0".into()],
                },
            ],
            edges: vec![Edge {
                source: "node:n".into(),
                target: "lan:a".into(),
                port: "n-eth0".into(),
                kind: "dgram".into(),
                up: true,
                link: "down".into(),
                impaired: false,
            }],
        }
    }

    #[test]
    fn dot_escapes_quotes() {
        let d = to_dot(&sample());
        assert!(d.starts_with("graph \"l\\\"ab\" {"), "{d}");
        assert!(d.contains("label=\"n (con\\\"tainer)\""), "{d}");
        assert!(d.contains("\"node:n\" -- \"lan:a\" [label=\"n-eth0\", style=dashed];"));
    }

    #[test]
    fn mermaid_uses_safe_ids() {
        let m = to_mermaid(&sample());
        assert!(m.contains("v1[\"n (con#quot;tainer)\"]"), "{m}");
        assert!(m.contains("v1 -.-|\"n-eth0\"| v0"), "{m}");
    }

    #[test]
    fn formats_parse() {
        assert_eq!("dot".parse::<Format>(), Ok(Format::Dot));
        assert!("svg"
            .parse::<Format>()
            .unwrap_err()
            .contains("json, dot, mermaid"));
    }
}
