//! Guests: what a node is (spec), how its emulator's argv is built (qemu,
//! uml), the images it boots, and the supervision of its process.

pub mod accel;
pub mod agent;
pub mod cpio;
pub mod image;
pub mod node;
pub mod qemu;
pub mod qmp;
pub mod spec;
pub mod uml;
