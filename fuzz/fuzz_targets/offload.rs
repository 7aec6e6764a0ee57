//! Finishing offloads (`ulan::wire::offload`) on any virtio-net header and
//! frame: raw headers over any bytes, and valid TCP super-frames with byte
//! mutations (see `ulan::testkit::offload_check::run`). Checked on every
//! input: no panic, and whatever is accepted comes out as complete frames
//! (checksums, lengths, IDs, sequence numbers, flags, payload).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use ulan::wire::offload::Segmenter;

thread_local! {
    static SEGMENTER: RefCell<Segmenter> = RefCell::new(Segmenter::new());
}

fuzz_target!(|data: &[u8]| {
    SEGMENTER.with(|s| {
        ulan::testkit::offload_check::run(&mut s.borrow_mut(), data);
    });
});
