//! Lab files are YAML or JSON from wherever the user got them. Any text
//! must parse and check or be refused with an error, never panic; a file
//! that is accepted survives a round trip through `to_yaml`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ulan::labfile::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = parse(text, "fuzz.yaml") {
        if file.check().is_ok() {
            let again = parse(&file.to_yaml(), "again.yaml").expect("to_yaml output parses");
            assert_eq!(again, file);
        }
    }
});
