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
    /// Default: `default`, or for `up`/`apply` the lab file's `name`.
    #[arg(long, global = true, env = "ULAN_LAB")]
    lab: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// Follow topology changes, port up/down and node states as they happen.
    Events,
    /// The lab as a graph (lans, nodes, ports, links) for docs and tools.
    Graph {
        /// json, dot (Graphviz) or mermaid; --json means json.
        #[arg(long, default_value = "json")]
        format: ulan::api::web::graph::Format,
    },
    /// The lab in a browser: prints a URL (with a secret token) that
    /// serves the page and the API on a loopback TCP port, until Ctrl-C.
    Web(cli::web::WebArgs),
    /// Live per-port frame and bit rates, drops, data-plane load and MAC
    /// table sizes (from GET /metrics); q or Ctrl-C quits.
    Top {
        /// Time between samples: seconds (1, 0.5) or 500ms, 2s.
        #[arg(long, default_value = "1", value_parser = cli::top::parse_interval)]
        interval: std::time::Duration,
        /// Print one snapshot (two samples an interval apart) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Guests (QEMU or UML) with NICs on the switch.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Attach to a node's serial console (Ctrl-] leaves).
    Console { node: String },
    /// Run a command in a node (built-in image) and exit with its code.
    Exec {
        node: String,
        /// Seconds the command may run.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Guest images: the built-in one and committed disks.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Start a lab from a YAML (or JSON) lab file; starts the daemon if needed.
    Up { file: std::path::PathBuf },
    /// Change the running lab to match a lab file, touching only what differs.
    Apply { file: std::path::PathBuf },
    /// Remove every node, port and lan of the lab and stop its daemon.
    Down,
    /// Print the running lab as a lab file that `ulan up` reproduces.
    Save,
    /// Nodes and lans with their state.
    Ls,
    /// Check this machine: QEMU, KVM, UML, qemu-img, the built-in image...
    Doctor,
    /// Impair a port's traffic (delay, jitter, loss, rate...) like tc netem.
    Netem(cli::instruments::NetemArgs),
    /// Set a port's link up or down (a guest's NIC loses carrier).
    Link {
        port: String,
        /// up | down
        #[arg(value_parser = ["up", "down"])]
        state: String,
    },
    /// A container node's holder (started by the daemon): namespaces,
    /// overlay root, then crun run. With --rm, removes a node's files;
    /// with --commit, merges a node's layers into a new root filesystem.
    #[command(hide = true)]
    ContainerHolder {
        #[arg(long)]
        rm: Option<std::path::PathBuf>,
        #[arg(long, num_args = 3, value_names = ["LOWER", "UPPER", "DEST"])]
        commit: Option<Vec<std::path::PathBuf>>,
        config: Option<std::path::PathBuf>,
    },
    /// RFC 2544-style frame-rate tests (throughput, latency, loss, bursts)
    /// through the daemon, on temporary ports it makes and removes.
    Bench(cli::bench::BenchArgs),
    /// Make a tap in the current network namespace and hand it to a tap
    /// port (what container nodes run inside their namespace). Exits once
    /// the daemon took it; the tap lives on in the daemon.
    #[command(hide = true)]
    TapAttach {
        /// The tap port's socket (its `path` in `ulan port ls --json`).
        #[arg(long)]
        socket: std::path::PathBuf,
        /// Name of the interface to make.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Its MAC (default: derived from the socket path, stable).
        #[arg(long)]
        mac: Option<String>,
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// Capture a port or a lan into pcapng (Wireshark, tshark, tcpdump).
    Capture {
        /// A port, or a lan.
        target: String,
        /// The file to write, or - for stdout (`| wireshark -k -i -`).
        #[arg(short = 'w', long = "write")]
        write: String,
        /// Treat the target as a lan even if a port has its name.
        #[arg(long)]
        lan: bool,
        /// Bytes kept of each frame.
        #[arg(long, short = 's')]
        snaplen: Option<u32>,
        /// Stop after this many seconds (else at Ctrl-C).
        #[arg(long)]
        duration: Option<f64>,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum NodeCmd {
    /// Make a node and start it.
    Add {
        #[command(flatten)]
        args: cli::nodes::NodeArgs,
        /// Return at once instead of waiting until it runs.
        #[arg(long)]
        no_wait: bool,
    },
    Rm {
        name: String,
    },
    Ls,
    Show {
        name: String,
    },
    Start {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Power the guest off (QMP quit after --timeout seconds).
    Stop {
        name: String,
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Turn a stopped node's disk into a new base image.
    Commit {
        name: String,
        image: String,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Make the built-in guest image from this machine's kernel, busybox and iperf3.
    Build {
        #[arg(long, default_value = "builtin")]
        name: String,
        /// Kernel version (default: the newest in /lib/modules with a /boot/vmlinuz).
        #[arg(long)]
        kernel_version: Option<String>,
        /// Rebuild even if it exists.
        #[arg(long)]
        force: bool,
    },
    Ls,
    /// Make a container image from an OCI layout dir, an OCI archive or a docker archive (`docker save`).
    Import {
        file: std::path::PathBuf,
        name: String,
        /// Which image, when the archive holds several (OCI ref name or docker tag).
        #[arg(long = "ref")]
        reference: Option<String>,
        /// Most bytes the image may unpack to, in MiB.
        #[arg(long, default_value_t = ulan::vmlaunch::container::import::DEFAULT_MAX_BYTES >> 20)]
        max_size: u64,
        /// Replace an image of that name.
        #[arg(long)]
        force: bool,
    },
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
        /// stream | dgram | vde | bess | vhost-user | tap (a tap device handed over by `ulan tap-attach`)
        #[arg(long, short)]
        kind: String,
        #[arg(long)]
        lan: Option<String>,
        /// Born with its link down (`ulan link PORT up` later): it forwards
        /// nothing until then.
        #[arg(long)]
        down: bool,
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
    if !matches!(args.cmd, Cmd::Daemon { .. }) {
        // A CLI whose reader went away (`ulan node ls --json | head -1`)
        // ends quietly, as other tools do, instead of panicking on EPIPE.
        // Sockets are unaffected (Rust sends with MSG_NOSIGNAL); the
        // daemon keeps ignoring SIGPIPE.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let explicit_lab = args.lab.clone();
    let lab = explicit_lab.clone().unwrap_or_else(|| "default".into());
    let out = if args.json {
        Output::Json
    } else {
        Output::Table
    };
    let result = match args.cmd {
        Cmd::Up { file } => {
            cli::block_on(cli::labctl::up(explicit_lab.as_deref(), &file, true, out))
        }
        Cmd::Apply { file } => {
            cli::block_on(cli::labctl::up(explicit_lab.as_deref(), &file, false, out))
        }
        Cmd::Down => cli::block_on(cli::labctl::down(&lab, out)),
        Cmd::Save => cli::block_on(cli::labctl::save(&lab, out)),
        Cmd::Ls => cli::block_on(cli::labctl::ls(&lab, out)),
        Cmd::Doctor => cli::doctor(out),
        Cmd::ContainerHolder { rm, commit, config } => {
            use ulan::vmlaunch::container::holder;
            let r = match (rm, commit.as_deref(), config) {
                (_, Some([lower, upper, dest]), _) => holder::commit(lower, upper, dest),
                (Some(dir), _, _) => holder::remove(&dir),
                (None, _, Some(c)) => holder::run(&c).map(|never| match never {}),
                (None, _, None) => Err(holder::HolderError::Other("no config file".into())),
            };
            r.map_err(|e| anyhow::anyhow!("container holder: {e}"))
        }
        Cmd::Netem(a) => {
            let dir_given = std::env::args().any(|x| x == "--dir" || x.starts_with("--dir="));
            cli::block_on(async {
                cli::instruments::netem(&cli::client(&lab), &a, dir_given, out).await
            })
        }
        Cmd::Link { port, state } => cli::block_on(async {
            let state = cli::instruments::parse_link(&state)?;
            cli::instruments::link(&cli::client(&lab), &port, state, out).await
        }),
        Cmd::Capture {
            target,
            write,
            lan: force_lan,
            snaplen,
            duration,
        } => cli::block_on(async {
            let args = cli::instruments::CaptureArgs {
                target,
                lan: force_lan,
                write,
                snaplen,
                duration,
            };
            cli::instruments::capture(&cli::client(&lab), args).await
        }),
        Cmd::TapAttach {
            socket,
            ifname,
            mac,
            mtu,
        } => cli::tap_attach(&socket, &ifname, mac.as_deref(), mtu),
        Cmd::Bench(a) => {
            cli::block_on(async { cli::bench::bench(&cli::client(&lab), &a, out).await })
        }
        Cmd::Graph { format } => cli::block_on(async {
            let format = if out == Output::Json {
                ulan::api::web::graph::Format::Json
            } else {
                format
            };
            cli::web::graph(&cli::client(&lab), format).await
        }),
        Cmd::Web(a) => cli::block_on(async { cli::web::web(&cli::client(&lab), &a).await }),
        Cmd::Top { interval, once } => cli::block_on(async {
            let client = cli::client(&lab);
            cli::top::top(&client, interval, once, out == Output::Json).await
        }),
        Cmd::Image(ImageCmd::Build {
            name,
            kernel_version,
            force,
        }) => cli::image_build(&name, kernel_version, force, out),
        Cmd::Image(ImageCmd::Ls) => cli::image_ls(out),
        Cmd::Image(ImageCmd::Import {
            file,
            name,
            reference,
            max_size,
            force,
        }) => cli::image_import(&file, &name, reference, max_size, force, out),
        Cmd::Console { node } => {
            let client = cli::client(&lab);
            cli::block_on(async { Ok(client.node(&node).await?) })
                .and_then(|n| cli::console::attach(&node, std::path::Path::new(&n.console)))
        }
        Cmd::Exec {
            node,
            timeout,
            argv,
        } => {
            let client = cli::client(&lab);
            match cli::block_on(cli::nodes::exec(&client, &node, &argv, timeout, out)) {
                Ok(code) => return ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => Err(e),
            }
        }
        Cmd::Node(cmd) => {
            let client = cli::client(&lab);
            cli::block_on(async {
                match cmd {
                    NodeCmd::Add { args, no_wait } => {
                        cli::nodes::add(&client, &args, !no_wait, out).await
                    }
                    NodeCmd::Rm { name } => cli::nodes::rm(&client, &name, out).await,
                    NodeCmd::Ls => cli::nodes::ls(&client, out).await,
                    NodeCmd::Show { name } => cli::nodes::show(&client, &name, out).await,
                    NodeCmd::Start { name, no_wait } => {
                        cli::nodes::start(&client, &name, !no_wait, out).await
                    }
                    NodeCmd::Stop { name, timeout } => {
                        cli::nodes::stop(&client, &name, timeout, out).await
                    }
                    NodeCmd::Commit { name, image } => {
                        cli::nodes::commit(&client, &name, &image, out).await
                    }
                }
            })
        }
        Cmd::Daemon { detach, aging } => {
            let opts = DaemonOptions {
                lab: lab.clone(),
                aging_secs: aging,
            };
            if detach {
                daemon::detach(&opts).map(|pid| {
                    let api = daemon::api_socket(&lab);
                    if out == Output::Json {
                        println!(
                            "{}",
                            serde_json::json!({"lab": lab, "pid": pid, "api_socket": api})
                        );
                    } else {
                        println!(
                            "ulan daemon for lab {lab} running (pid {pid}), API at {}",
                            api.display()
                        );
                    }
                })
            } else {
                init_logging();
                daemon::run(opts)
            }
            .map_err(anyhow::Error::from)
        }
        Cmd::Stop => daemon::stop(&lab)
            .map(|pid| {
                if out == Output::Json {
                    println!(
                        "{}",
                        serde_json::json!({"lab": lab, "pid": pid, "stopped": true})
                    );
                } else {
                    println!("ulan daemon for lab {lab} (pid {pid}) stopped");
                }
            })
            .map_err(anyhow::Error::from),
        cmd => {
            let request = match cmd {
                Cmd::Lab => cli::Request::Lab,
                Cmd::Lan(LanCmd::Add { name }) => cli::Request::LanAdd(name),
                Cmd::Lan(LanCmd::Rm { name }) => cli::Request::LanRm(name),
                Cmd::Lan(LanCmd::Ls) => cli::Request::LanLs,
                Cmd::Port(PortCmd::Add {
                    name,
                    kind,
                    lan,
                    down,
                }) => cli::Request::PortAdd {
                    name,
                    kind,
                    lan,
                    down,
                },
                Cmd::Port(PortCmd::Rm { name }) => cli::Request::PortRm(name),
                Cmd::Port(PortCmd::Ls) => cli::Request::PortLs,
                Cmd::Port(PortCmd::Move { name, lan, .. }) => cli::Request::PortMove { name, lan },
                Cmd::Port(PortCmd::Stats { name }) => cli::Request::PortStats(name),
                Cmd::Fdb { lan } => cli::Request::Fdb(lan),
                Cmd::Events => cli::Request::Events,
                _ => unreachable!("handled above"),
            };
            cli::run(&lab, request, out)
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
