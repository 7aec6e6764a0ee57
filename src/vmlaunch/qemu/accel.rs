//! Which accelerator a QEMU node gets. `auto` means KVM where KVM really
//! works, else TCG with one warning line. "Really works" is a boot test:
//! some hosts (nested `kvm_pvm`) have a /dev/kvm that answers
//! KVM_GET_API_VERSION and then hangs a stock kernel right after
//! "Probing EDD". The result costs up to a timeout, so it is cached per
//! host kernel, QEMU build and test kernel.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::vmlaunch::spec::Accel;

/// KVM's stable API version (linux/kvm.h KVM_API_VERSION).
pub const KVM_API_VERSION: i32 = 12;
/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
pub const KVM_DEVICE: &str = "/dev/kvm";
/// Present when the host's KVM is the nested, pagetable-based kvm_pvm.
pub const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";
/// Long enough for a working KVM on a loaded machine (it needs 1-2 s).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Cache entries kept (one per host kernel / QEMU / test kernel seen).
const MAX_CACHE_ENTRIES: usize = 8;
const CACHE_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("accel kvm was asked for, but KVM is not usable here: {0} (use accel auto or tcg)")]
    KvmUnusable(String),
    #[error("cannot run {}: {source} (is QEMU installed? apt-get install qemu-system-x86)", qemu.display())]
    QemuRun { qemu: PathBuf, source: io::Error },
    #[error("{} --version failed: {detail}", qemu.display())]
    QemuFailed { qemu: PathBuf, detail: String },
    #[error("no QEMU version in {0:?} (want \"QEMU emulator version X.Y.Z\")")]
    QemuVersion(String),
}

/// What the probe found. Serialized into the cache and `ulan doctor --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum KvmStatus {
    Usable,
    Unusable { reason: String },
}

impl KvmStatus {
    pub fn is_usable(&self) -> bool {
        matches!(self, KvmStatus::Usable)
    }

    fn unusable(reason: impl Into<String>) -> KvmStatus {
        KvmStatus::Unusable {
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub kvm: bool,
    /// One line for the user when `auto` fell back to TCG.
    pub warning: Option<String>,
}

/// Decides the accelerator. `status` is only called when the answer
/// depends on it (not for `tcg`).
pub fn resolve(
    requested: Accel,
    status: impl FnOnce() -> KvmStatus,
) -> Result<AccelChoice, AccelError> {
    match requested {
        Accel::Tcg => Ok(AccelChoice {
            kvm: false,
            warning: None,
        }),
        Accel::Kvm => match status() {
            KvmStatus::Usable => Ok(AccelChoice {
                kvm: true,
                warning: None,
            }),
            KvmStatus::Unusable { reason } => Err(AccelError::KvmUnusable(reason)),
        },
        Accel::Auto => Ok(match status() {
            KvmStatus::Usable => AccelChoice {
                kvm: true,
                warning: None,
            },
            KvmStatus::Unusable { reason } => AccelChoice {
                kvm: false,
                warning: Some(format!(
                    "KVM is not usable here ({reason}); using TCG (slower)"
                )),
            },
        }),
    }
}

/// QEMU's accelerator and CPU model arguments.
pub fn qemu_accel_args(kvm: bool, cpus: u32) -> Vec<String> {
    let accel = if kvm {
        "kvm"
    } else if cpus > 1 {
        // One host thread per vCPU; a single vCPU gains nothing from it.
        "tcg,thread=multi"
    } else {
        "tcg"
    };
    let cpu = if kvm { "host" } else { "max" };
    ["-accel", accel, "-cpu", cpu]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// `qemu-system-x86_64 --version`, as (major, minor, micro).
pub fn qemu_version(qemu: &Path) -> Result<(u32, u32, u32), AccelError> {
    parse_qemu_version(&qemu_version_line(qemu)?)
}

/// The first line of `qemu --version` (part of the probe cache key).
pub fn qemu_version_line(qemu: &Path) -> Result<String, AccelError> {
    let out = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| AccelError::QemuRun {
            qemu: qemu.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(AccelError::QemuFailed {
            qemu: qemu.to_path_buf(),
            detail: format!(
                "{}: {}",
                out.status,
                last_line(&String::from_utf8_lossy(&out.stderr))
            ),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// Parses "QEMU emulator version 7.2.22 (Debian ...)". A missing micro
/// version reads as 0; anything after the digits of a part is ignored
/// ("8.0.0-rc2").
pub fn parse_qemu_version(text: &str) -> Result<(u32, u32, u32), AccelError> {
    let bad = || AccelError::QemuVersion(text.chars().take(80).collect());
    let first = text.lines().next().ok_or_else(bad)?;
    let at = first.find("version ").ok_or_else(bad)?;
    let word = first[at + "version ".len()..]
        .split_whitespace()
        .next()
        .ok_or_else(bad)?;
    let mut parts = [0u32; 3];
    let mut count = 0;
    for piece in word.split('.').take(3) {
        let digits: &str = &piece[..piece
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(piece.len())];
        if digits.is_empty() || digits.len() > 9 {
            break;
        }
        parts[count] = digits.parse().map_err(|_| bad())?;
        count += 1;
        if digits.len() != piece.len() {
            break; // a suffix ends the version
        }
    }
    if count < 2 {
        return Err(bad());
    }
    Ok((parts[0], parts[1], parts[2]))
}

/// The cheap checks: the device exists, we may open it read-write, and it
/// speaks KVM's API version.
pub fn check_kvm_device(dev: &Path) -> Result<(), String> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dev)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "no {}: the kvm module is not loaded or virtualisation is off in the firmware",
                dev.display()
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "cannot open {} read-write: {e}; add yourself to the kvm group \
                 (sudo usermod -aG kvm $USER, then log in again)",
                dev.display()
            ))
        }
        Err(e) => return Err(format!("cannot open {}: {e}", dev.display())),
    };
    // SAFETY: an ioctl without argument on a file we own.
    let v = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v != KVM_API_VERSION {
        return Err(format!(
            "{} answers KVM_GET_API_VERSION with {v}, not {KVM_API_VERSION}",
            dev.display()
        ));
    }
    Ok(())
}

/// The host kernel that `qemu` can boot for the probe: the running
/// kernel's image if it is in /boot, else the newest readable vmlinuz.
pub fn find_probe_kernel() -> Option<PathBuf> {
    let release = host_release();
    let own = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    if File::open(&own).is_ok() {
        return Some(own);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
                && File::open(p).is_ok()
        })
        .collect();
    found.sort();
    found.pop()
}

/// The full probe, uncached: device checks, then a boot of `kernel`
/// under `-accel kvm` that must end (panic, no root) within `timeout`.
pub fn probe_kvm(qemu: &Path, kernel: &Path, timeout: Duration) -> KvmStatus {
    if let Err(reason) = check_kvm_device(Path::new(KVM_DEVICE)) {
        return KvmStatus::unusable(reason);
    }
    boot_probe(qemu, kernel, timeout).status
}

/// Only the boot test of [`probe_kvm`], uncached (the device checks are
/// [`check_kvm_device`]).
pub fn probe_kvm_boot(qemu: &Path, kernel: &Path, timeout: Duration) -> KvmStatus {
    boot_probe(qemu, kernel, timeout).status
}

/// [`probe_kvm`] with its boot test cached in [`cache_path`]. The device
/// checks are cheap and run every time (group membership can change).
pub fn probe_kvm_cached(qemu: &Path, kernel: &Path, timeout: Duration) -> KvmStatus {
    if let Err(reason) = check_kvm_device(Path::new(KVM_DEVICE)) {
        return KvmStatus::unusable(reason);
    }
    match cache_path() {
        Some(cache) => cached_boot_probe(&cache, qemu, kernel, timeout),
        None => boot_probe(qemu, kernel, timeout).status,
    }
}

/// `$XDG_CACHE_HOME/ulan/kvm-probe.json`, else `$HOME/.cache/ulan/...`.
pub fn cache_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        _ => match std::env::var_os("HOME") {
            Some(h) if Path::new(&h).is_absolute() => PathBuf::from(h).join(".cache"),
            _ => return None,
        },
    };
    Some(base.join("ulan").join("kvm-probe.json"))
}

/// What a boot probe result is valid for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeKey {
    /// `uname -r` of the host.
    pub host_release: String,
    /// First line of `qemu --version`.
    pub qemu: String,
    pub kernel: PathBuf,
    pub kernel_size: u64,
}

impl ProbeKey {
    pub fn current(qemu: &Path, kernel: &Path) -> Result<ProbeKey, String> {
        let qemu_line = qemu_version_line(qemu).map_err(|e| e.to_string())?;
        let kernel_size = std::fs::metadata(kernel)
            .map_err(|e| format!("probe kernel {}: {e}", kernel.display()))?
            .len();
        Ok(ProbeKey {
            host_release: host_release(),
            qemu: qemu_line,
            kernel: kernel.to_path_buf(),
            kernel_size,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry {
    key: ProbeKey,
    result: KvmStatus,
    /// Seconds since the epoch, for people reading the file.
    probed_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    entries: Vec<CacheEntry>,
}

/// The boot probe through the cache file `cache`. A missing, unreadable
/// or corrupt file counts as empty and is rewritten.
pub fn cached_boot_probe(cache: &Path, qemu: &Path, kernel: &Path, timeout: Duration) -> KvmStatus {
    let key = match ProbeKey::current(qemu, kernel) {
        Ok(k) => k,
        // Nothing to key on: probe (it reports the same problem).
        Err(_) => return boot_probe(qemu, kernel, timeout).status,
    };
    let mut file = read_cache(cache);
    if let Some(e) = file.entries.iter().find(|e| e.key == key) {
        return e.result.clone();
    }
    let probe = boot_probe(qemu, kernel, timeout);
    if probe.conclusive {
        file.entries.retain(|e| e.key != key);
        file.entries.insert(
            0,
            CacheEntry {
                key,
                result: probe.status.clone(),
                probed_at: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            },
        );
        file.entries.truncate(MAX_CACHE_ENTRIES);
        file.format = CACHE_FORMAT;
        if let Err(e) = write_cache(cache, &file) {
            tracing::debug!("cannot write {}: {e}", cache.display());
        }
    }
    probe.status
}

fn read_cache(path: &Path) -> CacheFile {
    let parsed = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<CacheFile>(&b).ok());
    match parsed {
        Some(f) if f.format == CACHE_FORMAT => f,
        _ => CacheFile::default(),
    }
}

fn write_cache(path: &Path, file: &CacheFile) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "cache path has no parent"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let text = serde_json::to_vec_pretty(file).map_err(io::Error::other)?;
    // Write then rename, so a concurrent reader never sees half a file.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".kvm-probe.{}.{nanos}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

struct BootProbe {
    status: KvmStatus,
    /// False when the probe could not run at all (missing kernel, QEMU
    /// not startable): not worth caching.
    conclusive: bool,
}

/// What a working KVM shows on the serial console before QEMU exits: the
/// kernel booted all the way to mounting a root it was not given. An
/// earlier stop (a triple fault, an early panic) proves nothing.
const BOOT_MARKER: &str = "Unable to mount root fs";

fn boot_probe(qemu: &Path, kernel: &Path, timeout: Duration) -> BootProbe {
    let pvm = Path::new(KVM_PVM_MODULE).exists();
    let pvm_note = if pvm {
        format!("; the host's KVM module is kvm_pvm ({KVM_PVM_MODULE}), which does not run stock guests")
    } else {
        String::new()
    };
    if let Err(e) = File::open(kernel) {
        // Without a kernel there is no boot test; kvm_pvm alone is
        // known to be broken, anything else gets the benefit of the doubt.
        return BootProbe {
            status: if pvm {
                KvmStatus::unusable(format!(
                    "cannot read the probe kernel {}: {e}{pvm_note}",
                    kernel.display()
                ))
            } else {
                KvmStatus::Usable
            },
            conclusive: false,
        };
    }
    let dir = match PrivateTempDir::new("kvm-probe") {
        Ok(d) => d,
        Err(e) => {
            return BootProbe {
                status: KvmStatus::unusable(format!("cannot make a temporary directory: {e}")),
                conclusive: false,
            }
        }
    };
    let console = dir.path().join("console.log");
    let errors = dir.path().join("qemu.err");
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(kernel)
    .args(["-append", "console=ttyS0 panic=-1"]);
    let run = match run_bounded(&mut cmd, &console, Some(&errors), timeout, |_| false) {
        Ok(r) => r,
        Err(e) => {
            return BootProbe {
                status: KvmStatus::unusable(format!("cannot run {}: {e}", qemu.display())),
                conclusive: false,
            }
        }
    };
    let seen = read_lossy(&console);
    let last = last_line(&seen);
    let status =
        match run.status {
            None => KvmStatus::unusable(format!(
                "a test guest ({}) did not finish booting under KVM within {} s \
             (last console line: {:?}){pvm_note}",
                kernel.display(),
                timeout.as_secs_f32(),
                last
            )),
            Some(_) if seen.contains(BOOT_MARKER) => KvmStatus::Usable,
            Some(st) => {
                let err = read_lossy(&errors);
                KvmStatus::unusable(format!(
                "QEMU with -accel kvm exited ({st}) before the test guest booted: {:?}{pvm_note}",
                if err.trim().is_empty() { last } else { last_line(&err) }
            ))
            }
        };
    BootProbe {
        status,
        conclusive: true,
    }
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub(crate) fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        // Only the tail matters, and a runaway console must not eat memory.
        const KEEP: u64 = 256 << 10;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > KEEP {
            let _ = f.seek(SeekFrom::Start(len - KEEP));
        }
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The last non-empty line, without control characters, at most 160 chars.
pub(crate) fn last_line(text: &str) -> String {
    text.lines()
        .map(|l| l.trim())
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(160)
        .collect()
}

/// How a bounded run ended.
pub(crate) struct BoundedRun {
    /// Its exit status when it ended by itself.
    pub status: Option<ExitStatus>,
    /// Killed at the timeout (else it exited, or `done` stopped it).
    pub timed_out: bool,
}

/// Runs `cmd` in a process group of its own with stdin from /dev/null,
/// stdout (and stderr, unless `errors` is given) into `log`. Returns when
/// it exits, when `done(log)` says enough was seen, or at `timeout`; in
/// every case the whole group is then killed, so helpers it forked do not
/// outlive it.
pub(crate) fn run_bounded(
    cmd: &mut Command,
    log: &Path,
    errors: Option<&Path>,
    timeout: Duration,
    done: impl Fn(&Path) -> bool,
) -> io::Result<BoundedRun> {
    let out = File::create(log)?;
    let err = match errors {
        Some(p) => File::create(p)?,
        None => out.try_clone()?,
    };
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pgid = child.id() as libc::pid_t;
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => {
                kill_group(pgid);
                let _ = child.wait();
                return Err(e);
            }
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break None;
        }
        if done(log) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    kill_group(pgid);
    if status.is_none() {
        let _ = child.wait();
    }
    Ok(BoundedRun { status, timed_out })
}

fn kill_group(pgid: libc::pid_t) {
    if pgid > 1 {
        // SAFETY: plain syscall on a group we created; ESRCH is fine.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// A mode-0700 directory under the system temp dir, removed on drop.
pub(crate) struct PrivateTempDir(PathBuf);

impl PrivateTempDir {
    pub fn new(prefix: &str) -> io::Result<PrivateTempDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for _ in 0..16 {
            let p = std::env::temp_dir().join(format!(
                "ulan-{prefix}-{}-{}-{nanos:x}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => return Ok(PrivateTempDir(p)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free temporary directory name",
        ))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateTempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unusable(r: &str) -> KvmStatus {
        KvmStatus::unusable(r)
    }

    #[test]
    fn resolve_follows_the_probe() {
        let c = resolve(Accel::Auto, || KvmStatus::Usable).unwrap();
        assert_eq!(
            c,
            AccelChoice {
                kvm: true,
                warning: None
            }
        );
        let c = resolve(Accel::Auto, || unusable("hangs")).unwrap();
        assert!(!c.kvm);
        assert_eq!(
            c.warning.as_deref(),
            Some("KVM is not usable here (hangs); using TCG (slower)")
        );
        assert!(resolve(Accel::Kvm, || KvmStatus::Usable).unwrap().kvm);
        let e = resolve(Accel::Kvm, || unusable("no /dev/kvm: x")).unwrap_err();
        assert!(matches!(&e, AccelError::KvmUnusable(r) if r == "no /dev/kvm: x"));
        assert!(e.to_string().contains("no /dev/kvm: x"));
    }

    #[test]
    fn tcg_never_probes() {
        let c = resolve(Accel::Tcg, || panic!("probed for tcg")).unwrap();
        assert_eq!(
            c,
            AccelChoice {
                kvm: false,
                warning: None
            }
        );
    }

    #[test]
    fn accel_args() {
        assert_eq!(qemu_accel_args(true, 4), ["-accel", "kvm", "-cpu", "host"]);
        assert_eq!(
            qemu_accel_args(false, 2),
            ["-accel", "tcg,thread=multi", "-cpu", "max"]
        );
        assert_eq!(qemu_accel_args(false, 1), ["-accel", "tcg", "-cpu", "max"]);
    }

    #[test]
    fn parses_real_versions() {
        let cases = [
            (
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                 Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n",
                (7, 2, 22),
            ),
            (
                "QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)",
                (8, 2, 2),
            ),
            (
                "QEMU emulator version 9.0.50 (v9.0.0-1234-gdeadbeef)",
                (9, 0, 50),
            ),
            ("QEMU emulator version 6.2", (6, 2, 0)),
            ("QEMU emulator version 8.0.0-rc2", (8, 0, 0)),
            ("QEMU emulator version 10.1.0\r\n", (10, 1, 0)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_qemu_version(text).unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn refuses_hostile_versions() {
        for text in [
            "",
            "\n",
            "version",
            "QEMU emulator version ",
            "QEMU emulator version x.y.z",
            "QEMU emulator version 7",
            "QEMU emulator version 7.",
            "QEMU emulator version .2.1",
            "QEMU emulator version 99999999999.1.1",
            "QEMU emulator version 4294967296.0.0",
            "Copyright\nQEMU emulator version 7.2.0",
            "QEMU emulator version \u{0}7.2.0",
        ] {
            assert!(parse_qemu_version(text).is_err(), "{text:?} accepted");
        }
        // Huge input: no panic, bounded error text.
        let big = format!("QEMU emulator version {}", "9".repeat(100_000));
        let e = parse_qemu_version(&big).unwrap_err().to_string();
        assert!(e.len() < 200);
    }

    #[test]
    fn qemu_version_of_a_missing_binary_names_it() {
        let e = qemu_version(Path::new("/nonexistent/qemu-system-x86_64")).unwrap_err();
        assert!(matches!(e, AccelError::QemuRun { .. }));
        assert!(e.to_string().contains("/nonexistent/qemu-system-x86_64"));
    }

    #[test]
    fn kvm_device_checks() {
        let dir = PrivateTempDir::new("kvm-dev-test").unwrap();
        let e = check_kvm_device(&dir.path().join("kvm")).unwrap_err();
        assert!(e.starts_with("no "), "{e}");
        // A regular file opens but is no KVM: the ioctl fails.
        let f = dir.path().join("notkvm");
        std::fs::write(&f, b"").unwrap();
        let e = check_kvm_device(&f).unwrap_err();
        assert!(e.contains("KVM_GET_API_VERSION"), "{e}");
    }

    #[test]
    fn last_line_is_clean_and_bounded() {
        assert_eq!(last_line("a\nb\n\n  \n"), "b");
        assert_eq!(last_line(""), "");
        assert_eq!(last_line("x\u{1b}[0my"), "x[0my");
        assert_eq!(last_line(&"z".repeat(1000)).len(), 160);
    }

    /// A fake `qemu` (a shell script) stands in for the real one, so the
    /// cache logic is tested without booting anything.
    fn fake_qemu(dir: &Path, version: &str, console: &str) -> PathBuf {
        let p = dir.join("qemu");
        let counter = dir.join("runs");
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\n\
                 if [ \"$1\" = --version ]; then echo '{version}'; exit 0; fi\n\
                 echo run >> '{}'\n\
                 printf '%s\\n' '{console}'\n",
                counter.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p
    }

    fn runs(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    #[test]
    fn an_early_stop_is_not_a_boot() {
        let dir = PrivateTempDir::new("kvm-early-test").unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        // A guest that starts, then triple-faults (-no-reboot: QEMU exits).
        let qemu = fake_qemu(
            dir.path(),
            "QEMU emulator version 7.2.0",
            "Linux version 6.1.0",
        );
        let st = probe_kvm_boot(&qemu, &kernel, Duration::from_secs(10));
        assert!(
            matches!(&st, KvmStatus::Unusable { reason } if reason.contains("Linux version 6.1.0")),
            "{st:?}"
        );
        // No kernel to boot: not cached, and not held against a normal host.
        let p = boot_probe(&qemu, &dir.path().join("missing"), Duration::from_secs(1));
        assert!(!p.conclusive);
        assert_eq!(p.status.is_usable(), !Path::new(KVM_PVM_MODULE).exists());
    }

    #[test]
    fn cache_hits_misses_and_corruption() {
        let dir = PrivateTempDir::new("kvm-cache-test").unwrap();
        let d = dir.path();
        let kernel = d.join("vmlinuz");
        std::fs::write(&kernel, b"kernel").unwrap();
        let qemu = fake_qemu(
            d,
            "QEMU emulator version 7.2.22",
            "Kernel panic - not syncing: VFS: Unable to mount root fs",
        );
        let cache = d.join("c").join("ulan").join("kvm-probe.json");
        let t = Duration::from_secs(10);

        let st = cached_boot_probe(&cache, &qemu, &kernel, t);
        assert_eq!(st, KvmStatus::Usable);
        assert_eq!(runs(d), 1);
        let text = std::fs::read_to_string(&cache).unwrap();
        assert!(text.contains("QEMU emulator version 7.2.22"), "{text}");
        assert!(text.contains(&kernel.display().to_string()));

        // Same key: no new run.
        assert_eq!(
            cached_boot_probe(&cache, &qemu, &kernel, t),
            KvmStatus::Usable
        );
        assert_eq!(runs(d), 1);

        // Kernel size changes the key.
        std::fs::write(&kernel, b"kernel v2").unwrap();
        cached_boot_probe(&cache, &qemu, &kernel, t);
        assert_eq!(runs(d), 2);

        // A different QEMU build changes the key, and the old entry stays.
        let qemu = fake_qemu(d, "QEMU emulator version 8.2.2", "no markers here");
        let st = cached_boot_probe(&cache, &qemu, &kernel, t);
        assert!(
            matches!(&st, KvmStatus::Unusable { reason } if reason.contains("no markers here")),
            "{st:?}"
        );
        assert_eq!(runs(d), 3);
        let f = read_cache(&cache);
        assert_eq!(f.entries.len(), 3);
        assert_eq!(f.entries[0].key.qemu, "QEMU emulator version 8.2.2");

        // Corrupt: ignored, probed again, rewritten as valid JSON.
        std::fs::write(&cache, b"{\"format\":1,\"entries\":[{\"key\":").unwrap();
        cached_boot_probe(&cache, &qemu, &kernel, t);
        assert_eq!(runs(d), 4);
        assert_eq!(read_cache(&cache).entries.len(), 1);
        cached_boot_probe(&cache, &qemu, &kernel, t);
        assert_eq!(runs(d), 4);
    }

    /// Gone or a zombie waiting for its (dead) parent's reaper.
    fn gone(pid: i32) -> bool {
        for _ in 0..40 {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                Ok(s) if s.rsplit(')').next().unwrap().trim_start().starts_with('Z') => {
                    return true
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(25)),
            }
        }
        false
    }

    #[test]
    fn a_hanging_guest_is_killed_at_the_timeout() {
        let dir = PrivateTempDir::new("kvm-hang-test").unwrap();
        let d = dir.path();
        let kernel = d.join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let qemu = d.join("qemu");
        // Prints a line, then hangs with a child of its own, like a
        // guest stuck after "Probing EDD".
        let pidfile = d.join("child.pid");
        std::fs::write(
            &qemu,
            format!(
                "#!/bin/sh\necho 'Probing EDD (edd=off to disable)... ok'\n\
                 sleep 600 & echo $! > '{}'\nwait\n",
                pidfile.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&qemu, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let t0 = Instant::now();
        let p = boot_probe(&qemu, &kernel, Duration::from_millis(700));
        assert!(t0.elapsed() < Duration::from_secs(5));
        match p.status {
            KvmStatus::Unusable { reason } => {
                assert!(reason.contains("within 0.7 s"), "{reason}");
                assert!(reason.contains("Probing EDD"), "{reason}");
            }
            s => panic!("{s:?}"),
        }
        // The forked helper died with the group.
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid), "helper {pid} survived the probe");
    }
}
