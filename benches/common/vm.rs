//! Two built-in-image guests running iperf3 through an in-process lab:
//! what `vm_iperf` measures for each QEMU transport, and what the
//! container bench compares its path with.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use ulan::lab::{Lab, LabConfig};
use ulan::vmlaunch::agent;
use ulan::vmlaunch::image::Image;
use ulan::vmlaunch::qemu::accel::{self, KvmStatus};
use ulan::vmlaunch::spec::{Accel, NodeSpec, Transport};

pub const MEMORY_MB: u32 = 256;
pub const BOOT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy)]
pub struct Run {
    pub mbps: f64,
    pub retransmits: u64,
}

/// Whether KVM works with the image's kernel here (probed once, cached).
pub fn kvm_usable(img: &Image) -> bool {
    let kernel = img.kernel_path().unwrap_or_default();
    let status = accel::probe_kvm_cached(
        Path::new("qemu-system-x86_64"),
        &kernel,
        Duration::from_secs(20),
    );
    matches!(status, KvmStatus::Usable)
}

pub fn spec(name: &str, ip: &str) -> NodeSpec {
    let mut s = NodeSpec::new(name, &["l"]);
    s.memory_mb = MEMORY_MB;
    s.nics[0].ip = vec![ip.parse().expect("address")];
    s
}

pub async fn exec(sock: &Path, argv: &[&str], secs: u64) -> Result<String, String> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let out = agent::exec(sock, &argv, Duration::from_secs(secs))
        .await
        .map_err(|e| e.to_string())?;
    if out.exit_code != 0 {
        return Err(format!(
            "{argv:?} exited {}: {}{}",
            out.exit_code, out.stdout, out.stderr
        ));
    }
    Ok(out.stdout)
}

/// iperf3 from the guest at `a` to the one at `b` (address `b_ip`).
pub async fn iperf(a: &Path, b: &Path, b_ip: &str, secs: u64) -> Result<Run, String> {
    exec(b, &["iperf3", "-s", "-D", "-1"], 10).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = secs.to_string();
    let json = exec(a, &["iperf3", "-c", b_ip, "-t", &t, "-J"], secs + 30).await?;
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or("no sum_received in iperf3's report")?;
    Ok(Run {
        mbps: bps / 1e6,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// Waits for both guests' agents, then `runs` iperf3 runs from a to b.
pub async fn measure(
    a: &Path,
    b: &Path,
    b_ip: &str,
    secs: u64,
    runs: usize,
) -> Result<Vec<Run>, String> {
    agent::wait_ready(a, Instant::now() + BOOT)
        .await
        .map_err(|e| e.to_string())?;
    agent::wait_ready(b, Instant::now() + BOOT)
        .await
        .map_err(|e| e.to_string())?;
    // A first ping fills the ARP caches.
    let _ = exec(a, &["ping", "-c", "1", "-W", "2", b_ip], 10).await;
    let mut out = Vec::new();
    for _ in 0..runs {
        out.push(iperf(a, b, b_ip, secs).await?);
    }
    Ok(out)
}

/// Two guests on one lan of an in-process lab, each NIC over `transport`.
pub async fn through_ulan(
    store: &Path,
    transport: Transport,
    kvm: bool,
    secs: u64,
    runs: usize,
) -> Result<Vec<Run>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut config = LabConfig::new("bench", &dir.path().join("run"));
    config.nodes.images_dir = store.to_path_buf();
    config.nodes.data_dir = dir.path().join("data");
    let lab: Arc<Lab> = Lab::start(config).map_err(|e| e.to_string())?;
    let result = async {
        lab.add_lan("l").map_err(|e| e.to_string())?;
        for (name, ip) in [("a", "10.9.0.1/24"), ("b", "10.9.0.2/24")] {
            let mut s = spec(name, ip);
            s.nics[0].transport = Some(transport);
            s.accel = if kvm { Accel::Kvm } else { Accel::Tcg };
            lab.add_node(s).await.map_err(|e| e.to_string())?;
        }
        let agent = |n: &str| lab.run_dir().join("nodes").join(n).join("agent.sock");
        measure(&agent("a"), &agent("b"), "10.9.0.2", secs, runs).await
    }
    .await;
    lab.stop_all_nodes().await;
    lab.shutdown();
    result
}
