//! Immutable topology snapshots, published by the control side and read by
//! the data plane at batch boundaries without taking a lock.

use crate::switch::{LanId, PortId};

/// Which port is on which lan, as one consistent picture.
///
/// Ids are small integers (slots reused after removal) so the data plane
/// looks them up by index.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Bumped on every change; the data plane compares it to notice one.
    pub generation: u64,
    /// Indexed by port id: the lan the port is on, if any.
    pub port_lan: Vec<Option<LanId>>,
    /// Indexed by lan id: the ports on it (None for a free slot).
    pub lan_ports: Vec<Option<Vec<PortId>>>,
}

impl Snapshot {
    pub fn lan_of(&self, port: PortId) -> Option<LanId> {
        self.port_lan.get(port as usize).copied().flatten()
    }

    pub fn ports_of(&self, lan: LanId) -> &[PortId] {
        self.lan_ports
            .get(lan as usize)
            .and_then(|p| p.as_deref())
            .unwrap_or(&[])
    }

    pub fn lan_exists(&self, lan: LanId) -> bool {
        matches!(self.lan_ports.get(lan as usize), Some(Some(_)))
    }
}
