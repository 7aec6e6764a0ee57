//! `ulan doctor`: what this machine can and cannot do for a lab, one line
//! per check, each with a fix. Nothing here changes the machine, except
//! the KVM probe's cache file and a run directory made and removed again
//! to see that it can be.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::vmlaunch::qemu::accel::{self, KvmStatus, KVM_PVM_MODULE};
use crate::vmlaunch::uml::{self, find_in_path, UmlStatus};

/// QEMU's `-netdev stream` and `-netdev dgram` arrived in 7.2.
pub const MIN_QEMU: (u32, u32, u32) = (7, 2, 0);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What to check, and where. [`DoctorOptions::from_env`] has the defaults.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// Binaries: a bare name is looked up in $PATH.
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub uml: PathBuf,
    pub vde_plug: PathBuf,
    pub kvm_device: PathBuf,
    /// The kernel the KVM probe boots; None: none found.
    pub probe_kernel: Option<PathBuf>,
    /// The KVM probe's cache; None: probe every time.
    pub kvm_cache: Option<PathBuf>,
    pub kvm_timeout: Duration,
    pub uml_timeout: Duration,
    pub image_store: Option<PathBuf>,
    /// ulan's base run directory (labs live below it).
    pub run_dir: PathBuf,
    pub shm_dir: PathBuf,
    /// `net.unix.max_dgram_qlen` of this network namespace.
    pub dgram_qlen_file: PathBuf,
}

impl DoctorOptions {
    pub fn from_env() -> DoctorOptions {
        DoctorOptions {
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            uml: uml::DEFAULT_UML_BINARY.into(),
            vde_plug: "vde_plug".into(),
            kvm_device: accel::KVM_DEVICE.into(),
            probe_kernel: accel::find_probe_kernel(),
            kvm_cache: accel::cache_path(),
            kvm_timeout: accel::DEFAULT_PROBE_TIMEOUT,
            uml_timeout: uml::DEFAULT_PROBE_TIMEOUT,
            image_store: default_image_store(),
            run_dir: crate::daemon::base_dir(),
            shm_dir: "/dev/shm".into(),
            dgram_qlen_file: DGRAM_QLEN_FILE.into(),
        }
    }
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions::from_env()
    }
}

/// `$ULAN_IMAGES`, else `$XDG_DATA_HOME/ulan/images`, else
/// `$HOME/.local/share/ulan/images`.
pub fn default_image_store() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    image_store_from(var("ULAN_IMAGES"), var("XDG_DATA_HOME"), var("HOME"))
}

/// [`default_image_store`] from given values; relative ones are ignored,
/// as the XDG spec says.
pub fn image_store_from(
    ulan_images: Option<PathBuf>,
    xdg_data_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    let abs = |p: Option<PathBuf>| p.filter(|p| p.is_absolute());
    abs(ulan_images)
        .or_else(|| abs(xdg_data_home).map(|d| d.join("ulan").join("images")))
        .or_else(|| abs(home).map(|h| h.join(".local/share/ulan/images")))
}

/// Every check, in a fixed order.
pub fn run_checks(opts: &DoctorOptions) -> Vec<Check> {
    vec![
        check_qemu(&opts.qemu),
        check_nic_transport(&opts.qemu),
        check_qemu_img(&opts.qemu_img),
        check_kvm(opts),
        check_uml(&opts.uml, opts.uml_timeout),
        check_vde_plug(&opts.vde_plug),
        check_shm(&opts.shm_dir),
        check_dgram_qlen(&opts.dgram_qlen_file),
        check_run_dir(&opts.run_dir),
        check_image(opts.image_store.as_deref()),
        check_crun(),
        check_container_limits(),
    ]
}

/// Container nodes need crun (and nsenter, from util-linux).
pub fn check_crun() -> Check {
    const NAME: &str = "crun";
    match crate::vmlaunch::container::find_crun() {
        Ok(p) => Check::ok(NAME, format!("{} (container nodes)", p.display())),
        Err(_) => Check::bad(
            NAME,
            Status::Warn,
            "crun not found (optional: container nodes need it)",
            "apt-get install crun",
        ),
    }
}

/// Whether container limits (memory, cpu, pids) can apply.
pub fn check_container_limits() -> Check {
    use crate::vmlaunch::container::limits::{probe, Delegation};
    const NAME: &str = "cgroups";
    match probe() {
        Ok(Delegation::V2 { base }) => Check::ok(
            NAME,
            format!(
                "this shell's cgroup v2 {} is delegated: container limits apply in a daemon \
                 started from here",
                base.display()
            ),
        ),
        Ok(Delegation::V1 { memory, .. }) => Check::ok(
            NAME,
            format!(
                "this shell's cgroup v1 cgroups are this user's ({} and the same in cpu and \
                 pids): container limits apply in a daemon started from here",
                memory.display()
            ),
        ),
        Err(why) => Check::bad(
            NAME,
            Status::Warn,
            format!("container memory/cpu/pids limits are not applied: {why}"),
            "on cgroup v2 (the default of current systems; boot with \
             systemd.unified_cgroup_hierarchy=1 otherwise), run the daemon in a cgroup \
             delegated to you: `systemd-run --user --scope -p Delegate=yes ulan daemon` (or a \
             user unit with Delegate=yes); on cgroup v1, an admin makes a cgroup in each of \
             the memory, cpu and pids hierarchies, chowns it and its cgroup.procs to you, \
             and the daemon is started in them",
        ),
    }
}

/// The worst status: `fail` makes `ulan doctor` exit non-zero.
pub fn worst(checks: &[Check]) -> Status {
    checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok)
}

/// One aligned line per check: status, name, detail, then the fix.
pub fn render(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max(9)
        + 2;
    let mut out = String::new();
    for c in checks {
        let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let _ = write!(
            out,
            "{:<6}{:<width$}{}",
            c.status.as_str(),
            c.name,
            one_line(&c.detail)
        );
        if let Some(fix) = &c.fix {
            let _ = write!(out, "; fix: {}", one_line(fix));
        }
        out.push('\n');
    }
    out
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn version_text(v: (u32, u32, u32)) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

pub fn check_qemu(qemu: &Path) -> Check {
    const NAME: &str = "qemu";
    let Some(path) = find_in_path(qemu) else {
        return Check::bad(
            NAME,
            Status::Fail,
            format!("{} not found", qemu.display()),
            "apt-get install qemu-system-x86 (QEMU 7.2 or newer)",
        );
    };
    match accel::qemu_version(&path) {
        Ok(v) if v >= MIN_QEMU => {
            Check::ok(NAME, format!("{} {}", display_name(&path), version_text(v)))
        }
        Ok(v) => Check::bad(
            NAME,
            Status::Fail,
            format!(
                "{} {} is too old: -netdev stream and dgram need QEMU 7.2",
                display_name(&path),
                version_text(v)
            ),
            "install QEMU 7.2 or newer (Debian 12, Ubuntu 23.04 and later have it)",
        ),
        Err(e) => Check::bad(
            NAME,
            Status::Fail,
            e.to_string(),
            "reinstall QEMU: apt-get install --reinstall qemu-system-x86",
        ),
    }
}

/// Which NIC transport a QEMU node gets, and why: vhost-user (ulan serves
/// the guest's rings in shared memory, no system call per frame) when this
/// QEMU has `-netdev vhost-user` and the kernel has memfd; else say how to
/// pick a socket transport.
pub fn check_nic_transport(qemu: &Path) -> Check {
    const NAME: &str = "nic transport";
    let Some(path) = find_in_path(qemu) else {
        return Check::bad(
            NAME,
            Status::Warn,
            "no QEMU to ask which netdevs it has",
            "install qemu-system-x86",
        );
    };
    let help = std::process::Command::new(&path)
        .args(["-netdev", "help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !help.lines().any(|l| l.trim() == "vhost-user") {
        return Check::bad(
            NAME,
            Status::Warn,
            format!(
                "{} has no -netdev vhost-user: QEMU nodes need `transport: stream` (or dgram, vde)",
                display_name(&path)
            ),
            "use a QEMU built with vhost-user (Debian's is), or set transport on each NIC",
        );
    }
    // SAFETY: memfd_create with a static name; the fd is closed at once.
    let fd = unsafe { libc::memfd_create(c"ulan-doctor".as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Check::bad(
            NAME,
            Status::Warn,
            format!(
                "memfd_create fails ({}): vhost-user guests cannot share their RAM",
                std::io::Error::last_os_error()
            ),
            "set `transport: stream` on QEMU NICs",
        );
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    Check::ok(
        NAME,
        "QEMU nodes get vhost-user NICs by default (ulan serves the guests' rings in shared memory: no system call per frame); stream, dgram and vde on request",
    )
}

pub fn check_qemu_img(qemu_img: &Path) -> Check {
    const NAME: &str = "qemu-img";
    let Some(path) = find_in_path(qemu_img) else {
        return Check::bad(
            NAME,
            Status::Fail,
            format!(
                "{} not found (nodes run on qcow2 overlays of their image)",
                qemu_img.display()
            ),
            "apt-get install qemu-utils",
        );
    };
    match accel::qemu_version(&path) {
        Ok(v) => Check::ok(NAME, format!("{} {}", display_name(&path), version_text(v))),
        Err(e) => Check::bad(
            NAME,
            Status::Fail,
            e.to_string(),
            "reinstall it: apt-get install --reinstall qemu-utils",
        ),
    }
}

pub fn check_kvm(opts: &DoctorOptions) -> Check {
    const NAME: &str = "kvm";
    if let Err(reason) = accel::check_kvm_device(&opts.kvm_device) {
        let fix = if reason.contains("kvm group") {
            "sudo usermod -aG kvm $USER, then log in again; until then nodes use TCG"
        } else {
            "enable virtualisation (VT-x/AMD-V) and load kvm_intel or kvm_amd; until then nodes use TCG"
        };
        return Check::bad(NAME, Status::Warn, reason, fix);
    }
    kvm_boot_check(opts)
}

/// The part of the KVM check after the device answered.
fn kvm_boot_check(opts: &DoctorOptions) -> Check {
    const NAME: &str = "kvm";
    const TCG: &str = "nothing needed: nodes with accel auto use TCG (slower)";
    let Some(qemu) = find_in_path(&opts.qemu) else {
        return Check::bad(
            NAME,
            Status::Warn,
            format!(
                "{} works, but the boot test needs QEMU",
                opts.kvm_device.display()
            ),
            "install QEMU (see the qemu line)",
        );
    };
    let Some(kernel) = &opts.probe_kernel else {
        if Path::new(KVM_PVM_MODULE).exists() {
            return Check::bad(
                NAME,
                Status::Warn,
                format!(
                    "the host's KVM is kvm_pvm ({KVM_PVM_MODULE}), which does not run stock guests"
                ),
                TCG,
            );
        }
        return Check::ok(
            NAME,
            format!(
                "{} answers (no kernel image to boot-test it: /boot/vmlinuz-* unreadable)",
                opts.kvm_device.display()
            ),
        );
    };
    let status = match &opts.kvm_cache {
        Some(cache) => accel::cached_boot_probe(cache, &qemu, kernel, opts.kvm_timeout),
        None => accel::probe_kvm_boot(&qemu, kernel, opts.kvm_timeout),
    };
    match status {
        KvmStatus::Usable => Check::ok(NAME, "KVM works (a test guest booted under it)"),
        KvmStatus::Unusable { reason } => Check::bad(NAME, Status::Warn, reason, TCG),
    }
}

pub fn check_uml(binary: &Path, timeout: Duration) -> Check {
    const NAME: &str = "uml";
    match uml::probe_uml(binary, timeout) {
        UmlStatus::Boots => {
            let version = find_in_path(binary)
                .and_then(|p| {
                    std::process::Command::new(p)
                        .arg("--version")
                        .stdin(std::process::Stdio::null())
                        .output()
                        .ok()
                })
                .map(|o| accel::last_line(&String::from_utf8_lossy(&o.stdout)))
                .filter(|v| !v.is_empty())
                .map(|v| format!(" {v}"))
                .unwrap_or_default();
            Check::ok(NAME, format!("{}{version} boots", display_name(binary)))
        }
        UmlStatus::Fails { reason } => Check::bad(
            NAME,
            Status::Warn,
            reason,
            "use kind: qemu nodes on this host",
        ),
        UmlStatus::Missing => Check::bad(
            NAME,
            Status::Warn,
            format!(
                "{} not found (only kind: uml nodes need it)",
                binary.display()
            ),
            "apt-get install user-mode-linux",
        ),
    }
}

pub fn check_vde_plug(vde_plug: &Path) -> Check {
    const NAME: &str = "vde_plug";
    match find_in_path(vde_plug) {
        Some(p) => Check::ok(NAME, format!("{}", p.display())),
        None => Check::bad(
            NAME,
            Status::Warn,
            format!(
                "{} not found (optional: plugs VDE tools into vde ports)",
                vde_plug.display()
            ),
            "apt-get install vdeplug",
        ),
    }
}

pub fn check_shm(dir: &Path) -> Check {
    const NAME: &str = "shm";
    let probe = dir.join(format!(".ulan-doctor-{}", std::process::id()));
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|f| f.set_len(4096));
    let _ = std::fs::remove_file(&probe);
    match result {
        Ok(()) => Check::ok(NAME, format!("{} is writable", dir.display())),
        Err(e) => Check::bad(
            NAME,
            Status::Warn,
            format!(
                "{} is not writable: {e} (shared guest memory for vhost-user will need it)",
                dir.display()
            ),
            format!(
                "mount a tmpfs there: mount -t tmpfs -o mode=1777 tmpfs {}",
                dir.display()
            ),
        ),
    }
}

pub const DGRAM_QLEN_FILE: &str = "/proc/sys/net/unix/max_dgram_qlen";
/// What systemd sets at boot; the kernel's own default is 10.
pub const GOOD_DGRAM_QLEN: u64 = 512;

/// QEMU's `dgram` netdev receives on an unconnected socket, so the kernel
/// lets anyone (ulan's port included) queue at most `max_dgram_qlen`
/// frames to it; with the kernel's 10 a burst to a guest is mostly lost.
pub fn check_dgram_qlen(file: &Path) -> Check {
    const NAME: &str = "dgram-qlen";
    let fix = format!(
        "as root: sysctl -w net.unix.max_dgram_qlen={GOOD_DGRAM_QLEN} \
         (systemd sets it at boot; add it to /etc/sysctl.d/ to keep it)"
    );
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            return Check::bad(
                NAME,
                Status::Warn,
                format!("cannot read {}: {e}", file.display()),
                fix,
            )
        }
    };
    match text.trim().parse::<u64>() {
        Ok(n) if n >= GOOD_DGRAM_QLEN => Check::ok(NAME, format!("net.unix.max_dgram_qlen is {n}")),
        Ok(n) => Check::bad(
            NAME,
            Status::Warn,
            format!(
                "net.unix.max_dgram_qlen is {n}: a QEMU dgram NIC can have only {n} frames \
                 queued to it, bursts to it are lost (stream and vde NICs are not affected)"
            ),
            fix,
        ),
        Err(_) => Check::bad(
            NAME,
            Status::Warn,
            format!("{} holds {:?}, not a number", file.display(), text.trim()),
            fix,
        ),
    }
}

pub fn check_run_dir(dir: &Path) -> Check {
    const NAME: &str = "run-dir";
    let fix_env = "set XDG_RUNTIME_DIR to a private directory of yours";
    let created = match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            return Check::bad(
                NAME,
                Status::Fail,
                format!("cannot create {}: {e}", dir.display()),
                fix_env,
            )
        }
    };
    let meta = std::fs::symlink_metadata(dir);
    if created {
        let _ = std::fs::remove_dir(dir);
    }
    let meta = match meta {
        Ok(m) => m,
        Err(e) => {
            return Check::bad(
                NAME,
                Status::Fail,
                format!("{}: {e}", dir.display()),
                fix_env,
            )
        }
    };
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let remove = format!("remove {} (ulan recreates it) or {fix_env}", dir.display());
    if !meta.is_dir() {
        return Check::bad(
            NAME,
            Status::Fail,
            format!("{} exists and is not a directory", dir.display()),
            remove,
        );
    }
    if meta.uid() != uid {
        return Check::bad(
            NAME,
            Status::Fail,
            format!(
                "{} belongs to uid {}, not to you (uid {uid})",
                dir.display(),
                meta.uid()
            ),
            remove,
        );
    }
    if meta.mode() & 0o077 != 0 {
        return Check::bad(
            NAME,
            Status::Fail,
            format!(
                "{} has mode {:04o}: others can reach the lab's sockets",
                dir.display(),
                meta.mode() & 0o7777
            ),
            format!("chmod 700 {}", dir.display()),
        );
    }
    let how = if created { "can be created" } else { "exists" };
    Check::ok(NAME, format!("{} {how}, private", dir.display()))
}

pub fn check_image(store: Option<&Path>) -> Check {
    const NAME: &str = "image";
    let Some(store) = store else {
        return Check::bad(
            NAME,
            Status::Warn,
            "no image store: neither ULAN_IMAGES, XDG_DATA_HOME nor HOME is set",
            "set ULAN_IMAGES to a directory, then run: ulan image build",
        );
    };
    let manifest = store.join("builtin").join("image.json");
    if manifest.is_file() {
        Check::ok(NAME, format!("built-in image in {}", store.display()))
    } else {
        Check::bad(
            NAME,
            Status::Warn,
            format!(
                "no built-in image ({} is missing); nodes without image or kernel need it",
                manifest.display()
            ),
            "ulan image build",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn render_aligns_and_puts_the_fix_on_the_line() {
        let checks = vec![
            Check::ok("qemu", "qemu-system-x86_64 7.2.22"),
            Check::bad("kvm", Status::Warn, "no /dev/kvm:\n  gone", "load kvm"),
            Check::bad("run-dir", Status::Fail, "bad", "chmod 700 /x"),
        ];
        let text = render(&checks);
        assert_eq!(
            text,
            "ok    qemu       qemu-system-x86_64 7.2.22\n\
             warn  kvm        no /dev/kvm: gone; fix: load kvm\n\
             fail  run-dir    bad; fix: chmod 700 /x\n"
        );
        assert_eq!(worst(&checks), Status::Fail);
        assert_eq!(worst(&checks[..1]), Status::Ok);
        assert_eq!(worst(&[]), Status::Ok);
    }

    #[test]
    fn json_shape() {
        let checks = vec![
            Check::ok("qemu", "x"),
            Check::bad("uml", Status::Warn, "y", "z"),
        ];
        let v: serde_json::Value = serde_json::to_value(&checks).unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {"name": "qemu", "status": "ok", "detail": "x"},
                {"name": "uml", "status": "warn", "detail": "y", "fix": "z"}
            ])
        );
    }

    #[test]
    fn qemu_missing_old_new_and_garbled() {
        let d = tmp();
        let c = check_qemu(&d.path().join("nope"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("qemu-system-x86"));

        let old = script(
            d.path(),
            "old",
            "echo 'QEMU emulator version 6.2.0 (Debian)'",
        );
        let c = check_qemu(&old);
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail.contains("6.2.0") && c.detail.contains("7.2"),
            "{}",
            c.detail
        );

        let new = script(
            d.path(),
            "new",
            "echo 'QEMU emulator version 7.2.22 (Debian)'",
        );
        assert_eq!(check_qemu(&new), Check::ok("qemu", "new 7.2.22"));

        let bad = script(d.path(), "bad", "echo hello");
        assert_eq!(check_qemu(&bad).status, Status::Fail);
        let fails = script(d.path(), "fails", "echo broken >&2; exit 3");
        let c = check_qemu(&fails);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("broken"), "{}", c.detail);
    }

    #[test]
    fn qemu_img_and_vde_plug() {
        let d = tmp();
        assert_eq!(check_qemu_img(&d.path().join("no")).status, Status::Fail);
        let img = script(
            d.path(),
            "qemu-img",
            "echo 'qemu-img version 7.2.22 (Debian)'",
        );
        assert_eq!(
            check_qemu_img(&img),
            Check::ok("qemu-img", "qemu-img 7.2.22")
        );
        // vde_plug is optional: a warning, not a failure.
        let c = check_vde_plug(&d.path().join("no"));
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap().contains("vdeplug"));
        let vp = script(d.path(), "vde_plug", "exit 0");
        assert_eq!(check_vde_plug(&vp).status, Status::Ok);
    }

    #[test]
    fn kvm_without_device_or_qemu() {
        let d = tmp();
        let mut o = DoctorOptions::from_env();
        o.kvm_device = d.path().join("kvm");
        let c = check_kvm(&o);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.starts_with("no "), "{}", c.detail);
        assert!(c.fix.unwrap().contains("TCG"));
    }

    #[test]
    fn kvm_boot_test_through_a_fake_qemu_and_the_cache() {
        let d = tmp();
        let kernel = d.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let mut o = DoctorOptions::from_env();
        o.qemu = script(
            d.path(),
            "qemu",
            "[ \"$1\" = --version ] && { echo 'QEMU emulator version 7.2.0'; exit 0; }\n\
             echo 'Kernel panic - not syncing: VFS: Unable to mount root fs'",
        );
        o.probe_kernel = Some(kernel);
        o.kvm_cache = Some(d.path().join("cache.json"));
        let c = kvm_boot_check(&o);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(d.path().join("cache.json").is_file());

        // A guest that never finishes: a warning with the reason.
        o.qemu = script(
            d.path(),
            "qemu2",
            "[ \"$1\" = --version ] && { echo 'QEMU emulator version 7.2.1'; exit 0; }\n\
             echo 'Probing EDD'; sleep 30",
        );
        o.kvm_timeout = Duration::from_millis(500);
        let c = kvm_boot_check(&o);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.detail.contains("Probing EDD"), "{}", c.detail);
        assert!(c.fix.unwrap().contains("TCG"));

        o.qemu = d.path().join("missing-qemu");
        let c = kvm_boot_check(&o);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("needs QEMU"), "{}", c.detail);
    }

    #[test]
    fn uml_missing_is_a_warning() {
        let c = check_uml(Path::new("/nonexistent/linux.uml"), Duration::from_secs(1));
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap().contains("user-mode-linux"));
    }

    #[test]
    fn uml_that_fails_says_why() {
        if uml::find_static_busybox().is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "no static busybox under CI: .ci/run should install busybox-static"
            );
            eprintln!("SKIPPED: no static busybox for the UML probe");
            return;
        }
        let d = tmp();
        let fake = script(
            d.path(),
            "linux.uml",
            "echo 'userspace - ptrace set fp regs failed, errno = 14'; sleep 30",
        );
        let c = check_uml(&fake, Duration::from_secs(10));
        assert_eq!(c.status, Status::Warn);
        assert_eq!(c.detail, uml::PTRACE_FP_REASON);
    }

    #[test]
    fn shm_writable_or_not() {
        let d = tmp();
        assert_eq!(check_shm(d.path()).status, Status::Ok);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "left a file"
        );
        let c = check_shm(&d.path().join("missing"));
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap().contains("tmpfs"));
    }

    #[test]
    fn dgram_qlen_values() {
        let d = tmp();
        let f = d.path().join("qlen");
        std::fs::write(&f, "512\n").unwrap();
        assert_eq!(check_dgram_qlen(&f).status, Status::Ok);
        std::fs::write(&f, "10\n").unwrap();
        let c = check_dgram_qlen(&f);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("is 10"), "{}", c.detail);
        assert!(c
            .fix
            .unwrap()
            .contains("sysctl -w net.unix.max_dgram_qlen=512"));
        std::fs::write(&f, "lots").unwrap();
        assert_eq!(check_dgram_qlen(&f).status, Status::Warn);
        assert!(check_dgram_qlen(&d.path().join("none"))
            .detail
            .contains("cannot read"));
    }

    #[test]
    fn run_dir_states() {
        let d = tmp();
        let dir = d.path().join("ulan");
        let c = check_run_dir(&dir);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.contains("can be created"));
        assert!(!dir.exists(), "doctor left the directory behind");

        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let c = check_run_dir(&dir);
        assert_eq!((c.status, c.detail.contains("exists")), (Status::Ok, true));

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = check_run_dir(&dir);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("0755") && c.fix.unwrap().contains("chmod 700"));

        let file = d.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(check_run_dir(&file).status, Status::Fail);

        let c = check_run_dir(&file.join("below"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("cannot create"), "{}", c.detail);

        // Someone else's directory (needs root to make one).
        // SAFETY: getuid cannot fail.
        if unsafe { libc::getuid() } == 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let c = check_run_dir(&dir);
            assert_eq!(c.status, Status::Fail);
            assert!(c.detail.contains("uid 65534"), "{}", c.detail);
        }
    }

    #[test]
    fn image_store_lookup_and_check() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(image_store_from(p("/i"), p("/x"), p("/h")), p("/i"));
        assert_eq!(
            image_store_from(None, p("/x"), p("/h")),
            p("/x/ulan/images")
        );
        assert_eq!(
            image_store_from(p("rel"), p("also-rel"), p("/h")),
            p("/h/.local/share/ulan/images")
        );
        assert_eq!(image_store_from(None, None, None), None);

        let d = tmp();
        let c = check_image(Some(d.path()));
        assert_eq!(c.status, Status::Warn);
        assert_eq!(c.fix.as_deref(), Some("ulan image build"));
        std::fs::create_dir(d.path().join("builtin")).unwrap();
        std::fs::write(d.path().join("builtin/image.json"), b"{}").unwrap();
        assert_eq!(check_image(Some(d.path())).status, Status::Ok);
        assert_eq!(check_image(None).status, Status::Warn);
    }

    #[test]
    fn run_checks_covers_everything_once() {
        let d = tmp();
        let o = DoctorOptions {
            qemu: d.path().join("q"),
            qemu_img: d.path().join("qi"),
            uml: d.path().join("u"),
            vde_plug: d.path().join("v"),
            kvm_device: d.path().join("kvm"),
            probe_kernel: None,
            kvm_cache: None,
            kvm_timeout: Duration::from_secs(1),
            uml_timeout: Duration::from_secs(1),
            image_store: Some(d.path().join("store")),
            run_dir: d.path().join("run"),
            shm_dir: d.path().to_path_buf(),
            dgram_qlen_file: d.path().join("qlen"),
        };
        let checks = run_checks(&o);
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "qemu",
                "nic transport",
                "qemu-img",
                "kvm",
                "uml",
                "vde_plug",
                "shm",
                "dgram-qlen",
                "run-dir",
                "image",
                "crun",
                "cgroups"
            ]
        );
        assert_eq!(worst(&checks), Status::Fail); // no QEMU at all
        assert_eq!(render(&checks).lines().count(), checks.len());
    }
}
