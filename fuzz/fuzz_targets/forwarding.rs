//! The learning switch over any frames from any ports, with the topology
//! changing and time passing in between: the bytes are a script of
//! operations (see `ulan::testkit::forwarding_script`). Checked on every
//! step: a frame never goes back to its ingress port nor leaves its lan; a
//! port on no lan gets `NoLan`; an address just learned on one port draws
//! unicast from the others of the lan.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ulan::testkit::forwarding_script::run(data);
});
