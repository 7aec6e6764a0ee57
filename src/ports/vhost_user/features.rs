//! The virtio and vhost-user features a ulan vhost-user port offers, and
//! why each is or is not there.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

pub const VIRTIO_NET_F_CSUM: u32 = 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
pub const VIRTIO_NET_F_STATUS: u32 = 16;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// The virtio-net header with VERSION_1 or MRG_RXBUF (num_buffers last).
pub const NET_HDR_LEN: usize = 12;
/// The legacy header without num_buffers.
pub const LEGACY_NET_HDR_LEN: usize = 10;

/// Offloads: checksum and TCP segmentation in both directions. Frames a
/// guest sends with them are finished in software when they leave on a
/// port that cannot take them (see `wire::offload`).
pub const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN);

/// What every port offers. Not offered: MQ (one queue pair is what one
/// data-plane thread serves), packed rings, indirect descriptors (the
/// chains Linux makes fit a 256-entry ring), CTRL_VQ (no filters or VLAN
/// offload to program), MTU (the frontend's choice).
pub const BASE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Protocol features: REPLY_ACK so the frontend learns of a refused
/// message; MQ so it can ask how many queue pairs there are (one).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ
}

pub fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The virtio-net header length for a negotiated feature set.
pub fn hdr_len(features: u64) -> usize {
    if has(features, VIRTIO_F_VERSION_1) || has(features, VIRTIO_NET_F_MRG_RXBUF) {
        NET_HDR_LEN
    } else {
        LEGACY_NET_HDR_LEN
    }
}
