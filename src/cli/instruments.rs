//! `ulan netem`, `ulan link` and `ulan capture`: the lab's instruments
//! from the command line, with tc-style values (`50ms`, `1%`, `10mbit`).

use std::io::Write;

use anyhow::{bail, Context};

use super::{print_json, Output};
use crate::api::client::{Client, ClientError};
use crate::lab::{CaptureRequest, LinkState};
use crate::switch::impair::{DirectionSpec, ImpairSpec};
use crate::wire::pcapng::BlockSplitter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dir {
    /// Towards the port's client (as `tc qdisc ... netem` on an interface).
    Egress,
    /// From the port's client.
    Ingress,
    Both,
}

#[derive(Debug, Clone, clap::Args)]
pub struct NetemArgs {
    /// The port.
    pub port: String,
    /// Which way the settings apply.
    #[arg(long, value_enum, default_value = "egress")]
    pub dir: Dir,
    /// Added delay: 50ms, 1.5s, 800us (a plain number is ms).
    #[arg(long, value_parser = parse_ms)]
    pub delay: Option<f64>,
    /// +- variation of the delay (same units).
    #[arg(long, value_parser = parse_ms)]
    pub jitter: Option<f64>,
    /// Random loss: 1% (or 1).
    #[arg(long, value_parser = parse_pct)]
    pub loss: Option<f64>,
    /// Correlation of successive losses (needs --loss).
    #[arg(long, value_parser = parse_pct)]
    pub loss_correlation: Option<f64>,
    /// Bursty loss instead of --loss: P,R[,BAD[,GOOD]] in percent (the
    /// Gilbert-Elliott chances good->bad, bad->good, and the loss in each).
    #[arg(long, value_name = "P,R[,BAD[,GOOD]]", value_parser = parse_ge)]
    pub loss_ge: Option<crate::switch::impair::GilbertElliott>,
    #[arg(long, value_parser = parse_pct)]
    pub duplicate: Option<f64>,
    /// Frames that skip the delay (needs --delay).
    #[arg(long, value_parser = parse_pct)]
    pub reorder: Option<f64>,
    /// Frames with one bit flipped.
    #[arg(long, value_parser = parse_pct)]
    pub corrupt: Option<f64>,
    /// Rate limit: 10mbit, 512kbit, 1gbit (bit/s); kbps/mbps are bytes/s
    /// as in tc.
    #[arg(long, value_parser = parse_rate_kbps)]
    pub rate: Option<u64>,
    /// Burst for --rate: 32kb, 1mb, 64k (bytes).
    #[arg(long, value_parser = parse_burst_kb)]
    pub burst: Option<u64>,
    /// Remove the impairments (of --dir if given, else both ways).
    #[arg(long)]
    pub clear: bool,
}

fn number(s: &str, what: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a {what}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a {what} (it must be 0 or more)"));
    }
    Ok(v)
}

/// `50ms`, `1.5s`, `800us`, `50` (ms) -> milliseconds.
pub fn parse_ms(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (n, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1e3)
    } else {
        (t.as_str(), 1.0)
    };
    Ok(number(n, "duration (50ms, 1s, 800us)")? * scale)
}

/// `1%`, `0.5` -> percent.
pub fn parse_pct(s: &str) -> Result<f64, String> {
    let v = number(s.trim().trim_end_matches('%'), "percentage (1%)")?;
    if v > 100.0 {
        return Err(format!("{s:?} is more than 100%"));
    }
    Ok(v)
}

fn parse_ge(s: &str) -> Result<crate::switch::impair::GilbertElliott, String> {
    let parts: Vec<f64> = s.split(',').map(parse_pct).collect::<Result<_, _>>()?;
    if !(2..=4).contains(&parts.len()) {
        return Err("give P,R or P,R,BAD or P,R,BAD,GOOD (percent)".into());
    }
    Ok(crate::switch::impair::GilbertElliott {
        p_pct: parts[0],
        r_pct: parts[1],
        bad_loss_pct: parts.get(2).copied(),
        good_loss_pct: parts.get(3).copied(),
    })
}

/// tc's rate units -> kbit/s.
pub fn parse_rate_kbps(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let units: [(&str, f64); 8] = [
        ("gbit", 1e9),
        ("mbit", 1e6),
        ("kbit", 1e3),
        ("gbps", 8e9),
        ("mbps", 8e6),
        ("kbps", 8e3),
        ("bps", 8.0),
        ("bit", 1.0),
    ];
    let (n, bits) = units
        .iter()
        .find_map(|(u, b)| t.strip_suffix(u).map(|n| (n, *b)))
        .ok_or_else(|| format!("{s:?}: give a unit, e.g. 10mbit, 512kbit, 1gbit"))?;
    let kbps = number(n, "rate")? * bits / 1e3;
    if kbps < 1.0 {
        return Err(format!("{s:?} is below 1kbit"));
    }
    Ok(kbps.round() as u64)
}

/// `32kb`, `64k`, `1mb`, `3000` (bytes) -> KiB, rounded up.
pub fn parse_burst_kb(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (n, scale) = if let Some(n) = t.strip_suffix("mb").or_else(|| t.strip_suffix('m')) {
        (n, 1024.0 * 1024.0)
    } else if let Some(n) = t.strip_suffix("kb").or_else(|| t.strip_suffix('k')) {
        (n, 1024.0)
    } else {
        (t.strip_suffix('b').unwrap_or(&t), 1.0)
    };
    let bytes = number(n, "size (32kb, 1mb)")? * scale;
    Ok(((bytes / 1024.0).ceil() as u64).max(1))
}

impl NetemArgs {
    fn direction(&self) -> DirectionSpec {
        DirectionSpec {
            delay_ms: self.delay,
            jitter_ms: self.jitter,
            loss_pct: self.loss,
            loss_correlation_pct: self.loss_correlation,
            loss_gilbert_elliott: self.loss_ge.clone(),
            duplicate_pct: self.duplicate,
            reorder_pct: self.reorder,
            corrupt_pct: self.corrupt,
            rate_kbps: self.rate,
            burst_kb: self.burst,
        }
    }

    /// What to PUT, given what the port has now: the chosen direction(s)
    /// replaced, the other kept.
    fn merged(&self, now: ImpairSpec, dir_given: bool) -> ImpairSpec {
        let set = if self.clear {
            None
        } else {
            Some(self.direction())
        };
        let mut spec = now;
        match (self.dir, self.clear && !dir_given) {
            (_, true) => return ImpairSpec::default(),
            (Dir::Egress, _) => spec.egress = set,
            (Dir::Ingress, _) => spec.ingress = set,
            (Dir::Both, _) => {
                spec.egress = set.clone();
                spec.ingress = set;
            }
        }
        spec
    }
}

fn describe(d: &Option<DirectionSpec>) -> String {
    let Some(d) = d else {
        return "-".into();
    };
    let mut parts = Vec::new();
    if let Some(v) = d.delay_ms {
        parts.push(format!("delay {v}ms"));
    }
    if let Some(v) = d.jitter_ms {
        parts.push(format!("jitter {v}ms"));
    }
    if let Some(v) = d.loss_pct {
        parts.push(format!("loss {v}%"));
    }
    if let Some(v) = d.loss_correlation_pct {
        parts.push(format!("correlation {v}%"));
    }
    if let Some(g) = &d.loss_gilbert_elliott {
        parts.push(format!("loss-ge p {}% r {}%", g.p_pct, g.r_pct));
    }
    if let Some(v) = d.duplicate_pct {
        parts.push(format!("duplicate {v}%"));
    }
    if let Some(v) = d.reorder_pct {
        parts.push(format!("reorder {v}%"));
    }
    if let Some(v) = d.corrupt_pct {
        parts.push(format!("corrupt {v}%"));
    }
    if let Some(v) = d.rate_kbps {
        parts.push(format!("rate {v}kbit"));
    }
    if let Some(v) = d.burst_kb {
        parts.push(format!("burst {v}KiB"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// `ulan netem`. `dir_given`: --dir was on the command line.
pub async fn netem(
    client: &Client,
    args: &NetemArgs,
    dir_given: bool,
    out: Output,
) -> anyhow::Result<()> {
    let now = client.impairments(&args.port).await?;
    let want = args.merged(now, dir_given);
    let applied = client.set_impairments(&args.port, &want).await?;
    if out == Output::Json {
        return print_json(&applied);
    }
    println!("{} egress:  {}", args.port, describe(&applied.egress));
    println!("{} ingress: {}", args.port, describe(&applied.ingress));
    Ok(())
}

/// `ulan link PORT up|down`.
pub async fn link(
    client: &Client,
    port: &str,
    state: LinkState,
    out: Output,
) -> anyhow::Result<()> {
    let p = client.set_link(port, state).await?;
    if out == Output::Json {
        return print_json(&p);
    }
    let word = match p.link {
        LinkState::Up => "up",
        LinkState::Down => "down",
    };
    println!("{port}: link {word}");
    Ok(())
}

pub struct CaptureArgs {
    pub target: String,
    /// Force the target to be a lan (a port of the same name wins
    /// otherwise).
    pub lan: bool,
    pub write: String,
    pub snaplen: Option<u32>,
    /// Stop after this many seconds.
    pub duration: Option<f64>,
}

/// `ulan capture PORT|LAN -w FILE|-`: a stream capture written as whole
/// pcapng blocks, so the file is valid wherever it is cut (Ctrl-C, a
/// reader that goes away, the end of --duration).
pub async fn capture(client: &Client, args: CaptureArgs) -> anyhow::Result<()> {
    let is_port = !args.lan
        && match client.port(&args.target).await {
            Ok(_) => true,
            Err(ClientError::Api { status, .. }) if status.as_u16() == 404 => false,
            Err(e) => return Err(e.into()),
        };
    let req = CaptureRequest {
        port: is_port.then(|| args.target.clone()),
        lan: (!is_port).then(|| args.target.clone()),
        snaplen: args.snaplen,
        path: None,
    };
    let mut sink: Box<dyn Write> = if args.write == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&args.write)
                .with_context(|| format!("cannot create {}", args.write))?,
        ))
    };
    let cap = client.start_capture(&req).await?;
    let mut stream = match client.capture_stream(&cap.id).await {
        Ok(s) => s,
        Err(e) => {
            let _ = client.stop_capture(&cap.id).await;
            return Err(e.into());
        }
    };
    eprintln!(
        "capturing {} {} as {} (Ctrl-C stops)",
        cap.of, cap.name, cap.id
    );
    let mut blocks = BlockSplitter::new();
    let deadline = args
        .duration
        .map(|s| tokio::time::Instant::now() + std::time::Duration::from_secs_f64(s));
    let mut stopping = false;
    let mut end = None;
    let result: anyhow::Result<()> = loop {
        let until = async {
            match deadline {
                Some(d) if !stopping => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            chunk = stream.next() => match chunk {
                Ok(Some(bytes)) => {
                    let n = match blocks.push(&bytes) {
                        Ok(n) => n,
                        Err(e) => break Err(e.into()),
                    };
                    if let Err(e) = sink.write_all(&blocks.pending()[..n]).and_then(|_| sink.flush()) {
                        // A reader that went away (`| head`) ends it quietly.
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            break Ok(());
                        }
                        break Err(anyhow::Error::from(e).context("cannot write the capture"));
                    }
                    blocks.consume(n);
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.into()),
            },
            _ = tokio::signal::ctrl_c(), if !stopping => {
                stopping = true;
                // The daemon ends the capture and the stream, after the
                // frames already queued.
                end = client.stop_capture(&cap.id).await.ok();
            }
            _ = until => {
                stopping = true;
                end = client.stop_capture(&cap.id).await.ok();
            }
        }
    };
    drop(stream);
    let _ = sink.flush();
    // Final counts: from the stop (already done, or now).
    if end.is_none() {
        end = client.stop_capture(&cap.id).await.ok();
    }
    if let Some(end) = end {
        eprintln!(
            "{} frames captured, {} dropped by the capture",
            end.frames, end.dropped
        );
    }
    result
}

pub fn parse_link(s: &str) -> anyhow::Result<LinkState> {
    match s {
        "up" => Ok(LinkState::Up),
        "down" => Ok(LinkState::Down),
        _ => bail!("link state is up or down, not {s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_style_values_parse() {
        assert_eq!(parse_ms("50ms"), Ok(50.0));
        assert_eq!(parse_ms("1.5s"), Ok(1500.0));
        assert_eq!(parse_ms("800us"), Ok(0.8));
        assert_eq!(parse_ms("7"), Ok(7.0));
        assert!(parse_ms("-5ms").is_err());
        assert!(parse_ms("soon").is_err());
        assert_eq!(parse_pct("1%"), Ok(1.0));
        assert!(parse_pct("150%").is_err());
        assert!(parse_pct("NaN").is_err());
        assert_eq!(parse_rate_kbps("10mbit"), Ok(10_000));
        assert_eq!(parse_rate_kbps("512kbit"), Ok(512));
        assert_eq!(parse_rate_kbps("1gbit"), Ok(1_000_000));
        assert_eq!(parse_rate_kbps("1mbps"), Ok(8_000));
        assert!(parse_rate_kbps("10").is_err());
        assert!(parse_rate_kbps("0mbit").is_err());
        assert_eq!(parse_burst_kb("32kb"), Ok(32));
        assert_eq!(parse_burst_kb("1mb"), Ok(1024));
        assert_eq!(parse_burst_kb("3000"), Ok(3));
        assert!(parse_ge("1").is_err());
        assert_eq!(parse_ge("1,20,80").unwrap().bad_loss_pct, Some(80.0));
    }

    #[test]
    fn netem_replaces_the_chosen_direction_and_keeps_the_other() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: NetemArgs,
        }
        let now = ImpairSpec {
            egress: Some(DirectionSpec {
                loss_pct: Some(5.0),
                ..Default::default()
            }),
            ingress: Some(DirectionSpec {
                delay_ms: Some(9.0),
                ..Default::default()
            }),
        };
        let t = T::parse_from(["x", "p", "--delay", "50ms", "--rate", "10mbit"]);
        let m = t.a.merged(now.clone(), false);
        assert_eq!(m.egress.as_ref().unwrap().delay_ms, Some(50.0));
        assert_eq!(m.egress.as_ref().unwrap().loss_pct, None);
        assert_eq!(m.ingress, now.ingress);
        let t = T::parse_from(["x", "p", "--clear"]);
        assert_eq!(t.a.merged(now.clone(), false), ImpairSpec::default());
        let t = T::parse_from(["x", "p", "--clear", "--dir", "ingress"]);
        let m = t.a.merged(now.clone(), true);
        assert_eq!((m.egress, m.ingress), (now.egress, None));
    }
}
