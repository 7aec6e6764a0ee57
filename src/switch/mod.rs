//! The switch: lans, MAC learning, topology snapshots and the data-plane
//! thread. It knows MAC addresses and port ids, not sockets.

pub mod capture;
pub mod dataplane;
pub mod fdb;
pub mod forward;
pub mod impair;
pub mod stats;
pub mod topology;

/// Index of a port on the data plane (slot, reused after removal).
pub type PortId = u32;
/// Index of a lan (slot, reused after removal).
pub type LanId = u32;
