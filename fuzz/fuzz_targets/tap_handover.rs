//! A tap port's handover header is the first thing a client sends. Any
//! bytes must parse or be refused with an error, never panic; an accepted
//! header is exactly the canonical encoding of what it says, and the
//! daemon's answer to it always parses back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ulan::ports::tap::handover::{parse_reply, reply_text, Header, MAX_REPLY};

fuzz_target!(|data: &[u8]| {
    match Header::parse(data) {
        Ok(h) => {
            assert_eq!(h.encode().as_slice(), data);
            assert!(matches!(h.vnet_hdr_len, 0 | 10 | 12));
        }
        Err(e) => {
            let answer = reply_text(Err(&e));
            assert!(answer.len() <= MAX_REPLY);
            assert!(parse_reply(answer.as_bytes()).is_err());
        }
    }
    let _ = parse_reply(data);
});
