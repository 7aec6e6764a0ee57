//! `ulan graph` and `ulan web`.

use crate::api::client::Client;
use crate::api::web::graph::{self, Format};

/// `ulan graph`: the lab's graph in `format` on stdout.
pub async fn graph(client: &Client, format: Format) -> anyhow::Result<()> {
    let g = client.graph().await?;
    print!("{}", graph::render(&g, format));
    Ok(())
}

/// `ulan web`: what to listen on.
#[derive(Debug, Clone, clap::Args)]
pub struct WebArgs {
    /// Address and port to listen on (port 0: any free port). Loopback
    /// only unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Allow a --listen address that is not loopback (anyone who reaches
    /// it can try the token).
    #[arg(long)]
    pub allow_remote: bool,
    /// A host name the browser uses for this listener, besides localhost
    /// and IP addresses (repeatable).
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
}

/// `ulan web`: serves the page and the API on a TCP port until Ctrl-C.
pub async fn web(client: &Client, args: &WebArgs) -> anyhow::Result<()> {
    use crate::api::web::listener::{WebConfig, WebServer};
    use std::io::Write;
    // Refuse the address before anything else; then a clear error now
    // rather than 502s in the browser later.
    if !args.allow_remote && !args.listen.ip().is_loopback() {
        return Err(crate::api::web::listener::WebError::NotLoopback { addr: args.listen }.into());
    }
    client.lab().await?;
    let mut config = WebConfig::new(
        args.listen,
        client.socket().to_path_buf(),
        client.lab_name(),
    );
    config.allow_remote = args.allow_remote;
    config.hosts = args.hosts.clone();
    let server = WebServer::bind(config).await?;
    println!("{}", server.url());
    std::io::stdout().flush()?;
    eprintln!(
        "lab {:?} served on {} (Ctrl-C stops)",
        client.lab_name(),
        server.local_addr()
    );
    let (stop, rx) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(server.serve(rx));
    tokio::signal::ctrl_c().await?;
    let _ = stop.send(true);
    let _ = serving.await;
    Ok(())
}
