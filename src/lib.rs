//! ulan: a rootless network lab. One unprivileged process is a userspace
//! Ethernet switch whose ports are Unix sockets; a JSON API over a Unix
//! socket changes the topology at runtime.

pub mod api;
pub mod bench;
pub mod cli;
pub mod daemon;
pub mod doctor;
pub mod events;
pub mod lab;
pub mod labfile;
pub mod metrics;
pub mod names;
pub mod persist;
pub mod ports;
pub mod switch;
pub mod testkit;
pub mod vmlaunch;
pub mod wire;
