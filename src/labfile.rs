//! Lab files: what `ulan up FILE` starts, what `ulan apply FILE` makes a
//! running lab match, and what `ulan save` prints. YAML, or JSON with the
//! same structure. A file is parsed (with limits, since it may come from
//! anywhere), checked as a whole, and compared with another to plan the
//! smallest set of changes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::lab::LinkState;
use crate::names::{check_name, NameError};
use crate::ports::PortKind;
use crate::switch::impair::{ImpairError, ImpairSpec};
use crate::vmlaunch::spec::{nic_port_name, NodeSpec, SpecError, DEFAULT_MEMORY_MB};
use crate::wire::MacAddr;

/// Real lab files are a few KiB; this leaves room for very large labs and
/// bounds what a hostile file can cost.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// YAML aliases can make a small file expand into a huge value ("billion
/// laughs"). A file without aliases under `MAX_FILE_BYTES` never reaches
/// these.
const MAX_EXPANDED_VALUES: usize = 1_000_000;
const MAX_EXPANDED_TEXT: usize = 4 * MAX_FILE_BYTES;
/// libyaml's cost per token grows with the flow (`[`, `{`) nesting depth,
/// so deep nesting is refused before it gets there. Lab files nest 3 deep.
const MAX_FLOW_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LabFileError {
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("{origin}: larger than {} KiB; a lab file is a short text file", MAX_FILE_BYTES / 1024)]
    TooLarge { origin: String },
    #[error("{origin}: not UTF-8 text")]
    NotText { origin: String },
    #[error("{origin}: the file is empty (a lab file has `lans:` and `nodes:`)")]
    Empty { origin: String },
    /// The text is not a lab file: bad syntax, wrong type, unknown key...
    #[error("{origin}:{}{message}", location(*line, *column))]
    Syntax {
        origin: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A parsed file that does not hold together (from `check`).
    #[error("{0}")]
    Check(#[from] CheckError),
    /// The same, from `load`, which knows the file.
    #[error("{origin}: {source}")]
    Invalid { origin: String, source: CheckError },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{l}:{c}: "),
        (Some(l), None) => format!("{l}: "),
        _ => " ".into(),
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckError {
    #[error("invalid lab name: {0}")]
    LabName(NameError),
    #[error("lan {lan:?}: {source}")]
    LanName { lan: String, source: NameError },
    #[error("lan {0:?} is listed twice")]
    DuplicateLan(String),
    #[error("node {node:?}: {source}")]
    Node { node: String, source: SpecError },
    #[error("two nodes are named {0:?}")]
    DuplicateNode(String),
    #[error("node {node:?}, nic {nic}: lan {lan:?} is not listed in `lans`")]
    NicLan {
        node: String,
        nic: usize,
        lan: String,
    },
    #[error("port {port:?}: {source}")]
    PortName { port: String, source: NameError },
    #[error("two ports are named {0:?}")]
    DuplicatePort(String),
    #[error("port {port:?}: that is the name of node {node:?}'s nic {nic}")]
    PortIsNic {
        port: String,
        node: String,
        nic: usize,
    },
    #[error("port {port:?}: lan {lan:?} is not listed in `lans`")]
    PortLan { port: String, lan: String },
    #[error("port {port:?}: impairments: {source}")]
    PortImpairments { port: String, source: ImpairError },
    #[error("node {node:?} nic {nic} and node {other:?} nic {other_nic} have the same MAC {mac}")]
    DuplicateMac {
        node: String,
        nic: usize,
        other: String,
        other_nic: usize,
        mac: MacAddr,
    },
}

/// A plain switch port for outside clients (vde_plug, a QEMU you run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: String,
    pub kind: PortKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan: Option<String>,
    /// A down port forwards nothing either way.
    #[serde(default, skip_serializing_if = "is_up")]
    pub link: LinkState,
    /// As `PUT /v1/ports/{port}/impairments` takes them.
    #[serde(default, skip_serializing_if = "ImpairSpec::is_empty")]
    pub impairments: ImpairSpec,
}

impl PortSpec {
    /// A port with the link up and no impairments.
    pub fn new(name: &str, kind: PortKind, lan: Option<&str>) -> PortSpec {
        PortSpec {
            name: name.into(),
            kind,
            lan: lan.map(str::to_string),
            link: LinkState::Up,
            impairments: ImpairSpec::default(),
        }
    }
}

fn is_up(link: &LinkState) -> bool {
    *link == LinkState::Up
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabFile {
    /// The lab `ulan up` starts when no `--lab` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lans: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
}

/// Parses a lab file's text: JSON when it starts with `{`, else YAML.
/// `origin` (usually the file name) prefixes every error. Does not `check`.
pub fn parse(text: &str, origin: &str) -> Result<LabFile, LabFileError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(LabFileError::TooLarge {
            origin: origin.into(),
        });
    }
    let start = text.trim_start();
    if start.is_empty() {
        return Err(LabFileError::Empty {
            origin: origin.into(),
        });
    }
    if start.starts_with('{') {
        // No aliases in JSON, and serde_json caps nesting at 128.
        serde_json::from_str(text).map_err(|e| json_error(&e, origin))
    } else {
        check_flow_depth(text, origin)?;
        // First walk the value with every alias expanded, counting, so the
        // real pass below is known to be small.
        serde_yaml_ng::Deserializer::from_str(text)
            .deserialize_any(Budget::default().visitor())
            .map_err(|e| yaml_error(&e, origin))?;
        LabFile::deserialize(serde_yaml_ng::Deserializer::from_str(text))
            .map_err(|e| yaml_error(&e, origin))
    }
}

/// Counts brackets anywhere, quoted or not: a real file never comes close
/// to the limit, and a count this simple cannot be fooled into a slow path.
fn check_flow_depth(text: &str, origin: &str) -> Result<(), LabFileError> {
    let mut depth = 0usize;
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    let line = text.as_bytes()[..i].iter().filter(|&&b| b == b'\n').count() + 1;
                    let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
                    return Err(LabFileError::Syntax {
                        origin: origin.into(),
                        line: Some(line),
                        column: Some(text[line_start..i].chars().count() + 1),
                        message: format!("more than {MAX_FLOW_DEPTH} levels of [ ] or {{ }}"),
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Reads, parses and checks a lab file.
pub fn load(path: &Path) -> Result<LabFile, LabFileError> {
    let origin = path.display().to_string();
    let read_error = |source| LabFileError::Read {
        origin: origin.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    // `take`, not the file's size: the path may be a pipe or /dev/zero.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(LabFileError::TooLarge { origin });
    }
    let text = String::from_utf8(bytes).map_err(|_| LabFileError::NotText {
        origin: origin.clone(),
    })?;
    let mut lab = parse(&text, &origin)?;
    // Relative kernel, initrd and image paths are relative to the file.
    let dir = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    for node in &mut lab.nodes {
        node.absolutize(&dir);
    }
    lab.check().map_err(|e| match e {
        LabFileError::Check(source) => LabFileError::Invalid { origin, source },
        other => other,
    })?;
    Ok(lab)
}

/// Keeps the message, drops the parser's own " at line L column C" (the
/// location goes in front, compiler style).
fn without_location(message: String, line: usize, column: usize) -> String {
    let suffix = format!(" at line {line} column {column}");
    match message.find(&suffix) {
        Some(at) => format!("{}{}", &message[..at], &message[at + suffix.len()..]),
        None => message,
    }
}

fn yaml_error(e: &serde_yaml_ng::Error, origin: &str) -> LabFileError {
    let message = e.to_string();
    match e.location() {
        Some(l) => LabFileError::Syntax {
            origin: origin.into(),
            line: Some(l.line()),
            column: Some(l.column()),
            message: without_location(message, l.line(), l.column()),
        },
        None => LabFileError::Syntax {
            origin: origin.into(),
            line: None,
            column: None,
            message,
        },
    }
}

fn json_error(e: &serde_json::Error, origin: &str) -> LabFileError {
    let (line, column) = (e.line(), e.column());
    // serde_json reports line 0 when it has no position.
    let known = line > 0;
    LabFileError::Syntax {
        origin: origin.into(),
        line: known.then_some(line),
        column: known.then_some(column),
        message: without_location(e.to_string(), line, column),
    }
}

/// Counts the values and text of a document, aliases expanded, failing
/// once past the limits. Allocates nothing per value.
#[derive(Default)]
struct Budget {
    values: usize,
    text: usize,
}

struct Counting<'b>(&'b mut Budget);

impl Budget {
    fn visitor(&mut self) -> Counting<'_> {
        Counting(self)
    }
}

impl Counting<'_> {
    fn spend<E: de::Error>(&mut self, text: usize) -> Result<(), E> {
        self.0.values += 1;
        self.0.text = self.0.text.saturating_add(text);
        if self.0.values > MAX_EXPANDED_VALUES || self.0.text > MAX_EXPANDED_TEXT {
            return Err(E::custom(
                "the file expands (through YAML aliases) into far more than a lab file holds",
            ));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Counting<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counting<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E: de::Error>(mut self, _: bool) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_i64<E: de::Error>(mut self, _: i64) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_i128<E: de::Error>(mut self, _: i128) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_u64<E: de::Error>(mut self, _: u64) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_u128<E: de::Error>(mut self, _: u128) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_f64<E: de::Error>(mut self, _: f64) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        self.spend(v.len())
    }
    fn visit_bytes<E: de::Error>(mut self, v: &[u8]) -> Result<(), E> {
        self.spend(v.len())
    }
    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_none<E: de::Error>(mut self) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_some<D: Deserializer<'de>>(mut self, d: D) -> Result<(), D::Error> {
        self.spend(0)?;
        d.deserialize_any(Counting(self.0))
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(mut self, d: D) -> Result<(), D::Error> {
        self.spend(0)?;
        d.deserialize_any(Counting(self.0))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.spend(0)?;
        while seq.next_element_seed(Counting(self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.spend(0)?;
        while map.next_key_seed(Counting(self.0))?.is_some() {
            map.next_value_seed(Counting(self.0))?;
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(mut self, data: A) -> Result<(), A::Error> {
        // A YAML tag (`!name value`): count the tag and what it tags.
        use serde::de::VariantAccess;
        self.spend(0)?;
        let (de::IgnoredAny, variant) = data.variant()?;
        variant.newtype_variant_seed(Counting(self.0))
    }
}

impl LabFile {
    /// Everything that makes a file hold together, beyond each node's own
    /// `NodeSpec::validate`.
    pub fn check(&self) -> Result<(), LabFileError> {
        self.check_inner().map_err(LabFileError::Check)
    }

    fn check_inner(&self) -> Result<(), CheckError> {
        if let Some(name) = &self.name {
            check_name(name).map_err(CheckError::LabName)?;
        }
        let mut lans = BTreeSet::new();
        for lan in &self.lans {
            check_name(lan).map_err(|source| CheckError::LanName {
                lan: lan.clone(),
                source,
            })?;
            if !lans.insert(lan.as_str()) {
                return Err(CheckError::DuplicateLan(lan.clone()));
            }
        }
        // Every switch port the file makes: NIC ports, then plain ports.
        let mut nic_ports: BTreeMap<String, (&str, usize)> = BTreeMap::new();
        let mut nodes = BTreeSet::new();
        let mut macs: BTreeMap<MacAddr, (&str, usize)> = BTreeMap::new();
        for node in &self.nodes {
            node.validate().map_err(|source| CheckError::Node {
                node: node.name.clone(),
                source,
            })?;
            if !nodes.insert(node.name.as_str()) {
                return Err(CheckError::DuplicateNode(node.name.clone()));
            }
            for (i, nic) in node.nics.iter().enumerate() {
                if let Some(lan) = &nic.lan {
                    if !lans.contains(lan.as_str()) {
                        return Err(CheckError::NicLan {
                            node: node.name.clone(),
                            nic: i,
                            lan: lan.clone(),
                        });
                    }
                }
                if let Some(mac) = nic.mac {
                    if let Some(&(other, other_nic)) = macs.get(&mac) {
                        return Err(CheckError::DuplicateMac {
                            node: node.name.clone(),
                            nic: i,
                            other: other.into(),
                            other_nic,
                            mac,
                        });
                    }
                    macs.insert(mac, (&node.name, i));
                }
                nic_ports.insert(node.port_name(i), (&node.name, i));
            }
        }
        let mut ports = BTreeSet::new();
        for port in &self.ports {
            check_name(&port.name).map_err(|source| CheckError::PortName {
                port: port.name.clone(),
                source,
            })?;
            if !ports.insert(port.name.as_str()) {
                return Err(CheckError::DuplicatePort(port.name.clone()));
            }
            if let Some(&(node, nic)) = nic_ports.get(&port.name) {
                return Err(CheckError::PortIsNic {
                    port: port.name.clone(),
                    node: node.into(),
                    nic,
                });
            }
            if let Some(lan) = &port.lan {
                if !lans.contains(lan.as_str()) {
                    return Err(CheckError::PortLan {
                        port: port.name.clone(),
                        lan: lan.clone(),
                    });
                }
            }
            port.impairments
                .validate()
                .map_err(|source| CheckError::PortImpairments {
                    port: port.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The file as `ulan save` prints it: fields in a fixed order, lists in
    /// the lab file's order, defaults left out. `parse` gives `self` back.
    pub fn to_yaml(&self) -> String {
        let mut value = match serde_yaml_ng::to_value(self) {
            Ok(v) => v,
            // Only strings, numbers, lists and string-keyed maps are in
            // here, which YAML always represents.
            Err(e) => return format!("# cannot write the lab as YAML: {e}\n"),
        };
        // NodeSpec writes memory_mb and cpus always and a missing lan as
        // null; a saved file is easier to read without them.
        let nodes = value
            .as_mapping_mut()
            .and_then(|m| m.get_mut("nodes"))
            .and_then(|n| n.as_sequence_mut());
        for node in nodes.into_iter().flatten() {
            let Some(node) = node.as_mapping_mut() else {
                continue;
            };
            for (key, default) in [("memory_mb", u64::from(DEFAULT_MEMORY_MB)), ("cpus", 1)] {
                if node.get(key).and_then(|v| v.as_u64()) == Some(default) {
                    node.shift_remove(key);
                }
            }
            let nics = node.get_mut("nics").and_then(|n| n.as_sequence_mut());
            for nic in nics.into_iter().flatten() {
                if let Some(nic) = nic.as_mapping_mut() {
                    if nic.get("lan").is_some_and(|l| l.is_null()) {
                        nic.shift_remove("lan");
                    }
                }
            }
        }
        serde_yaml_ng::to_string(&value)
            .unwrap_or_else(|e| format!("# cannot write the lab as YAML: {e}\n"))
    }
}

/// The changes that turn one lab into another, in an order where each is
/// valid when it runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    AddLan(String),
    RemoveLan(String),
    AddPort(PortSpec),
    RemovePort(String),
    MovePort {
        port: String,
        lan: Option<String>,
    },
    AddNode(NodeSpec),
    RemoveNode(String),
    /// Only NIC lans differ: move the NIC ports, the guest keeps running.
    MoveNic {
        node: String,
        port: String,
        lan: Option<String>,
    },
    /// Anything else about the node differs: remove it, add the new one.
    ReplaceNode(NodeSpec),
    /// A port's or NIC's link state differs: set it, nothing restarts.
    SetLink {
        port: String,
        link: LinkState,
    },
    /// A port's or NIC's impairments differ: replace them (empty clears).
    SetImpairments {
        port: String,
        impairments: ImpairSpec,
    },
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

fn lan_text(lan: &Option<String>) -> &str {
    lan.as_deref().unwrap_or("(no lan)")
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::AddLan(lan) => write!(f, "+ lan {lan}"),
            Step::RemoveLan(lan) => write!(f, "- lan {lan}"),
            Step::AddPort(p) => write!(
                f,
                "+ port {} ({}) on {}",
                p.name,
                p.kind.as_str(),
                lan_text(&p.lan)
            ),
            Step::RemovePort(port) => write!(f, "- port {port}"),
            Step::MovePort { port, lan } => write!(f, "~ port {port} -> {}", lan_text(lan)),
            Step::AddNode(n) => {
                write!(f, "+ node {}", n.name)?;
                let lans: Vec<&str> = n.nics.iter().map(|nic| lan_text(&nic.lan)).collect();
                if !lans.is_empty() {
                    write!(f, " on {}", lans.join(", "))?;
                }
                Ok(())
            }
            Step::RemoveNode(node) => write!(f, "- node {node}"),
            Step::MoveNic { node, port, lan } => {
                // `h1.eth0` -> `eth0`: the node is already named.
                let nic = port
                    .strip_prefix(node.as_str())
                    .and_then(|p| p.strip_prefix('.'))
                    .unwrap_or(port);
                write!(f, "~ node {node}: {nic} -> {}", lan_text(lan))
            }
            Step::ReplaceNode(n) => write!(f, "-+ node {} (changed: the guest restarts)", n.name),
            Step::SetLink { port, link } => {
                let word = match link {
                    LinkState::Up => "up",
                    LinkState::Down => "down",
                };
                write!(f, "~ port {port}: link {word}")
            }
            Step::SetImpairments { port, impairments } if impairments.is_empty() => {
                write!(f, "~ port {port}: no impairments")
            }
            Step::SetImpairments { port, impairments } => {
                // One line, in the same words as the file and the API.
                let text = serde_json::to_string(impairments).unwrap_or_default();
                write!(f, "~ port {port}: impairments {text}")
            }
        }
    }
}

/// Whether `a` and `b` differ only in what their NICs' ports can change
/// while the guest runs: lan, link state and impairments.
fn only_nic_ports_differ(a: &NodeSpec, b: &NodeSpec) -> bool {
    if a.nics.len() != b.nics.len() {
        return false;
    }
    let mut a = a.clone();
    for (nic, other) in a.nics.iter_mut().zip(&b.nics) {
        nic.lan.clone_from(&other.lan);
        nic.link = other.link;
        nic.impairments.clone_from(&other.impairments);
    }
    a == *b
}

/// The steps that give an existing port `link` and `impairments`.
fn port_state_steps(
    port: &str,
    (was_link, was_imp): (LinkState, &ImpairSpec),
    (link, imp): (LinkState, &ImpairSpec),
    out: &mut Vec<Step>,
) {
    // Compared as what acts: an empty direction is no impairment.
    if was_imp != imp && !(was_imp.is_empty() && imp.is_empty()) {
        out.push(Step::SetImpairments {
            port: port.to_string(),
            impairments: imp.clone(),
        });
    }
    if was_link != link {
        out.push(Step::SetLink {
            port: port.to_string(),
            link,
        });
    }
}

/// The steps from `current` to `wanted`, both files that pass `check`.
/// Anything unchanged makes no step. Order: lans are added first; then
/// what goes away is removed and changed nodes replaced (freeing names
/// before anything reuses them); then new ports and nodes are added;
/// then ports and NICs move; lans go last, once nothing is on them.
pub fn plan(current: &LabFile, wanted: &LabFile) -> Plan {
    let cur_lans: BTreeSet<&str> = current.lans.iter().map(String::as_str).collect();
    let want_lans: BTreeSet<&str> = wanted.lans.iter().map(String::as_str).collect();
    let cur_ports: BTreeMap<&str, &PortSpec> =
        current.ports.iter().map(|p| (p.name.as_str(), p)).collect();
    let want_ports: BTreeMap<&str, &PortSpec> =
        wanted.ports.iter().map(|p| (p.name.as_str(), p)).collect();
    let cur_nodes: BTreeMap<&str, &NodeSpec> =
        current.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let want_nodes: BTreeSet<&str> = wanted.nodes.iter().map(|n| n.name.as_str()).collect();

    let mut add_lans = Vec::new();
    let mut removals = Vec::new();
    let mut replacements = Vec::new();
    let mut additions = Vec::new();
    let mut moves = Vec::new();
    let mut remove_lans = Vec::new();

    for lan in &wanted.lans {
        if !cur_lans.contains(lan.as_str()) {
            add_lans.push(Step::AddLan(lan.clone()));
        }
    }
    // A port whose kind changes is a different socket: remove and add.
    for port in &current.ports {
        if want_ports.get(port.name.as_str()).map(|w| w.kind) != Some(port.kind) {
            removals.push(Step::RemovePort(port.name.clone()));
        }
    }
    for port in &wanted.ports {
        match cur_ports.get(port.name.as_str()) {
            Some(old) if old.kind == port.kind => {
                if old.lan != port.lan {
                    moves.push(Step::MovePort {
                        port: port.name.clone(),
                        lan: port.lan.clone(),
                    });
                }
                port_state_steps(
                    &port.name,
                    (old.link, &old.impairments),
                    (port.link, &port.impairments),
                    &mut moves,
                );
            }
            _ => additions.push(Step::AddPort(port.clone())),
        }
    }
    for node in &current.nodes {
        if !want_nodes.contains(node.name.as_str()) {
            removals.push(Step::RemoveNode(node.name.clone()));
        }
    }
    let mut nic_moves = Vec::new();
    for node in &wanted.nodes {
        let Some(&old) = cur_nodes.get(node.name.as_str()) else {
            additions.push(Step::AddNode(node.clone()));
            continue;
        };
        if old == node {
            continue;
        }
        if !only_nic_ports_differ(old, node) {
            replacements.push(Step::ReplaceNode(node.clone()));
            continue;
        }
        for (i, (was, now)) in old.nics.iter().zip(&node.nics).enumerate() {
            let port = nic_port_name(&node.name, i);
            if was.lan != now.lan {
                nic_moves.push(Step::MoveNic {
                    node: node.name.clone(),
                    port: port.clone(),
                    lan: now.lan.clone(),
                });
            }
            port_state_steps(
                &port,
                (was.link, &was.impairments),
                (now.link, &now.impairments),
                &mut nic_moves,
            );
        }
    }
    moves.extend(nic_moves);
    for lan in &current.lans {
        if !want_lans.contains(lan.as_str()) {
            remove_lans.push(Step::RemoveLan(lan.clone()));
        }
    }
    let steps = [
        add_lans,
        removals,
        replacements,
        additions,
        moves,
        remove_lans,
    ]
    .concat();
    Plan { steps }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmlaunch::spec::{NicSpec, NodeKind, RouteSpec, Transport};
    use std::time::{Duration, Instant};

    const ROUTER: &str = "\
name: router            # the lab name
lans: [left, right]
nodes:
  - name: r1
    forward: true
    nics:
      - {lan: left, ip: 10.0.1.1/24}
      - {lan: right, ip: 10.0.2.1/24}
  - name: h1
    nics: [{lan: left, ip: 10.0.1.10/24}]
    routes: [{to: default, via: 10.0.1.1}]
ports:
  - {name: ext0, kind: vde, lan: left}
";

    fn router() -> LabFile {
        parse(ROUTER, "router.yaml").unwrap()
    }

    fn syntax_error(text: &str) -> String {
        match parse(text, "lab.yaml") {
            Err(e @ LabFileError::Syntax { .. }) => e.to_string(),
            other => panic!("{text:?}: expected a syntax error, got {other:?}"),
        }
    }

    fn check_error(lab: &LabFile) -> String {
        match lab.check() {
            Err(e @ LabFileError::Check(_)) => e.to_string(),
            other => panic!("expected a check error, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_documented_shape() {
        let lab = router();
        lab.check().unwrap();
        assert_eq!(lab.name.as_deref(), Some("router"));
        assert_eq!(lab.lans, ["left", "right"]);
        assert_eq!(lab.nodes.len(), 2);
        let r1 = &lab.nodes[0];
        assert!(r1.forward);
        assert_eq!(r1.nics[1].lan.as_deref(), Some("right"));
        assert_eq!(r1.nics[1].ip[0].to_string(), "10.0.2.1/24");
        assert_eq!(r1.memory_mb, DEFAULT_MEMORY_MB);
        let h1 = &lab.nodes[1];
        assert_eq!(h1.routes[0].to, "default");
        assert_eq!(h1.routes[0].via.to_string(), "10.0.1.1");
        assert_eq!(
            lab.ports,
            [PortSpec::new("ext0", PortKind::Vde, Some("left"))]
        );
    }

    const IMPAIRED: &str = "\
lans: [left]
nodes:
  - name: h1
    nics:
      - {lan: left, ip: 10.0.1.10/24, link: down,
         impairments: {egress: {delay_ms: 20, loss_pct: 1}}}
      - {lan: left, impairments: {ingress: {rate_kbps: 512, burst_kb: 8}}}
ports:
  - {name: ext0, kind: vde, lan: left, link: down}
  - {name: ext1, kind: stream, lan: left, link: up,
     impairments: {ingress: {loss_gilbert_elliott: {p_pct: 1, r_pct: 20}}}}
";

    fn impaired() -> LabFile {
        let lab = parse(IMPAIRED, "impaired.yaml").unwrap();
        lab.check().unwrap();
        lab
    }

    #[test]
    fn parses_link_state_and_impairments() {
        use crate::switch::impair::{DirectionSpec, GilbertElliott};
        let lab = impaired();
        let nics = &lab.nodes[0].nics;
        assert_eq!(nics[0].link, LinkState::Down);
        assert_eq!(
            nics[0].impairments,
            ImpairSpec {
                egress: Some(DirectionSpec {
                    delay_ms: Some(20.0),
                    loss_pct: Some(1.0),
                    ..Default::default()
                }),
                ingress: None,
            }
        );
        assert_eq!(nics[1].link, LinkState::Up);
        let ingress = nics[1].impairments.ingress.as_ref().unwrap();
        assert_eq!((ingress.rate_kbps, ingress.burst_kb), (Some(512), Some(8)));
        assert_eq!(lab.ports[0].link, LinkState::Down);
        assert!(lab.ports[0].impairments.is_empty());
        assert_eq!(lab.ports[1].link, LinkState::Up);
        assert_eq!(
            lab.ports[1]
                .impairments
                .ingress
                .as_ref()
                .unwrap()
                .loss_gilbert_elliott,
            Some(GilbertElliott {
                p_pct: 1.0,
                r_pct: 20.0,
                bad_loss_pct: None,
                good_loss_pct: None,
            })
        );
        // Left out, both are the defaults.
        let router = router();
        assert!(router.nodes[0]
            .nics
            .iter()
            .all(|n| n.link == LinkState::Up && n.impairments.is_empty()));
        assert_eq!(router.ports[0].link, LinkState::Up);
    }

    #[test]
    fn bad_link_states_and_impairments_are_refused_by_name() {
        // Syntax: unknown keys and words, wrong types.
        for (text, want) in [
            (
                "nodes: [{name: h, nics: [{lan: a, link: sideways}]}]\n",
                "unknown variant `sideways`, expected `up` or `down`",
            ),
            ("ports: [{name: p, kind: vde, link: 0}]\n", "link"),
            (
                "nodes: [{name: h, nics: [{impairments: {egress: {delay: 5}}}]}]\n",
                "unknown field `delay`",
            ),
            (
                "nodes: [{name: h, nics: [{impairments: {both: {delay_ms: 5}}}]}]\n",
                "unknown field `both`, expected `egress` or `ingress`",
            ),
            (
                "ports: [{name: p, kind: vde, impairments: {egress: {loss_pct: lots}}}]\n",
                "loss_pct",
            ),
            (
                "ports: [{name: p, kind: vde, impairments: {ingress: {loss_gilbert_elliott: {p_pct: 1}}}}]\n",
                "missing field `r_pct`",
            ),
        ] {
            let e = syntax_error(text);
            assert!(e.contains(want), "{text:?}: {e:?} should contain {want:?}");
        }
        // Values out of range: `check`, naming node, NIC or port, and the field.
        for (text, want) in [
            (
                "lans: [a]\nnodes: [{name: h1, nics: [{lan: a}, {lan: a, impairments: {egress: {loss_pct: 200}}}]}]\n",
                "node \"h1\": nic 1: impairments: egress.loss_pct is 200; it must be between 0 and 100",
            ),
            (
                "nodes: [{name: h1, nics: [{impairments: {ingress: {delay_ms: -1}}}]}]\n",
                "node \"h1\": nic 0: impairments: ingress.delay_ms is -1",
            ),
            (
                "ports: [{name: ext0, kind: vde, impairments: {ingress: {rate_kbps: 0}}}]\n",
                "port \"ext0\": impairments: ingress.rate_kbps is 0",
            ),
            (
                "ports: [{name: ext0, kind: vde, impairments: {egress: {reorder_pct: 5}}}]\n",
                "port \"ext0\": impairments: egress.reorder_pct needs",
            ),
            (
                "ports: [{name: ext0, kind: vde, impairments: {egress: {loss_pct: 1, loss_gilbert_elliott: {p_pct: 1, r_pct: 2}}}}]\n",
                "port \"ext0\": impairments: egress: loss_pct and loss_gilbert_elliott",
            ),
        ] {
            let lab = parse(text, "lab.yaml").unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let e = check_error(&lab);
            assert!(e.contains(want), "{text:?}: {e:?} should contain {want:?}");
        }
    }

    #[test]
    fn link_state_and_impairments_round_trip_and_defaults_stay_out() {
        let lab = impaired();
        let text = lab.to_yaml();
        assert_eq!(parse(&text, "saved.yaml").unwrap(), lab, "{text}");
        assert_eq!(text.matches("link: down").count(), 2, "{text}");
        // ext1's `link: up` is the default: not written.
        assert!(!text.contains("link: up"), "{text}");
        assert!(text.contains("delay_ms: 20"), "{text}");
        let json = serde_json::to_string(&lab).unwrap();
        assert_eq!(parse(&json, "saved.json").unwrap(), lab);
        let plain = router().to_yaml();
        for absent in ["link", "impairments"] {
            assert!(!plain.contains(absent), "{absent} in\n{plain}");
        }
    }

    #[test]
    fn json_is_the_same_structure() {
        let json = serde_json::to_string_pretty(&router()).unwrap();
        assert!(json.trim_start().starts_with('{'));
        assert_eq!(parse(&json, "router.json").unwrap(), router());
        // Leading blank lines still mean JSON.
        let e = parse("\n\n  {\"lans\": 5}", "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.json:3:"), "{e}");
        assert!(e.contains("expected a sequence"), "{e}");
    }

    #[test]
    fn missing_lists_are_empty_and_empty_text_is_refused() {
        let lab = parse("lans: [a]\n", "f").unwrap();
        assert!(lab.nodes.is_empty() && lab.ports.is_empty() && lab.name.is_none());
        assert_eq!(parse("{}", "f").unwrap(), LabFile::default());
        for empty in ["", "   \n\t\n"] {
            let e = parse(empty, "f.yaml").unwrap_err();
            assert!(matches!(e, LabFileError::Empty { .. }), "{e:?}");
            assert!(e.to_string().starts_with("f.yaml: "), "{e}");
        }
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let text = "lans: [a]\nnodes:\n  - name: h1\n    memroy_mb: 5\n";
        let e = syntax_error(text);
        assert!(e.starts_with("lab.yaml:4:5: "), "{e}");
        assert!(e.contains("unknown field `memroy_mb`"), "{e}");
        // The parser's own " at line .. column .." is not repeated.
        assert!(!e.contains("at line"), "{e}");
        assert!(!e.contains('\n'), "{e}");

        let e = syntax_error("lans: [a\nnodes: []\n");
        assert!(e.starts_with("lab.yaml:"), "{e}");
        let e = syntax_error("lanz: [a]\n");
        assert!(e.starts_with("lab.yaml:1:1: "), "{e}");
        assert!(e.contains("lanz"), "{e}");
        let e = syntax_error("ports: [{name: p, kind: tcp}]\n");
        assert!(e.contains("tcp"), "{e}");
        let e = syntax_error("nodes: [{name: h, nics: [{lan: a, ip: 10.0.0.1}]}]\n");
        assert!(e.contains("ADDRESS/PREFIX"), "{e}");
        assert!(e.starts_with("lab.yaml:1:"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_everywhere() {
        for text in [
            "lans: []\nextra: 1\n",
            "nodes: [{name: h, colour: red}]\n",
            "nodes: [{name: h, nics: [{lan: a, speed: 10}]}]\n",
            "nodes: [{name: h, routes: [{to: default, via: 10.0.0.1, metric: 1}]}]\n",
            "ports: [{name: p, kind: vde, mode: x}]\n",
        ] {
            syntax_error(text);
        }
    }

    #[test]
    fn wrong_types_are_errors() {
        for text in [
            "lans: left\n",
            "lans: [[a]]\n",
            "nodes: {name: h}\n",
            "nodes: [{name: h, memory_mb: lots}]\n",
            "nodes: [{name: h, memory_mb: -1}]\n",
            "nodes: [{name: h, memory_mb: 99999999999999999999999}]\n",
            "nodes: [{name: h, forward: maybe}]\n",
            "nodes: [{name: h, nics: [{lan: a, mac: 02:00}]}]\n",
            "nodes: [{name: [h]}]\n",
            "name: [x]\n",
            "- a\n- b\n",
            "just a string\n",
            "42\n",
            "{\"lans\": {\"a\": 1}}",
            "{\"nodes\": [{\"name\": 5}]}",
        ] {
            assert!(parse(text, "f").is_err(), "{text:?} accepted");
        }
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = syntax_error("lans: [a]\nlans: [b]\n");
        assert!(e.contains("duplicate field `lans`"), "{e}");
        let e = syntax_error("nodes:\n  - name: h1\n    name: h2\n");
        assert!(e.contains("duplicate field `name`"), "{e}");
        assert!(parse("{\"lans\": [], \"lans\": []}", "f").is_err());
    }

    /// Hostile input ends in an error, quickly.
    fn refused_quickly(text: &str) -> String {
        let t = Instant::now();
        let e = parse(text, "evil.yaml").unwrap_err().to_string();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        assert!(e.starts_with("evil.yaml"), "{e}");
        e
    }

    #[test]
    fn binary_junk_is_an_error() {
        let mut junk = String::new();
        let mut x: u32 = 12345;
        for _ in 0..4096 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            junk.push(char::from_u32((x >> 16) % 0x800).unwrap_or('?'));
        }
        refused_quickly(&junk);
        refused_quickly("\0\0\0\u{1}\u{2}");
        refused_quickly("lans: [a]\n\u{7f}ELF\u{1}\u{1}\0\0");
        refused_quickly("{\0}");
    }

    #[test]
    fn deep_nesting_is_an_error() {
        let depth = 100_000;
        refused_quickly(&"[".repeat(depth));
        refused_quickly(&format!("lans: {}{}", "[".repeat(depth), "]".repeat(depth)));
        refused_quickly(&format!("{}{}", "{\"a\":".repeat(depth), "}".repeat(depth)));
        refused_quickly(
            &format!("{}{}", "[".repeat(depth), "]".repeat(depth)).replacen('[', "{\"lans\":[", 1),
        );
        let mut block = String::new();
        for i in 0..500 {
            block.push_str(&" ".repeat(i));
            block.push_str("a:\n");
        }
        refused_quickly(&block);
    }

    #[test]
    fn alias_bombs_are_errors() {
        // Billion laughs: nine levels of nine aliases.
        let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        refused_quickly(&text);
        // Few aliases of a long string, where the lab file takes strings.
        let long = "x".repeat(200_000);
        let refs = vec!["*s"; 200].join(", ");
        let text =
            format!("nodes:\n  - name: h\n    append: &s {long}\n    extra_args: [{refs}]\n");
        let e = refused_quickly(&text);
        assert!(e.contains("expands"), "{e}");
        // An alias to itself, and to an anchor that does not exist.
        refused_quickly("lans: &a [*a]\n");
        refused_quickly("lans: *nowhere\n");
        // Used sparingly, aliases are fine.
        let lab = parse(
            "lans: [&l left]\nports: [{name: p, kind: vde, lan: *l}]\n",
            "f",
        )
        .unwrap();
        assert_eq!(lab.ports[0].lan.as_deref(), Some("left"));
    }

    #[test]
    fn oversized_text_is_refused() {
        let big = format!("lans: [a]\n{}", "# padding\n".repeat(1_000_000));
        assert!(big.len() > 10_000_000);
        let e = refused_quickly(&big);
        assert!(e.contains("larger than 1024 KiB"), "{e}");
        // Just under the cap is parsed.
        let fits = format!("lans: [a]\n{}", "#".repeat(MAX_FILE_BYTES - 20));
        assert_eq!(parse(&fits, "f").unwrap().lans, ["a"]);
    }

    #[test]
    fn other_yaml_features_are_errors_not_panics() {
        refused_quickly("lans: [a]\n---\nlans: [b]\n");
        refused_quickly("lans: !!binary aGVsbG8=\n");
        refused_quickly("nodes: [{name: h, kind: !qemu x}]\n");
        refused_quickly("<<: {lans: [a]}\n");
        refused_quickly("? [a, b]\n: c\n");
        refused_quickly("lans: [a]\n\t- b\n");
    }

    #[test]
    fn load_reads_caps_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("router.yaml");
        std::fs::write(&ok, ROUTER).unwrap();
        assert_eq!(load(&ok).unwrap(), router());

        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "lans: [a]\nnodes: [{name: h1, nics: [{lan: b}]}]\n").unwrap();
        let e = load(&bad).unwrap_err();
        assert!(matches!(e, LabFileError::Invalid { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.starts_with(&format!("{}: ", bad.display())), "{e}");
        assert!(e.contains("node \"h1\", nic 0: lan \"b\""), "{e}");

        let junk = dir.path().join("junk.yaml");
        std::fs::write(&junk, [0xff, 0xfe, 0x00, 0x80]).unwrap();
        assert!(matches!(load(&junk), Err(LabFileError::NotText { .. })));

        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_FILE_BYTES + 1]).unwrap();
        assert!(matches!(load(&big), Err(LabFileError::TooLarge { .. })));
        // Endless input stops at the cap.
        assert!(matches!(
            load(Path::new("/dev/zero")),
            Err(LabFileError::TooLarge { .. })
        ));
        let e = load(&dir.path().join("missing.yaml")).unwrap_err();
        assert!(matches!(e, LabFileError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.yaml: cannot read"), "{e}");
        assert!(matches!(load(dir.path()), Err(LabFileError::Read { .. })));
    }

    type Change = Box<dyn Fn(&mut LabFile)>;

    #[test]
    fn check_names_what_is_wrong() {
        let mac = || Some("02:00:00:00:00:01".parse().unwrap());
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|l| l.name = Some("My Lab".into())),
                "invalid lab name",
            ),
            (Box::new(|l| l.lans.push("Bad".into())), "lan \"Bad\""),
            (
                Box::new(|l| l.lans.push(String::new())),
                "lan \"\": name is empty",
            ),
            (
                Box::new(|l| l.lans.push("left".into())),
                "lan \"left\" is listed twice",
            ),
            (
                Box::new(|l| l.nodes[1].memory_mb = 1),
                "node \"h1\": memory_mb",
            ),
            (
                Box::new(|l| l.nodes[0].nics[1].transport = Some(Transport::Bess)),
                "node \"r1\": nic 1: transport bess",
            ),
            (
                Box::new(|l| l.nodes[1].name = "r1".into()),
                "two nodes are named \"r1\"",
            ),
            (
                Box::new(|l| l.nodes[1].nics[0].lan = Some("middle".into())),
                "node \"h1\", nic 0: lan \"middle\" is not listed in `lans`",
            ),
            (Box::new(|l| l.ports[0].name = "Ext".into()), "port \"Ext\""),
            (
                Box::new(|l| {
                    let p = l.ports[0].clone();
                    l.ports.push(p)
                }),
                "two ports are named \"ext0\"",
            ),
            (
                Box::new(|l| l.ports[0].name = "r1.eth1".into()),
                "port \"r1.eth1\": that is the name of node \"r1\"'s nic 1",
            ),
            (
                Box::new(|l| l.ports[0].lan = Some("up".into())),
                "port \"ext0\": lan \"up\" is not listed",
            ),
            (
                Box::new(move |l| {
                    l.nodes[0].nics[1].mac = mac();
                    l.nodes[1].nics[0].mac = mac();
                }),
                "node \"h1\" nic 0 and node \"r1\" nic 1 have the same MAC 02:00:00:00:00:01",
            ),
        ];
        for (change, want) in cases {
            let mut lab = router();
            change(&mut lab);
            let e = check_error(&lab);
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        // Unplugged NICs and ports need no lan; a port name like a NIC
        // port of a NIC that does not exist is fine.
        let mut lab = router();
        lab.nodes[1].nics[0].lan = None;
        lab.ports[0].lan = None;
        lab.ports[0].name = "h1.eth1".into();
        lab.check().unwrap();
    }

    // ---- saving ----

    /// A small deterministic generator for varied labs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Lan names that YAML would read as something else unless quoted.
    const LANS: [&str; 6] = ["a", "null", "0", "true", "1e3", "yes"];
    const NODES: [&str; 5] = ["n1", "n2", "on", "0x1f", "n5"];
    const PORTS: [&str; 4] = ["p1", "~p", "n1.eth1", "off"];

    fn random_link(rng: &mut Rng) -> LinkState {
        if rng.below(4) == 0 {
            LinkState::Down
        } else {
            LinkState::Up
        }
    }

    fn random_impairments(rng: &mut Rng) -> ImpairSpec {
        use crate::switch::impair::DirectionSpec;
        match rng.below(6) {
            0 => ImpairSpec {
                egress: Some(DirectionSpec {
                    delay_ms: Some(20.0),
                    jitter_ms: Some(2.5),
                    ..Default::default()
                }),
                ingress: None,
            },
            1 => ImpairSpec {
                egress: Some(DirectionSpec {
                    rate_kbps: Some(1000),
                    ..Default::default()
                }),
                ingress: Some(DirectionSpec {
                    loss_pct: Some(1.5),
                    ..Default::default()
                }),
            },
            _ => ImpairSpec::default(),
        }
    }

    fn random_lab(rng: &mut Rng) -> LabFile {
        let lans: Vec<String> = LANS
            .iter()
            .filter(|_| rng.below(3) > 0)
            .map(|s| s.to_string())
            .collect();
        let lan = |rng: &mut Rng| {
            if lans.is_empty() || rng.below(5) == 0 {
                None
            } else {
                Some(rng.pick(&lans).clone())
            }
        };
        let mut nodes = Vec::new();
        for name in NODES {
            if rng.below(3) == 0 {
                continue;
            }
            let mut n = NodeSpec::new(name, &[]);
            for i in 0..rng.below(4) {
                let ip = if rng.below(2) == 0 {
                    vec![]
                } else {
                    vec![format!("10.{i}.0.{}/24", rng.below(250) + 1)
                        .parse()
                        .unwrap()]
                };
                n.nics.push(NicSpec {
                    ip,
                    link: random_link(rng),
                    impairments: random_impairments(rng),
                    ..NicSpec::on(lan(rng).as_deref())
                });
            }
            n.memory_mb = *rng.pick(&[DEFAULT_MEMORY_MB, 160, 512]);
            n.forward = rng.below(4) == 0;
            if rng.below(4) == 0 {
                n.kind = NodeKind::Uml;
                n.image = Some("/var/lib/images/rootfs.img".into());
            }
            nodes.push(n);
        }
        let mut ports = Vec::new();
        for name in PORTS {
            if rng.below(2) == 0 {
                ports.push(PortSpec {
                    link: random_link(rng),
                    impairments: random_impairments(rng),
                    ..PortSpec::new(
                        &name.replace('~', "x"),
                        *rng.pick(&PortKind::ALL),
                        lan(rng).as_deref(),
                    )
                });
            }
        }
        LabFile {
            name: if rng.below(2) == 0 {
                None
            } else {
                Some("lab".into())
            },
            lans,
            nodes,
            ports,
        }
    }

    fn random_labs() -> Vec<LabFile> {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut labs = vec![LabFile::default(), router()];
        while labs.len() < 40 {
            let lab = random_lab(&mut rng);
            // n1.eth1 as a port and as a NIC: not a valid file.
            if lab.check().is_ok() {
                labs.push(lab);
            }
        }
        labs
    }

    fn odd_node() -> NodeSpec {
        let mut n = NodeSpec::new("odd", &["null", "0"]);
        n.kind = NodeKind::Uml;
        n.cpus = 4;
        n.memory_mb = 1024;
        n.image = Some("/images/a b: c #d.qcow2".into());
        n.kernel = Some("/boot/vmlinuz".into());
        n.append = Some("console=ttyS0 quiet 'x' \"y\" # not a comment".into());
        n.persistent = true;
        n.accel = crate::vmlaunch::spec::Accel::Tcg;
        n.nics[0].mac = Some("02:aa:bb:cc:dd:ee".parse().unwrap());
        n.nics[0].transport = Some(Transport::Bess);
        n.nics[1].ip = vec![
            "192.168.0.1/24".parse().unwrap(),
            "10.0.0.1/8".parse().unwrap(),
        ];
        n.routes = vec![
            RouteSpec {
                to: "default".into(),
                via: "192.168.0.254".parse().unwrap(),
            },
            RouteSpec {
                to: "172.16.0.0/12".into(),
                via: "10.0.0.2".parse().unwrap(),
            },
        ];
        n.forward = true;
        n.binary = Some("/opt/uml/linux".into());
        n.extra_args = vec![
            "-x".into(),
            "".into(),
            "  leading: spaces".into(),
            "tab\there".into(),
            "ümlaut ☃".into(),
            "- dash".into(),
            "*star".into(),
            "&amp".into(),
            "!bang".into(),
            "@at".into(),
            "%pct".into(),
            "{brace}".into(),
            "line\rbreak".into(),
            "~".into(),
        ];
        n
    }

    #[test]
    fn to_yaml_round_trips() {
        let mut labs = random_labs();
        let mut odd = LabFile {
            name: Some("odd".into()),
            lans: vec!["null".into(), "0".into()],
            nodes: vec![odd_node()],
            ports: vec![],
        };
        odd.check().unwrap();
        labs.push(odd.clone());
        odd.nodes[0].nics[1].lan = None;
        labs.push(odd);
        for lab in labs {
            let text = lab.to_yaml();
            let back = parse(&text, "saved.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(back, lab, "{text}");
            // Stable: the same lab always prints the same text.
            assert_eq!(back.to_yaml(), text);
        }
    }

    #[test]
    fn to_yaml_leaves_defaults_out() {
        let text = router().to_yaml();
        for absent in [
            "memory_mb",
            "cpus",
            "kind: qemu",
            "accel",
            "persistent",
            "mac",
            "transport",
            "image",
            "null",
            "binary",
            "extra_args",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        // Fields come in a fixed order: name, lans, nodes, ports.
        let at = |s: &str| text.find(s).unwrap();
        assert!(at("name: router") < at("lans:"));
        assert!(at("lans:") < at("nodes:"));
        assert!(at("nodes:") < at("ports:"));
        assert!(at("name: r1") < at("name: h1"));

        let mut lab = router();
        lab.nodes[0].memory_mb = 512;
        lab.nodes[0].cpus = 2;
        lab.nodes[1].nics[0].lan = None;
        let text = lab.to_yaml();
        assert!(text.contains("memory_mb: 512"), "{text}");
        assert!(text.contains("cpus: 2"), "{text}");
        assert!(!text.contains("null"), "{text}");
        assert_eq!(parse(&text, "f").unwrap(), lab);
        assert_eq!(LabFile::default().to_yaml().trim(), "{}");
    }

    // ---- planning ----

    /// A lab as the daemon holds it, refusing what the daemon would refuse.
    #[derive(Debug, Default, PartialEq)]
    struct Sim {
        lans: BTreeSet<String>,
        ports: BTreeMap<String, PortSpec>,
        nodes: BTreeMap<String, NodeSpec>,
    }

    /// What acts on a port: an empty direction is none, as the daemon
    /// keeps it.
    fn acting(i: &ImpairSpec) -> ImpairSpec {
        ImpairSpec {
            egress: i.egress.clone().filter(|d| !d.is_empty()),
            ingress: i.ingress.clone().filter(|d| !d.is_empty()),
        }
    }

    impl Sim {
        fn of(lab: &LabFile) -> Sim {
            let mut sim = Sim::default();
            for step in plan(&LabFile::default(), lab).steps {
                sim.apply(&step).unwrap();
            }
            sim
        }

        fn port_taken(&self, name: &str) -> bool {
            self.ports.contains_key(name)
                || self
                    .nodes
                    .values()
                    .any(|n| (0..n.nics.len()).any(|i| n.port_name(i) == name))
        }

        fn lan_ok(&self, lan: &Option<String>) -> Result<(), String> {
            match lan {
                Some(l) if !self.lans.contains(l) => Err(format!("no lan {l}")),
                _ => Ok(()),
            }
        }

        fn add_node(&mut self, n: &NodeSpec) -> Result<(), String> {
            if self.nodes.contains_key(&n.name) {
                return Err(format!("node {} exists", n.name));
            }
            for (i, nic) in n.nics.iter().enumerate() {
                if self.port_taken(&n.port_name(i)) {
                    return Err(format!("port {} exists", n.port_name(i)));
                }
                self.lan_ok(&nic.lan)?;
            }
            let mut n = n.clone();
            for nic in &mut n.nics {
                nic.impairments = acting(&nic.impairments);
            }
            self.nodes.insert(n.name.clone(), n);
            Ok(())
        }

        /// A port's or NIC's (link, impairments).
        fn port_state(&mut self, port: &str) -> Result<(&mut LinkState, &mut ImpairSpec), String> {
            if let Some(p) = self.ports.get_mut(port) {
                return Ok((&mut p.link, &mut p.impairments));
            }
            for n in self.nodes.values_mut() {
                if let Some(i) = (0..n.nics.len()).find(|&i| n.port_name(i) == port) {
                    let nic = &mut n.nics[i];
                    return Ok((&mut nic.link, &mut nic.impairments));
                }
            }
            Err(format!("no port {port}"))
        }

        fn apply(&mut self, step: &Step) -> Result<(), String> {
            match step {
                Step::AddLan(l) => {
                    if !self.lans.insert(l.clone()) {
                        return Err(format!("lan {l} exists"));
                    }
                }
                Step::RemoveLan(l) => {
                    let used = self.ports.values().any(|p| p.lan.as_ref() == Some(l))
                        || self
                            .nodes
                            .values()
                            .any(|n| n.nics.iter().any(|nic| nic.lan.as_ref() == Some(l)));
                    if used {
                        return Err(format!("lan {l} is not empty"));
                    }
                    if !self.lans.remove(l) {
                        return Err(format!("no lan {l}"));
                    }
                }
                Step::AddPort(p) => {
                    if self.port_taken(&p.name) {
                        return Err(format!("port {} exists", p.name));
                    }
                    self.lan_ok(&p.lan)?;
                    let mut p = p.clone();
                    p.impairments = acting(&p.impairments);
                    self.ports.insert(p.name.clone(), p);
                }
                Step::RemovePort(p) => {
                    self.ports.remove(p).ok_or(format!("no port {p}"))?;
                }
                Step::MovePort { port, lan } => {
                    self.lan_ok(lan)?;
                    let p = self.ports.get_mut(port).ok_or(format!("no port {port}"))?;
                    p.lan.clone_from(lan);
                }
                Step::AddNode(n) => self.add_node(n)?,
                Step::RemoveNode(n) => {
                    self.nodes.remove(n).ok_or(format!("no node {n}"))?;
                }
                Step::ReplaceNode(n) => {
                    self.nodes
                        .remove(&n.name)
                        .ok_or(format!("no node {}", n.name))?;
                    self.add_node(n)?;
                }
                Step::MoveNic { node, port, lan } => {
                    self.lan_ok(lan)?;
                    let n = self.nodes.get_mut(node).ok_or(format!("no node {node}"))?;
                    let i = (0..n.nics.len())
                        .find(|&i| n.port_name(i) == *port)
                        .ok_or(format!("no nic {port}"))?;
                    n.nics[i].lan.clone_from(lan);
                }
                Step::SetLink { port, link } => *self.port_state(port)?.0 = *link,
                Step::SetImpairments { port, impairments } => {
                    impairments.validate().map_err(|e| e.to_string())?;
                    *self.port_state(port)?.1 = acting(impairments);
                }
            }
            Ok(())
        }
    }

    /// Runs the plan from `current` to `wanted`, every step checked, and
    /// returns it.
    fn run(current: &LabFile, wanted: &LabFile) -> Plan {
        let p = plan(current, wanted);
        let mut sim = Sim::of(current);
        for (i, step) in p.steps.iter().enumerate() {
            sim.apply(step)
                .unwrap_or_else(|e| panic!("step {i} ({step}) is invalid: {e}\nplan: {p:#?}"));
        }
        assert_eq!(sim, Sim::of(wanted), "plan: {p:#?}");
        p
    }

    fn kinds(p: &Plan) -> Vec<String> {
        p.steps.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plan_from_empty_and_to_empty() {
        let full = router();
        let up = run(&LabFile::default(), &full);
        assert_eq!(
            kinds(&up),
            [
                "+ lan left",
                "+ lan right",
                "+ port ext0 (vde) on left",
                "+ node r1 on left, right",
                "+ node h1 on left",
            ]
        );
        let down = run(&full, &LabFile::default());
        assert_eq!(
            kinds(&down),
            [
                "- port ext0",
                "- node r1",
                "- node h1",
                "- lan left",
                "- lan right",
            ]
        );
    }

    #[test]
    fn plan_for_an_unchanged_lab_is_empty() {
        assert!(run(&router(), &router()).is_empty());
        assert!(plan(&LabFile::default(), &LabFile::default()).is_empty());
        // The lab name is not part of what apply changes.
        let mut renamed = router();
        renamed.name = None;
        assert!(plan(&router(), &renamed).is_empty());
    }

    #[test]
    fn plan_moves_nics_when_only_lans_differ() {
        let mut wanted = router();
        wanted.nodes[1].nics[0].lan = Some("right".into());
        let p = run(&router(), &wanted);
        assert_eq!(
            p.steps,
            [Step::MoveNic {
                node: "h1".into(),
                port: "h1.eth0".into(),
                lan: Some("right".into()),
            }]
        );
        assert_eq!(kinds(&p), ["~ node h1: eth0 -> right"]);

        // Both of r1's NICs swap lans; one unplugs.
        let mut wanted = router();
        wanted.nodes[0].nics[0].lan = Some("right".into());
        wanted.nodes[0].nics[1].lan = None;
        let p = run(&router(), &wanted);
        assert_eq!(
            kinds(&p),
            ["~ node r1: eth0 -> right", "~ node r1: eth1 -> (no lan)"]
        );
    }

    #[test]
    fn plan_sets_link_and_impairments_without_replacing() {
        use crate::switch::impair::DirectionSpec;
        let delay = ImpairSpec {
            egress: Some(DirectionSpec {
                delay_ms: Some(20.0),
                ..Default::default()
            }),
            ingress: None,
        };
        let mut wanted = router();
        wanted.nodes[1].nics[0].link = LinkState::Down;
        wanted.nodes[1].nics[0].impairments = delay.clone();
        wanted.ports[0].link = LinkState::Down;
        let p = run(&router(), &wanted);
        assert_eq!(
            p.steps,
            [
                Step::SetLink {
                    port: "ext0".into(),
                    link: LinkState::Down
                },
                Step::SetImpairments {
                    port: "h1.eth0".into(),
                    impairments: delay.clone()
                },
                Step::SetLink {
                    port: "h1.eth0".into(),
                    link: LinkState::Down
                },
            ]
        );
        assert_eq!(
            kinds(&p),
            [
                "~ port ext0: link down",
                "~ port h1.eth0: impairments {\"egress\":{\"delay_ms\":20.0}}",
                "~ port h1.eth0: link down",
            ]
        );
        // And back: the link up, the impairments cleared.
        let back = run(&wanted, &router());
        assert_eq!(
            kinds(&back),
            [
                "~ port ext0: link up",
                "~ port h1.eth0: no impairments",
                "~ port h1.eth0: link up",
            ]
        );
        // With a lan move too: still no replacement.
        wanted.nodes[1].nics[0].lan = Some("right".into());
        let p = run(&router(), &wanted);
        assert!(
            p.steps.iter().all(|s| !matches!(s, Step::ReplaceNode(_))),
            "{p:#?}"
        );
        assert_eq!(p.steps.len(), 4, "{p:#?}");
        // An empty direction is no impairment: nothing to do.
        let mut empty = router();
        empty.ports[0].impairments.ingress = Some(DirectionSpec::default());
        assert!(run(&router(), &empty).is_empty());
        // A new port gets its settings with it.
        let mut wanted = router();
        wanted.ports.push(PortSpec {
            link: LinkState::Down,
            impairments: delay,
            ..PortSpec::new("tap", PortKind::Dgram, Some("right"))
        });
        let p = run(&router(), &wanted);
        assert_eq!(p.steps, [Step::AddPort(wanted.ports[1].clone())]);
        // Anything else about the node still replaces it.
        let mut changed = wanted.clone();
        changed.nodes[1].nics[0].link = LinkState::Down;
        changed.nodes[1].cpus = 2;
        assert_eq!(
            run(&wanted, &changed).steps,
            [Step::ReplaceNode(changed.nodes[1].clone())]
        );
    }

    #[test]
    fn plan_replaces_nodes_whose_spec_changed() {
        let mut wanted = router();
        wanted.nodes[1].memory_mb = 512;
        let p = run(&router(), &wanted);
        assert_eq!(p.steps, [Step::ReplaceNode(wanted.nodes[1].clone())]);
        assert_eq!(kinds(&p), ["-+ node h1 (changed: the guest restarts)"]);

        // A lan change together with anything else is a replacement too.
        let mut wanted = router();
        wanted.nodes[1].nics[0].lan = Some("right".into());
        wanted.nodes[1].nics[0].ip = vec!["10.0.2.10/24".parse().unwrap()];
        assert_eq!(
            run(&router(), &wanted).steps,
            [Step::ReplaceNode(wanted.nodes[1].clone())]
        );
        // As is a different number of NICs.
        let mut wanted = router();
        wanted.nodes[1].nics.push(NicSpec::on(Some("right")));
        assert_eq!(
            run(&router(), &wanted).steps,
            [Step::ReplaceNode(wanted.nodes[1].clone())]
        );
    }

    #[test]
    fn plan_treats_a_renamed_node_as_remove_and_add() {
        let mut wanted = router();
        wanted.nodes[1].name = "h9".into();
        let p = run(&router(), &wanted);
        assert_eq!(
            p.steps,
            [
                Step::RemoveNode("h1".into()),
                Step::AddNode(wanted.nodes[1].clone())
            ]
        );
    }

    #[test]
    fn plan_removes_a_lan_after_moving_everything_off_it() {
        let mut current = router();
        current.lans.push("old".into());
        current.nodes[1].nics[0].lan = Some("old".into());
        current.ports[0].lan = Some("old".into());
        current
            .ports
            .push(PortSpec::new("gone", PortKind::Stream, Some("old")));
        current.nodes.push(NodeSpec::new("h2", &["old"]));
        let mut wanted = router();
        wanted.lans.push("new".into());
        wanted.nodes[0].nics[1].lan = Some("new".into());
        let p = run(&current, &wanted);
        assert_eq!(
            kinds(&p),
            [
                "+ lan new",
                "- port gone",
                "- node h2",
                "~ port ext0 -> left",
                "~ node r1: eth1 -> new",
                "~ node h1: eth0 -> left",
                "- lan old",
            ]
        );
    }

    #[test]
    fn plan_adds_removes_and_moves_ports() {
        let mut wanted = router();
        wanted.ports[0].lan = Some("right".into());
        wanted
            .ports
            .push(PortSpec::new("tap", PortKind::Dgram, None));
        let p = run(&router(), &wanted);
        assert_eq!(
            kinds(&p),
            ["+ port tap (dgram) on (no lan)", "~ port ext0 -> right"]
        );
        let p = run(&wanted, &router());
        assert_eq!(kinds(&p), ["- port tap", "~ port ext0 -> left"]);

        // A new kind is a new socket.
        let mut wanted = router();
        wanted.ports[0].kind = PortKind::Bess;
        wanted.ports[0].lan = Some("right".into());
        let p = run(&router(), &wanted);
        assert_eq!(
            p.steps,
            [
                Step::RemovePort("ext0".into()),
                Step::AddPort(wanted.ports[0].clone())
            ]
        );
    }

    #[test]
    fn plan_frees_a_port_name_before_reusing_it() {
        // A plain port gives its name to a node's new NIC...
        let mut current = router();
        current.ports[0].name = "h1.eth1".into();
        let mut wanted = router();
        wanted.ports.clear();
        wanted.nodes[1].nics.push(NicSpec::on(Some("right")));
        run(&current, &wanted);
        // ...and takes it back.
        run(&wanted, &current);
        // A removed node's NIC name becomes a plain port.
        let mut wanted = router();
        wanted.nodes.pop();
        wanted.ports[0].name = "h1.eth0".into();
        run(&router(), &wanted);
    }

    #[test]
    fn plan_between_many_labs_is_valid() {
        let labs = random_labs();
        let mut steps = 0;
        for a in &labs {
            for b in &labs {
                let p = run(a, b);
                assert_eq!(
                    p.is_empty(),
                    a.lans.iter().collect::<BTreeSet<_>>()
                        == b.lans.iter().collect::<BTreeSet<_>>()
                        && Sim::of(a) == Sim::of(b)
                );
                steps += p.steps.len();
            }
        }
        assert!(steps > 1000, "only {steps} steps: the labs are too alike");
    }

    #[test]
    fn step_display() {
        let node = NodeSpec::new("h3", &[]);
        let cases = [
            (Step::AddLan("a".into()), "+ lan a"),
            (Step::RemoveLan("a".into()), "- lan a"),
            (Step::RemovePort("p".into()), "- port p"),
            (
                Step::MovePort {
                    port: "p".into(),
                    lan: None,
                },
                "~ port p -> (no lan)",
            ),
            (Step::AddNode(node.clone()), "+ node h3"),
            (Step::RemoveNode("h3".into()), "- node h3"),
            (
                Step::ReplaceNode(node),
                "-+ node h3 (changed: the guest restarts)",
            ),
        ];
        for (step, want) in cases {
            assert_eq!(step.to_string(), want);
        }
    }

    #[test]
    fn relative_file_paths_are_relative_to_the_lab_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.yaml");
        std::fs::write(
            &path,
            "lans: [l]\nnodes:\n  - name: h1\n    kernel: k/vmlinuz\n    initrd: /abs/initrd\n    nics: [{lan: l}]\n",
        )
        .unwrap();
        let lab = load(&path).unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            lab.nodes[0].kernel.as_deref(),
            Some(base.join("k/vmlinuz").to_str().unwrap())
        );
        assert_eq!(lab.nodes[0].initrd.as_deref(), Some("/abs/initrd"));
        // Parsed text with no file behind it keeps the rule: absolute only.
        let text = std::fs::read_to_string(&path).unwrap();
        let e = parse(&text, "x.yaml")
            .unwrap()
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
    }
}
