//! The forwarding database of one lan: which port a MAC was last seen on.
//!
//! Time is passed in (milliseconds on the data plane's clock) so tests can
//! step it; nothing here reads a clock.

use crate::switch::PortId;
use crate::wire::MacAddr;
use rustc_hash::FxHashMap;

/// Upper bound on learned addresses per lan, so a client spraying random
/// source MACs costs a counter, not memory.
pub const DEFAULT_FDB_CAPACITY: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub port: PortId,
    pub last_seen_ms: u64,
}

/// What learning a source address did, for counters and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    Refreshed,
    New,
    Moved {
        from: PortId,
    },
    /// Group or all-zero source: never learned.
    NotLearnable,
    /// The table is full; the frame is still forwarded.
    TableFull,
}

#[derive(Debug)]
pub struct Fdb {
    entries: FxHashMap<MacAddr, FdbEntry>,
    aging_ms: u64,
    capacity: usize,
}

impl Fdb {
    pub fn new(aging_ms: u64, capacity: usize) -> Self {
        Fdb {
            entries: FxHashMap::default(),
            aging_ms,
            capacity,
        }
    }

    pub fn learn(&mut self, mac: MacAddr, port: PortId, now_ms: u64) -> Learned {
        if !mac.is_learnable() {
            return Learned::NotLearnable;
        }
        if let Some(e) = self.entries.get_mut(&mac) {
            e.last_seen_ms = now_ms;
            if e.port == port {
                return Learned::Refreshed;
            }
            let from = e.port;
            e.port = port;
            return Learned::Moved { from };
        }
        if self.entries.len() >= self.capacity {
            return Learned::TableFull;
        }
        self.entries.insert(
            mac,
            FdbEntry {
                port,
                last_seen_ms: now_ms,
            },
        );
        Learned::New
    }

    /// The port a unicast address lives on, if known and not aged out.
    pub fn lookup(&self, mac: MacAddr, now_ms: u64) -> Option<PortId> {
        let e = self.entries.get(&mac)?;
        (now_ms.saturating_sub(e.last_seen_ms) < self.aging_ms).then_some(e.port)
    }

    /// Drops entries older than the aging time. Returns how many went.
    pub fn age(&mut self, now_ms: u64) -> usize {
        let before = self.entries.len();
        let aging = self.aging_ms;
        self.entries
            .retain(|_, e| now_ms.saturating_sub(e.last_seen_ms) < aging);
        before - self.entries.len()
    }

    /// Forgets everything learned on `port` (it left the lan or went away).
    pub fn forget_port(&mut self, port: PortId) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.port != port);
        before - self.entries.len()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&MacAddr, &FdbEntry)> {
        self.entries.iter()
    }

    pub fn aging_ms(&self) -> u64 {
        self.aging_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn learns_moves_and_ages() {
        let mut f = Fdb::new(1000, 8);
        assert_eq!(f.learn(mac(1), 1, 0), Learned::New);
        assert_eq!(f.learn(mac(1), 1, 10), Learned::Refreshed);
        assert_eq!(f.lookup(mac(1), 500), Some(1));
        assert_eq!(f.learn(mac(1), 2, 600), Learned::Moved { from: 1 });
        assert_eq!(f.lookup(mac(1), 700), Some(2));
        // Aged out at exactly aging time after the last sighting.
        assert_eq!(f.lookup(mac(1), 1599), Some(2));
        assert_eq!(f.lookup(mac(1), 1600), None);
        assert_eq!(f.age(1600), 1);
        assert!(f.is_empty());
    }

    #[test]
    fn never_learns_group_addresses() {
        let mut f = Fdb::new(1000, 8);
        assert_eq!(f.learn(MacAddr::BROADCAST, 1, 0), Learned::NotLearnable);
        assert_eq!(
            f.learn(MacAddr([0x01, 0, 0x5e, 0, 0, 1]), 1, 0),
            Learned::NotLearnable
        );
        assert_eq!(f.learn(MacAddr([0; 6]), 1, 0), Learned::NotLearnable);
        assert!(f.is_empty());
    }

    #[test]
    fn capacity_bounds_memory_and_forget_port() {
        let mut f = Fdb::new(1000, 3);
        for n in 0..3 {
            assert_eq!(f.learn(mac(n), u32::from(n % 2), 0), Learned::New);
        }
        assert_eq!(f.learn(mac(9), 1, 0), Learned::TableFull);
        // A known address still refreshes and moves when full.
        assert_eq!(f.learn(mac(0), 1, 5), Learned::Moved { from: 0 });
        // Port 1 now holds mac(0) and mac(1); mac(2) stays on port 0.
        assert_eq!(f.forget_port(1), 2);
        assert_eq!(f.len(), 1);
    }
}
