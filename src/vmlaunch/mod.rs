//! Nodes: what a node is (spec), one folder per node kind (qemu, uml, container) with
//! how its process is started, the images nodes boot, and the supervision
//! of their processes.

pub mod agent;
pub mod container;
pub mod cpio;
pub mod image;
pub mod node;
pub mod qemu;
pub mod spec;
pub mod uml;
