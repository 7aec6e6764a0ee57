//! The documents of an OCI image layout and of a docker archive, and
//! which image (and which platform's) they describe, checked blob by blob.

use std::collections::HashMap;
use std::io::Read;

use super::archive::{sha256_hex, sha256_of, Source};
use super::{json_err, ImportError, MAX_JSON};
use crate::vmlaunch::container::rootfs::ContainerImage;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct OciManifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The image config (OCI and docker share it).
#[derive(Debug, Default, Deserialize)]
pub(super) struct Config {
    #[serde(default)]
    pub(super) architecture: String,
    #[serde(default)]
    pub(super) os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The platform name of this host's architecture, as images spell it.
pub(super) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// One layer to apply: where it is and what it must hash to.
pub(super) struct LayerRef {
    pub(super) member: String,
    pub(super) label: String,
    /// The stored blob's digest (hex) and size, when known.
    pub(super) raw: Option<(String, Option<u64>)>,
    /// The uncompressed tar's digest (hex), from the config's diff_ids.
    pub(super) diff: Option<String>,
}

/// What to import: checked documents, layers still to read.
pub(super) struct Plan {
    pub(super) format: &'static str,
    pub(super) reference: Option<String>,
    pub(super) config: Config,
    pub(super) layers: Vec<LayerRef>,
}

// --- reading and checking -------------------------------------------------

/// Reads a JSON blob named by a descriptor, checking size and digest.
fn read_blob(src: &Source, d: &Descriptor) -> Result<Vec<u8>, ImportError> {
    let hex = sha256_hex(&d.digest)?;
    let blob_err = |message: String| ImportError::Blob {
        digest: d.digest.clone(),
        message,
    };
    if d.size > MAX_JSON {
        return Err(blob_err(format!(
            "declares {} bytes, more than a JSON document may have ({MAX_JSON})",
            d.size
        )));
    }
    let (r, size) = src
        .read(&format!("blobs/sha256/{hex}"))?
        .ok_or_else(|| blob_err("missing from the image".into()))?;
    if size != d.size {
        return Err(blob_err(format!(
            "declares {} bytes but the image holds {size}",
            d.size
        )));
    }
    let mut out = Vec::new();
    r.take(MAX_JSON)
        .read_to_end(&mut out)
        .map_err(|e| blob_err(e.to_string()))?;
    let got = sha256_of(&out);
    if got != hex {
        return Err(blob_err(format!("its content hashes to sha256:{got}")));
    }
    Ok(out)
}

fn is_index(d: &Descriptor, bytes: &[u8]) -> bool {
    d.media_type.contains("index")
        || d.media_type.contains("manifest.list")
        || serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .is_some_and(|v| v.get("manifests").is_some())
}

fn refs_of(d: &Descriptor) -> Vec<&str> {
    [REF_NAME, CONTAINERD_NAME]
        .iter()
        .filter_map(|k| d.annotations.get(*k).map(String::as_str))
        .collect()
}

/// Of several manifests for different platforms, this host's.
fn pick_platform<'a>(ds: &[&'a Descriptor]) -> Result<&'a Descriptor, ImportError> {
    let arch = host_arch();
    if let Some(d) = ds.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    }) {
        return Ok(d);
    }
    if ds.len() == 1 && ds[0].platform.is_none() {
        return Ok(ds[0]);
    }
    let have: Vec<String> = ds
        .iter()
        .map(|d| match &d.platform {
            Some(p) => format!("{}/{}", p.os, p.architecture),
            None => "unspecified".into(),
        })
        .collect();
    Err(ImportError::Choose(format!(
        "no image for linux/{arch} here (it has: {})",
        have.join(", ")
    )))
}

fn plan_oci(src: &Source, reference: Option<&str>) -> Result<Plan, ImportError> {
    let layout = src
        .read_small("oci-layout")?
        .ok_or_else(|| json_err("oci-layout", "missing"))?;
    let layout: serde_json::Value =
        serde_json::from_slice(&layout).map_err(|e| json_err("oci-layout", e))?;
    if !layout
        .get("imageLayoutVersion")
        .and_then(|v| v.as_str())
        .is_some_and(|v| v.starts_with("1."))
    {
        return Err(json_err("oci-layout", "no imageLayoutVersion 1.x"));
    }
    let index = src
        .read_small("index.json")?
        .ok_or_else(|| json_err("index.json", "missing"))?;
    let index: Index = serde_json::from_slice(&index).map_err(|e| json_err("index.json", e))?;
    let all: Vec<&Descriptor> = index.manifests.iter().collect();
    let chosen: Vec<&Descriptor> = match reference {
        Some(r) => all
            .iter()
            .copied()
            .filter(|d| refs_of(d).contains(&r))
            .collect(),
        None => all.clone(),
    };
    let mut digests: Vec<&str> = chosen.iter().map(|d| d.digest.as_str()).collect();
    digests.sort();
    digests.dedup();
    let top = match digests.len() {
        0 => {
            return Err(ImportError::Choose(match reference {
                Some(r) => format!("no image named {r:?} here ({})", list_refs(&all)),
                None => "the index lists no image".into(),
            }))
        }
        1 => chosen[0],
        _ if chosen.iter().all(|d| d.platform.is_some()) => pick_platform(&chosen)?,
        _ => {
            return Err(ImportError::Choose(format!(
                "it holds several images: pick one with --ref ({})",
                list_refs(&all)
            )))
        }
    };
    let name = reference
        .map(str::to_string)
        .or_else(|| refs_of(top).first().map(|s| s.to_string()));
    let mut d: Descriptor = top.clone();
    let mut depth = 0;
    let manifest = loop {
        let bytes = read_blob(src, &d)?;
        if !is_index(&d, &bytes) {
            break serde_json::from_slice::<OciManifest>(&bytes)
                .map_err(|e| json_err(&format!("manifest {}", d.digest), e))?;
        }
        depth += 1;
        if depth > 4 {
            return Err(json_err("index", "indexes nested more than 4 deep"));
        }
        let idx: Index = serde_json::from_slice(&bytes)
            .map_err(|e| json_err(&format!("index {}", d.digest), e))?;
        // Attestations are listed as platform unknown/unknown.
        let usable: Vec<&Descriptor> = idx
            .manifests
            .iter()
            .filter(|m| m.platform.as_ref().map_or(true, |p| p.os != "unknown"))
            .collect();
        d = pick_platform(&usable)?.clone();
    };
    let config_bytes = read_blob(src, &manifest.config)?;
    let config: Config = serde_json::from_slice(&config_bytes)
        .map_err(|e| json_err(&format!("config {}", manifest.config.digest), e))?;
    let diffs = diff_ids(&config, manifest.layers.len())?;
    let mut layers = Vec::new();
    for (i, l) in manifest.layers.iter().enumerate() {
        let hex = sha256_hex(&l.digest)?.to_string();
        layers.push(LayerRef {
            member: format!("blobs/sha256/{hex}"),
            label: l.digest.clone(),
            raw: Some((hex, Some(l.size))),
            diff: diffs.get(i).cloned(),
        });
    }
    Ok(Plan {
        format: if matches!(src, Source::Dir(_)) {
            "OCI layout"
        } else {
            "OCI archive"
        },
        reference: name,
        config,
        layers,
    })
}

fn list_refs(ds: &[&Descriptor]) -> String {
    let names: Vec<&str> = ds
        .iter()
        .filter_map(|d| refs_of(d).first().copied())
        .collect();
    if names.is_empty() {
        format!("{} unnamed entries", ds.len())
    } else {
        format!("named: {}", names.join(", "))
    }
}

/// The config's uncompressed layer digests (hex), one per layer.
fn diff_ids(config: &Config, layers: usize) -> Result<Vec<String>, ImportError> {
    let ids = config
        .rootfs
        .as_ref()
        .map(|r| &r.diff_ids[..])
        .unwrap_or(&[]);
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    if ids.len() != layers {
        return Err(json_err(
            "config",
            format!(
                "rootfs.diff_ids lists {} layers, the manifest {layers}",
                ids.len()
            ),
        ));
    }
    ids.iter()
        .map(|d| sha256_hex(d).map(str::to_string))
        .collect()
}

/// The sha256 a docker archive's file name promises: `blobs/sha256/HEX`
/// (docker 25+) or `HEX.json` / `HEX.tar` (older docker, skopeo).
fn digest_in_name(name: &str) -> Option<String> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))
        .or_else(|| name.strip_suffix(".tar"))?;
    let hex = hex.rsplit('/').next()?;
    sha256_hex(&format!("sha256:{hex}"))
        .ok()
        .map(str::to_string)
}

fn plan_docker(src: &Source, text: &[u8], reference: Option<&str>) -> Result<Plan, ImportError> {
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(text).map_err(|e| json_err("manifest.json", e))?;
    let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let all: Vec<String> = entries.iter().flat_map(tags).collect();
    let chosen: Vec<&DockerEntry> = match reference {
        Some(r) => entries
            .iter()
            .filter(|e| tags(e).iter().any(|t| t == r))
            .collect(),
        None => entries.iter().collect(),
    };
    let entry = match chosen.len() {
        1 => chosen[0],
        0 => {
            return Err(ImportError::Choose(match reference {
                Some(r) => format!("no image tagged {r:?} here (tags: {})", all.join(", ")),
                None => "manifest.json lists no image".into(),
            }))
        }
        _ => {
            return Err(ImportError::Choose(format!(
                "it holds several images: pick one with --ref (tags: {})",
                all.join(", ")
            )))
        }
    };
    let cfg_hex = digest_in_name(&entry.config).ok_or_else(|| {
        json_err(
            "manifest.json",
            format!(
                "config {:?} is not named by its digest: it cannot be checked",
                entry.config
            ),
        )
    })?;
    let config_bytes = read_member_checked(src, &entry.config, &format!("sha256:{cfg_hex}"))?;
    let config: Config =
        serde_json::from_slice(&config_bytes).map_err(|e| json_err("config", e))?;
    let diffs = diff_ids(&config, entry.layers.len())?;
    if diffs.len() != entry.layers.len() {
        return Err(json_err(
            "config",
            "no rootfs.diff_ids: the layers of a docker archive cannot be checked without them",
        ));
    }
    let layers = entry
        .layers
        .iter()
        .zip(diffs)
        .map(|(member, diff)| LayerRef {
            member: member.clone(),
            label: member.clone(),
            raw: member
                .starts_with("blobs/sha256/")
                .then(|| digest_in_name(member))
                .flatten()
                .map(|h| (h, None)),
            diff: Some(diff),
        })
        .collect();
    Ok(Plan {
        format: "docker archive",
        reference: reference
            .map(str::to_string)
            .or_else(|| entry.repo_tags.as_ref().and_then(|t| t.first().cloned())),
        config,
        layers,
    })
}

/// A small member whose digest is known (a docker archive's config).
fn read_member_checked(src: &Source, member: &str, digest: &str) -> Result<Vec<u8>, ImportError> {
    let blob_err = |message: String| ImportError::Blob {
        digest: digest.into(),
        message,
    };
    let bytes = src
        .read_small(member)?
        .ok_or_else(|| blob_err(format!("{member} is missing from the archive")))?;
    let got = sha256_of(&bytes);
    if format!("sha256:{got}") != digest {
        return Err(blob_err(format!("{member} hashes to sha256:{got}")));
    }
    Ok(bytes)
}

/// Which format `src` holds, and what to import from it.
pub(super) fn plan(src: &Source, reference: Option<&str>) -> Result<Plan, ImportError> {
    // docker 25+ writes both; its manifest.json carries the RepoTags.
    if let Some(text) = src.read_small("manifest.json")? {
        return plan_docker(src, &text, reference);
    }
    if src.has("oci-layout") || src.has("index.json") {
        return plan_oci(src, reference);
    }
    Err(ImportError::Unrecognized {
        path: src.label(),
        message: "not an OCI layout, OCI archive or docker archive \
                  (no oci-layout + index.json, no manifest.json)"
            .into(),
    })
}

fn no_nul(what: &str, v: &[String]) -> Result<(), ImportError> {
    if v.iter().any(|s| s.contains('\0')) {
        return Err(json_err("config", format!("{what} holds a NUL byte")));
    }
    Ok(())
}

/// How the image runs: Entrypoint + Cmd, Env, WorkingDir.
pub(super) fn container_part(config: &Config) -> Result<ContainerImage, ImportError> {
    let run = config.config.as_ref();
    let mut entrypoint: Vec<String> = run.and_then(|c| c.entrypoint.clone()).unwrap_or_default();
    entrypoint.extend(run.and_then(|c| c.cmd.clone()).unwrap_or_default());
    let env = run.and_then(|c| c.env.clone()).unwrap_or_default();
    no_nul("Entrypoint/Cmd", &entrypoint)?;
    no_nul("Env", &env)?;
    let workdir = run
        .and_then(|c| c.working_dir.clone())
        .filter(|w| !w.is_empty())
        .map(|w| {
            if w.starts_with('/') {
                w
            } else {
                format!("/{w}")
            }
        });
    no_nul("WorkingDir", workdir.as_slice())?;
    Ok(ContainerImage {
        rootfs: "rootfs".into(),
        entrypoint,
        env,
        workdir,
    })
}
