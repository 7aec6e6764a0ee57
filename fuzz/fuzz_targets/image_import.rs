//! `ulan image import` reads archives from wherever the user got them:
//! any bytes must import or be refused with an error, never panic, and
//! never leave a scratch dir or write outside the store.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ulan::vmlaunch::container::import::{import, ImportOptions};
use ulan::vmlaunch::image::ImageStore;

fn work() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ulan-fuzz-import-{}", std::process::id()));
        std::fs::create_dir_all(d.join("in")).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = work();
    let input = dir.join("in/archive");
    std::fs::write(&input, data).unwrap();
    let store = ImageStore::open(&dir.join("store"));
    let opts = ImportOptions {
        reference: None,
        max_bytes: 64 << 20,
        replace: true,
    };
    let _ = import(&store, &input, "fuzzed", &opts);
    for e in std::fs::read_dir(store.dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".tmp"), "a scratch dir was left: {name}");
    }
    let mut top: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert!(top.iter().all(|n| n == "in" || n == "store"), "{top:?}");
});
