//! `ulan image import FILE NAME`: a container image from an OCI image
//! layout (a directory), an OCI archive (a tar of one) or a docker archive
//! (`docker save`: manifest.json with Config and Layers), told apart by
//! content, never by file name.
//!
//! Every blob is checked before it is used: an OCI descriptor's size and
//! sha256 digest; in a docker archive, the config's digest from its name
//! and each layer's uncompressed digest (the config's `rootfs.diff_ids`,
//! also checked for OCI images). JSON documents are read whole with a cap;
//! layers stream through the check into the unpacker (unpack.rs), so a
//! layer with a wrong digest is unpacked into the scratch dir first and
//! then thrown away with it. Layers are plain tar, gzip or zstd (by
//! content); bzip2 and xz layers are refused with a clear error.
//!
//! The image is made in a scratch dir of the store and put in place only
//! when whole: whatever fails, the scratch dir is removed.

mod archive;
mod layout;

use std::io::{self, BufRead, BufReader};
use std::path::Path;

use self::archive::{compression, Decoded, Hashed, Hashing, Source, TOO_BIG};
use self::layout::{container_part, host_arch, plan, LayerRef};
use super::rootfs::BUILTIN_CONTAINER;
use super::unpack::{UnpackError, Unpacker};
use crate::vmlaunch::image::{self, Image, ImageError, ImageStore, Manifest};

/// Default cap on the bytes an image unpacks to.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 30;
/// Largest JSON document read (index, manifest, config).
const MAX_JSON: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {message}")]
    Unrecognized { path: String, message: String },
    #[error("{what}: {message}")]
    Json { what: String, message: String },
    #[error("blob {digest}: {message}")]
    Blob { digest: String, message: String },
    #[error("{0}")]
    Choose(String),
    #[error("layer {index} ({label}): {message}")]
    Layer {
        index: usize,
        label: String,
        message: String,
    },
    #[error("layer {index} ({label}): {source}")]
    Unpack {
        index: usize,
        label: String,
        #[source]
        source: UnpackError,
    },
    #[error("{0}")]
    Image(#[from] ImageError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn json_err(what: &str, e: impl std::fmt::Display) -> ImportError {
    ImportError::Json {
        what: what.into(),
        message: e.to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Which image of several: an OCI ref name or a docker RepoTag.
    pub reference: Option<String>,
    /// Cap on the bytes of file content unpacked.
    pub max_bytes: u64,
    /// Replace an image of the same name.
    pub replace: bool,
}

impl Default for ImportOptions {
    fn default() -> ImportOptions {
        ImportOptions {
            reference: None,
            max_bytes: DEFAULT_MAX_BYTES,
            replace: false,
        }
    }
}

#[derive(Debug)]
pub struct Imported {
    pub image: Image,
    /// What kind of input it was: "OCI layout", "OCI archive", "docker archive".
    pub format: &'static str,
    pub layers: usize,
    /// Entries skipped (device nodes, fifos), a foreign architecture.
    pub warnings: Vec<String>,
}

/// Streams one layer through its checks into the unpacker.
fn apply_layer(
    src: &Source,
    index: usize,
    layer: &LayerRef,
    unpacker: &mut Unpacker,
    stream_budget: &mut u64,
) -> Result<(), ImportError> {
    let layer_err = |message: String| ImportError::Layer {
        index,
        label: layer.label.clone(),
        message,
    };
    let (r, size) = src
        .read(&layer.member)?
        .ok_or_else(|| layer_err(format!("{} is missing from the image", layer.member)))?;
    if let Some((_, Some(declared))) = &layer.raw {
        if *declared != size {
            return Err(layer_err(format!(
                "declares {declared} bytes but the image holds {size}"
            )));
        }
    }
    let mut raw = Hashed::default();
    let mut diff = Hashed::default();
    let read_err = |e: io::Error| {
        if e.to_string() == TOO_BIG {
            layer_err("the layer unpacks to more bytes than the limit (see --max-size)".into())
        } else {
            layer_err(format!("cannot read it: {e}"))
        }
    };
    {
        let mut buf = BufReader::new(Hashing {
            inner: r,
            state: &mut raw,
            limit: u64::MAX,
        });
        let head = buf.fill_buf().map_err(read_err)?.to_vec();
        let decoded = match compression(&head) {
            None => Decoded::Plain(buf),
            Some("gzip") => Decoded::Gzip(flate2::bufread::MultiGzDecoder::new(buf)),
            Some("zstd") => Decoded::Zstd(Box::new(archive::ZstdFrames::new(buf))),
            Some(kind) => {
                return Err(layer_err(format!(
                    "{kind}-compressed layers are not supported (plain tar, gzip and zstd are)"
                )))
            }
        };
        let mut archive = tar::Archive::new(Hashing {
            inner: decoded,
            state: &mut diff,
            limit: *stream_budget,
        });
        unpacker
            .apply(&mut archive)
            .map_err(|source| match source {
                UnpackError::Tar(e) if e.to_string() == TOO_BIG => layer_err(
                    "the layer unpacks to more bytes than the limit (see --max-size)".into(),
                ),
                source => ImportError::Unpack {
                    index,
                    label: layer.label.clone(),
                    source,
                },
            })?;
        // The rest of the stream (tar's end blocks, padding) counts too.
        let mut stream = archive.into_inner();
        io::copy(&mut stream, &mut io::sink()).map_err(read_err)?;
        let mut inner = stream.inner.into_inner();
        io::copy(&mut inner, &mut io::sink()).map_err(read_err)?;
    }
    *stream_budget = stream_budget.saturating_sub(diff.bytes);
    if let Some((hex, _)) = &layer.raw {
        if raw.hex() != *hex {
            return Err(layer_err(format!(
                "its content hashes to sha256:{}, not the digest it is named by",
                raw.hex()
            )));
        }
    }
    if let Some(hex) = &layer.diff {
        if diff.hex() != *hex {
            return Err(layer_err(format!(
                "its uncompressed tar hashes to sha256:{}, not the config's diff_id sha256:{hex}",
                diff.hex()
            )));
        }
    }
    Ok(())
}

/// Imports the image at `input` into `store` as `name`.
pub fn import(
    store: &ImageStore,
    input: &Path,
    name: &str,
    opts: &ImportOptions,
) -> Result<Imported, ImportError> {
    crate::names::check_name(name).map_err(ImageError::from)?;
    if name == image::BUILTIN || name == BUILTIN_CONTAINER {
        return Err(ImportError::Choose(format!(
            "{name:?} is the name of a built-in image: import under another name"
        )));
    }
    if !opts.replace && store.dir().join(name).exists() {
        return Err(ImageError::Exists(name.into()).into());
    }
    let src = Source::open(
        input,
        store.dir(),
        opts.max_bytes.saturating_mul(2).saturating_add(1 << 20),
    )?;
    let plan = plan(&src, opts.reference.as_deref())?;
    let tmp = store.scratch(name)?;
    let result = (|| {
        let root = tmp.join("rootfs");
        // A subvolume where the store is on Btrfs: nodes snapshot it.
        super::btrfs::make_root_dir(&root).map_err(io_err(&root))?;
        let mut unpacker = Unpacker::new(&root, opts.max_bytes);
        // The tar streams may be a bit larger than their content (headers).
        let mut budget = opts.max_bytes.saturating_mul(2).saturating_add(1 << 20);
        for (i, layer) in plan.layers.iter().enumerate() {
            apply_layer(&src, i + 1, layer, &mut unpacker, &mut budget)?;
        }
        let mut warnings = unpacker.finish().map_err(io_err(&root))?;
        let arch = host_arch();
        if !plan.config.architecture.is_empty() && plan.config.architecture != arch {
            warnings.push(format!(
                "the image is for {}/{}, this host is linux/{arch}: its programs may not run",
                plan.config.os, plan.config.architecture
            ));
        }
        let description = format!(
            "imported {} {}{}",
            plan.format,
            input.file_name().unwrap_or_default().to_string_lossy(),
            plan.reference
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        let manifest = Manifest::container(description, container_part(&plan.config)?);
        let _lock = store.lock()?;
        let image = store.install(&tmp, name, &manifest, opts.replace)?;
        Ok(Imported {
            image,
            format: plan.format,
            layers: plan.layers.len(),
            warnings,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
