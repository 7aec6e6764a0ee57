//! Gathers what `GET /metrics` shows (rendered by [`crate::metrics`]).

use tokio::sync::oneshot;

use super::Lab;
use crate::metrics::{thread_cpu_ns, LanSample, PortSample, Snapshot, ThreadSample};
use crate::switch::dataplane::Command;

impl Lab {
    /// Every port's counters, each lan's MAC table size (asked of the data
    /// plane between batches, one question per lan), the data plane's
    /// load, and each node's state.
    pub async fn metrics(&self) -> Snapshot {
        let (ports, lans) = {
            let st = self.state();
            let ports: Vec<PortSample> = st
                .ports
                .iter()
                .map(|(name, p)| PortSample {
                    name: name.clone(),
                    kind: p.kind,
                    lan: p.lan.clone(),
                    up: p.shared.is_up(),
                    counters: p.shared.counters.load(),
                })
                .collect();
            let lans: Vec<(String, u32, usize)> = st
                .lans
                .iter()
                .map(|(name, l)| (name.clone(), l.id, st.lan_info(name).ports.len()))
                .collect();
            (ports, lans)
        };
        let mut lan_samples = Vec::with_capacity(lans.len());
        for (name, id, nports) in lans {
            let (reply, rx) = oneshot::channel();
            let fdb_entries = match self.dataplane.send(Command::Fdb { lan: id, reply }) {
                Ok(()) => rx.await.ok().map(|rows| rows.len()),
                Err(_) => None,
            };
            lan_samples.push(LanSample {
                name,
                ports: nports,
                fdb_entries,
            });
        }
        let load = self.dataplane.stats().load();
        Snapshot {
            lab: self.name().to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            ports,
            lans: lan_samples,
            nodes: self
                .nodes()
                .into_iter()
                .map(|n| (n.name, n.state))
                .collect(),
            dataplane: vec![ThreadSample {
                load,
                cpu_ns: thread_cpu_ns(load.tid),
            }],
        }
    }
}
