//! The learning-switch decision for one frame: pure logic over a topology
//! snapshot and the lans' forwarding databases, no sockets and no clock.

use crate::switch::fdb::{Fdb, Learned};
use crate::switch::topology::Snapshot;
use crate::switch::{LanId, PortId};
use crate::wire::{EthernetFrame, MacAddr};

/// Where one frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The ingress port is on no lan: dropped.
    NoLan,
    /// Unicast to an address learned on the ingress port: dropped.
    Filtered,
    /// Known unicast: exactly one egress port.
    Unicast(PortId),
    /// Broadcast, multicast or unknown unicast: every other port of the lan.
    Flood(LanId),
}

/// One learned address, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbRow {
    pub mac: MacAddr,
    pub port: PortId,
    pub age_ms: u64,
}

#[derive(Debug)]
pub struct Forwarder {
    fdbs: Vec<Option<Fdb>>,
    aging_ms: u64,
    capacity: usize,
}

impl Forwarder {
    pub fn new(aging_ms: u64, capacity: usize) -> Self {
        Forwarder {
            fdbs: Vec::new(),
            aging_ms,
            capacity,
        }
    }

    fn fdb_mut(&mut self, lan: LanId) -> &mut Fdb {
        let i = lan as usize;
        if self.fdbs.len() <= i {
            self.fdbs.resize_with(i + 1, || None);
        }
        let (aging, cap) = (self.aging_ms, self.capacity);
        self.fdbs[i].get_or_insert_with(|| Fdb::new(aging, cap))
    }

    /// Learns the source and decides where `frame` from `ingress` goes.
    /// Returns the decision and what learning did (for counters).
    pub fn decide(
        &mut self,
        snap: &Snapshot,
        ingress: PortId,
        frame: &EthernetFrame<'_>,
        now_ms: u64,
    ) -> (Decision, Learned) {
        let Some(lan) = snap.lan_of(ingress) else {
            return (Decision::NoLan, Learned::NotLearnable);
        };
        let fdb = self.fdb_mut(lan);
        let learned = fdb.learn(frame.src(), ingress, now_ms);
        let dst = frame.dst();
        if dst.is_multicast() {
            return (Decision::Flood(lan), learned);
        }
        match fdb.lookup(dst, now_ms) {
            Some(p) if p == ingress => (Decision::Filtered, learned),
            // The table may briefly name a port that just left the lan;
            // the snapshot is the truth, so flood rather than misdeliver.
            Some(p) if snap.lan_of(p) == Some(lan) => (Decision::Unicast(p), learned),
            _ => (Decision::Flood(lan), learned),
        }
    }

    /// Applies a topology change: ports that changed lan or vanished lose
    /// their entries, removed lans lose their tables.
    pub fn sync(&mut self, old: &Snapshot, new: &Snapshot) {
        let n = old.port_lan.len().max(new.port_lan.len());
        for port in 0..n as PortId {
            if let Some(old_lan) = old.lan_of(port) {
                if new.lan_of(port) != Some(old_lan) {
                    if let Some(Some(f)) = self.fdbs.get_mut(old_lan as usize) {
                        f.forget_port(port);
                    }
                }
            }
        }
        for (lan, slot) in self.fdbs.iter_mut().enumerate() {
            if slot.is_some() && !new.lan_exists(lan as LanId) {
                *slot = None;
            }
        }
    }

    /// A port was removed (its id may be reused): forget it everywhere.
    pub fn forget_port(&mut self, port: PortId) {
        for f in self.fdbs.iter_mut().flatten() {
            f.forget_port(port);
        }
    }

    pub fn age(&mut self, now_ms: u64) -> usize {
        self.fdbs.iter_mut().flatten().map(|f| f.age(now_ms)).sum()
    }

    pub fn rows(&self, lan: LanId, now_ms: u64) -> Vec<FdbRow> {
        let Some(Some(f)) = self.fdbs.get(lan as usize) else {
            return Vec::new();
        };
        let mut rows: Vec<FdbRow> = f
            .iter()
            .filter(|(_, e)| now_ms.saturating_sub(e.last_seen_ms) < f.aging_ms())
            .map(|(mac, e)| FdbRow {
                mac: *mac,
                port: e.port,
                age_ms: now_ms.saturating_sub(e.last_seen_ms),
            })
            .collect();
        rows.sort_by_key(|r| r.mac);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::write_header;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        write_header(&mut f, dst, src, 0x88b5);
        f
    }

    /// Two lans: lan 0 = ports 0,1,2; lan 1 = ports 3,4; port 5 on none.
    fn snap() -> Snapshot {
        Snapshot {
            generation: 1,
            port_lan: vec![Some(0), Some(0), Some(0), Some(1), Some(1), None],
            lan_ports: vec![Some(vec![0, 1, 2]), Some(vec![3, 4])],
        }
    }

    fn decide(fw: &mut Forwarder, s: &Snapshot, p: PortId, f: &[u8], now: u64) -> Decision {
        fw.decide(s, p, &EthernetFrame::new_checked(f).unwrap(), now)
            .0
    }

    #[test]
    fn floods_unknown_then_unicasts_learned() {
        let s = snap();
        let mut fw = Forwarder::new(300_000, 100);
        assert_eq!(
            decide(&mut fw, &s, 0, &frame(mac(2), mac(1)), 0),
            Decision::Flood(0)
        );
        assert_eq!(
            decide(&mut fw, &s, 1, &frame(mac(1), mac(2)), 1),
            Decision::Unicast(0)
        );
        assert_eq!(
            decide(&mut fw, &s, 0, &frame(mac(2), mac(1)), 2),
            Decision::Unicast(1)
        );
        assert_eq!(
            decide(&mut fw, &s, 0, &frame(MacAddr::BROADCAST, mac(1)), 3),
            Decision::Flood(0)
        );
        // Same-port unicast is filtered.
        assert_eq!(
            decide(&mut fw, &s, 1, &frame(mac(2), mac(7)), 4),
            Decision::Filtered
        );
    }

    #[test]
    fn lans_are_isolated_and_detached_ports_drop() {
        let s = snap();
        let mut fw = Forwarder::new(300_000, 100);
        decide(&mut fw, &s, 0, &frame(MacAddr::BROADCAST, mac(1)), 0);
        // mac(1) is known on lan 0, not on lan 1: a lan-1 frame to it floods lan 1.
        assert_eq!(
            decide(&mut fw, &s, 3, &frame(mac(1), mac(3)), 1),
            Decision::Flood(1)
        );
        assert_eq!(
            decide(&mut fw, &s, 5, &frame(mac(1), mac(5)), 1),
            Decision::NoLan
        );
    }

    #[test]
    fn moving_a_port_forgets_its_addresses() {
        let s = snap();
        let mut fw = Forwarder::new(300_000, 100);
        decide(&mut fw, &s, 1, &frame(MacAddr::BROADCAST, mac(2)), 0);
        assert_eq!(
            decide(&mut fw, &s, 0, &frame(mac(2), mac(1)), 1),
            Decision::Unicast(1)
        );
        let mut moved = s.clone();
        moved.generation = 2;
        moved.port_lan[1] = Some(1);
        moved.lan_ports[0] = Some(vec![0, 2]);
        moved.lan_ports[1] = Some(vec![1, 3, 4]);
        fw.sync(&s, &moved);
        assert_eq!(
            decide(&mut fw, &moved, 0, &frame(mac(2), mac(1)), 2),
            Decision::Flood(0)
        );
        assert!(fw.rows(0, 2).iter().all(|r| r.port != 1));
    }

    #[test]
    fn entries_age_out() {
        let s = snap();
        let mut fw = Forwarder::new(1000, 100);
        decide(&mut fw, &s, 1, &frame(MacAddr::BROADCAST, mac(2)), 0);
        assert_eq!(
            decide(&mut fw, &s, 0, &frame(mac(2), mac(1)), 999),
            Decision::Unicast(1)
        );
        assert_eq!(
            decide(&mut fw, &s, 0, &frame(mac(2), mac(1)), 1000),
            Decision::Flood(0)
        );
        assert_eq!(fw.age(5000), 2);
        assert!(fw.rows(0, 5000).is_empty());
    }

    /// The `forwarding` fuzz target's checks over pseudo-random scripts
    /// (a cheap stand-in that runs with every `cargo test`).
    #[test]
    fn random_scripts_keep_the_forwarding_rules() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let len = (next() % 600) as usize;
            let script: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            crate::testkit::forwarding_script::run(&script);
        }
    }
}
