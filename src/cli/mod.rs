//! What the `ulan` subcommands do once parsed: one API call each, printed
//! as a table or as JSON. Errors come back as `anyhow` (this is the edge).

use std::io::Write;

use anyhow::Context;
use serde::Serialize;

use crate::api::client::{Client, ClientError};
use crate::daemon;
use crate::ports::PortKind;

pub mod bench;
pub mod console;
pub mod instruments;
pub mod labctl;
pub mod nodes;
pub mod top;
pub mod web;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone)]
pub enum Request {
    Lab,
    LanAdd(String),
    LanRm(String),
    LanLs,
    PortAdd {
        name: String,
        kind: String,
        lan: Option<String>,
        down: bool,
    },
    PortRm(String),
    PortLs,
    PortMove {
        name: String,
        lan: Option<String>,
    },
    PortStats(String),
    Fdb(String),
    Events,
}

/// `ulan tap-attach`: a tap here, handed to the port at `socket`.
pub fn tap_attach(
    socket: &std::path::Path,
    ifname: &str,
    mac: Option<&str>,
    mtu: Option<u32>,
) -> anyhow::Result<()> {
    use crate::ports::tap::client;
    use std::os::fd::AsFd;
    let mac = match mac {
        Some(m) => client::parse_mac(m).map_err(anyhow::Error::msg)?,
        None => client::mac_from_name(&format!("{}/{ifname}", socket.display())),
    };
    let fd = client::create_tap(ifname, mac, mtu)?;
    client::hand_over(socket, fd.as_fd())?;
    Ok(())
}

/// Renders rows as left-aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            if i + 1 < width.len() {
                s.push_str(&" ".repeat(width[i].saturating_sub(c.chars().count())));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn dash(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

fn up(b: bool) -> String {
    if b { "up" } else { "down" }.to_string()
}

/// Runs one async CLI command on a small runtime.
pub fn block_on<F: std::future::Future<Output = anyhow::Result<T>>, T>(f: F) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(f)
}

/// The API client for lab `lab`.
pub fn client(lab: &str) -> Client {
    Client::new(daemon::api_socket(lab), lab)
}

/// `ulan image build`: local, no daemon needed.
pub fn image_build(
    name: &str,
    kernel_version: Option<String>,
    force: bool,
    out: Output,
) -> anyhow::Result<()> {
    use crate::vmlaunch::image;
    let store = image::ImageStore::open(&image::default_store_dir());
    let opts = image::BuildOptions {
        name: name.to_string(),
        kernel_version,
        force,
    };
    let img = image::build_builtin(&store, &opts, &image::indicatif_progress())?;
    if out == Output::Json {
        return print_json(&img.view());
    }
    println!("image {} ready in {}", img.name, img.dir.display());
    Ok(())
}

/// `ulan image ls`
pub fn image_ls(out: Output) -> anyhow::Result<()> {
    use crate::vmlaunch::image;
    let store = image::ImageStore::open(&image::default_store_dir());
    let images = store.list()?;
    if out == Output::Json {
        return print_json(&images.iter().map(|i| i.view()).collect::<Vec<_>>());
    }
    let rows: Vec<_> = images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.manifest.description.clone(),
                i.dir.display().to_string(),
            ]
        })
        .collect();
    print!("{}", table(&["IMAGE", "DESCRIPTION", "DIR"], &rows));
    Ok(())
}

/// `ulan image import FILE NAME`: a container image from an OCI layout,
/// an OCI archive or a docker archive, into the user's store.
pub fn image_import(
    file: &std::path::Path,
    name: &str,
    reference: Option<String>,
    max_mib: u64,
    force: bool,
    out: Output,
) -> anyhow::Result<()> {
    use crate::vmlaunch::{container::import, image};
    let store = image::ImageStore::open(&image::default_store_dir());
    let opts = import::ImportOptions {
        reference,
        max_bytes: max_mib.saturating_mul(1 << 20),
        replace: force,
    };
    let done = import::import(&store, file, name, &opts)?;
    for w in &done.warnings {
        eprintln!("warning: {w}");
    }
    if out == Output::Json {
        return print_json(&done.image.view());
    }
    println!(
        "image {} imported ({}, {} layers) in {}",
        done.image.name,
        done.format,
        done.layers,
        done.image.dir.display()
    );
    Ok(())
}

/// `ulan doctor`: one line per check; fails when a check fails.
pub fn doctor(out: Output) -> anyhow::Result<()> {
    let checks = crate::doctor::run_checks(&crate::doctor::DoctorOptions::default());
    if out == Output::Json {
        print_json(&checks)?;
    } else {
        print!("{}", crate::doctor::render(&checks));
    }
    if checks
        .iter()
        .any(|c| c.status == crate::doctor::Status::Fail)
    {
        anyhow::bail!("some checks failed (see the fixes above)");
    }
    Ok(())
}

pub fn run(lab: &str, req: Request, out: Output) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = Client::new(daemon::api_socket(lab), lab);
    rt.block_on(run_with(&client, req, out))
        .map_err(|e| match e.downcast::<ClientError>() {
            Ok(ce) => anyhow::Error::new(ce),
            Err(e) => e,
        })
}

pub async fn run_with(client: &Client, req: Request, out: Output) -> anyhow::Result<()> {
    let json = out == Output::Json;
    match req {
        Request::Lab => {
            let l = client.lab().await?;
            if json {
                return print_json(&l);
            }
            println!("lab       {}", l.name);
            println!(
                "daemon    pid {}, ulan {}, up {} s",
                l.pid, l.version, l.uptime_s
            );
            println!("api       {}", l.api_socket);
            println!("run dir   {}", l.run_dir);
            println!("lans      {}", l.lans);
            println!("ports     {} ({} up)", l.ports, l.ports_up);
            println!("aging     {} s", l.aging_s);
        }
        Request::LanAdd(name) => {
            let l = client.add_lan(&name).await?;
            if json {
                return print_json(&l);
            }
            println!("lan {} added", l.name);
        }
        Request::LanRm(name) => {
            client.remove_lan(&name).await?;
            if json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("lan {name} removed");
        }
        Request::LanLs => {
            let lans = client.lans().await?;
            if json {
                return print_json(&lans);
            }
            let rows: Vec<_> = lans
                .iter()
                .map(|l| vec![l.name.clone(), l.ports.len().to_string(), l.ports.join(",")])
                .collect();
            print!("{}", table(&["LAN", "PORTS", "MEMBERS"], &rows));
        }
        Request::PortAdd {
            name,
            kind,
            lan,
            down,
        } => {
            // Check the kind here too, for a message that lists the kinds.
            let kind: PortKind = kind.parse().map_err(anyhow::Error::msg)?;
            let link = if down {
                crate::lab::LinkState::Down
            } else {
                crate::lab::LinkState::Up
            };
            let p = client
                .add_port_with(&name, kind, lan.as_deref(), link, &Default::default())
                .await?;
            if json {
                return print_json(&p);
            }
            println!(
                "port {} ({}) added on lan {}; connect to {}",
                p.name,
                p.kind.as_str(),
                dash(&p.lan),
                p.path
            );
        }
        Request::PortRm(name) => {
            client.remove_port(&name).await?;
            if json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("port {name} removed");
        }
        Request::PortLs => {
            let ports = client.ports().await?;
            if json {
                return print_json(&ports);
            }
            let rows: Vec<_> = ports
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.kind.as_str().to_string(),
                        dash(&p.lan),
                        up(p.up),
                        p.path.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["PORT", "KIND", "LAN", "STATE", "PATH"], &rows)
            );
        }
        Request::PortMove { name, lan } => {
            let p = client.move_port(&name, lan.as_deref()).await?;
            if json {
                return print_json(&p);
            }
            match &p.lan {
                Some(l) => println!("port {} is now on lan {l}", p.name),
                None => println!("port {} is now on no lan", p.name),
            }
        }
        Request::PortStats(name) => {
            let s = client.port_stats(&name).await?;
            if json {
                return print_json(&s);
            }
            println!("port {} ({})", s.name, up(s.up));
            let rows: Vec<_> = s
                .counters
                .iter()
                .map(|(k, v)| vec![k.clone(), v.to_string()])
                .collect();
            print!("{}", table(&["COUNTER", "VALUE"], &rows));
        }
        Request::Fdb(lan) => {
            let f = client.fdb(&lan).await?;
            if json {
                return print_json(&f);
            }
            let rows: Vec<_> = f
                .entries
                .iter()
                .map(|e| vec![e.mac.clone(), e.port.clone(), format!("{:.1}", e.age_s)])
                .collect();
            print!("{}", table(&["MAC", "PORT", "AGE(s)"], &rows));
        }
        Request::Events => {
            let mut events = client.events().await?;
            let stdout = std::io::stdout();
            while let Some(ev) = events.next().await? {
                let mut lock = stdout.lock();
                if json {
                    let line =
                        serde_json::json!({ "event": ev.event, "id": ev.id, "data": ev.data });
                    writeln!(lock, "{line}")?;
                } else {
                    writeln!(lock, "{:<13} {}", ev.event, ev.data)?;
                }
                lock.flush()?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["PORT", "KIND"],
            &[
                vec!["a".into(), "stream".into()],
                vec!["long-name".into(), "vde".into()],
            ],
        );
        assert_eq!(t, "PORT       KIND\na          stream\nlong-name  vde\n");
    }
}
