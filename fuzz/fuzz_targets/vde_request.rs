//! A VDE control request is the first thing an unknown client sends. Any
//! bytes must parse or be refused with an error, never panic; an accepted
//! request always names a usable AF_UNIX address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ulan::ports::vde::parse_request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        assert!(!req.data_addr.path_bytes().is_empty());
        assert!(req.description.len() <= 4 * 128);
    }
});
