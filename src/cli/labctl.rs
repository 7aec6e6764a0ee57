//! Lab files at the command line: `ulan up`, `apply`, `down`, `save`, `ls`.
//! The daemon knows nothing of files: the CLI reads the file, asks the
//! daemon for the running lab as a lab file, plans the difference and
//! carries it out with ordinary API calls.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::nodes::{nodes_table, wait_running};
use super::{print_json, table, Output};
use crate::api::client::{Client, ClientError};
use crate::daemon::{self, DaemonOptions};
use crate::labfile::{self, LabFile, Step};
use crate::vmlaunch::image::{self, ImageStore};

/// How long `up`/`apply` wait for guests to boot.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// The lab a file command acts on: `--lab`/`ULAN_LAB`, else the file's
/// `name:`, else `default`.
pub fn lab_name(explicit: Option<&str>, file: &LabFile) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| file.name.clone())
        .unwrap_or_else(|| "default".into())
}

/// Starts the lab's daemon in the background unless one answers.
pub async fn ensure_daemon(client: &Client, lab: &str) -> anyhow::Result<()> {
    match client.lab().await {
        Ok(_) => Ok(()),
        Err(ClientError::NoDaemon { .. }) => {
            let opts = DaemonOptions {
                lab: lab.to_string(),
                aging_secs: 300,
            };
            let lab = lab.to_string();
            let pid = tokio::task::spawn_blocking(move || daemon::detach(&opts))
                .await
                .context("starting the daemon")??;
            eprintln!("started the ulan daemon for lab {lab} (pid {pid})");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Builds the built-in image first if a node needs it and it is missing,
/// with a progress bar (the daemon would refuse the node otherwise).
fn ensure_builtin_image(file: &LabFile) -> anyhow::Result<()> {
    if !file.nodes.iter().any(|n| n.uses_builtin_image()) {
        return Ok(());
    }
    let store = ImageStore::open(&image::default_store_dir());
    if store.get(image::BUILTIN).is_ok() {
        return Ok(());
    }
    eprintln!("the built-in guest image is missing; building it (once)");
    image::build_builtin(
        &store,
        &image::BuildOptions::default(),
        &image::indicatif_progress(),
    )?;
    Ok(())
}

/// Makes the running lab match `wanted`; returns the steps it took.
pub async fn apply_file(
    client: &Client,
    wanted: &LabFile,
    progress: bool,
) -> anyhow::Result<Vec<Step>> {
    let current = client.lab_spec().await?;
    let plan = labfile::plan(&current, wanted);
    let mut new_nodes = Vec::new();
    for step in &plan.steps {
        if progress {
            eprintln!("{step}");
        }
        match step {
            Step::AddLan(l) => drop(client.add_lan(l).await?),
            Step::RemoveLan(l) => client.remove_lan(l).await?,
            Step::AddPort(p) => {
                // Born with them, before it joins its lan.
                client
                    .add_port_with(&p.name, p.kind, p.lan.as_deref(), p.link, &p.impairments)
                    .await?;
            }
            Step::RemovePort(p) => client.remove_port(p).await?,
            Step::MovePort { port, lan } => drop(client.move_port(port, lan.as_deref()).await?),
            Step::AddNode(spec) => {
                client.add_node(spec).await?;
                new_nodes.push(spec.name.clone());
            }
            Step::RemoveNode(n) => client.remove_node(n).await?,
            Step::MoveNic { port, lan, .. } => drop(client.move_port(port, lan.as_deref()).await?),
            Step::SetLink { port, link } => drop(client.set_link(port, *link).await?),
            Step::SetImpairments { port, impairments } if impairments.is_empty() => {
                client.clear_impairments(port).await?
            }
            Step::SetImpairments { port, impairments } => {
                client.set_impairments(port, impairments).await?;
            }
            Step::ReplaceNode(spec) => {
                // The new spec's files first: a typo must not cost the old
                // node. And if the new one fails all the same, the old one
                // is put back.
                crate::vmlaunch::node::check_boot(spec, &image::default_store_dir())
                    .map_err(|e| anyhow::anyhow!("cannot replace node {}: {e}", spec.name))?;
                let old = current.nodes.iter().find(|n| n.name == spec.name);
                client.remove_node(&spec.name).await?;
                if let Err(e) = client.add_node(spec).await {
                    let Some(old) = old else {
                        return Err(e.into());
                    };
                    return Err(match client.add_node(old).await {
                        Ok(_) => anyhow::anyhow!(
                            "cannot replace node {}: {e}; the old node is back",
                            spec.name
                        ),
                        Err(back) => anyhow::anyhow!(
                            "cannot replace node {}: {e}; putting the old one back failed too: {back}",
                            spec.name
                        ),
                    });
                }
                new_nodes.push(spec.name.clone());
            }
        }
    }
    if !new_nodes.is_empty() {
        wait_running(client, &new_nodes, BOOT_TIMEOUT, progress).await?;
    }
    Ok(plan.steps)
}

fn load(path: &Path) -> anyhow::Result<LabFile> {
    labfile::load(path).with_context(|| format!("cannot use lab file {}", path.display()))
}

/// `ulan up FILE` and `ulan apply FILE`: both make the lab match the file
/// (`up` on an empty or absent lab is the first apply). `up` also starts
/// the daemon when needed.
pub async fn up(
    explicit_lab: Option<&str>,
    path: &Path,
    start_daemon: bool,
    out: Output,
) -> anyhow::Result<()> {
    let file = load(path)?;
    let lab = lab_name(explicit_lab, &file);
    let client = Client::new(daemon::api_socket(&lab), &lab);
    ensure_builtin_image(&file)?;
    if start_daemon {
        ensure_daemon(&client, &lab).await?;
    }
    let steps = apply_file(&client, &file, out == Output::Table).await?;
    let nodes = client.nodes().await?;
    if out == Output::Json {
        return print_json(&serde_json::json!({
            "lab": lab,
            "steps": steps.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "nodes": nodes,
        }));
    }
    super::nodes::print_warnings(&nodes);
    if steps.is_empty() {
        println!("lab {lab} already matches {}", path.display());
    } else {
        println!("lab {lab} is up ({} changes)", steps.len());
    }
    print!("{}", nodes_table(&nodes));
    Ok(())
}

/// `ulan down`: every node, port and lan goes, then the daemon.
pub async fn down(lab: &str, out: Output) -> anyhow::Result<()> {
    let client = Client::new(daemon::api_socket(lab), lab);
    let current = match client.lab_spec().await {
        Ok(c) => c,
        Err(ClientError::NoDaemon { .. }) => {
            // A lab whose daemon died is still saved: down forgets it.
            let state = crate::persist::default_state_path(lab);
            let forgotten = match std::fs::remove_file(&state) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(anyhow::anyhow!("{}: {e}", state.display())),
            };
            if out == Output::Json {
                return print_json(
                    &serde_json::json!({ "lab": lab, "running": false, "forgotten": forgotten }),
                );
            }
            if forgotten {
                println!("lab {lab} is not running; its saved state is forgotten");
            } else {
                println!("lab {lab} is not running");
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let removals = current.nodes.iter().map(|n| client.remove_node(&n.name));
    for r in futures_util::future::join_all(removals).await {
        r?;
    }
    for p in &current.ports {
        client.remove_port(&p.name).await?;
    }
    for l in &current.lans {
        client.remove_lan(l).await?;
    }
    let lab_owned = lab.to_string();
    let pid = tokio::task::spawn_blocking(move || daemon::stop(&lab_owned))
        .await
        .context("stopping the daemon")??;
    if out == Output::Json {
        return print_json(&serde_json::json!({
            "lab": lab,
            "nodes_removed": current.nodes.len(),
            "daemon_pid": pid,
        }));
    }
    println!(
        "lab {lab} is down ({} nodes, {} lans removed; daemon pid {pid} stopped)",
        current.nodes.len(),
        current.lans.len()
    );
    Ok(())
}

/// `ulan save`: the running lab as a lab file on stdout.
pub async fn save(lab: &str, out: Output) -> anyhow::Result<()> {
    let client = Client::new(daemon::api_socket(lab), lab);
    let mut file = client.lab_spec().await?;
    file.name = Some(lab.to_string());
    if out == Output::Json {
        return print_json(&file);
    }
    print!("{}", file.to_yaml());
    Ok(())
}

/// `ulan ls`: nodes with their state, then lans with their members.
pub async fn ls(lab: &str, out: Output) -> anyhow::Result<()> {
    let client = Client::new(daemon::api_socket(lab), lab);
    let nodes = client.nodes().await?;
    let lans = client.lans().await?;
    if out == Output::Json {
        return print_json(&serde_json::json!({ "lab": lab, "nodes": nodes, "lans": lans }));
    }
    print!("{}", nodes_table(&nodes));
    println!();
    let rows: Vec<_> = lans
        .iter()
        .map(|l| vec![l.name.clone(), l.ports.join(" ")])
        .collect();
    print!("{}", table(&["LAN", "PORTS"], &rows));
    Ok(())
}
