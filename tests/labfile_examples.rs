//! Every lab file in examples/ parses and checks, and has the shape its
//! comments promise. (Booting them is tested elsewhere.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ulan::labfile::{self, LabFile};
use ulan::vmlaunch::spec::NodeSpec;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn load(name: &str) -> LabFile {
    labfile::load(&examples_dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn node<'a>(lab: &'a LabFile, name: &str) -> &'a NodeSpec {
    lab.nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// Each NIC as (lan, addresses).
fn nics(n: &NodeSpec) -> Vec<(String, Vec<String>)> {
    n.nics
        .iter()
        .map(|nic| {
            (
                nic.lan.clone().unwrap_or_default(),
                nic.ip.iter().map(|c| c.to_string()).collect(),
            )
        })
        .collect()
}

fn nic(lan: &str, ip: &str) -> (String, Vec<String>) {
    (lan.to_string(), vec![ip.to_string()])
}

/// Default routes as gateway addresses.
fn gateways(n: &NodeSpec) -> Vec<String> {
    n.routes
        .iter()
        .filter(|r| r.to == "default")
        .map(|r| r.via.to_string())
        .collect()
}

#[test]
fn every_example_loads_checks_and_round_trips() {
    let mut seen = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let lab = labfile::load(&path).unwrap_or_else(|e| panic!("{e}"));
        lab.check().unwrap();
        assert!(!lab.nodes.is_empty(), "{}: no nodes", path.display());
        // The examples run in whatever lab `--lab` names.
        assert_eq!(lab.name, None, "{}", path.display());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with('#') && text.contains("ulan up examples/"),
            "{}: the comment at the top says how to run it",
            path.display()
        );
        for n in &lab.nodes {
            assert!(
                n.uses_builtin_image(),
                "{}: {} boots the built-in image",
                path.display(),
                n.name
            );
        }
        assert_eq!(labfile::parse(&lab.to_yaml(), "saved").unwrap(), lab);
        // Starting it on an empty lab is one step per lan and node.
        let plan = labfile::plan(&LabFile::default(), &lab);
        assert_eq!(plan.steps.len(), lab.lans.len() + lab.nodes.len());
        seen += 1;
    }
    assert!(seen >= 3, "only {seen} examples");
}

#[test]
fn two_node() {
    let lab = load("two-node.yaml");
    assert_eq!(lab.lans, ["lan0"]);
    assert_eq!(lab.nodes.len(), 2);
    assert_eq!(nics(node(&lab, "h1")), [nic("lan0", "10.0.0.1/24")]);
    assert_eq!(nics(node(&lab, "h2")), [nic("lan0", "10.0.0.2/24")]);
    assert!(lab.ports.is_empty());
}

#[test]
fn router() {
    let lab = load("router.yaml");
    assert_eq!(lab.lans, ["left", "right"]);
    assert_eq!(lab.nodes.len(), 3);
    let r1 = node(&lab, "r1");
    assert!(r1.forward);
    assert_eq!(
        nics(r1),
        [nic("left", "10.0.1.1/24"), nic("right", "10.0.2.1/24")]
    );
    assert!(r1.routes.is_empty());
    let h1 = node(&lab, "h1");
    assert!(!h1.forward);
    assert_eq!(nics(h1), [nic("left", "10.0.1.10/24")]);
    assert_eq!(gateways(h1), ["10.0.1.1"]);
    let h2 = node(&lab, "h2");
    assert_eq!(nics(h2), [nic("right", "10.0.2.10/24")]);
    assert_eq!(gateways(h2), ["10.0.2.1"]);
}

#[test]
fn star10() {
    let lab = load("star10.yaml");
    assert_eq!(lab.lans, ["star"]);
    assert_eq!(lab.nodes.len(), 10);
    let names: BTreeSet<&str> = lab.nodes.iter().map(|n| n.name.as_str()).collect();
    for i in 1..=10 {
        let name = format!("n{i}");
        assert!(names.contains(name.as_str()), "no {name}");
        let n = node(&lab, &name);
        assert_eq!(n.memory_mb, 160);
        assert_eq!(nics(n), [nic("star", &format!("10.0.0.{i}/24"))]);
    }
}

#[test]
fn containers_example_is_a_router_container_between_two_lans_and_a_guest() {
    use ulan::vmlaunch::spec::NodeKind;
    let lab = load("containers.yaml");
    let r1 = node(&lab, "r1");
    assert_eq!(r1.kind, NodeKind::Container);
    assert!(r1.forward);
    assert_eq!(r1.cmd, ["sleep", "infinity"]);
    assert_eq!(
        nics(r1),
        [nic("left", "10.0.1.1/24"), nic("right", "10.0.2.1/24")]
    );
    for (n, lan, ip, via) in [
        ("c1", "left", "10.0.1.10/24", "10.0.1.1"),
        ("c2", "right", "10.0.2.10/24", "10.0.2.1"),
    ] {
        let c = node(&lab, n);
        assert_eq!(c.kind, NodeKind::Container, "{n}");
        assert_eq!(nics(c), [nic(lan, ip)]);
        assert_eq!(c.routes[0].via.to_string(), via);
    }
    assert_eq!(node(&lab, "g1").kind, NodeKind::Qemu);
}
