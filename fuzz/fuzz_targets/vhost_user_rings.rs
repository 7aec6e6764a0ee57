//! Guest memory as any bytes: descriptor tables, available and used rings
//! where the input puts them. ulan's device takes every transmit frame and
//! fills receive buffers until a ring runs dry or is found broken; guard
//! pages around the guest regions make any access outside them fault (see
//! `ulan::ports::vhost_user::fuzz::rings`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ulan::ports::vhost_user::fuzz::rings(data);
});
