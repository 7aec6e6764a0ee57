//! iperf3 between user+network namespaces (no root needed): the kernel's
//! own paths that the tap and container benches measure ulan against.

use std::process::{Child, Command, Stdio};

const NS: [&str; 3] = ["--user", "--map-root-user", "--net"];

/// `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Gbit/s from `iperf3 -J` output (what the receiver counted).
pub fn gbits(json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(v["end"]["sum_received"]["bits_per_second"].as_f64()? / 1e9)
}

/// `sh -c script` in a new user (mapped to root) + network namespace,
/// with `extra` unshare flags; killed after 120 s.
pub fn sh_in_ns(extra: &[&str], script: &str) -> Child {
    Command::new("timeout")
        .arg("120")
        .arg("unshare")
        .args(NS)
        .args(extra)
        .args(["sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare")
}

/// Waits for an iperf3 client and reads its Gbit/s.
pub fn finish(child: Child, what: &str) -> Result<f64, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{what}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let json = &text[text.find('{').unwrap_or(0)..];
    gbits(json).ok_or_else(|| format!("{what}: no iperf3 result in {text}"))
}

/// The kernel paths, in one user + net + mount namespace: `ip netns`
/// namespaces a and b joined by a veth pair, or (`bridge`) each by a
/// veth to a Linux bridge in a third namespace.
pub fn kernel_path(bridge: bool, secs: u64) -> Result<f64, String> {
    let link = if bridge {
        "ip netns add br
         ip -n br link add b0 type bridge
         ip -n br link set b0 up
         ip link add va netns a type veth peer name pa netns br
         ip link add vb netns b type veth peer name pb netns br
         for p in pa pb; do ip -n br link set $p master b0; ip -n br link set $p up; done"
    } else {
        "ip link add va netns a type veth peer name vb netns b"
    };
    let script = format!(
        "set -e
        mount -t tmpfs tmpfs /run
        mkdir -p /run/netns
        ip netns add a; ip netns add b
        {link}
        ip -n a link set va up; ip -n b link set vb up
        ip -n a addr add 10.1.0.1/24 dev va; ip -n b addr add 10.1.0.2/24 dev vb
        ip netns exec a iperf3 -s -1 -D -B 10.1.0.1
        sleep 0.3
        ip netns exec b iperf3 -c 10.1.0.1 -t {secs} -J"
    );
    finish(sh_in_ns(&["--mount"], &script), "kernel path")
}

/// The median (the upper one of an even count); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The summed CPU time (ns) of a process's threads named `comm`.
pub fn threads_cpu_ns(pid: u32, comm: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .filter_map(|t| super::cpu_ns(&t.path().join("stat").to_string_lossy()))
        .sum()
}
