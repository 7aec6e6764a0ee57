//! A vhost-user frontend's protocol stream, any bytes: chunks written one
//! sendmsg each (some with eventfds or memfds attached) to ulan's session
//! over a socket pair, whose write side is then shut. The session must
//! end without hanging or panicking, whatever it was sent (see
//! `ulan::ports::vhost_user::fuzz::messages`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ulan::ports::vhost_user::fuzz::messages(data);
});
