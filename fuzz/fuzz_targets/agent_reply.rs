//! The exec agent's reply headers come from inside a guest, which may be
//! anyone's. Any line must parse or be refused, never panic, and an
//! accepted RESULT never announces more output than the host will read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ulan::vmlaunch::agent::{parse_reply, Reply, MAX_OUTPUT};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Reply::Result {
        out_len, err_len, ..
    }) = parse_reply(line)
    {
        assert!(out_len <= MAX_OUTPUT && err_len <= MAX_OUTPUT);
    }
});
