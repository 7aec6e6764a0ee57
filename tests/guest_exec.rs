//! The exec agent end to end: one real QEMU guest (TCG) of the built-in
//! image, driven only through `Lab::exec_node` (host side
//! `src/vmlaunch/agent.rs`, guest side `src/vmlaunch/guest/agent.sh`).
//!
//! One boot for every check, so the test costs one guest's start.

mod common;

use std::time::{Duration, Instant};

use common::guests::*;
use ulan::lab::LabError;
use ulan::vmlaunch::agent::{AgentError, ExecOutput, MAX_COMMAND, MAX_OUTPUT};
use ulan::vmlaunch::node::{NodeError, NodeState};

const NODE: &str = "ex1";
const IP: &str = "10.9.0.5/24";

/// `argv` in the guest through the agent with the given timeout.
fn run(g: &GuestLab, node: &str, argv: &[&str], timeout: Duration) -> Result<ExecOutput, LabError> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    g.rt.block_on(g.lab.exec_node(node, &argv, timeout))
}

/// The guest's process list (busybox `ps`), checked to be a real one: it
/// shows the agent and the watchdog of the very `ps` it runs (`g.exec`
/// gives 60 s), so an absent watchdog or command is really absent.
/// Busybox shows an applet forked without exec as `{applet} <parent's
/// command line>`, so callers look for substrings, not whole lines.
fn processes(g: &GuestLab) -> String {
    let ps = g.exec(NODE, &["ps"]);
    assert_eq!(ps.exit_code, 0, "ps failed: {ps:?}");
    assert!(
        ps.stdout.contains("/etc/ulan/agent") && ps.stdout.contains("sleep 60"),
        "ps does not list the agent and its own watchdog, so it proves nothing:\n{}",
        ps.stdout
    );
    ps.stdout
}

/// Lines of a `ps` listing that mention `what`.
fn mentioning(ps: &str, what: &str) -> Vec<String> {
    ps.lines()
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

/// Processes (`pid: command line`) whose environment holds the line
/// `mark`: whatever a command started under `env MARK sh -c ...` forked,
/// exec'd or not, inherits it.
fn marked(g: &GuestLab, mark: &str) -> Vec<String> {
    let script = r#"for d in /proc/[0-9]*; do
        if tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qxF "$1"; then
            echo "${d#/proc/}: $(tr '\0' ' ' <"$d/cmdline")"
        fi
    done"#;
    let r = g.exec(NODE, &["sh", "-c", script, "_", mark]);
    assert_eq!(r.exit_code, 0, "listing processes marked {mark}: {r:?}");
    r.stdout.lines().map(str::to_string).collect()
}

#[test]
fn exec_agent_semantics_in_a_real_guest() {
    if skip_without_guests("exec_agent_semantics_in_a_real_guest") {
        return;
    }
    let t0 = Instant::now();
    let g = GuestLab::new("exec");
    g.lab.add_lan("l").unwrap();
    let mut spec = GuestLab::spec(NODE, &["l"]);
    spec.nics[0].ip = vec![IP.parse().unwrap()];
    g.add(spec);
    g.wait_running(&[NODE]);
    eprintln!("guest running after {:?}", t0.elapsed());

    // 1. Exit codes pass through unchanged.
    let r = g.exec(NODE, &["sh", "-c", "exit 7"]);
    assert_eq!(r.exit_code, 7, "`sh -c 'exit 7'` must give rc 7: {r:?}");
    let r = g.exec(NODE, &["sh", "-c", "exit 255"]);
    assert_eq!(r.exit_code, 255, "`exit 255` must give rc 255: {r:?}");
    let r = g.exec(NODE, &["true"]);
    assert_eq!(
        r,
        ExecOutput {
            exit_code: 0,
            stdout: String::new(),
            stderr: String::new()
        },
        "`true` must give rc 0 and no output"
    );
    let r = g.exec(NODE, &["false"]);
    assert_eq!(r.exit_code, 1, "`false` must give rc 1: {r:?}");
    let r = g.exec(NODE, &["/nonexistent/cmd", "arg"]);
    assert_eq!(
        r.exit_code, 127,
        "a missing command must give the shell's 127: {r:?}"
    );
    assert!(
        r.stderr.contains("/nonexistent/cmd") && r.stdout.is_empty(),
        "a missing command must be named on stderr: {r:?}"
    );
    let r = g.exec(NODE, &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        r.exit_code, 143,
        "a command killed by SIGTERM must give 128+15: {r:?}"
    );

    // 2. stdout and stderr are kept apart.
    let r = g.exec(NODE, &["sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(r.stdout, "out\n", "stdout must hold only stdout: {r:?}");
    assert_eq!(r.stderr, "err\n", "stderr must hold only stderr: {r:?}");

    // 3. argv words arrive byte for byte, with no shell re-interpretation.
    let tricky = "a b  \"dq\" 'sq' $HOME $(id) `id` \\n\\ back\\slash\nline2\t* ; | & é ~";
    for word in [tricky, "", "-n", "'", "\\", "$", "\n"] {
        let r = g.exec(NODE, &["printf", "[%s]", word]);
        assert_eq!(r.exit_code, 0, "{word:?}: {r:?}");
        assert_eq!(
            r.stdout,
            format!("[{word}]"),
            "argument {word:?} was changed on its way to the guest"
        );
    }
    let r = g.exec(
        NODE,
        &[
            "sh",
            "-c",
            "printf '%s|' \"$#\" \"$@\"",
            "_",
            "x y",
            "",
            "z",
        ],
    );
    assert_eq!(
        r.stdout, "3|x y||z|",
        "word boundaries (and an empty word) must survive: {r:?}"
    );

    // 4. A 64 KiB argument arrives whole; the documented limit is the
    // quoted command line's MAX_COMMAND bytes, and over it is a clear error.
    let big: String = "0123456789abcdef 'q' $x \"d\" \\ \n"
        .chars()
        .cycle()
        .take(64 << 10)
        .collect();
    assert_eq!(big.len(), 65536);
    let r = g.exec(NODE, &["sh", "-c", "printf %s \"$1\" | wc -c", "_", &big]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout.trim(),
        "65536",
        "the 64 KiB argument did not arrive whole"
    );
    let r = g.exec(NODE, &["printf", "%s", &big]);
    assert!(
        r.exit_code == 0 && r.stdout == big,
        "the 64 KiB argument came back changed (rc {}, {} bytes)",
        r.exit_code,
        r.stdout.len()
    );
    // `printf %s WORD` with a plain WORD is sent unquoted: exactly
    // MAX_COMMAND bytes is accepted and runs, one more is refused.
    let prefix = "printf %s ";
    let at_limit = "x".repeat(MAX_COMMAND - prefix.len());
    let r = g.exec(NODE, &["printf", "%s", &at_limit]);
    assert!(
        r.exit_code == 0 && r.stdout == at_limit,
        "a command line of exactly MAX_COMMAND ({MAX_COMMAND}) bytes must run intact \
         (rc {}, {} bytes back)",
        r.exit_code,
        r.stdout.len()
    );
    let over = "x".repeat(MAX_COMMAND - prefix.len() + 1);
    let err = run(&g, NODE, &["printf", "%s", &over], Duration::from_secs(60)).unwrap_err();
    assert!(
        matches!(
            err,
            LabError::Node(NodeError::Agent {
                source: AgentError::CommandTooLong,
                ..
            })
        ),
        "a command line over MAX_COMMAND must be refused as too long, got: {err}"
    );
    assert!(
        err.to_string().contains("longer than"),
        "the too-long error must say so: {err}"
    );
    let r = g.exec(NODE, &["true"]);
    assert_eq!(r.exit_code, 0, "the agent is unusable after a refusal");

    // 5. Large output: 1 MiB of stdout and 64 KiB of stderr, exact.
    let t = Instant::now();
    let r = g.exec(
        NODE,
        &[
            "sh",
            "-c",
            "head -c 1048576 /dev/zero | tr '\\0' a; head -c 65536 /dev/zero | tr '\\0' b >&2",
        ],
    );
    eprintln!("1 MiB + 64 KiB of output in {:?}", t.elapsed());
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.len(), 1 << 20, "stdout length");
    assert!(
        r.stdout.bytes().all(|b| b == b'a'),
        "stdout content changed"
    );
    assert_eq!(r.stderr.len(), 64 << 10, "stderr length");
    assert!(
        r.stderr.bytes().all(|b| b == b'b'),
        "stderr content changed"
    );

    // Two execs at once are serialized and each gets its own reply.
    let (a, b) = g.rt.block_on(async {
        let one = ["sh".to_string(), "-c".into(), "sleep 1; echo one".into()];
        let two = ["sh".to_string(), "-c".into(), "echo two >&2; exit 3".into()];
        let t = Duration::from_secs(60);
        tokio::join!(
            g.lab.exec_node(NODE, &one, t),
            g.lab.exec_node(NODE, &two, t)
        )
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        (a.exit_code, a.stdout.as_str(), a.stderr.as_str()),
        (0, "one\n", ""),
        "concurrent exec one got another's reply: {a:?}"
    );
    assert_eq!(
        (b.exit_code, b.stdout.as_str(), b.stderr.as_str()),
        (3, "", "two\n"),
        "concurrent exec two got another's reply: {b:?}"
    );

    // What a command leaves running on purpose (a daemon, as `iperf3 -D`)
    // keeps running, and the marker finds it: the absence checks below
    // can see such processes.
    let r = g.exec(
        NODE,
        &[
            "env",
            "ULAN_MARK=daemon",
            "sh",
            "-c",
            "sleep 33 >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(r.exit_code, 0, "{r:?}");
    let daemon = marked(&g, "ULAN_MARK=daemon");
    assert!(
        daemon.iter().any(|p| p.contains("sleep 33")),
        "a background process of a finished command must keep running: {daemon:?}"
    );
    assert!(
        mentioning(&processes(&g), "sleep 33").len() == 1,
        "ps must show the daemon"
    );
    for p in &daemon {
        let pid = p.split(':').next().unwrap();
        let r = g.exec(NODE, &["kill", pid]);
        assert_eq!(r.exit_code, 0, "killing the daemon {p}: {r:?}");
    }

    // A command that ends in time leaves no watchdog behind.
    let r = run(&g, NODE, &["true"], Duration::from_secs(47)).unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let left = mentioning(&processes(&g), "sleep 47");
    assert!(
        left.is_empty(),
        "the watchdog of a finished command is still running: {left:?}"
    );

    // 6. A timeout kills the command's whole process group (137), the
    // reply comes promptly and the agent keeps working.
    let t = Instant::now();
    let r = run(
        &g,
        NODE,
        &[
            "env",
            "ULAN_MARK=timeout",
            "sh",
            "-c",
            "sleep 31 & sleep 30",
        ],
        Duration::from_secs(2),
    )
    .unwrap();
    let took = t.elapsed();
    eprintln!("timed-out exec returned after {took:?}");
    assert_eq!(
        r.exit_code, 137,
        "a command killed at its timeout must give 137: {r:?}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "the command was stopped before its 2 s timeout ({took:?})"
    );
    assert!(
        took < Duration::from_secs(10),
        "a 2 s timeout took {took:?} to come back"
    );
    let t = Instant::now();
    let r = g.exec(NODE, &["true"]);
    let took = t.elapsed();
    assert_eq!(
        r.exit_code, 0,
        "the agent is unusable after a timeout: {r:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "`true` after a timeout took {took:?}"
    );
    let left = marked(&g, "ULAN_MARK=timeout");
    assert!(
        left.is_empty(),
        "processes of the timed-out command outlived its kill: {left:?}"
    );
    let ps = processes(&g);
    for what in ["sleep 30", "sleep 31", "sleep 2;"] {
        let left = mentioning(&ps, what);
        assert!(
            left.is_empty(),
            "`{what}` outlived the timeout kill: {left:?}\n{ps}"
        );
    }
    let watchdog_sleep: Vec<&str> = ps
        .lines()
        .filter(|l| l.trim_end().ends_with(" sleep 2"))
        .collect();
    assert!(
        watchdog_sleep.is_empty(),
        "the timed-out command's watchdog outlived it: {watchdog_sleep:?}"
    );

    // 7. Hostname and address from the spec.
    let r = g.exec(NODE, &["hostname"]);
    assert_eq!(
        r.stdout.trim(),
        NODE,
        "hostname is not the node name: {r:?}"
    );
    let mac = g.lab.node(NODE).unwrap().nics[0].mac.to_string();
    let r = g.exec(NODE, &["ip", "addr", "show"]);
    assert_eq!(r.exit_code, 0, "{r:?}");
    // Interface blocks: a header line, then indented lines.
    let mut blocks: Vec<String> = Vec::new();
    for line in r.stdout.lines() {
        match blocks.last_mut() {
            Some(b) if line.starts_with(' ') => {
                b.push('\n');
                b.push_str(line);
            }
            _ => blocks.push(line.to_string()),
        }
    }
    let nic = blocks
        .iter()
        .find(|b| b.contains(&format!("link/ether {mac}")))
        .unwrap_or_else(|| panic!("no interface with the NIC's MAC {mac}:\n{}", r.stdout));
    assert!(
        nic.contains(&format!("inet {IP}")),
        "the NIC ({mac}) does not have {IP}:\n{nic}"
    );
    assert!(
        nic.lines().next().is_some_and(|h| h.contains(",UP")),
        "the NIC is not up:\n{nic}"
    );

    // Output over MAX_OUTPUT per stream is an error, not a truncation; the
    // host reads past the refused reply, so the next exec is clean.
    let t = Instant::now();
    let too_much = (MAX_OUTPUT + 1).to_string();
    let err = run(
        &g,
        NODE,
        &["head", "-c", &too_much, "/dev/zero"],
        Duration::from_secs(60),
    )
    .unwrap_err();
    eprintln!("over-long output refused after {:?}", t.elapsed());
    assert!(
        matches!(
            err,
            LabError::Node(NodeError::Agent {
                source: AgentError::TooLarge,
                ..
            })
        ),
        "output over MAX_OUTPUT ({MAX_OUTPUT}) must be refused as too large, got: {err}"
    );
    assert!(
        err.to_string().contains("larger than"),
        "the too-large error must say so: {err}"
    );
    for _ in 0..3 {
        let t = Instant::now();
        let out = run(&g, NODE, &["echo", "hi"], Duration::from_secs(20)).unwrap();
        assert_eq!(out.stdout, "hi\n");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "exec after a refused reply took {:?}",
            t.elapsed()
        );
    }

    // 8. Exec on a stopped node or an unknown one is a clear error.
    let err = run(&g, "nosuchnode", &["true"], Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(err, LabError::NotFound { what: "node", .. }),
        "exec on an unknown node must be NotFound, got: {err}"
    );
    let info =
        g.rt.block_on(g.lab.stop_node(NODE, Some(Duration::from_secs(5))))
            .unwrap();
    assert_eq!(info.state, NodeState::Stopped, "{info:?}");
    let t = Instant::now();
    let err = run(&g, NODE, &["true"], Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(
            err,
            LabError::Node(NodeError::Busy {
                state: NodeState::Stopped,
                ..
            })
        ),
        "exec on a stopped node must be Busy(stopped), got: {err}"
    );
    assert!(
        err.to_string().contains("stopped") && err.to_string().contains("start it first"),
        "the error must say the node is stopped and what to do: {err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "exec on a stopped node must fail at once, took {:?}",
        t.elapsed()
    );
    eprintln!("whole test: {:?}", t0.elapsed());
}
