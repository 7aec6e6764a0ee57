//! `ulan node ...` and `ulan exec`: guests through the API.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{dash, print_json, table, Output};
use crate::api::client::{Client, NodeView};
use crate::vmlaunch::spec::{Accel, Cidr, NicSpec, NodeKind, NodeSpec, RouteSpec, Transport};

/// `--nic LAN[,ip=CIDR][,mac=MAC][,transport=T][,link=down]`; `-` as LAN
/// leaves the NIC unplugged.
pub fn parse_nic(text: &str) -> anyhow::Result<NicSpec> {
    let mut parts = text.split(',');
    let lan = parts.next().unwrap_or("");
    let mut nic = NicSpec::on(Some(lan).filter(|l| *l != "-" && !l.is_empty()));
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--nic {text:?}: {p:?} is not KEY=VALUE"))?;
        match k {
            "ip" => nic.ip.push(
                v.parse::<Cidr>()
                    .with_context(|| format!("--nic {text:?}"))?,
            ),
            "mac" => {
                nic.mac =
                    Some(v.parse().map_err(|_| {
                        anyhow::anyhow!("--nic {text:?}: {v:?} is not a MAC address")
                    })?)
            }
            "transport" => {
                nic.transport = Some(
                    serde_json::from_value::<Transport>(serde_json::Value::String(v.into()))
                        .map_err(|_| {
                            anyhow::anyhow!(
                            "--nic {text:?}: transport must be stream, dgram, vde, daemon or bess"
                        )
                        })?,
                )
            }
            "link" => {
                nic.link = match v {
                    "up" => crate::lab::LinkState::Up,
                    "down" => crate::lab::LinkState::Down,
                    _ => bail!("--nic {text:?}: link must be up or down"),
                }
            }
            _ => bail!("--nic {text:?}: unknown key {k:?} (ip, mac, transport, link)"),
        }
    }
    Ok(nic)
}

/// `--route DEST,VIA`
pub fn parse_route(text: &str) -> anyhow::Result<RouteSpec> {
    let (to, via) = text
        .split_once(',')
        .with_context(|| format!("--route {text:?}: expected DEST,VIA (e.g. default,10.0.0.1)"))?;
    Ok(RouteSpec {
        to: to.into(),
        via: via
            .parse()
            .with_context(|| format!("--route {text:?}: {via:?} is not an IPv4 address"))?,
    })
}

/// What `ulan node add` takes (parsed by clap in main.rs).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NodeArgs {
    pub name: String,
    /// qemu (default), uml or container.
    #[arg(long)]
    pub kind: Option<String>,
    /// Container: the first process's argv as one shell-free list
    /// (repeat: --cmd /bin/sh --cmd -c --cmd 'sleep 9').
    #[arg(long = "cmd", allow_hyphen_values = true)]
    pub cmd: Vec<String>,
    /// Container: KEY=VALUE (repeatable).
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// Container: the first process's working directory.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Container: its hostname (default: the node's name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Container: memory limit in MiB (cgroup memory.max).
    #[arg(long = "memory-mb")]
    pub container_memory_mb: Option<u32>,
    /// Container: pids.max of its cgroup.
    #[arg(long = "pids-max")]
    pub pids_max: Option<u32>,
    #[arg(long = "memory")]
    pub memory_mb: Option<u32>,
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Disk base: an image store name or a path.
    #[arg(long)]
    pub image: Option<String>,
    #[arg(long)]
    pub kernel: Option<String>,
    #[arg(long)]
    pub initrd: Option<String>,
    /// Extra kernel command line.
    #[arg(long)]
    pub append: Option<String>,
    /// Keep the disk overlay across stop/start.
    #[arg(long)]
    pub persistent: bool,
    /// auto (default), kvm or tcg.
    #[arg(long)]
    pub accel: Option<String>,
    /// A NIC: LAN[,ip=CIDR][,mac=MAC][,transport=stream|dgram|vde|daemon|bess]
    /// (repeat for more; LAN `-` leaves it unplugged).
    #[arg(long = "nic")]
    pub nics: Vec<String>,
    /// A static route DEST,VIA (built-in image; repeatable).
    #[arg(long = "route")]
    pub routes: Vec<String>,
    /// Turn on IPv4 forwarding in the guest (built-in image).
    #[arg(long)]
    pub forward: bool,
    /// The emulator binary (default qemu-system-x86_64 / linux.uml).
    #[arg(long)]
    pub binary: Option<String>,
    /// Your own emulator arguments, appended last, unchecked.
    #[arg(last = true)]
    pub extra_args: Vec<String>,
}

fn enum_arg<T: serde::de::DeserializeOwned>(
    what: &str,
    v: &str,
    allowed: &str,
) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(v.into()))
        .map_err(|_| anyhow::anyhow!("--{what} {v:?}: expected one of {allowed}"))
}

impl NodeArgs {
    pub fn to_spec(&self) -> anyhow::Result<NodeSpec> {
        let mut spec = NodeSpec::new(&self.name, &[]);
        if let Some(k) = &self.kind {
            spec.kind = enum_arg::<NodeKind>("kind", k, "qemu, uml, container")?;
        }
        if let Some(a) = &self.accel {
            spec.accel = enum_arg::<Accel>("accel", a, "auto, kvm, tcg")?;
        }
        if let Some(m) = self.memory_mb.or(self.container_memory_mb) {
            spec.memory_mb = m;
        }
        spec.cmd = self.cmd.clone();
        spec.env = self.env.clone();
        spec.workdir = self.workdir.clone();
        spec.hostname = self.hostname.clone();
        spec.pids_max = self.pids_max;
        if let Some(c) = self.cpus {
            spec.cpus = c;
        }
        spec.image = self.image.clone();
        spec.kernel = self.kernel.clone();
        spec.initrd = self.initrd.clone();
        spec.append = self.append.clone();
        spec.persistent = self.persistent;
        spec.forward = self.forward;
        spec.binary = self.binary.clone();
        spec.extra_args = self.extra_args.clone();
        spec.nics = self
            .nics
            .iter()
            .map(|n| parse_nic(n))
            .collect::<anyhow::Result<_>>()?;
        spec.routes = self
            .routes
            .iter()
            .map(|r| parse_route(r))
            .collect::<anyhow::Result<_>>()?;
        if let Ok(cwd) = std::env::current_dir() {
            spec.absolutize(&cwd);
        }
        spec.validate()?;
        Ok(spec)
    }
}

fn nics_cell(n: &NodeView) -> String {
    n.nics
        .iter()
        .map(|nic| {
            let mut s = format!("eth{}:{}", nic.index, nic.lan.as_deref().unwrap_or("-"));
            if let Some(ip) = nic.ip.first() {
                s.push('=');
                s.push_str(ip);
            }
            s
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Each distinct node warning once, on stderr (e.g. the TCG fallback).
pub fn print_warnings(nodes: &[NodeView]) {
    let mut seen = std::collections::BTreeSet::new();
    for w in nodes.iter().filter_map(|n| n.warning.as_deref()) {
        if seen.insert(w) {
            eprintln!("warning: {w}");
        }
    }
}

pub fn nodes_table(nodes: &[NodeView]) -> String {
    let rows: Vec<_> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.kind.as_str().to_string(),
                n.state.clone(),
                n.pid.map_or("-".into(), |p| p.to_string()),
                dash(&n.accel),
                nics_cell(n),
            ]
        })
        .collect();
    table(&["NODE", "KIND", "STATE", "PID", "ACCEL", "NICS"], &rows)
}

fn print_node(n: &NodeView) {
    println!("node      {} ({})", n.name, n.kind.as_str());
    println!("state     {}", n.state);
    if let Some(w) = &n.warning {
        println!("warning   {w}");
    }
    if let Some(e) = &n.exit {
        println!("last exit {e}");
    }
    println!(
        "process   {}",
        n.pid
            .map_or("-".to_string(), |p| format!("pid {p}, {}", dash(&n.accel)))
    );
    if let Some(r) = &n.rootfs {
        println!("root      {r}");
    }
    println!("console   {} (log {})", n.console, n.console_log);
    println!(
        "exec      {}",
        if n.agent {
            "yes"
        } else {
            "no agent in this image"
        }
    );
    for nic in &n.nics {
        println!(
            "eth{}      {} {} lan {} port {} ({}){}",
            nic.index,
            nic.mac,
            nic.transport,
            nic.lan.as_deref().unwrap_or("-"),
            nic.port,
            if nic.up { "up" } else { "down" },
            if nic.ip.is_empty() {
                String::new()
            } else {
                format!(" {}", nic.ip.join(" "))
            }
        );
    }
}

/// Waits until every named node has left `starting`; fails on a crash.
/// Prints a progress line on stderr.
pub async fn wait_running(
    client: &Client,
    names: &[String],
    timeout: Duration,
    progress: bool,
) -> anyhow::Result<Vec<NodeView>> {
    use std::io::{IsTerminal, Write};
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    loop {
        let all = client.nodes().await?;
        let ours: Vec<NodeView> = all
            .into_iter()
            .filter(|n| names.contains(&n.name))
            .collect();
        if let Some(c) = ours
            .iter()
            .find(|n| n.state == "crashed" || n.state == "stopped")
        {
            if progress && tty {
                eprintln!();
            }
            bail!(
                "node {} {}: {}",
                c.name,
                c.state,
                c.exit.as_deref().unwrap_or("no reason given")
            );
        }
        let running = ours.iter().filter(|n| n.state == "running").count();
        let waiting: Vec<&str> = ours
            .iter()
            .filter(|n| n.state != "running")
            .map(|n| n.name.as_str())
            .collect();
        if progress {
            let mut line = format!(
                "booting: {running}/{} running, {:.0} s",
                names.len(),
                start.elapsed().as_secs_f64()
            );
            if !waiting.is_empty() && waiting.len() <= 6 {
                line.push_str(&format!(" (waiting for {})", waiting.join(" ")));
            }
            if tty {
                eprint!("\r\x1b[K{line}");
                let _ = std::io::stderr().flush();
            } else if line.split(',').next() != last_line.split(',').next() {
                eprintln!("{line}");
            }
            last_line = line;
        }
        if waiting.is_empty() {
            if progress && tty {
                eprintln!();
            }
            return Ok(ours);
        }
        if start.elapsed() > timeout {
            if progress && tty {
                eprintln!();
            }
            bail!(
                "nodes still not running after {} s: {}",
                timeout.as_secs(),
                waiting.join(" ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for one node to run (with the progress line on a terminal).
async fn wait_one(client: &Client, name: &str, out: Output) -> anyhow::Result<NodeView> {
    wait_running(
        client,
        &[name.to_string()],
        Duration::from_secs(600),
        out == Output::Table,
    )
    .await?
    .pop()
    .context("the node disappeared while starting")
}

pub async fn add(client: &Client, args: &NodeArgs, wait: bool, out: Output) -> anyhow::Result<()> {
    let spec = args.to_spec()?;
    let mut n = client.add_node(&spec).await?;
    if wait {
        n = wait_one(client, &spec.name, out).await?;
    }
    if out == Output::Json {
        return print_json(&n);
    }
    print_warnings(std::slice::from_ref(&n));
    println!("node {} {} ({})", n.name, n.state, dash(&n.accel));
    Ok(())
}

pub async fn ls(client: &Client, out: Output) -> anyhow::Result<()> {
    let nodes = client.nodes().await?;
    if out == Output::Json {
        return print_json(&nodes);
    }
    print!("{}", nodes_table(&nodes));
    Ok(())
}

pub async fn show(client: &Client, name: &str, out: Output) -> anyhow::Result<()> {
    let n = client.node(name).await?;
    if out == Output::Json {
        return print_json(&n);
    }
    print_node(&n);
    Ok(())
}

pub async fn rm(client: &Client, name: &str, out: Output) -> anyhow::Result<()> {
    client.remove_node(name).await?;
    if out == Output::Json {
        return print_json(&serde_json::json!({ "removed": name }));
    }
    println!("node {name} removed");
    Ok(())
}

pub async fn start(client: &Client, name: &str, wait: bool, out: Output) -> anyhow::Result<()> {
    let mut n = client.start_node(name).await?;
    if wait {
        n = wait_one(client, name, out).await?;
    }
    if out == Output::Json {
        return print_json(&n);
    }
    println!("node {} {}", n.name, n.state);
    Ok(())
}

pub async fn stop(
    client: &Client,
    name: &str,
    timeout_s: Option<u64>,
    out: Output,
) -> anyhow::Result<()> {
    let client = client
        .clone()
        .with_timeout(Some(Duration::from_secs(timeout_s.unwrap_or(10) + 60)));
    let n = client.stop_node(name, timeout_s).await?;
    if out == Output::Json {
        return print_json(&n);
    }
    println!("node {} {}", n.name, n.state);
    Ok(())
}

pub async fn commit(client: &Client, name: &str, image: &str, out: Output) -> anyhow::Result<()> {
    let client = client.clone().with_timeout(None);
    let v = client.commit_node(name, image).await?;
    if out == Output::Json {
        return print_json(&v);
    }
    let what = if v["container"].is_object() {
        "root filesystem"
    } else {
        "disk"
    };
    println!("node {name}'s {what} is now image {image}");
    Ok(())
}

/// Runs a command in the guest; returns its exit code for the process.
pub async fn exec(
    client: &Client,
    name: &str,
    argv: &[String],
    timeout_s: u64,
    out: Output,
) -> anyhow::Result<i32> {
    use std::io::Write;
    let r = client.exec(name, argv, timeout_s).await?;
    if out == Output::Json {
        print_json(&r)?;
        return Ok(r.exit_code);
    }
    std::io::stdout().write_all(r.stdout.as_bytes())?;
    std::io::stdout().flush()?;
    std::io::stderr().write_all(r.stderr.as_bytes())?;
    Ok(r.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_syntax() {
        let n = parse_nic("lan0,ip=10.0.0.1/24,mac=02:00:00:00:00:05,transport=dgram").unwrap();
        assert_eq!(n.lan.as_deref(), Some("lan0"));
        assert_eq!(n.ip[0].to_string(), "10.0.0.1/24");
        assert_eq!(n.mac.unwrap().to_string(), "02:00:00:00:00:05");
        assert_eq!(n.transport, Some(Transport::Dgram));
        assert_eq!(parse_nic("-").unwrap().lan, None);
        for bad in [
            "l,ip=1.2.3.4",
            "l,mac=zz",
            "l,transport=carrier-pigeon",
            "l,speed=10",
            "l,noequals",
        ] {
            assert!(parse_nic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn route_syntax_and_spec() {
        let r = parse_route("default,10.0.0.1").unwrap();
        assert_eq!(
            (r.to.as_str(), r.via.to_string().as_str()),
            ("default", "10.0.0.1")
        );
        assert!(parse_route("default").is_err());
        assert!(parse_route("default,x").is_err());
        let args = NodeArgs {
            name: "h1".into(),
            memory_mb: Some(128),
            nics: vec!["a,ip=10.0.0.1/24".into()],
            routes: vec!["default,10.0.0.254".into()],
            extra_args: vec!["-S".into()],
            ..Default::default()
        };
        let s = args.to_spec().unwrap();
        assert_eq!(s.memory_mb, 128);
        assert_eq!(s.nics.len(), 1);
        assert_eq!(s.extra_args, ["-S"]);
        let bad = NodeArgs {
            name: "h1".into(),
            memory_mb: Some(1),
            ..Default::default()
        };
        assert!(bad.to_spec().unwrap_err().to_string().contains("memory_mb"));
        let bad = NodeArgs {
            name: "h1".into(),
            accel: Some("fast".into()),
            ..Default::default()
        };
        assert!(bad.to_spec().is_err());
    }
}
