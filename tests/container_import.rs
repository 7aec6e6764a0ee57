//! `ulan image import` against real files: OCI layouts, OCI archives and
//! docker archives built here with the tar crate (plain, gzip and zstd layers,
//! whiteouts, an opaque directory, links), the same images made by the
//! third-party umoci and skopeo, hostile archives (each a clear error,
//! nothing written outside the store, no scratch dir left), a byte-flipping
//! loop over a valid archive, and a container node of an imported image
//! run through the daemon as the unprivileged account.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use ulan::vmlaunch::container::import::{import, ImportOptions};
use ulan::vmlaunch::image::ImageStore;

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One tar entry of a test layer.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Char(&'a str),
    /// A name written into the header as is (the tar crate refuses `..`).
    RawFile(&'a [u8], &'a [u8]),
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Sym(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Hard(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                // Raw link name: absolute and `..` targets are the point.
                let old = h.as_old_mut();
                old.linkname[..t.len()].copy_from_slice(t.as_bytes());
                old.name[..p.len()].copy_from_slice(p.as_bytes());
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Char(p) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::RawFile(name, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(data).unwrap();
    g.finish().unwrap()
}

/// An image's parts: layers (stored bytes, uncompressed tar) and config.
struct Parts {
    layers: Vec<(Vec<u8>, Vec<u8>)>,
    config: Value,
}

impl Parts {
    fn new(layers: Vec<(Vec<u8>, bool)>, run: Value) -> Parts {
        let layers: Vec<(Vec<u8>, Vec<u8>)> = layers
            .into_iter()
            .map(|(tar, gz)| (if gz { gzip(&tar) } else { tar.clone() }, tar))
            .collect();
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|(_, t)| format!("sha256:{}", sha(t)))
            .collect();
        Parts {
            config: json!({
                "architecture": "amd64", "os": "linux", "config": run,
                "rootfs": {"type": "layers", "diff_ids": diff_ids}
            }),
            layers,
        }
    }
}

type Files = BTreeMap<String, Vec<u8>>;

/// The manifest's bytes for `parts`, adding its blobs to `files`.
fn oci_manifest(parts: &Parts, files: &mut Files) -> Vec<u8> {
    let cfg = serde_json::to_vec(&parts.config).unwrap();
    let layers: Vec<Value> = parts
        .layers
        .iter()
        .map(|(stored, tar)| {
            files.insert(format!("blobs/sha256/{}", sha(stored)), stored.clone());
            let mt = if stored == tar {
                "application/vnd.oci.image.layer.v1.tar"
            } else if stored.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                "application/vnd.oci.image.layer.v1.tar+zstd"
            } else {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            };
            json!({"mediaType": mt, "digest": format!("sha256:{}", sha(stored)), "size": stored.len()})
        })
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha(&cfg)), "size": cfg.len()},
        "layers": layers
    }))
    .unwrap();
    files.insert(format!("blobs/sha256/{}", sha(&cfg)), cfg);
    files.insert(format!("blobs/sha256/{}", sha(&manifest)), manifest.clone());
    manifest
}

fn desc(bytes: &[u8], media: &str, extra: Value) -> Value {
    let mut d = json!({"mediaType": media, "digest": format!("sha256:{}", sha(bytes)), "size": bytes.len()});
    d.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    d
}

/// An OCI layout of images named by ref.
fn oci_files(images: &[(&str, &Parts)]) -> Files {
    let mut files = Files::new();
    let mut manifests = Vec::new();
    for (name, parts) in images {
        let m = oci_manifest(parts, &mut files);
        manifests.push(desc(
            &m,
            "application/vnd.oci.image.manifest.v1+json",
            json!({"annotations": {"org.opencontainers.image.ref.name": name}}),
        ));
    }
    files.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    files.insert(
        "index.json".into(),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests})).unwrap(),
    );
    files
}

/// A `docker save` archive's files (older layout: HEX.json, ID/layer.tar).
fn docker_files(tag: &str, parts: &Parts) -> Files {
    let mut files = Files::new();
    let cfg = serde_json::to_vec(&parts.config).unwrap();
    let mut layers = Vec::new();
    for (i, (stored, _)) in parts.layers.iter().enumerate() {
        let name = format!("{:064x}/layer.tar", i + 1);
        files.insert(name.clone(), stored.clone());
        layers.push(name);
    }
    files.insert(format!("{}.json", sha(&cfg)), cfg.clone());
    files.insert(
        "manifest.json".into(),
        serde_json::to_vec(&json!([{"Config": format!("{}.json", sha(&cfg)),
            "RepoTags": [tag], "Layers": layers}]))
        .unwrap(),
    );
    files
}

fn write_dir(dir: &Path, files: &Files) {
    for (name, data) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

fn tar_files(files: &Files) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// A test store and a place for inputs, side by side in one temp dir.
struct World {
    tmp: tempfile::TempDir,
    store: ImageStore,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("store"));
        std::fs::create_dir(tmp.path().join("in")).unwrap();
        World { tmp, store }
    }

    fn input(&self, name: &str) -> PathBuf {
        self.tmp.path().join("in").join(name)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.input(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn import(&self, input: &Path, name: &str) -> Result<ulan::vmlaunch::image::Image, String> {
        self.import_with(input, name, &ImportOptions::default())
            .map(|i| i.image)
    }

    fn import_with(
        &self,
        input: &Path,
        name: &str,
        opts: &ImportOptions,
    ) -> Result<ulan::vmlaunch::container::import::Imported, String> {
        let r = import(&self.store, input, name, opts).map_err(|e| e.to_string());
        self.assert_no_scratch();
        r
    }

    /// No half-made image: no scratch dir in the store.
    fn assert_no_scratch(&self) {
        let Ok(rd) = std::fs::read_dir(self.store.dir()) else {
            return;
        };
        let left: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp") || n.starts_with(".old"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

fn sample() -> Parts {
    let l1 = tar_of(&[
        E::Dir("etc", 0o755),
        E::File("etc/keep", b"keep1", 0o644),
        E::File("etc/gone", b"gone", 0o644),
        E::Dir("opq", 0o755),
        E::File("opq/old", b"old", 0o644),
        E::Dir("opq/sub", 0o755),
        E::File("opq/sub/deep", b"deep", 0o644),
        E::Dir("bin", 0o755),
        E::File("bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
        E::Sym("bin/link", "tool"),
        E::Hard("bin/hard", "bin/tool"),
        E::Dir("ro", 0o555),
        E::File("ro/f", b"ro", 0o444),
        E::Sym("usr", "/opt/elsewhere"),
        E::Dir("lib", 0o755),
        E::Sym("lib64", "lib"),
        // A v7-style directory: a regular entry named with a slash.
        E::RawFile(b"olddir/", b""),
    ]);
    let l2 = tar_of(&[
        E::Dir("etc", 0o755),
        E::File("etc/.wh.gone", b"", 0o644),
        E::File("etc/keep", b"keep2", 0o600),
        E::Dir("opq", 0o700),
        E::File("opq/new", b"new", 0o644),
        E::File("opq/.wh..wh..opq", b"", 0o644),
        E::File("second", b"from layer 2\n", 0o644),
        E::File("bin/suid", b"x", 0o4755),
        // Through a relative symlink that stays inside: lands in lib/.
        E::File("lib64/libx.so", b"lib", 0o644),
    ]);
    Parts::new(
        vec![(l1, false), (l2, true)],
        json!({"Entrypoint": ["/bin/tool"], "Cmd": ["arg"], "Env": ["A=1", "PATH=/bin"],
               "WorkingDir": "/opq"}),
    )
}

fn check_sample(img: &ulan::vmlaunch::image::Image) {
    let root = img.rootfs_path().unwrap();
    let read = |p: &str| std::fs::read(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("etc/keep"), b"keep2");
    assert!(
        !root.join("etc/gone").exists(),
        "the whiteout did not remove etc/gone"
    );
    assert!(!root.join("opq/old").exists() && !root.join("opq/sub").exists());
    assert_eq!(
        read("opq/new"),
        b"new",
        "this layer's own entry survives its opaque marker"
    );
    assert!(!root.join("opq/.wh..wh..opq").exists() && !root.join("etc/.wh.gone").exists());
    assert_eq!(read("second"), b"from layer 2\n");
    assert_eq!(read("lib/libx.so"), b"lib");
    assert!(root.join("olddir").is_dir());
    let mode = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("bin/tool"), 0o755);
    assert_eq!(mode("bin/suid"), 0o4755, "setuid is kept");
    assert_eq!(mode("etc/keep"), 0o600);
    assert_eq!(mode("ro/f"), 0o444);
    assert_eq!(mode("ro"), 0o755, "directories keep u+rwx");
    assert_eq!(mode("opq"), 0o700);
    assert_eq!(
        std::fs::read_link(root.join("bin/link")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(
        std::fs::read_link(root.join("usr")).unwrap(),
        Path::new("/opt/elsewhere"),
        "an absolute symlink exists as is"
    );
    let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
    assert_eq!(ino("bin/hard"), ino("bin/tool"), "a hard link");
    let c = img.manifest.container.as_ref().unwrap();
    assert_eq!(c.entrypoint, ["/bin/tool", "arg"]);
    assert_eq!(c.env, ["A=1", "PATH=/bin"]);
    assert_eq!(c.workdir.as_deref(), Some("/opq"));
    assert_eq!(c.rootfs, "rootfs");
}

#[test]
fn oci_layouts_oci_archives_and_docker_archives_import_layer_by_layer() {
    let w = World::new();
    let parts = sample();
    let oci = oci_files(&[("latest", &parts)]);
    let dir = w.input("layout");
    write_dir(&dir, &oci);
    check_sample(&w.import(&dir, "from-dir").unwrap());
    let archive = w.file("oci.tar", &tar_files(&oci));
    check_sample(&w.import(&archive, "from-oci-archive").unwrap());
    let docker = w.file("docker.tar", &tar_files(&docker_files("img:1", &parts)));
    let done = w
        .import_with(&docker, "from-docker", &ImportOptions::default())
        .unwrap();
    assert_eq!(done.format, "docker archive");
    assert_eq!(done.layers, 2);
    check_sample(&done.image);
    // docker 25+: manifest.json naming blobs of an OCI layout beside it.
    let mut both = oci.clone();
    let cfg = serde_json::to_vec(&parts.config).unwrap();
    let layers: Vec<String> = parts
        .layers
        .iter()
        .map(|(s, _)| format!("blobs/sha256/{}", sha(s)))
        .collect();
    both.insert(
        "manifest.json".into(),
        serde_json::to_vec(&json!([{"Config": format!("blobs/sha256/{}", sha(&cfg)),
            "RepoTags": ["img:1"], "Layers": layers}]))
        .unwrap(),
    );
    let d25 = w.file("docker25.tar", &tar_files(&both));
    check_sample(&w.import(&d25, "from-docker25").unwrap());
    // The store lists them; a second import of a name is refused unless forced.
    let names: Vec<String> = w
        .store
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(
        names,
        [
            "from-dir",
            "from-docker",
            "from-docker25",
            "from-oci-archive"
        ]
    );
    let e = w.import(&dir, "from-dir").unwrap_err();
    assert!(e.contains("already exists"), "{e}");
    let opts = ImportOptions {
        replace: true,
        ..Default::default()
    };
    check_sample(&w.import_with(&dir, "from-dir", &opts).unwrap().image);
    let e = w.import(&dir, "builtin-container").unwrap_err();
    assert!(e.contains("built-in"), "{e}");
}

#[test]
fn several_images_need_a_ref_and_a_multi_platform_index_gives_this_hosts() {
    let w = World::new();
    let one = |name: &str| {
        Parts::new(
            vec![(tar_of(&[E::File(name, name.as_bytes(), 0o644)]), true)],
            json!({"Cmd": [name]}),
        )
    };
    let (a, b) = (one("a"), one("b"));
    let dir = w.input("two");
    write_dir(&dir, &oci_files(&[("a", &a), ("b", &b)]));
    let e = w.import(&dir, "x").unwrap_err();
    assert!(e.contains("--ref") && e.contains("a, b"), "{e}");
    let pick = |r: &str| ImportOptions {
        reference: Some(r.into()),
        ..Default::default()
    };
    let img = w.import_with(&dir, "b", &pick("b")).unwrap().image;
    assert!(img.rootfs_path().unwrap().join("b").is_file());
    assert!(!img.rootfs_path().unwrap().join("a").exists());
    assert_eq!(img.manifest.container.unwrap().entrypoint, ["b"]);
    let e = w.import_with(&dir, "c", &pick("c")).unwrap_err();
    assert!(e.contains("\"c\"") && e.contains("a, b"), "{e}");

    // docker archives choose by RepoTags the same way.
    let docker = w.file("d.tar", &tar_files(&docker_files("repo/x:7", &a)));
    let e = w.import_with(&docker, "d", &pick("nope")).unwrap_err();
    assert!(e.contains("repo/x:7"), "{e}");
    assert!(w.import_with(&docker, "d", &pick("repo/x:7")).is_ok());

    // An index of arm64, amd64 and an attestation: this host's is taken.
    let arm = one("arm");
    let amd = one("amd");
    let mut files = Files::new();
    let m_arm = oci_manifest(&arm, &mut files);
    let m_amd = oci_manifest(&amd, &mut files);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let inner = serde_json::to_vec(&json!({"schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [
        desc(&m_arm, mt, json!({"platform": {"os": "linux", "architecture": "arm64"}})),
        desc(&m_amd, mt, json!({"platform": {"os": "unknown", "architecture": "unknown"}})),
        desc(&m_amd, mt, json!({"platform": {"os": "linux", "architecture": "amd64"}})),
    ]}))
    .unwrap();
    files.insert(format!("blobs/sha256/{}", sha(&inner)), inner.clone());
    files.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    files.insert(
        "index.json".into(),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [
            desc(&inner, "application/vnd.oci.image.index.v1+json", json!({}))]}))
        .unwrap(),
    );
    let multi = w.file("multi.tar", &tar_files(&files));
    if std::env::consts::ARCH == "x86_64" {
        let img = w.import(&multi, "multi").unwrap();
        assert!(img.rootfs_path().unwrap().join("amd").is_file());
        assert!(!img.rootfs_path().unwrap().join("arm").exists());
    }
}

/// An OCI archive of one image whose layers are `layers` (plain tar).
fn oci_archive_of(layers: &[Vec<u8>]) -> Vec<u8> {
    let parts = Parts::new(
        layers.iter().map(|l| (l.clone(), false)).collect(),
        json!({}),
    );
    tar_files(&oci_files(&[("t", &parts)]))
}

#[test]
fn hostile_layers_are_refused_and_write_nothing_outside() {
    let w = World::new();
    let outside = w.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let outside_s = outside.display().to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot", tar_of(&[E::RawFile(b"../evil", b"x")]), "`..`"),
        (
            "dotdot-deep",
            tar_of(&[E::RawFile(b"a/../../evil", b"x")]),
            "`..`",
        ),
        (
            "absolute",
            tar_of(&[E::RawFile(b"/tmp/ulan-import-evil", b"x")]),
            "absolute",
        ),
        (
            "symlink-abs",
            tar_of(&[E::Sym("a", &outside_s), E::File("a/x", b"x", 0o644)]),
            "symlink to the absolute path",
        ),
        (
            "symlink-up",
            tar_of(&[E::Sym("a", "../../.."), E::File("a/x", b"x", 0o644)]),
            "climbs above",
        ),
        (
            "symlink-chain",
            tar_of(&[
                E::Dir("d", 0o755),
                E::Sym("d/up", ".."),
                E::Sym("b", "d/up/d/up/.."),
                E::File("b/x", b"x", 0o644),
            ]),
            "climbs above",
        ),
        (
            "hard-abs",
            tar_of(&[E::Hard("h", "/etc/passwd")]),
            "absolute",
        ),
        ("hard-up", tar_of(&[E::Hard("h", "../x")]), "`..`"),
        (
            "hard-missing",
            tar_of(&[E::Hard("h", "nope")]),
            "does not exist",
        ),
        (
            "hard-through-symlink",
            tar_of(&[E::Sym("etc", "/etc"), E::Hard("h", "etc/passwd")]),
            "symlink to the absolute path",
        ),
        (
            "file-over-parent-file",
            tar_of(&[E::File("f", b"x", 0o644), E::File("f/x", b"x", 0o644)]),
            "not a directory",
        ),
        (
            "not-tar",
            b"this is not a tar archive at all, just some words".repeat(20),
            "not a valid tar",
        ),
        (
            "zstd",
            [&[0x28, 0xb5, 0x2f, 0xfd][..], &[0u8; 600][..]].concat(),
            "zstd",
        ),
    ];
    for (name, layer, want) in cases {
        let a = w.file(&format!("{name}.tar"), &oci_archive_of(&[layer]));
        let e = w.import(&a, name).expect_err(name);
        assert!(e.contains(want), "{name}: {e}");
        assert!(w.store.get(name).is_err(), "{name}: an image was made");
    }
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "written outside"
    );
    assert!(!Path::new("/tmp/ulan-import-evil").exists());
    assert!(!w.tmp.path().join("evil").exists());

    // A later layer turns a directory into a symlink out: the first
    // layer's directory modes are not applied through it, and a whiteout
    // through it removes nothing outside.
    let kept = w.tmp.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    std::fs::write(kept.join("keepme"), "x").unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o750)).unwrap();
    let kept_s = kept.display().to_string();
    let l1 = tar_of(&[E::Dir("a", 0o555), E::Dir("a/b", 0o500)]);
    let l2 = tar_of(&[E::Sym("a", &kept_s)]);
    let a = w.file("swap.tar", &oci_archive_of(&[l1, l2]));
    let img = w.import(&a, "swap").unwrap();
    let link = img.rootfs_path().unwrap().join("a");
    assert_eq!(std::fs::read_link(&link).unwrap(), kept);
    let l3 = tar_of(&[E::File("a/.wh.keepme", b"", 0o644)]);
    let l4 = tar_of(&[E::File("a/b/.wh..wh..opq", b"", 0o644)]);
    for (name, extra) in [("swap-wh", l3), ("swap-opq", l4)] {
        let l1 = tar_of(&[E::Sym("a", &kept_s)]);
        let a = w.file(&format!("{name}.tar"), &oci_archive_of(&[l1, extra]));
        let e = w.import(&a, name).unwrap_err();
        assert!(e.contains("symlink to the absolute path"), "{name}: {e}");
    }
    assert!(kept.join("keepme").exists());
    assert_eq!(std::fs::metadata(&kept).unwrap().mode() & 0o7777, 0o750);
    assert!(!kept.join("b").exists());

    // Device nodes are skipped with a warning (and not made).
    let a = w.file(
        "dev.tar",
        &oci_archive_of(&[tar_of(&[
            E::Dir("dev", 0o755),
            E::Char("dev/null"),
            E::File("ok", b"1", 0o644),
        ])]),
    );
    let done = w.import_with(&a, "dev", &ImportOptions::default()).unwrap();
    assert!(
        done.warnings
            .iter()
            .any(|w| w.contains("dev/null") && w.contains("device")),
        "{:?}",
        done.warnings
    );
    let root = done.image.rootfs_path().unwrap();
    assert!(root.join("ok").is_file() && !root.join("dev/null").exists());

    // A size bomb meets the cap.
    let big = vec![0u8; 64 * 1024];
    let a = w.file(
        "big.tar",
        &oci_archive_of(&[tar_of(&[E::File("big", &big, 0o644)])]),
    );
    let opts = ImportOptions {
        max_bytes: 16 * 1024,
        ..Default::default()
    };
    let e = w.import_with(&a, "big", &opts).unwrap_err();
    assert!(e.contains("limit"), "{e}");
    // A gzip bomb too: the decompressed stream is capped.
    let parts = Parts::new(
        vec![(tar_of(&[E::File("big", &vec![0u8; 4 << 20], 0o644)]), true)],
        json!({}),
    );
    let a = w.file("gzbomb.tar", &tar_files(&oci_files(&[("t", &parts)])));
    let e = w.import_with(&a, "gzbomb", &opts).unwrap_err();
    assert!(e.contains("limit"), "{e}");
}

#[test]
fn broken_archives_and_blobs_are_clear_errors() {
    let w = World::new();
    let parts = sample();
    let oci = oci_files(&[("t", &parts)]);
    let layer_name = |i: usize| format!("blobs/sha256/{}", sha(&parts.layers[i].0));
    let index: Value = serde_json::from_slice(&oci["index.json"]).unwrap();
    let manifest_name = format!(
        "blobs/sha256/{}",
        index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    );
    let manifest: Value = serde_json::from_slice(&oci[&manifest_name]).unwrap();
    let config_name = format!(
        "blobs/sha256/{}",
        manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    );
    // Changes to a valid layout: (case, edit, expected words).
    type Edit = Box<dyn Fn(&mut Files)>;
    let l0 = layer_name(0);
    let l1 = layer_name(1);
    let l1b = l1.clone();
    let (m1, m2, m3) = (
        manifest_name.clone(),
        manifest_name.clone(),
        manifest_name.clone(),
    );
    let c1 = config_name.clone();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "bad-digest",
            Box::new(move |f: &mut Files| {
                // File content (not a header): only the digest can tell.
                let b = f.get_mut(&l0).unwrap();
                let i = b.windows(5).position(|w| w == b"keep1").unwrap();
                b[i + 3] = b'q';
            }),
            "hashes to",
        ),
        (
            "truncated-blob",
            Box::new(move |f: &mut Files| {
                let b = f.get_mut(&l1).unwrap();
                b.truncate(b.len() / 2);
            }),
            "declares",
        ),
        (
            "missing-blob",
            Box::new(move |f: &mut Files| {
                f.remove(&l1b);
            }),
            "missing",
        ),
        (
            "garbage-config",
            Box::new(move |f: &mut Files| {
                // A config that is not JSON, with a manifest that names it right.
                let garbage = b"{{{ not json".to_vec();
                let mut m: Value = serde_json::from_slice(&f[&m1]).unwrap();
                m["config"]["digest"] = json!(format!("sha256:{}", sha(&garbage)));
                m["config"]["size"] = json!(garbage.len());
                f.insert(format!("blobs/sha256/{}", sha(&garbage)), garbage);
                relink(f, &m1, &m);
            }),
            "config",
        ),
        (
            "huge-size",
            Box::new(move |f: &mut Files| {
                let mut m: Value = serde_json::from_slice(&f[&m2]).unwrap();
                m["layers"][0]["size"] = json!(1u64 << 60);
                relink(f, &m2, &m);
            }),
            "declares 1152921504606846976 bytes",
        ),
        (
            "bad-diff-id",
            Box::new(move |f: &mut Files| {
                let mut c: Value = serde_json::from_slice(&f[&c1]).unwrap();
                c["rootfs"]["diff_ids"][1] = json!(format!("sha256:{}", "0".repeat(64)));
                let bytes = serde_json::to_vec(&c).unwrap();
                let mut m: Value = serde_json::from_slice(&f[&m3]).unwrap();
                m["config"]["digest"] = json!(format!("sha256:{}", sha(&bytes)));
                m["config"]["size"] = json!(bytes.len());
                f.insert(format!("blobs/sha256/{}", sha(&bytes)), bytes);
                relink(f, &m3, &m);
            }),
            "diff_id",
        ),
        (
            "garbage-index",
            Box::new(|f: &mut Files| {
                f.insert("index.json".into(), b"[1,2".to_vec());
            }),
            "index.json",
        ),
        (
            "sha512",
            Box::new(|f: &mut Files| {
                let mut i: Value = serde_json::from_slice(&f["index.json"]).unwrap();
                i["manifests"][0]["digest"] = json!(format!("sha512:{}", "a".repeat(128)));
                f.insert("index.json".into(), serde_json::to_vec(&i).unwrap());
            }),
            "only sha256",
        ),
    ];
    for (name, edit, want) in cases {
        let mut files = oci.clone();
        edit(&mut files);
        let dir = w.input(name);
        write_dir(&dir, &files);
        let e = w.import(&dir, name).expect_err(name);
        assert!(e.contains(want), "{name} (dir): {e}");
        let a = w.file(&format!("{name}.tar"), &tar_files(&files));
        let e = w.import(&a, name).expect_err(name);
        assert!(e.contains(want), "{name} (archive): {e}");
        assert!(w.store.get(name).is_err());
    }
    // A truncated archive, at several places.
    let whole = tar_files(&oci);
    // (A tar that only lacks its end blocks is whole: tar readers accept it.)
    for cut in [
        100,
        700,
        whole.len() / 3,
        whole.len() / 2,
        whole.len() - 2048 + 100,
    ] {
        let a = w.file("cut.tar", &whole[..cut]);
        let e = w.import(&a, "cut").expect_err("cut");
        assert!(!e.is_empty());
    }
    // Not an image at all, or compressed whole.
    let a = w.file("words", b"hello there, I am not an image");
    let e = w.import(&a, "words").unwrap_err();
    assert!(e.contains("not an OCI layout"), "{e}");
    // Gzipped whole (`docker save | gzip`): decompressed first, then as
    // the plain one; cut short, a clear error; a bomb, capped; other
    // compressions are named.
    let gz = gzip(&whole);
    let a = w.file("tar.gz", &gz);
    w.import(&a, "gz").expect("a gzipped archive imports");
    let a = w.file("cut.tar.gz", &gz[..gz.len() / 2]);
    let e = w.import(&a, "gzcut").unwrap_err();
    assert!(e.contains("gzip"), "{e}");
    let a = w.file("bomb.tar.gz", &gzip(&vec![0u8; 8 << 20]));
    let small = ImportOptions {
        max_bytes: 1 << 20,
        ..ImportOptions::default()
    };
    let e = w.import_with(&a, "gzbomb", &small).map(|_| ()).unwrap_err();
    assert!(e.contains("more than"), "{e}");
    let a = w.file("x.tar.xz", &[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2]);
    let e = w.import(&a, "xz").unwrap_err();
    assert!(e.contains("decompress"), "{e}");
    let e = w.import(&w.tmp.path().join("in"), "emptydir").unwrap_err();
    assert!(e.contains("not an OCI layout"), "{e}");
    let e = w.import(&w.input("nope"), "nope").unwrap_err();
    assert!(e.contains("No such file"), "{e}");
    // A docker archive whose config is not named by its digest.
    let mut d = docker_files("x:1", &parts);
    let cfg_name = d
        .keys()
        .find(|k| k.ends_with(".json") && *k != "manifest.json")
        .unwrap()
        .clone();
    let cfg = d.remove(&cfg_name).unwrap();
    d.insert("config.json".into(), cfg);
    let mut m: Value = serde_json::from_slice(&d["manifest.json"]).unwrap();
    m[0]["Config"] = json!("config.json");
    d.insert("manifest.json".into(), serde_json::to_vec(&m).unwrap());
    let a = w.file("d.tar", &tar_files(&d));
    let e = w.import(&a, "d").unwrap_err();
    assert!(e.contains("not named by its digest"), "{e}");
}

/// Replaces manifest `old` by `m` and points the index at it.
fn relink(files: &mut Files, old: &str, m: &Value) {
    let bytes = serde_json::to_vec(m).unwrap();
    files.remove(old);
    let mut i: Value = serde_json::from_slice(&files["index.json"]).unwrap();
    i["manifests"][0]["digest"] = json!(format!("sha256:{}", sha(&bytes)));
    i["manifests"][0]["size"] = json!(bytes.len());
    files.insert(format!("blobs/sha256/{}", sha(&bytes)), bytes);
    files.insert("index.json".into(), serde_json::to_vec(&i).unwrap());
}

/// A fixed-seed xorshift generator, so the mutation loops are the same
/// every run.
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// Whether `path` imported; a refusal must say why.
fn imports_or_says_why(w: &World, path: &Path, name: &str, opts: &ImportOptions) -> bool {
    match w.import_with(path, name, opts) {
        Ok(_) => true,
        Err(e) => {
            assert!(!e.is_empty());
            false
        }
    }
}

#[test]
fn mutated_archives_never_panic_and_fail_cleanly() {
    let w = World::new();
    let l1 = tar_of(&[
        E::Dir("d", 0o755),
        E::File("d/f", b"hello", 0o644),
        E::Sym("s", "d"),
    ]);
    let l2 = tar_of(&[E::File("d/.wh.f", b"", 0o644), E::File("s/g", b"g", 0o644)]);
    let parts = Parts::new(vec![(l1, false), (l2, true)], json!({"Cmd": ["/x"]}));
    let valid = tar_files(&oci_files(&[("t", &parts)]));
    let docker = tar_files(&docker_files("t:1", &parts));
    let mut rand = xorshift(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut failed) = (0, 0);
    let path = w.input("m.tar");
    let opts = ImportOptions {
        replace: true,
        max_bytes: 1 << 20,
        ..Default::default()
    };
    for i in 0..3000 {
        let mut bytes = if i % 2 == 0 {
            valid.clone()
        } else {
            docker.clone()
        };
        match rand() % 4 {
            0 => bytes.truncate((rand() % bytes.len() as u64) as usize),
            _ => {
                // Header blocks and JSON are where the parser looks.
                for _ in 0..1 + rand() % 4 {
                    let at = if rand() % 2 == 0 {
                        ((rand() % (bytes.len() as u64 / 512)) * 512 + rand() % 512) as usize
                    } else {
                        (rand() % bytes.len() as u64) as usize
                    };
                    bytes[at] ^= 1 << (rand() % 8);
                }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        if imports_or_says_why(&w, &path, "m", &opts) {
            ok += 1;
        } else {
            failed += 1;
        }
    }
    eprintln!("mutated archives: {ok} imported, {failed} refused");
    assert!(
        failed > ok,
        "most mutations must be caught ({ok} ok, {failed} failed)"
    );
    // Nothing but the store and the inputs in the temp dir.
    let mut top: Vec<String> = std::fs::read_dir(w.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["in", "store"]);
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Skips loudly (fails under CI) without `tools`.
fn tools_or_skip(test: &str, tools: &[(&str, &str)]) -> bool {
    for (t, pkg) in tools {
        if !have(t) {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: {t} is missing under CI (apt-get install {pkg})"
            );
            ulan::testkit::skipped(format_args!(
                "{test}: {t} is not installed (apt-get install {pkg})"
            ));
            return false;
        }
    }
    true
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// zstd layers as the `zstd` tool writes them: one frame, and a stream
/// of two frames with a skippable frame between (as zstd:chunked layers
/// hold) decode to the same image as plain and gzip layers; a truncated
/// or corrupt zstd layer is a clear error that leaves no image.
#[test]
fn zstd_layers_of_one_or_several_frames_import() {
    if !tools_or_skip(
        "zstd_layers_of_one_or_several_frames_import",
        &[("zstd", "zstd")],
    ) {
        return;
    }
    let w = World::new();
    let zstd = |name: &str, data: &[u8]| -> Vec<u8> {
        let f = w.file(name, data);
        let o = Command::new("zstd")
            .args(["-q", "-c"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
        o.stdout
    };
    let base = sample();
    let (l1, l2) = (base.layers[0].1.clone(), base.layers[1].1.clone());
    let cut = l2.len() / 3;
    let mut several = zstd("l2a", &l2[..cut]);
    // A skippable frame: magic 0x184D2A5?, length, then that many bytes.
    several.extend(0x184D_2A53u32.to_le_bytes());
    several.extend(5u32.to_le_bytes());
    several.extend(b"skip!");
    several.extend(zstd("l2b", &l2[cut..]));
    let parts = Parts {
        layers: vec![(zstd("l1", &l1), l1.clone()), (several, l2)],
        config: base.config.clone(),
    };
    let dir = w.input("zstd-layout");
    write_dir(&dir, &oci_files(&[("latest", &parts)]));
    check_sample(&w.import(&dir, "zstd-layers").unwrap());
    let whole = zstd("whole", &l1);
    let mut flipped = whole.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    let mut bad_skip = whole.clone();
    bad_skip.extend(0x184D_2A50u32.to_le_bytes());
    bad_skip.extend(1000u32.to_le_bytes());
    bad_skip.extend(b"short");
    for (name, layer) in [
        ("truncated", whole[..whole.len() / 2].to_vec()),
        ("flipped", flipped),
        ("short-skippable-frame", bad_skip),
        ("magic-only", vec![0x28, 0xb5, 0x2f, 0xfd]),
    ] {
        let a = w.file(&format!("{name}.tar"), &oci_archive_of(&[layer]));
        let e = w.import(&a, name).expect_err(name);
        assert!(e.contains("zstd") || e.contains("hashes to"), "{name}: {e}");
        assert!(w.store.get(name).is_err(), "{name}: an image was made");
    }
    // Mutated zstd layers with digests that match them, so the decoder
    // itself meets the damage: an error or, where the damage is harmless,
    // the right image; never a panic. Only the config's diff_id (of the
    // original tar) is trusted.
    let mut rand = xorshift(0x2545_f491_4f6c_dd1d);
    let opts = ImportOptions {
        replace: true,
        max_bytes: 1 << 20,
        ..Default::default()
    };
    let path = w.input("mz.tar");
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..500 {
        let mut z = whole.clone();
        if rand() % 4 == 0 {
            z.truncate((rand() % z.len() as u64) as usize);
        } else {
            for _ in 0..1 + rand() % 3 {
                let at = (rand() % z.len() as u64) as usize;
                z[at] ^= 1 << (rand() % 8);
            }
        }
        let mut m = Parts::new(vec![(l1.clone(), false)], json!({}));
        m.layers = vec![(z, l1.clone())];
        std::fs::write(&path, tar_files(&oci_files(&[("t", &m)]))).unwrap();
        if imports_or_says_why(&w, &path, "mz", &opts) {
            ok += 1;
        } else {
            refused += 1;
        }
    }
    eprintln!("mutated zstd layers: {ok} imported, {refused} refused");
    assert!(refused > ok, "{ok} imported, {refused} refused");
}

/// busybox with a few applets, as a rootfs under `dir`.
fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for a in [
        "sh", "cat", "ls", "sleep", "test", "echo", "tr", "readlink", "grep",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
}

#[test]
fn images_made_by_umoci_and_converted_by_skopeo_import() {
    let test = "images_made_by_umoci_and_converted_by_skopeo_import";
    if !tools_or_skip(
        test,
        &[
            ("umoci", "umoci"),
            ("skopeo", "skopeo"),
            ("busybox", "busybox-static"),
        ],
    ) {
        return;
    }
    let w = World::new();
    let layout = w.input("umoci");
    let l = format!("{}:v1", layout.display());
    let bundle = w.input("bundle");
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &l]));
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &l])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    busybox_rootfs(&rootfs);
    std::fs::write(rootfs.join("gone"), "layer 1").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &l])
        .arg(&bundle));
    // The second layer from a fresh unpack of the first.
    let bundle2 = w.input("bundle2");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &l])
        .arg(&bundle2));
    let rootfs2 = bundle2.join("rootfs");
    std::fs::remove_file(rootfs2.join("gone")).unwrap();
    std::fs::write(rootfs2.join("second"), "layer 2").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &l])
        .arg(&bundle2));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &l,
        "--config.entrypoint",
        "sleep",
        "--config.cmd",
        "1000",
        "--config.env",
        "FOO=bar",
        "--config.workingdir",
        "/bin",
    ]));
    let check = |img: &ulan::vmlaunch::image::Image| {
        let root = img.rootfs_path().unwrap();
        assert_eq!(std::fs::read(root.join("second")).unwrap(), b"layer 2");
        assert!(!root.join("gone").exists(), "umoci's whiteout");
        assert_eq!(
            std::fs::read(root.join("bin/busybox")).unwrap(),
            std::fs::read("/bin/busybox").unwrap()
        );
        let c = img.manifest.container.as_ref().unwrap();
        assert_eq!(c.entrypoint, ["sleep", "1000"]);
        assert!(c.env.contains(&"FOO=bar".to_string()), "{:?}", c.env);
        assert_eq!(c.workdir.as_deref(), Some("/bin"));
    };
    let done = w
        .import_with(&layout, "umoci-layout", &ImportOptions::default())
        .unwrap();
    assert_eq!((done.format, done.layers), ("OCI layout", 2));
    check(&done.image);
    let oci_archive = w.input("skopeo-oci.tar");
    let docker_archive = w.input("skopeo-docker.tar");
    let src = format!("oci:{}:v1", layout.display());
    for (dest, name) in [
        (
            format!("oci-archive:{}:v1", oci_archive.display()),
            "skopeo-oci",
        ),
        (
            format!("docker-archive:{}:bb:v1", docker_archive.display()),
            "skopeo-docker",
        ),
    ] {
        run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet", &src, &dest])
            .env("HOME", w.tmp.path()));
        let file = if name == "skopeo-oci" {
            &oci_archive
        } else {
            &docker_archive
        };
        let done = w
            .import_with(file, name, &ImportOptions::default())
            .unwrap();
        eprintln!("{name}: {} with {} layers", done.format, done.layers);
        assert_eq!(done.layers, 2, "{name}");
        check(&done.image);
    }
    // skopeo recompressing the layers with zstd, as podman's zstd images.
    let zlayout = w.input("skopeo-zstd");
    run(Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-compress-format",
            "zstd",
            &src,
        ])
        .arg(format!("oci:{}:v1", zlayout.display()))
        .env("HOME", w.tmp.path()));
    let index = std::fs::read_to_string(zlayout.join("index.json")).unwrap();
    let blobs = zlayout.join("blobs/sha256");
    let manifest = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .find(|t| t.contains("tar+zstd"));
    assert!(manifest.is_some(), "skopeo wrote no zstd layers: {index}");
    let done = w
        .import_with(&zlayout, "skopeo-zstd", &ImportOptions::default())
        .unwrap();
    assert_eq!(done.layers, 2);
    check(&done.image);
    // The layout holds the three umoci manifests' blobs; --ref picks v1.
    let opts = ImportOptions {
        reference: Some("v1".into()),
        ..Default::default()
    };
    check(&w.import_with(&layout, "umoci-ref", &opts).unwrap().image);
}

#[test]
fn an_imported_image_runs_as_a_container_node_of_the_unprivileged_daemon() {
    let test = "an_imported_image_runs_as_a_container_node_of_the_unprivileged_daemon";
    if !tools_or_skip(
        test,
        &[
            ("crun", "crun"),
            ("nsenter", "util-linux"),
            ("busybox", "busybox-static"),
        ],
    ) {
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: no /dev/net/tun under CI"
        );
        ulan::testkit::skipped(format_args!("{test}: /dev/net/tun is missing"));
        return;
    }
    let Some(user) = common::cli::unprivileged_or_skip(test) else {
        return;
    };
    let probe = user
        .command("unshare")
        .args(["--user", "--map-root-user", "--mount", "--net", "true"])
        .output()
        .unwrap();
    if !probe.status.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: no user namespaces under CI"
        );
        ulan::testkit::skipped(format_args!(
            "{test}: the test user cannot make user namespaces"
        ));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let l1dir = tmp.path().join("l1");
    busybox_rootfs(&l1dir);
    std::fs::create_dir_all(l1dir.join("etc")).unwrap();
    std::fs::write(l1dir.join("etc/gone"), "layer 1").unwrap();
    std::fs::create_dir_all(l1dir.join("data")).unwrap();
    std::fs::write(l1dir.join("data/old"), "old").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", &l1dir).unwrap();
    let l1 = b.into_inner().unwrap();
    let l2 = tar_of(&[
        E::Dir("etc", 0o755),
        E::File("etc/.wh.gone", b"", 0o644),
        E::Dir("data", 0o755),
        E::File("data/.wh..wh..opq", b"", 0o644),
        E::File("data/new", b"new", 0o644),
        E::File("second", b"from layer 2\n", 0o644),
    ]);
    let parts = Parts::new(
        vec![(l1, true), (l2, false)],
        json!({"Entrypoint": ["sleep"], "Cmd": ["1000"], "Env": ["FOO=imported"], "WorkingDir": "/data"}),
    );
    let d = common::cli::Daemon::start(common::cli::CliUser::as_account("imp", user));
    let archive = d.home().join("bb.tar");
    std::fs::write(&archive, tar_files(&docker_files("bb:1", &parts))).unwrap();
    common::cli::give_to(&archive, d.account().unwrap());
    let out = d.ok(&["image", "import", &archive.display().to_string(), "bb"]);
    assert!(
        out.contains("docker archive") && out.contains("2 layers"),
        "{out}"
    );
    let listed = d.ok(&["image", "ls"]);
    assert!(listed.contains("bb"), "{listed}");
    // The image's files belong to the unprivileged user (root inside).
    let rootfs = d.data_dir().join("ulan/images/bb/rootfs");
    assert_eq!(
        std::fs::metadata(rootfs.join("second")).unwrap().uid(),
        d.account().unwrap().uid
    );
    d.ok(&["lan", "add", "l1"]);
    // An OCI layout is not a root filesystem: the error says to import it.
    let layout = d.home().join("layout");
    write_dir(&layout, &oci_files(&[("t", &parts)]));
    common::cli::give_to(&layout, d.account().unwrap());
    let layout_s = layout.display().to_string();
    let o = d.ulan(&[
        "node",
        "add",
        "l",
        "--kind",
        "container",
        "--image",
        &layout_s,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("ulan image import"),
        "{err}"
    );
    d.ok(&[
        "node",
        "add",
        "c",
        "--kind",
        "container",
        "--image",
        "bb",
        "--nic",
        "l1",
    ]);
    let o = d.ulan(&[
        "exec", "c", "--", "sh", "-c",
        "cat /second; test -e /etc/gone && echo present || echo gone; ls /data; \
         tr '\\0' ' ' < /proc/1/cmdline; echo; tr '\\0' '\\n' < /proc/1/environ | grep FOO; readlink /proc/1/cwd",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["from layer 2", "gone", "new"], "{text}");
    assert_eq!(
        lines[3].trim(),
        "sleep 1000",
        "the image's Entrypoint + Cmd: {text}"
    );
    assert_eq!(
        lines[4..],
        ["FOO=imported", "/data"],
        "the image's Env and WorkingDir: {text}"
    );
    eprintln!("exec in an imported image: {text}");
    // The image itself is never written by the node.
    let o = d.ulan(&["exec", "c", "--", "sh", "-c", "echo x > /second"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(rootfs.join("second")).unwrap(),
        b"from layer 2\n"
    );
}
