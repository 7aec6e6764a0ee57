//! `tap` ports: the frames of a Linux tap device, read and written by the
//! data plane through the tap's fd. The tap is opened by a client inside
//! some network namespace where the user is root (a user namespace, a
//! container's) and handed to the daemon over the port's socket with
//! SCM_RIGHTS ([`handover`]); the daemon needs no privilege of its own.
//!
//! The client opens the tap with IFF_VNET_HDR and checksum and TCP
//! segmentation offloads ([`client::create_tap`]), so the kernel hands
//! over TCP super-frames of up to 64 KiB with a virtio-net header: one
//! read moves what would otherwise be some forty. The switch passes the
//! request on to ports that take it (another tap, a vhost-user guest
//! that negotiated it) and finishes it in software (`wire::offload`) for
//! the others. Frames into the tap carry the request they still hold, or
//! a zero header.
//!
//! A later handover replaces the tap (down, then up); the port goes down
//! when the tap's namespace ends (reads fail with EBADFD).

pub mod client;
pub mod handover;
mod io;
pub mod tun;

pub use io::{TapPort, HANDOVER_TIMEOUT_MS};
