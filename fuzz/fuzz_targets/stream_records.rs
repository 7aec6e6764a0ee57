//! The stream framing (4-byte big-endian length, then the frame) over any
//! bytes: every record handed out has a legal frame length and lies inside
//! the input; a bad length stops parsing with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ulan::ports::stream::parse_record;
use ulan::wire::{ETH_HEADER_LEN, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = parse_record(rest) {
        assert!((ETH_HEADER_LEN..=MAX_FRAME_LEN).contains(&frame.len()));
        assert_eq!(used, frame.len() + 4);
        rest = &rest[used..];
    }
});
