//! The lab in a browser: the graph export, the single-page app's embedded
//! files, and the guards of the TCP listener `ulan web` opens.

pub mod assets;
pub mod console;
pub mod graph;
pub mod guard;
pub mod listener;
