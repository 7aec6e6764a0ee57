//! The `ulan` command: parses the command line and calls the library.
//! Everything but `daemon` talks to the lab's daemon over its API socket.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ulan::cli::{self, Output};
use ulan::daemon::{self, DaemonOptions};

#[derive(Parser)]
#[command(
    name = "ulan",
    version,
    about = "Rootless network lab: a userspace Ethernet switch with a JSON API"
)]
struct Args {
    /// Lab to talk to (each lab has its own daemon and run directory).
    #[arg(long, global = true, env = "ULAN_LAB", default_value = "default")]
    lab: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the lab's daemon (switch + API) in the foreground.
    Daemon {
        /// Start it in the background and return once its API answers.
        #[arg(long)]
        detach: bool,
        /// Seconds before a learned MAC address is forgotten.
        #[arg(long, default_value_t = 300)]
        aging: u64,
    },
    /// Stop the lab's daemon: every port closes, every socket is removed.
    Stop,
    /// Show the lab: daemon, run directory, counts.
    Lab,
    /// Lans (broadcast domains).
    #[command(subcommand)]
    Lan(LanCmd),
    /// Switch ports (sockets clients plug into).
    #[command(subcommand)]
    Port(PortCmd),
    /// The MAC table of a lan.
    Fdb { lan: String },
    /// Follow topology changes and port up/down as they happen.
    Events,
}

#[derive(Subcommand)]
enum LanCmd {
    Add { name: String },
    Rm { name: String },
    Ls,
}

#[derive(Subcommand)]
enum PortCmd {
    /// Make a port; prints the path a client connects to.
    Add {
        name: String,
        /// stream | dgram | vde | bess
        #[arg(long, short)]
        kind: String,
        #[arg(long)]
        lan: Option<String>,
    },
    Rm {
        name: String,
    },
    Ls,
    /// Put a port on another lan, or on none with --detach.
    Move {
        name: String,
        #[arg(required_unless_present = "detach")]
        lan: Option<String>,
        #[arg(long, conflicts_with = "lan")]
        detach: bool,
    },
    Stats {
        name: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let out = if args.json {
        Output::Json
    } else {
        Output::Table
    };
    let result = match args.cmd {
        Cmd::Daemon { detach, aging } => {
            let opts = DaemonOptions {
                lab: args.lab.clone(),
                aging_secs: aging,
            };
            if detach {
                daemon::detach(&opts).map(|pid| {
                    println!(
                        "ulan daemon for lab {} running (pid {pid}), API at {}",
                        args.lab,
                        daemon::api_socket(&args.lab).display()
                    );
                })
            } else {
                init_logging();
                daemon::run(opts)
            }
            .map_err(anyhow::Error::from)
        }
        Cmd::Stop => daemon::stop(&args.lab)
            .map(|pid| println!("ulan daemon for lab {} (pid {pid}) stopped", args.lab))
            .map_err(anyhow::Error::from),
        cmd => {
            let request = match cmd {
                Cmd::Lab => cli::Request::Lab,
                Cmd::Lan(LanCmd::Add { name }) => cli::Request::LanAdd(name),
                Cmd::Lan(LanCmd::Rm { name }) => cli::Request::LanRm(name),
                Cmd::Lan(LanCmd::Ls) => cli::Request::LanLs,
                Cmd::Port(PortCmd::Add { name, kind, lan }) => {
                    cli::Request::PortAdd { name, kind, lan }
                }
                Cmd::Port(PortCmd::Rm { name }) => cli::Request::PortRm(name),
                Cmd::Port(PortCmd::Ls) => cli::Request::PortLs,
                Cmd::Port(PortCmd::Move { name, lan, .. }) => cli::Request::PortMove { name, lan },
                Cmd::Port(PortCmd::Stats { name }) => cli::Request::PortStats(name),
                Cmd::Fdb { lan } => cli::Request::Fdb(lan),
                Cmd::Events => cli::Request::Events,
                Cmd::Daemon { .. } | Cmd::Stop => unreachable!("handled above"),
            };
            cli::run(&args.lab, request, out)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ulan: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
