//! The image store and the built-in guest image.
//!
//! An image is a directory `<store>/<name>/` with an `image.json` manifest
//! naming the files inside it: a kernel and initrd (direct boot), a disk
//! (the read-only base of node overlays), or both. `ulan image build` makes
//! the built-in image from what the host already has: the Debian kernel
//! and its virtio modules, busybox-static, iperf3 with its libraries, and a
//! small init with the exec agent. Nothing is downloaded.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::names::check_name;
use crate::vmlaunch::cpio::Cpio;

pub const BUILTIN: &str = "builtin";
const MANIFEST: &str = "image.json";
/// Largest manifest read (they are a few hundred bytes).
const MAX_MANIFEST: u64 = 64 * 1024;

const INIT: &str = include_str!("guest/init.sh");
const AGENT: &str = include_str!("guest/agent.sh");
const POWERBUTTON: &str = include_str!("guest/powerbutton.sh");
const INITTAB: &str = include_str!("guest/inittab");
/// Modules the built-in image loads (their dependencies come first).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "button",
    "evdev",
];
/// Programs copied with their shared libraries.
const PROGRAMS: &[&str] = &["/usr/bin/iperf3"];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no image named {name:?} in {store}{hint}")]
    NotFound {
        name: String,
        store: String,
        hint: &'static str,
    },
    #[error("invalid image name: {0}")]
    Name(#[from] crate::names::NameError),
    #[error("image {name:?}: broken manifest: {message}")]
    Manifest { name: String, message: String },
    #[error("image {0:?} already exists")]
    Exists(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },
    #[error("cannot build the built-in image: {0}")]
    Build(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The store's default place: `$ULAN_IMAGES`, else
/// `$XDG_DATA_HOME/ulan/images`, else `~/.local/share/ulan/images`.
pub fn default_store_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ULAN_IMAGES").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let data = match std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(".local/share"),
    };
    data.join("ulan/images")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_format: Option<String>,
    /// Kernel command line the image needs, before ulan's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// The image runs ulan's exec agent.
    #[serde(default)]
    pub agent: bool,
    #[serde(default)]
    pub description: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// What made it: for the built-in image, a digest of the recipe, so a
    /// new ulan rebuilds an image made by an older one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
    /// A container image: its root filesystem and how it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::vmlaunch::container::rootfs::ContainerImage>,
}

/// A file named by a manifest must be a plain name inside the image dir.
fn plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

impl Manifest {
    /// A container image's manifest: made now, nothing to boot.
    pub fn container(
        description: String,
        part: crate::vmlaunch::container::rootfs::ContainerImage,
    ) -> Manifest {
        Manifest {
            kernel: None,
            initrd: None,
            disk: None,
            disk_format: None,
            append: None,
            agent: false,
            description,
            created: now(),
            kernel_version: None,
            recipe: None,
            container: Some(part),
        }
    }

    fn check(&self) -> Result<(), String> {
        for (what, v) in [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("disk", &self.disk),
        ] {
            if let Some(v) = v {
                if !plain_file_name(v) {
                    return Err(format!("{what} {v:?} is not a file name inside the image"));
                }
            }
        }
        if let Some(c) = &self.container {
            if !plain_file_name(&c.rootfs) {
                return Err(format!(
                    "rootfs {:?} is not a name inside the image",
                    c.rootfs
                ));
            }
        }
        if let Some(f) = &self.disk_format {
            if f.is_empty() || !f.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("disk_format {f:?} is not a format name"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// An image as the API and `--json` show it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageView {
    pub name: String,
    pub dir: String,
    #[serde(flatten)]
    pub manifest: Manifest,
}

impl Image {
    fn file(&self, name: &Option<String>) -> Option<PathBuf> {
        name.as_ref().map(|n| self.dir.join(n))
    }
    pub fn kernel_path(&self) -> Option<PathBuf> {
        self.file(&self.manifest.kernel)
    }
    pub fn initrd_path(&self) -> Option<PathBuf> {
        self.file(&self.manifest.initrd)
    }
    /// A container image's root filesystem directory.
    pub fn rootfs_path(&self) -> Option<PathBuf> {
        self.manifest
            .container
            .as_ref()
            .map(|c| self.dir.join(&c.rootfs))
    }
    pub fn disk_path(&self) -> Option<PathBuf> {
        self.file(&self.manifest.disk)
    }
    pub fn view(&self) -> ImageView {
        ImageView {
            name: self.name.clone(),
            dir: self.dir.display().to_string(),
            manifest: self.manifest.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// A scratch dir in the store, locked (flock) while this lives, so the
/// store's sweep leaves it alone.
#[derive(Debug)]
pub(crate) struct Scratch {
    path: PathBuf,
    _lock: Option<File>,
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// Holds the store's lock file (flock) while it lives.
pub(crate) struct StoreLock(#[allow(dead_code)] File);

impl ImageStore {
    /// The store at `dir`; nothing is made until something is written.
    pub fn open(dir: &Path) -> ImageStore {
        ImageStore {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        check_name(name)?;
        let dir = self.dir.join(name);
        let path = dir.join(MANIFEST);
        let text = match read_capped(&path, MAX_MANIFEST) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound {
                    name: name.into(),
                    store: self.dir.display().to_string(),
                    hint: if name == BUILTIN {
                        "; make it with `ulan image build`"
                    } else {
                        ""
                    },
                })
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| ImageError::Manifest {
                name: name.into(),
                message: e.to_string(),
            })?;
        manifest.check().map_err(|message| ImageError::Manifest {
            name: name.into(),
            message,
        })?;
        let img = Image {
            name: name.into(),
            dir,
            manifest,
        };
        for f in [img.kernel_path(), img.initrd_path(), img.disk_path()]
            .into_iter()
            .flatten()
        {
            if !f.is_file() {
                return Err(ImageError::Manifest {
                    name: name.into(),
                    message: format!("{} is missing", f.display()),
                });
            }
        }
        if let Some(r) = img.rootfs_path() {
            if !r.is_dir() {
                return Err(ImageError::Manifest {
                    name: name.into(),
                    message: format!("{} is not a directory", r.display()),
                });
            }
        }
        Ok(img)
    }

    /// Every image whose manifest reads; broken ones are skipped.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names.iter().filter_map(|n| self.get(n).ok()).collect())
    }

    pub(crate) fn lock(&self) -> Result<StoreLock, ImageError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.dir.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // Blocks until other builders finish.
        crate::ports::sys::flock_exclusive(&f, true).map_err(io_err(&path))?;
        Ok(StoreLock(f))
    }

    /// A fresh scratch directory inside the store (same file system, so
    /// the finished image is renamed into place atomically), locked while
    /// the returned guard lives. The scratch dirs of a build, import or
    /// commit that was killed (Ctrl-C, a crash) are swept first: nobody
    /// holds their lock any more.
    pub(crate) fn scratch(&self, name: &str) -> Result<Scratch, ImageError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        self.sweep_scratch();
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = loop {
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = self.dir.join(format!(
                ".tmp-{name}-{}-{}-{seq}",
                std::process::id(),
                now()
            ));
            match std::fs::create_dir(&tmp) {
                Ok(()) => break tmp,
                // Someone else's (another process with our pid, in another
                // pid namespace): never touched, another name taken.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&tmp)(e)),
            }
        };
        // The lock only keeps the sweep away. Where a directory cannot be
        // flocked (NFS emulates flock with POSIX locks, which need a
        // writable fd) the dir goes unlocked, and the sweep, which cannot
        // lock it either, leaves it alone.
        let lock = File::open(&tmp)
            .ok()
            .filter(|f| crate::ports::sys::flock_exclusive(f, false).unwrap_or(false));
        Ok(Scratch {
            path: tmp,
            _lock: lock,
        })
    }

    /// Removes the store's scratch (`.tmp-*`) and replaced (`.old-*`)
    /// dirs that nobody holds locked and that are over a minute old (a
    /// scratch dir is locked right after it is made: young ones are not
    /// even looked at, so a maker never finds its new dir locked).
    fn sweep_scratch(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with(".tmp-") || name.starts_with(".old-")) {
                continue;
            }
            let old = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() >= 60);
            if !old {
                continue;
            }
            let path = e.path();
            let Ok(dir) = File::open(&path) else {
                continue;
            };
            if crate::ports::sys::flock_exclusive(&dir, false).unwrap_or(false) {
                tracing::info!(
                    "removing {}, left by an image build or import that did not finish",
                    path.display()
                );
                if let Err(err) = std::fs::remove_dir_all(&path) {
                    tracing::warn!("cannot remove {}: {err}", path.display());
                }
            }
        }
    }

    /// Puts a finished scratch dir in place as `name`, replacing an older
    /// image of that name when `replace`.
    pub(crate) fn install(
        &self,
        tmp: &Path,
        name: &str,
        manifest: &Manifest,
        replace: bool,
    ) -> Result<Image, ImageError> {
        let text = serde_json::to_vec_pretty(manifest).map_err(|e| ImageError::Manifest {
            name: name.into(),
            message: e.to_string(),
        })?;
        let mpath = tmp.join(MANIFEST);
        std::fs::write(&mpath, text).map_err(io_err(&mpath))?;
        let dest = self.dir.join(name);
        if dest.exists() {
            if !replace {
                let _ = std::fs::remove_dir_all(tmp);
                return Err(ImageError::Exists(name.into()));
            }
            let old = self.dir.join(format!(".old-{name}-{}", now()));
            std::fs::rename(&dest, &old).map_err(io_err(&dest))?;
            let _ = std::fs::remove_dir_all(&old);
        }
        std::fs::rename(tmp, &dest).map_err(io_err(&dest))?;
        self.get(name)
    }

    /// Makes image `name` with a disk written by `write_disk` (given the
    /// path to write, e.g. a `qemu-img convert` target). The kernel, initrd,
    /// command line and agent of `boot_from` are carried over, so a disk
    /// committed from a built-in-image node boots the same way.
    pub fn add_disk(
        &self,
        name: &str,
        description: &str,
        boot_from: Option<&Image>,
        write_disk: impl FnOnce(&Path) -> Result<(), ImageError>,
    ) -> Result<Image, ImageError> {
        check_name(name)?;
        let _lock = self.lock()?;
        if self.dir.join(name).exists() {
            return Err(ImageError::Exists(name.into()));
        }
        let tmp = self.scratch(name)?;
        let result = (|| {
            let mut manifest = Manifest {
                kernel: None,
                initrd: None,
                disk: Some("disk.qcow2".into()),
                disk_format: Some("qcow2".into()),
                append: None,
                agent: false,
                description: description.into(),
                created: now(),
                kernel_version: None,
                recipe: None,
                container: None,
            };
            if let Some(src) = boot_from {
                for (file, slot) in [
                    (src.kernel_path(), &mut manifest.kernel),
                    (src.initrd_path(), &mut manifest.initrd),
                ] {
                    if let Some(f) = file {
                        let fname = f
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let to = tmp.join(&fname);
                        std::fs::copy(&f, &to).map_err(io_err(&f))?;
                        *slot = Some(fname);
                    }
                }
                manifest.append = src.manifest.append.clone();
                manifest.agent = src.manifest.agent;
                manifest.kernel_version = src.manifest.kernel_version.clone();
            }
            write_disk(&tmp.join("disk.qcow2"))?;
            self.install(&tmp, name, &manifest, false)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_capped(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    File::open(path)?.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(out)
}

/// Reports build progress (the CLI draws a bar; tests pass [`NoProgress`]).
pub trait Progress {
    fn begin(&self, steps: u64);
    fn step(&self, what: &str);
    fn done(&self, what: &str);
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: u64) {}
    fn step(&self, _: &str) {}
    fn done(&self, _: &str) {}
}

pub struct BarProgress(indicatif::ProgressBar);

impl Progress for BarProgress {
    fn begin(&self, steps: u64) {
        self.0.set_length(steps);
    }
    fn step(&self, what: &str) {
        self.0.set_message(what.to_string());
        self.0.inc(1);
    }
    fn done(&self, what: &str) {
        self.0.finish_with_message(what.to_string());
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn indicatif_progress() -> BarProgress {
    let bar = indicatif::ProgressBar::new(1);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}") {
        bar.set_style(style);
    }
    BarProgress(bar)
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub name: String,
    /// Default: the newest version in /lib/modules with a /boot/vmlinuz.
    pub kernel_version: Option<String>,
    /// Rebuild even when a current image exists.
    pub force: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            name: BUILTIN.into(),
            kernel_version: None,
            force: false,
        }
    }
}

/// Where the host's kernels and modules are (tests point these elsewhere).
#[derive(Debug, Clone)]
pub struct HostFiles {
    pub boot: PathBuf,
    pub modules: PathBuf,
    pub busybox: PathBuf,
}

impl Default for HostFiles {
    fn default() -> Self {
        HostFiles {
            boot: "/boot".into(),
            modules: "/lib/modules".into(),
            busybox: "/bin/busybox".into(),
        }
    }
}

/// Orders kernel versions like `6.1.0-9` < `6.1.0-10` (numbers as numbers).
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut num = String::new();
    let mut text = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                out.push((0, std::mem::take(&mut text)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((num.parse().unwrap_or(u64::MAX), String::new()));
                num.clear();
            }
            text.push(c);
        }
    }
    if !num.is_empty() {
        out.push((num.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !text.is_empty() {
        out.push((0, text));
    }
    out
}

/// The newest kernel version that has both modules and a vmlinuz.
pub fn pick_kernel_version(host: &HostFiles) -> Result<String, ImageError> {
    let mut versions: Vec<String> = std::fs::read_dir(&host.modules)
        .map_err(|e| {
            ImageError::Build(format!(
                "no kernel modules in {} ({e}); apt-get install linux-image-amd64",
                host.modules.display()
            ))
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|v| host.boot.join(format!("vmlinuz-{v}")).is_file())
        .collect();
    versions.sort_by_key(|v| version_key(v));
    versions.pop().ok_or_else(|| {
        ImageError::Build(format!(
            "no kernel with both {}/VERSION and {}/vmlinuz-VERSION; apt-get install linux-image-amd64",
            host.modules.display(),
            host.boot.display()
        ))
    })
}

/// `modules.dep` as module name -> (path, dependency paths).
fn parse_modules_dep(text: &str) -> std::collections::HashMap<String, (String, Vec<String>)> {
    let mut map = std::collections::HashMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let name = module_name(path);
        map.insert(
            name,
            (
                path.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ),
        );
    }
    map
}

fn module_name(path: &str) -> String {
    let file = path.trim().rsplit('/').next().unwrap_or("");
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

/// The modules to load, dependencies first, as paths relative to the
/// modules dir.
pub fn module_load_order(dep_text: &str, wanted: &[&str]) -> Result<Vec<String>, ImageError> {
    let deps = parse_modules_dep(dep_text);
    let mut order: Vec<String> = Vec::new();
    fn visit(
        name: &str,
        deps: &std::collections::HashMap<String, (String, Vec<String>)>,
        order: &mut Vec<String>,
        stack: &mut Vec<String>,
    ) -> Result<(), ImageError> {
        let (path, ds) = deps
            .get(name)
            .ok_or_else(|| ImageError::Build(format!("module {name} is not in modules.dep")))?;
        if order.contains(path) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) || stack.len() > 64 {
            return Err(ImageError::Build(format!(
                "module dependency loop at {name}"
            )));
        }
        stack.push(name.to_string());
        for d in ds {
            visit(&module_name(d), deps, order, stack)?;
        }
        stack.pop();
        order.push(path.clone());
        Ok(())
    }
    for w in wanted {
        visit(w, &deps, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

/// Shared libraries (and the loader) `ldd` lists for a program.
pub(crate) fn shared_libraries(program: &str) -> Result<Vec<PathBuf>, ImageError> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| ImageError::Tool {
            tool: "ldd".into(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool: format!("ldd {program}"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A digest of everything that shapes the built-in image, so a changed
/// recipe (a new init, more modules) makes ulan rebuild it.
fn recipe_digest(kernel_version: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let parts = [INIT, AGENT, POWERBUTTON, INITTAB, kernel_version];
    for p in parts
        .iter()
        .map(|s| s.as_bytes())
        .chain(MODULES.iter().map(|m| m.as_bytes()))
        .chain(PROGRAMS.iter().map(|m| m.as_bytes()))
    {
        for &b in p.iter().chain([0u8].iter()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("builtin-{h:016x}")
}

/// Builds the built-in image (or returns it untouched when a current one
/// exists and `force` is off).
pub fn build_builtin(
    store: &ImageStore,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Image, ImageError> {
    build_builtin_from(store, opts, &HostFiles::default(), progress)
}

pub fn build_builtin_from(
    store: &ImageStore,
    opts: &BuildOptions,
    host: &HostFiles,
    progress: &dyn Progress,
) -> Result<Image, ImageError> {
    check_name(&opts.name)?;
    let version = match &opts.kernel_version {
        Some(v) => v.clone(),
        None => pick_kernel_version(host)?,
    };
    let recipe = recipe_digest(&version);
    let current = |img: &Image| img.manifest.recipe.as_deref() == Some(recipe.as_str());
    if !opts.force {
        if let Ok(img) = store.get(&opts.name) {
            if current(&img) {
                progress.done("up to date");
                return Ok(img);
            }
        }
    }
    let _lock = store.lock()?;
    // Another builder may have finished while we waited for the lock.
    if !opts.force {
        if let Ok(img) = store.get(&opts.name) {
            if current(&img) {
                progress.done("up to date");
                return Ok(img);
            }
        }
    }
    let tmp = store.scratch(&opts.name)?;
    let result = build_into(&tmp, &version, host, progress).and_then(|()| {
        let manifest = Manifest {
            kernel: Some("vmlinuz".into()),
            initrd: Some("initrd.img".into()),
            disk: None,
            disk_format: None,
            append: None,
            agent: true,
            description: format!("ulan built-in image (kernel {version}, busybox, iperf3)"),
            created: now(),
            kernel_version: Some(version.clone()),
            recipe: Some(recipe.clone()),
            container: None,
        };
        store.install(&tmp, &opts.name, &manifest, true)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if result.is_ok() {
        progress.done("built-in image ready");
    }
    result
}

fn build_into(
    tmp: &Path,
    version: &str,
    host: &HostFiles,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    let mod_dir = host.modules.join(version);
    let libs: Vec<PathBuf> = PROGRAMS
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(|p| shared_libraries(p))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    progress.begin(5 + MODULES.len() as u64 + libs.len() as u64);

    progress.step("kernel");
    let kernel = host.boot.join(format!("vmlinuz-{version}"));
    std::fs::copy(&kernel, tmp.join("vmlinuz")).map_err(|e| {
        ImageError::Build(format!(
            "cannot read {} ({e}); it must be readable by you",
            kernel.display()
        ))
    })?;

    let mut w = Cpio::default();
    let mut made = BTreeSet::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "etc/ulan",
        "root",
        "lib",
        "lib/modules",
        "lib64",
        "var",
    ] {
        if made.insert(d.to_string()) {
            w.dir(d);
        }
    }
    // The kernel makes the console node itself while unpacking.
    w.entry(
        "dev/console",
        crate::vmlaunch::cpio::CHAR_DEV | 0o600,
        (5 << 8) | 1,
        &[],
    );

    progress.step("busybox");
    let bb = std::fs::read(&host.busybox).map_err(|e| {
        ImageError::Build(format!(
            "{} ({e}); apt-get install busybox-static",
            host.busybox.display()
        ))
    })?;
    if !crate::vmlaunch::uml::is_static_elf(&host.busybox).unwrap_or(false) {
        return Err(ImageError::Build(format!(
            "{} is not statically linked; apt-get install busybox-static",
            host.busybox.display()
        )));
    }
    w.file("bin/busybox", 0o755, &bb);
    w.symlink("bin/sh", "busybox");

    progress.step("init and agent");
    w.file("init", 0o755, INIT.as_bytes());
    w.file("etc/ulan/agent", 0o755, AGENT.as_bytes());
    w.file("etc/ulan/powerbutton", 0o755, POWERBUTTON.as_bytes());
    w.file("etc/inittab", 0o644, INITTAB.as_bytes());
    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    w.file("etc/group", 0o644, b"root:x:0:\n");
    w.file(
        "etc/profile",
        0o644,
        b"export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nPS1='\\h:\\w# '\n",
    );

    let dep_path = mod_dir.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path)
        .map_err(|e| ImageError::Build(format!("{}: {e}", dep_path.display())))?;
    let order = module_load_order(&dep_text, MODULES)?;
    let mut names = Vec::new();
    for rel in &order {
        let name = module_name(rel);
        progress.step(&format!("module {name}"));
        if !rel.ends_with(".ko") {
            return Err(ImageError::Build(format!(
                "module {rel} is compressed; the built-in image needs uncompressed modules"
            )));
        }
        let p = mod_dir.join(rel);
        let data = std::fs::read(&p).map_err(io_err(&p))?;
        w.file(&format!("lib/modules/{name}.ko"), 0o644, &data);
        names.push(name);
    }
    w.file(
        "lib/modules/order",
        0o644,
        format!("{}\n", names.join("\n")).as_bytes(),
    );

    for p in PROGRAMS.iter().filter(|p| Path::new(p).exists()) {
        let data = std::fs::read(p).map_err(io_err(Path::new(p)))?;
        let rel = p.trim_start_matches('/');
        w.parents(rel, &mut made);
        w.file(rel, 0o755, &data);
    }
    for lib in &libs {
        progress.step(&format!("{}", lib.display()));
        let data = std::fs::read(lib).map_err(io_err(lib))?;
        let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
        w.parents(&rel, &mut made);
        w.file(&rel, 0o755, &data);
    }

    progress.step("initramfs");
    let initrd = tmp.join("initrd.img");
    std::fs::write(&initrd, w.finish()).map_err(io_err(&initrd))?;
    Ok(())
}

/// The built-in image, built first if missing or made by an older recipe.
pub fn ensure_builtin(store: &ImageStore) -> Result<Image, ImageError> {
    build_builtin(store, &BuildOptions::default(), &NoProgress)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
";

    #[test]
    fn modules_load_after_their_dependencies() {
        let order = module_load_order(DEP, &["virtio_pci", "virtio_net"]).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert_eq!(names.len(), 8, "{names:?}");
        assert!(pos("virtio_ring") < pos("virtio"));
        assert!(pos("virtio") < pos("virtio_pci_modern_dev"));
        assert!(pos("virtio_pci_legacy_dev") < pos("virtio_pci"));
        assert!(pos("failover") < pos("net_failover"));
        assert!(pos("net_failover") < pos("virtio_net"));
        let e = module_load_order(DEP, &["nope"]).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        // A loop in a hostile modules.dep is an error, not a hang.
        let looped = "a.ko: b.ko\nb.ko: a.ko\n";
        assert!(module_load_order(looped, &["a"]).is_err());
    }

    #[test]
    fn ldd_output_and_versions() {
        let text = "\tlinux-vdso.so.1 (0x00007f)\n\tlibiperf.so.0 => /lib/x86_64-linux-gnu/libiperf.so.0 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n\tlibgone.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libiperf.so.0"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let mut v = vec!["6.1.0-10-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v, ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]);
    }

    fn write(dir: &Path, name: &str, manifest: &str, files: &[&str]) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(MANIFEST), manifest).unwrap();
        for f in files {
            std::fs::write(d.join(f), b"x").unwrap();
        }
    }

    #[test]
    fn broken_stores_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path());
        assert!(store.list().unwrap().is_empty());
        let e = store.get(BUILTIN).unwrap_err().to_string();
        assert!(e.contains("ulan image build"), "{e}");
        assert!(store.get("../etc").is_err());
        write(dir.path(), "junk", "not json", &[]);
        write(
            dir.path(),
            "escape",
            r#"{"kernel":"../../etc/passwd"}"#,
            &[],
        );
        write(dir.path(), "missing", r#"{"kernel":"vmlinuz"}"#, &[]);
        write(dir.path(), "extra", r#"{"kernel":"k","bogus":1}"#, &["k"]);
        write(
            dir.path(),
            "fmt",
            r#"{"disk":"d","disk_format":"qcow2;rm"}"#,
            &["d"],
        );
        write(
            dir.path(),
            "ok",
            r#"{"kernel":"k","initrd":"i","agent":true}"#,
            &["k", "i"],
        );
        std::fs::write(dir.path().join("huge.json"), vec![b' '; 100]).unwrap();
        for (name, want) in [
            ("junk", "broken manifest"),
            ("escape", "not a file name"),
            ("missing", "missing"),
            ("extra", "unknown field"),
            ("fmt", "disk_format"),
        ] {
            let e = store.get(name).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
        let ok = store.get("ok").unwrap();
        assert!(ok.manifest.agent);
        assert_eq!(ok.kernel_path().unwrap(), dir.path().join("ok/k"));
        let listed: Vec<String> = store.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(listed, ["ok"]);
    }

    #[test]
    fn add_disk_is_atomic_and_refuses_existing_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path());
        write(
            dir.path(),
            "base",
            r#"{"kernel":"k","initrd":"i","agent":true}"#,
            &["k", "i"],
        );
        let base = store.get("base").unwrap();
        let img = store
            .add_disk("new", "test", Some(&base), |p| {
                std::fs::write(p, b"disk").map_err(io_err(p))
            })
            .unwrap();
        assert!(img.manifest.agent);
        assert_eq!(std::fs::read(img.disk_path().unwrap()).unwrap(), b"disk");
        assert!(img.kernel_path().unwrap().is_file());
        assert!(matches!(
            store.add_disk("new", "again", None, |_| Ok(())),
            Err(ImageError::Exists(_))
        ));
        // A failing writer leaves nothing behind.
        let e = store.add_disk("bad", "x", None, |_| {
            Err(ImageError::Tool {
                tool: "qemu-img".into(),
                message: "boom".into(),
            })
        });
        assert!(e.is_err());
        assert!(store.get("bad").is_err());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// What a killed import or build left in the store goes at the next
    /// scratch; a scratch dir still held (another build going on) stays,
    /// however old.
    #[test]
    fn scratch_dirs_nobody_holds_are_swept_at_the_next_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path());
        let held = store.scratch("busy").unwrap();
        std::fs::write(held.join("part"), b"x").unwrap();
        let left = dir.path().join(".tmp-gone-999999-1");
        std::fs::create_dir_all(left.join("rootfs/etc")).unwrap();
        let replaced = dir.path().join(".old-x-1");
        std::fs::create_dir(&replaced).unwrap();
        let young = dir.path().join(".tmp-young-999999-2");
        std::fs::create_dir(&young).unwrap();
        let image = dir.path().join("kept");
        std::fs::create_dir(&image).unwrap();
        // An hour ago, all but `young`.
        let hour_ago = libc::timespec {
            tv_sec: (now() as libc::time_t) - 3600,
            tv_nsec: 0,
        };
        for p in [&*held, left.as_path(), replaced.as_path(), image.as_path()] {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: utimensat on a NUL-terminated path with two timespecs.
            let r = unsafe {
                libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [hour_ago, hour_ago].as_ptr(), 0)
            };
            assert_eq!(r, 0, "{}", p.display());
        }
        let next = store.scratch("next").unwrap();
        assert!(!left.exists(), "a stale scratch dir stayed");
        assert!(!replaced.exists(), "a stale .old dir stayed");
        assert!(held.join("part").exists(), "a held scratch dir was swept");
        assert!(
            young.exists(),
            "a scratch dir just made may not be locked yet"
        );
        assert!(image.exists());
        assert!(next.is_dir());
    }
}
