//! What a node is asked to be: the body of `POST /v1/nodes` and one entry of
//! a lab file's `nodes:`. Checked once here, so the launchers only ever see
//! a spec that makes sense.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::lab::LinkState;
use crate::names::{check_name, NameError};
use crate::ports::PortKind;
use crate::switch::impair::{ImpairError, ImpairSpec};
use crate::wire::MacAddr;

/// Port names are `NODE.ethN`, and a port name is at most 32 characters.
pub const MAX_NODE_NAME_LEN: usize = 26;
pub const MAX_NICS: usize = 16;
pub const MIN_MEMORY_MB: u32 = 32;
pub const MAX_MEMORY_MB: u32 = 1 << 20;
pub const MAX_CPUS: u32 = 64;
pub const DEFAULT_MEMORY_MB: u32 = 256;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid node name: {0}")]
    Name(#[from] NameError),
    #[error("node name {0:?} is longer than {MAX_NODE_NAME_LEN} characters (its NICs are named NODE.ethN)")]
    NameTooLong(String),
    #[error("memory_mb must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB}, not {0}")]
    Memory(u32),
    #[error("cpus must be between 1 and {MAX_CPUS}, not {0}")]
    Cpus(u32),
    #[error("at most {MAX_NICS} nics per node, not {0}")]
    TooManyNics(usize),
    #[error("nic {nic}: invalid lan name: {source}")]
    NicLan { nic: usize, source: NameError },
    #[error("nic {nic}: transport {transport} is not available for {kind} nodes (use {})", kind.transports().iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "))]
    Transport {
        nic: usize,
        transport: Transport,
        kind: NodeKind,
    },
    #[error("nic {nic}: {mac} is a multicast address; a NIC needs a unicast MAC")]
    MulticastMac { nic: usize, mac: MacAddr },
    #[error("nic {nic} and nic {other} have the same MAC {mac}")]
    DuplicateMac {
        nic: usize,
        other: usize,
        mac: MacAddr,
    },
    #[error("nic {nic}: {source}")]
    Address { nic: usize, source: CidrError },
    #[error("nic {nic}: impairments: {source}")]
    Impairments { nic: usize, source: ImpairError },
    #[error("route {index}: {message}")]
    Route { index: usize, message: String },
    #[error("{field} must not be empty or contain NUL or newline characters")]
    BadText { field: &'static str },
    #[error("image {0:?}: an image is a name from the image store or an absolute path")]
    ImageName(String),
    #[error("{field} {path:?} must be an absolute path (the daemon does not share your working directory)")]
    RelativePath { field: &'static str, path: String },
    #[error("{0}")]
    Container(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    #[default]
    Qemu,
    Uml,
    /// An OCI container run by crun, rootless (src/vmlaunch/container).
    Container,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Qemu => "qemu",
            NodeKind::Uml => "uml",
            NodeKind::Container => "container",
        }
    }

    /// The NIC transports this kind of guest can use, default first.
    pub fn transports(self) -> &'static [Transport] {
        match self {
            // vhost-user first: shared-memory rings, the fastest path.
            NodeKind::Qemu => &[
                Transport::VhostUser,
                Transport::Stream,
                Transport::Dgram,
                Transport::Vde,
            ],
            NodeKind::Uml => &[Transport::Daemon, Transport::Vde, Transport::Bess],
            // A tap device in the container's net namespace, its fd handed
            // to the daemon.
            NodeKind::Container => &[Transport::Tap],
        }
    }

    pub fn default_transport(self) -> Transport {
        // Every kind has one; the fallback is never used.
        self.transports()
            .first()
            .copied()
            .unwrap_or(Transport::Stream)
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a guest NIC reaches its switch port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QEMU `-netdev stream` (QEMU 7.2+): length-prefixed frames on a stream socket.
    Stream,
    /// QEMU `-netdev dgram` (QEMU 7.2+): one frame per datagram.
    Dgram,
    /// The vde_switch protocol: QEMU `-netdev vde` (built with libvdeplug), UML `vde`.
    Vde,
    /// UML `daemon` transport: the uml_switch protocol, which a `vde` port speaks.
    Daemon,
    /// UML vector `bess` transport: SOCK_SEQPACKET.
    Bess,
    /// QEMU `-netdev vhost-user`: ulan serves the guest's virtqueues in
    /// shared memory (no system call per frame).
    #[serde(rename = "vhost-user")]
    VhostUser,
    /// A container's tap device, opened in its network namespace and
    /// handed to the daemon's tap port as a file descriptor.
    Tap,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Stream => "stream",
            Transport::Dgram => "dgram",
            Transport::Vde => "vde",
            Transport::Daemon => "daemon",
            Transport::Bess => "bess",
            Transport::VhostUser => "vhost-user",
            Transport::Tap => "tap",
        }
    }

    /// The switch port kind the NIC plugs into.
    pub fn port_kind(self) -> PortKind {
        match self {
            Transport::Stream => PortKind::Stream,
            Transport::Dgram => PortKind::Dgram,
            Transport::Vde | Transport::Daemon => PortKind::Vde,
            Transport::Bess => PortKind::Bess,
            Transport::VhostUser => PortKind::VhostUser,
            Transport::Tap => PortKind::Tap,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `auto` uses KVM where a real probe says it works, else TCG with a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// An IPv4 address with prefix length, `10.0.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not ADDRESS/PREFIX (e.g. 10.0.0.1/24)")]
    Syntax(String),
    #[error("{0:?}: prefix length must be 0..=32")]
    Prefix(String),
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let short = || s.chars().take(40).collect::<String>();
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(short()))?;
        let addr = a.parse().map_err(|_| CidrError::Syntax(short()))?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::Prefix(short()));
        }
        let prefix: u8 = p.parse().map_err(|_| CidrError::Prefix(short()))?;
        if prefix > 32 {
            return Err(CidrError::Prefix(short()));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One guest NIC. It becomes the switch port `NODE.ethN`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The lan the NIC is plugged into; none leaves the cable out.
    #[serde(default)]
    pub lan: Option<String>,
    /// Default: stable, derived from lab, node and NIC index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Default: the node kind's first transport (QEMU `stream`, UML `daemon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// Addresses the built-in image's init gives this NIC. A file may give
    /// one address as a plain string; it is written back as a list.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "one_or_many_cidrs"
    )]
    pub ip: Vec<Cidr>,
    /// The port's link as the node starts (a down port forwards nothing
    /// and the guest sees no carrier).
    #[serde(default, skip_serializing_if = "is_default")]
    pub link: LinkState,
    /// The port's impairments, as `PUT /v1/ports/{port}/impairments` takes.
    #[serde(default, skip_serializing_if = "ImpairSpec::is_empty")]
    pub impairments: ImpairSpec,
}

impl NicSpec {
    /// A NIC on `lan` with everything else default.
    pub fn on(lan: Option<&str>) -> NicSpec {
        NicSpec {
            lan: lan.map(str::to_string),
            mac: None,
            transport: None,
            ip: Vec::new(),
            link: LinkState::Up,
            impairments: ImpairSpec::default(),
        }
    }
}

/// `ip: 10.0.0.1/24` or `ip: [10.0.0.1/24, 10.0.0.2/24]`.
fn one_or_many_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
    struct OneOrMany;
    impl<'de> serde::de::Visitor<'de> for OneOrMany {
        type Value = Vec<Cidr>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an address like 10.0.0.1/24 or a list of them")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<Cidr>, E> {
            v.parse().map(|c| vec![c]).map_err(E::custom)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<Cidr>, A::Error> {
            // No size_hint preallocation: the hint comes from the input.
            let mut out = Vec::new();
            while let Some(c) = seq.next_element()? {
                out.push(c);
            }
            Ok(out)
        }
    }
    d.deserialize_any(OneOrMany)
}

/// A static route the built-in image's init adds: `to` is `default` or a
/// CIDR, `via` a gateway address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub to: String,
    pub via: Ipv4Addr,
}

impl RouteSpec {
    /// `None` for the default route.
    pub fn destination(&self) -> Result<Option<Cidr>, CidrError> {
        if self.to == "default" {
            Ok(None)
        } else {
            self.to.parse().map(Some)
        }
    }
}

fn default_memory() -> u32 {
    DEFAULT_MEMORY_MB
}
fn default_cpus() -> u32 {
    1
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub kind: NodeKind,
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// A disk base image: a name from the image store or an absolute path.
    /// The node runs on a qcow2 overlay; the base is never written. With no
    /// image, kernel or initrd the node boots the built-in image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Direct kernel boot (QEMU `-kernel`); for UML, the UML binary's
    /// root filesystem comes from `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Extra kernel command line, after what ulan puts there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// Keep the disk overlay across stop/start (default: fresh at each start).
    #[serde(default, skip_serializing_if = "is_false")]
    pub persistent: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub accel: Accel,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Static routes (built-in image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// IPv4 forwarding on (built-in image): the node routes between its NICs.
    #[serde(default, skip_serializing_if = "is_false")]
    pub forward: bool,
    /// The emulator binary; default `qemu-system-x86_64` or `linux.uml` from PATH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// The user's own arguments, appended last to the emulator's argv
    /// unchanged (no shell). ulan does not check them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
    /// Container nodes: the argv of its first process (default: the
    /// image's entrypoint, or `/bin/sh` for a plain root filesystem).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// Container nodes: `KEY=VALUE` environment, after the image's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Container nodes: the first process's working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Container nodes: default the node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Container nodes: the cgroup's pids.max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u32>,
}

impl NodeSpec {
    /// A QEMU node with defaults and the given NICs' lans.
    pub fn new(name: &str, lans: &[&str]) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            kind: NodeKind::Qemu,
            memory_mb: DEFAULT_MEMORY_MB,
            cpus: 1,
            image: None,
            kernel: None,
            initrd: None,
            append: None,
            persistent: false,
            accel: Accel::Auto,
            nics: lans.iter().map(|l| NicSpec::on(Some(l))).collect(),
            routes: Vec::new(),
            forward: false,
            binary: None,
            extra_args: Vec::new(),
            cmd: Vec::new(),
            env: Vec::new(),
            workdir: None,
            hostname: None,
            pids_max: None,
        }
    }

    /// Checks everything that can be checked without the file system or the
    /// lab's state (lans existing, images present: see the node manager).
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name(&self.name)?;
        if self.name.len() > MAX_NODE_NAME_LEN {
            return Err(SpecError::NameTooLong(self.name.clone()));
        }
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&self.memory_mb) {
            return Err(SpecError::Memory(self.memory_mb));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(SpecError::Cpus(self.cpus));
        }
        if self.nics.len() > MAX_NICS {
            return Err(SpecError::TooManyNics(self.nics.len()));
        }
        // Container fields before the NICs: a container's NICs have their
        // own rules.
        crate::vmlaunch::container::spec::validate(self)
            .map_err(|e| SpecError::Container(e.to_string()))?;
        for (i, nic) in self.nics.iter().enumerate() {
            if let Some(lan) = &nic.lan {
                check_name(lan).map_err(|source| SpecError::NicLan { nic: i, source })?;
            }
            let transport = self.transport(i);
            if !self.kind.transports().contains(&transport) {
                return Err(SpecError::Transport {
                    nic: i,
                    transport,
                    kind: self.kind,
                });
            }
            if let Some(mac) = nic.mac {
                if mac.is_multicast() {
                    return Err(SpecError::MulticastMac { nic: i, mac });
                }
            }
            nic.impairments
                .validate()
                .map_err(|source| SpecError::Impairments { nic: i, source })?;
        }
        for i in 0..self.nics.len() {
            for j in 0..i {
                if self.nics[i].mac.is_some() && self.nics[i].mac == self.nics[j].mac {
                    return Err(SpecError::DuplicateMac {
                        nic: i,
                        other: j,
                        mac: self.nics[i].mac.unwrap_or_default(),
                    });
                }
            }
        }
        for (index, r) in self.routes.iter().enumerate() {
            r.destination().map_err(|e| SpecError::Route {
                index,
                message: e.to_string(),
            })?;
        }
        for (field, value) in [
            ("image", &self.image),
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("binary", &self.binary),
        ] {
            if let Some(v) = value {
                if !plain_text(v) {
                    return Err(SpecError::BadText { field });
                }
            }
        }
        for (field, value) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(v) = value {
                if !v.starts_with('/') {
                    return Err(SpecError::RelativePath {
                        field,
                        path: v.chars().take(80).collect(),
                    });
                }
            }
        }
        if let Some(image) = &self.image {
            if !image.starts_with('/') && check_name(image).is_err() {
                return Err(SpecError::ImageName(image.chars().take(60).collect()));
            }
        }
        if let Some(a) = &self.append {
            if a.contains(['\0', '\n']) {
                return Err(SpecError::BadText { field: "append" });
            }
        }
        if self.extra_args.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::BadText {
                field: "extra_args",
            });
        }
        Ok(())
    }

    /// Makes the file paths absolute against `base` (a lab file's
    /// directory, the CLI's working directory): kernel, initrd, and an
    /// image given as a path rather than a store name.
    pub fn absolutize(&mut self, base: &std::path::Path) {
        let abs = |p: &str| {
            if p.starts_with('/') {
                p.to_string()
            } else {
                base.join(p).display().to_string()
            }
        };
        for p in [&mut self.kernel, &mut self.initrd].into_iter().flatten() {
            *p = abs(p);
        }
        if let Some(image) = &mut self.image {
            if image.contains('/') {
                *image = abs(image);
            }
        }
    }

    /// NIC `index`'s transport, the kind's default when not given.
    pub fn transport(&self, index: usize) -> Transport {
        self.nics
            .get(index)
            .and_then(|n| n.transport)
            .unwrap_or_else(|| self.kind.default_transport())
    }

    /// The switch port of NIC `index`.
    pub fn port_name(&self, index: usize) -> String {
        nic_port_name(&self.name, index)
    }

    /// Whether the node boots the built-in image, whose init reads
    /// addresses from the kernel command line: QEMU nodes given no image,
    /// kernel or initrd (they get its kernel, initrd and exec agent), UML
    /// nodes given no image or initrd (they get its initrd as their root).
    pub fn uses_builtin_image(&self) -> bool {
        self.image.is_none()
            && self.initrd.is_none()
            && (self.kind == NodeKind::Uml || self.kernel.is_none())
    }
}

pub fn nic_port_name(node: &str, index: usize) -> String {
    format!("{node}.eth{index}")
}

fn plain_text(s: &str) -> bool {
    !s.is_empty() && !s.contains(['\0', '\n'])
}

/// The MAC a NIC gets when none is given: locally administered, unicast,
/// the same for the same lab, node and index on every run and machine
/// (FNV-1a, not std's hasher, whose output may change between releases).
pub fn stable_mac(lab: &str, node: &str, index: usize) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lab
        .bytes()
        .chain([0])
        .chain(node.bytes())
        .chain([0])
        .chain((index as u32).to_be_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    // 0x02: locally administered, unicast.
    MacAddr([0x02, b[0], b[1], b[2], b[3], b[4]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NodeSpec {
        NodeSpec::new("r1", &["a", "b"])
    }

    #[test]
    fn defaults_from_minimal_json() {
        let s: NodeSpec = serde_json::from_str(r#"{"name":"h1","nics":[{"lan":"a"}]}"#).unwrap();
        assert_eq!(s.kind, NodeKind::Qemu);
        assert_eq!(s.memory_mb, DEFAULT_MEMORY_MB);
        assert_eq!(s.cpus, 1);
        assert_eq!(s.transport(0), Transport::VhostUser);
        assert!(s.uses_builtin_image());
        s.validate().unwrap();
        assert_eq!(s.port_name(0), "h1.eth0");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<NodeSpec>(r#"{"name":"h1","memroy_mb":5}"#).is_err());
        assert!(
            serde_json::from_str::<NodeSpec>(r#"{"name":"h1","nics":[{"lan":"a","x":1}]}"#)
                .is_err()
        );
    }

    #[test]
    fn round_trips_through_json() {
        let mut s = spec();
        s.nics[0].ip = vec!["10.0.0.1/24".parse().unwrap()];
        s.nics[1].mac = Some("02:00:00:00:00:09".parse().unwrap());
        s.routes.push(RouteSpec {
            to: "default".into(),
            via: "10.0.0.254".parse().unwrap(),
        });
        s.forward = true;
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<NodeSpec>(&text).unwrap(), s);
    }

    type Change = Box<dyn Fn(&mut NodeSpec)>;

    #[test]
    fn bad_values_are_named() {
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.name = "../x".into()), "invalid node name"),
            (Box::new(|s| s.name = "a".repeat(27)), "longer than 26"),
            (Box::new(|s| s.memory_mb = 0), "memory_mb"),
            (Box::new(|s| s.memory_mb = u32::MAX), "memory_mb"),
            (Box::new(|s| s.cpus = 0), "cpus"),
            (Box::new(|s| s.nics[0].lan = Some("A B".into())), "nic 0"),
            (
                Box::new(|s| s.nics[1].transport = Some(Transport::Bess)),
                "not available for qemu",
            ),
            (
                Box::new(|s| s.nics[0].mac = Some("01:00:5e:00:00:01".parse().unwrap())),
                "multicast",
            ),
            (
                Box::new(|s| {
                    s.nics[0].mac = Some("02:00:00:00:00:01".parse().unwrap());
                    s.nics[1].mac = s.nics[0].mac;
                }),
                "same MAC",
            ),
            (
                Box::new(|s| {
                    s.routes.push(RouteSpec {
                        to: "10.0.0.0/99".into(),
                        via: "10.0.0.1".parse().unwrap(),
                    })
                }),
                "route 0",
            ),
            (Box::new(|s| s.image = Some("../etc".into())), "image"),
            (Box::new(|s| s.kernel = Some(String::new())), "kernel"),
            (
                Box::new(|s| s.kernel = Some("boot/vmlinuz".into())),
                "absolute path",
            ),
            (
                Box::new(|s| s.initrd = Some("./initrd".into())),
                "absolute path",
            ),
            (Box::new(|s| s.append = Some("a\nb".into())), "append"),
            (
                Box::new(|s| s.extra_args = vec!["a\0b".into()]),
                "extra_args",
            ),
            (
                Box::new(|s| s.nics = vec![s.nics[0].clone(); MAX_NICS + 1]),
                "at most",
            ),
        ];
        for (change, want) in cases {
            let mut s = spec();
            change(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn ip_is_one_string_or_a_list() {
        let one: NicSpec = serde_json::from_str(r#"{"lan":"a","ip":"10.0.0.1/24"}"#).unwrap();
        assert_eq!(one.ip, vec!["10.0.0.1/24".parse::<Cidr>().unwrap()]);
        let two: NicSpec =
            serde_json::from_str(r#"{"lan":"a","ip":["10.0.0.1/24","10.0.1.1/16"]}"#).unwrap();
        assert_eq!(two.ip.len(), 2);
        assert_eq!(two.ip[1].to_string(), "10.0.1.1/16");
        let none: NicSpec = serde_json::from_str(r#"{"lan":"a"}"#).unwrap();
        assert!(none.ip.is_empty());
        // Written back as a list.
        assert_eq!(
            serde_json::to_value(&one).unwrap()["ip"],
            serde_json::json!(["10.0.0.1/24"])
        );
        let yaml: NicSpec = serde_yaml_ng::from_str("lan: a\nip: 10.0.0.1/24\n").unwrap();
        assert_eq!(yaml, one);
        for bad in [r#""10.0.0.1""#, "5", r#"["10.0.0.1/24", 7]"#, "{}"] {
            let text = format!(r#"{{"lan":"a","ip":{bad}}}"#);
            assert!(serde_json::from_str::<NicSpec>(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_become_absolute() {
        let mut s = spec();
        s.kernel = Some("k/vmlinuz".into());
        s.initrd = Some("/abs/initrd".into());
        s.image = Some("disks/base.qcow2".into());
        s.absolutize(std::path::Path::new("/labs/x"));
        assert_eq!(s.kernel.as_deref(), Some("/labs/x/k/vmlinuz"));
        assert_eq!(s.initrd.as_deref(), Some("/abs/initrd"));
        assert_eq!(s.image.as_deref(), Some("/labs/x/disks/base.qcow2"));
        s.image = Some("builtin".into());
        s.absolutize(std::path::Path::new("/labs/x"));
        assert_eq!(s.image.as_deref(), Some("builtin"));
        s.validate().unwrap();
    }

    #[test]
    fn uml_transports() {
        let mut s = spec();
        s.kind = NodeKind::Uml;
        assert_eq!(s.transport(0), Transport::Daemon);
        s.nics[1].transport = Some(Transport::Bess);
        s.validate().unwrap();
        s.nics[1].transport = Some(Transport::Stream);
        assert!(s.validate().is_err());
        assert!(s.uses_builtin_image());
        s.initrd = Some("/my/initrd".into());
        assert!(!s.uses_builtin_image());
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/8"
        );
        for bad in [
            "10.0.0.1",
            "10.0.0.1/",
            "10.0.0.1/33",
            "x/24",
            "10.0.0.1/+1",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn stable_macs_are_stable_unicast_and_distinct() {
        let a = stable_mac("lab", "h1", 0);
        assert_eq!(a, stable_mac("lab", "h1", 0));
        assert!(!a.is_multicast());
        assert_eq!(a.0[0] & 0x02, 0x02);
        let mut seen = std::collections::HashSet::new();
        for lab in ["lab", "other"] {
            for node in ["h1", "h2", "h10"] {
                for i in 0..4 {
                    assert!(seen.insert(stable_mac(lab, node, i)));
                }
            }
        }
        // Pinned so a change to the derivation is a deliberate one.
        assert_eq!(
            stable_mac("default", "h1", 0).to_string(),
            "02:38:38:c5:21:f9"
        );
    }
}
