//! Whatever the bytes, request parsing returns an answer and never panics:
//! bodies for every route that takes one, Content-Type values and request
//! paths. Every refusal is a 4xx with a code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ulan::api::routes::{check_content_type, decode_body, match_route, Op};
use ulan::api::ApiError;

fn refused(e: ApiError) {
    assert!(e.status.is_client_error(), "{e}");
    assert!(!e.code.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => decode_body(Op::AddLan, rest)
            .map(drop)
            .unwrap_or_else(refused),
        1 => decode_body(Op::AddPort, rest)
            .map(drop)
            .unwrap_or_else(refused),
        2 => decode_body(Op::MovePort, rest)
            .map(drop)
            .unwrap_or_else(refused),
        3 => check_content_type(Some(rest)).unwrap_or_else(refused),
        _ => {
            let text = String::from_utf8_lossy(rest);
            let (method, path) = text.split_once(' ').unwrap_or(("GET", &text));
            match match_route(method, path) {
                // A matched path's parameters are valid names.
                Ok(m) => m
                    .params
                    .iter()
                    .for_each(|p| ulan::names::check_name(p).unwrap()),
                Err(e) => refused(e),
            }
        }
    }
});
