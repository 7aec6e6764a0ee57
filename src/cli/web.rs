//! `ulan graph` and `ulan web`.

use crate::api::client::Client;
use crate::api::web::graph::{self, Format};

/// `ulan graph`: the lab's graph in `format` on stdout.
pub async fn graph(client: &Client, format: Format) -> anyhow::Result<()> {
    let g = client.graph().await?;
    print!("{}", graph::render(&g, format));
    Ok(())
}
