//! User-Mode Linux nodes: the argv of a `linux.uml` guest wired to ulan
//! ports, and a probe that says whether UML runs on this host at all.
//!
//! How UML reads its argv (arch/um/kernel/um_arch.c, linux_main): each
//! argument is first offered to UML's own options (`mem=`, `umid=`,
//! `uml_dir=`, `initrd=`), which see it whole; then every argument
//! (but `umid=`) is joined with single spaces into the kernel command
//! line, which the kernel splits at whitespace outside double quotes
//! (lib/cmdline.c next_arg) before handing `ubdN=`, `ethN=`, `vecN:`
//! and `con`/`ssl` to their drivers. So:
//! - an argument the kernel parses that holds whitespace is wrapped in
//!   double quotes (the kernel strips them again);
//! - UML's own options would see those quotes, so their paths must not
//!   hold whitespace at all;
//! - a double quote can never be carried.
//!
//! NIC options, checked against arch/um/drivers:
//! - `daemon` (daemon_kern.c, split_if_spec): `ethN=daemon,MAC,unix,CTL`,
//!   CTL being the vde port's `<dir>/ctl`; fields are comma-separated.
//!   daemon_user.c copies CTL into a sockaddr_un without a length check.
//! - `vde` (vde_kern.c): `ethN=vde,DIR,MAC`, through libvdeplug.
//! - `bess` (vector_kern.c / vector_user.c user_init_unix_fds):
//!   `vecN:transport=bess,dst=PATH,src=PATH,mac=MAC`; `key=value` pairs
//!   split at `,` and a second `=` in a value is a parse error. UML binds
//!   `src` before connecting to `dst` (so a stale `src` socket must be
//!   removed first, see [`prepare_run_dir`]). The guest interface is
//!   named `vecN`, not `ethN`.
//! - `ubd0=DISK` or `ubd0=COW,BASE` (ubd_kern.c): `,` and `:` separate.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::vmlaunch::qemu::accel::{last_line, read_lossy, run_bounded, PrivateTempDir};
use crate::vmlaunch::spec::{NodeKind, NodeSpec, Transport, MAX_NICS};
use crate::wire::MacAddr;

pub const DEFAULT_UML_BINARY: &str = "linux.uml";
/// arch/um/include/asm/setup.h; UML exits when its argv does not fit.
pub const UML_COMMAND_LINE_SIZE: usize = 4096;
/// Room for what UML adds itself (`root=98:0 console=tty0`).
const COMMAND_LINE_RESERVE: usize = 64;
/// sun_path holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// What UML prints when it cannot drive its processes on this CPU.
pub const PTRACE_FP_FAILURE: &str = "ptrace set fp regs failed";
pub const PTRACE_FP_REASON: &str = "UML cannot run on this host: ptrace set fp regs failed \
     (AVX-512/AMX CPU; known UML limitation)";
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UmlError {
    #[error("node {0:?} is not a uml node")]
    NotUml(String),
    #[error("UML nodes have one CPU (this UML has no SMP); cpus is {0}")]
    Cpus(u32),
    #[error("nic {index}: no such NIC in the node spec")]
    NoSuchNic { index: usize },
    #[error("nic {index} is given twice")]
    DuplicateNic { index: usize },
    #[error("nic {index}: the spec says transport {spec}, the port is for {given}")]
    TransportMismatch {
        index: usize,
        spec: Transport,
        given: Transport,
    },
    #[error("nic {index}: transport {transport} is not a UML transport (use daemon, vde or bess)")]
    Transport { index: usize, transport: Transport },
    #[error("{what} {path:?} contains {ch:?}, which UML's option syntax cannot carry (it separates fields); use a path without it")]
    Separator {
        what: String,
        path: PathBuf,
        ch: char,
    },
    #[error("{what} {path:?} contains whitespace, which UML's own option parser cannot carry; use a path without spaces")]
    Whitespace { what: String, path: PathBuf },
    #[error("{what} {path:?} contains a double quote or a control character, which UML's command line cannot carry")]
    Unquotable { what: String, path: PathBuf },
    #[error("{what} {path:?} is not valid UTF-8")]
    NotUtf8 { what: String, path: PathBuf },
    #[error("{what} {path:?} must be an absolute path")]
    Relative { what: String, path: PathBuf },
    #[error("{what} {path:?} is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH} (use a shorter run directory)")]
    SocketPathTooLong {
        what: String,
        path: PathBuf,
        len: usize,
    },
    #[error("extra_args must not contain NUL bytes")]
    ExtraArg,
    #[error("the UML command line would be {len} bytes; UML takes at most {max}")]
    CommandLineTooLong { len: usize, max: usize },
}

/// Where a UML node keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UmlPaths {
    /// The node's directory. It is UML's `uml_dir` (UML keeps its pid
    /// file and mconsole socket in `<run_dir>/<node>/`) and holds the
    /// bess transport's own sockets.
    pub run_dir: PathBuf,
    /// Where the console goes: UML writes console 0 to its stdout, which
    /// [`uml_command`] points here.
    pub console_log: PathBuf,
    /// When set, `disk` is a read-only base and the node writes into this
    /// UML COW file (`ubd0=COW,BASE`; UML creates it when missing).
    pub cow: Option<PathBuf>,
}

impl UmlPaths {
    pub fn new(run_dir: &Path) -> UmlPaths {
        UmlPaths {
            run_dir: run_dir.to_path_buf(),
            console_log: run_dir.join("console.log"),
            cow: None,
        }
    }

    /// The socket UML binds for its bess NIC `index` (`src=`).
    pub fn bess_src(&self, index: usize) -> PathBuf {
        self.run_dir.join(format!("vec{index}.sock"))
    }
}

/// One NIC as the launcher wired it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UmlNic {
    pub index: usize,
    pub mac: MacAddr,
    pub transport: Transport,
    /// `daemon`/`vde`: the vde port's directory (its control socket is
    /// `<dir>/ctl`); `bess`: the port's SOCK_SEQPACKET socket.
    pub port_path: PathBuf,
}

/// The guest interface name UML gives NIC `index`.
pub fn guest_ifname(transport: Transport, index: usize) -> String {
    match transport {
        Transport::Bess => format!("vec{index}"),
        _ => format!("eth{index}"),
    }
}

/// The argv (binary first) of a UML node: memory, identity, its files in
/// the run dir, `spec.initrd`, the disk, the consoles, one option per
/// wired NIC (a NIC without a cable is left out), then `append` and
/// `spec.extra_args` last, unchanged. `append` is the whole kernel
/// command line the caller wants (including `spec.append`); it is split
/// at whitespace, which UML joins back with single spaces. No shell is
/// involved.
pub fn uml_argv(
    spec: &NodeSpec,
    binary: &Path,
    nics: &[UmlNic],
    disk: Option<&Path>,
    paths: &UmlPaths,
    append: &str,
) -> Result<Vec<OsString>, UmlError> {
    if spec.kind != NodeKind::Uml {
        return Err(UmlError::NotUml(spec.name.clone()));
    }
    if spec.cpus != 1 {
        return Err(UmlError::Cpus(spec.cpus));
    }
    let mut args: Vec<OsString> = vec![binary.as_os_str().to_owned()];
    args.push(format!("mem={}M", spec.memory_mb).into());
    // The name is checked by the spec (letters, digits, - _ .).
    args.push(format!("umid={}", spec.name).into());
    let run_dir = own_option_path("run directory", &paths.run_dir)?;
    args.push(format!("uml_dir={run_dir}").into());
    if let Some(initrd) = &spec.initrd {
        let initrd = own_option_path("initrd", Path::new(initrd))?;
        args.push(format!("initrd={initrd}").into());
    }
    if let Some(disk) = disk {
        let base = field_path("disk", disk, &[',', ':'])?;
        let value = match &paths.cow {
            Some(cow) => format!("{},{base}", field_path("COW file", cow, &[',', ':'])?),
            None => base.to_string(),
        };
        args.push(kernel_arg(format!("ubd0={value}")));
    }
    // Console 0 on stdin/stdout (logged by whoever holds stdout), the
    // other consoles and serial lines off, not xterms or ptys.
    args.extend(["con=null", "ssl=null", "con0=fd:0,fd:1"].map(OsString::from));

    let mut seen = [false; MAX_NICS];
    let mut sorted: Vec<&UmlNic> = nics.iter().collect();
    sorted.sort_by_key(|n| n.index);
    for nic in sorted {
        let index = nic.index;
        if index >= spec.nics.len() || index >= MAX_NICS {
            return Err(UmlError::NoSuchNic { index });
        }
        if std::mem::replace(&mut seen[index], true) {
            return Err(UmlError::DuplicateNic { index });
        }
        let want = spec.transport(index);
        if nic.transport != want {
            return Err(UmlError::TransportMismatch {
                index,
                spec: want,
                given: nic.transport,
            });
        }
        args.push(nic_arg(nic, paths)?);
    }

    args.extend(append.split_whitespace().map(OsString::from));
    for a in &spec.extra_args {
        if a.contains('\0') {
            return Err(UmlError::ExtraArg);
        }
        args.push(a.into());
    }

    // add_arg() joins argv[1..] with one space each.
    let len: usize = args[1..].iter().map(|a| a.len() + 1).sum();
    let max = UML_COMMAND_LINE_SIZE - COMMAND_LINE_RESERVE;
    if len > max {
        return Err(UmlError::CommandLineTooLong { len, max });
    }
    Ok(args)
}

fn nic_arg(nic: &UmlNic, paths: &UmlPaths) -> Result<OsString, UmlError> {
    let n = nic.index;
    let mac = nic.mac;
    Ok(match nic.transport {
        Transport::Daemon => {
            let ctl = nic.port_path.join("ctl");
            let what = format!("nic {n} control socket");
            socket_len(&what, &ctl)?;
            let ctl = field_path(&what, &ctl, &[','])?;
            kernel_arg(format!("eth{n}=daemon,{mac},unix,{ctl}"))
        }
        Transport::Vde => {
            let what = format!("nic {n} vde directory");
            socket_len(&what, &nic.port_path.join("ctl"))?;
            let dir = field_path(&what, &nic.port_path, &[','])?;
            kernel_arg(format!("eth{n}=vde,{dir},{mac}"))
        }
        Transport::Bess => {
            let what = format!("nic {n} bess socket");
            socket_len(&what, &nic.port_path)?;
            let dst = field_path(&what, &nic.port_path, &[',', '='])?;
            let src_path = paths.bess_src(n);
            let src_what = format!("nic {n} bess own socket");
            socket_len(&src_what, &src_path)?;
            let src = field_path(&src_what, &src_path, &[',', '='])?;
            kernel_arg(format!(
                "vec{n}:transport=bess,dst={dst},src={src},mac={mac}"
            ))
        }
        transport @ (Transport::Stream
        | Transport::Dgram
        | Transport::VhostUser
        | Transport::Tap) => {
            return Err(UmlError::Transport {
                index: n,
                transport,
            })
        }
    })
}

/// An argument the kernel's parser splits: quoted when it holds
/// whitespace (the values were checked to hold no quote).
fn kernel_arg(arg: String) -> OsString {
    if arg.contains(char::is_whitespace) {
        format!("\"{arg}\"").into()
    } else {
        arg.into()
    }
}

/// A path inside a comma-separated option: absolute, UTF-8, quotable,
/// and free of the option's separators.
fn field_path<'a>(what: &str, path: &'a Path, separators: &[char]) -> Result<&'a str, UmlError> {
    let err_what = || what.to_string();
    let s = path.to_str().ok_or_else(|| UmlError::NotUtf8 {
        what: err_what(),
        path: path.to_path_buf(),
    })?;
    if !path.is_absolute() {
        return Err(UmlError::Relative {
            what: err_what(),
            path: path.to_path_buf(),
        });
    }
    if s.contains(|c: char| c == '"' || (c.is_control() && !c.is_whitespace()))
        || s.contains(['\n', '\r'])
    {
        return Err(UmlError::Unquotable {
            what: err_what(),
            path: path.to_path_buf(),
        });
    }
    if let Some(ch) = s.chars().find(|c| separators.contains(c)) {
        return Err(UmlError::Separator {
            what: err_what(),
            path: path.to_path_buf(),
            ch,
        });
    }
    Ok(s)
}

/// A path for one of UML's own options, which see the raw argument (no
/// quote removal) and then also land on the kernel command line.
fn own_option_path<'a>(what: &str, path: &'a Path) -> Result<&'a str, UmlError> {
    let s = field_path(what, path, &[])?;
    if s.contains(char::is_whitespace) {
        return Err(UmlError::Whitespace {
            what: what.to_string(),
            path: path.to_path_buf(),
        });
    }
    Ok(s)
}

fn socket_len(what: &str, path: &Path) -> Result<(), UmlError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(UmlError::SocketPathTooLong {
            what: what.to_string(),
            path: path.to_path_buf(),
            len,
        });
    }
    Ok(())
}

/// Makes the node directory (mode 0700) and removes stale bess `src`
/// sockets from an earlier run: UML binds them and fails if one exists.
pub fn prepare_run_dir(paths: &UmlPaths, nics: &[UmlNic]) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.run_dir)?;
    for nic in nics.iter().filter(|n| n.transport == Transport::Bess) {
        let src = paths.bess_src(nic.index);
        match std::fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&src)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", src.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A `Command` for `argv`: console 0 appended to `paths.console_log`
/// (stdout and stderr), stdin piped (hold it open to type into the
/// console; dropping it gives the console EOF), and a process group of
/// its own so the node and the helpers UML forks are stopped together
/// (`kill(-pid, ...)`).
pub fn uml_command(argv: &[OsString], paths: &UmlPaths) -> io::Result<Command> {
    use std::os::unix::process::CommandExt;
    let (bin, rest) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let log = crate::daemon::open_run_file_append(&paths.console_log)?;
    let mut cmd = Command::new(bin);
    cmd.args(rest)
        .stdin(std::process::Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    Ok(cmd)
}

/// Whether UML runs here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum UmlStatus {
    /// A guest reached its init and ran a shell command.
    Boots,
    Fails {
        reason: String,
    },
    /// No UML binary.
    Missing,
}

/// Boots `binary` with 64 MiB, no disk and a tiny busybox initramfs
/// whose init prints a computed marker and powers off, in a temporary
/// uml_dir; the whole process group is killed afterwards.
pub fn probe_uml(binary: &Path, timeout: Duration) -> UmlStatus {
    let Some(binary) = find_in_path(binary) else {
        return UmlStatus::Missing;
    };
    let Some(busybox) = find_static_busybox() else {
        return UmlStatus::Fails {
            reason: "cannot test UML: a static busybox is needed for the test initramfs \
                     (apt-get install busybox-static)"
                .into(),
        };
    };
    let fails = |reason: String| UmlStatus::Fails { reason };
    let dir = match PrivateTempDir::new("uml-probe") {
        Ok(d) => d,
        Err(e) => return fails(format!("cannot make a temporary directory: {e}")),
    };
    let initrd = dir.path().join("probe.cpio");
    // The marker is computed by the guest's shell, so finding it proves
    // userspace ran (the script's own text never reaches the console).
    let script = "#!/bin/sh\necho ULAN-UML-PROBE-$((6*7))-OK\n/bin/busybox poweroff -f\n";
    const MARKER: &str = "ULAN-UML-PROBE-42-OK";
    let written = busybox_initramfs(&busybox, script)
        .and_then(|bytes| File::create(&initrd)?.write_all(&bytes));
    if let Err(e) = written {
        return fails(format!("cannot write the test initramfs: {e}"));
    }
    let (Some(uml_dir), Some(initrd_s)) = (dir.path().to_str(), initrd.to_str()) else {
        return fails("the temporary directory's path is not UTF-8".into());
    };
    let log = dir.path().join("console.log");
    let mut cmd = Command::new(&binary);
    cmd.args([
        "mem=64M",
        "umid=ulan-probe",
        &format!("uml_dir={uml_dir}"),
        &format!("initrd={initrd_s}"),
        "con=null",
        "ssl=null",
        "con0=null,fd:1",
    ]);
    let done = |p: &Path| {
        let t = read_lossy(p);
        t.contains(MARKER) || t.contains(PTRACE_FP_FAILURE)
    };
    let run = match run_bounded(&mut cmd, &log, None, timeout, done) {
        Ok(r) => r,
        Err(e) => return fails(format!("cannot run {}: {e}", binary.display())),
    };
    let seen = read_lossy(&log);
    if seen.contains(MARKER) {
        UmlStatus::Boots
    } else if seen.contains(PTRACE_FP_FAILURE) {
        fails(PTRACE_FP_REASON.into())
    } else if run.timed_out {
        fails(format!(
            "the test guest did not reach its init within {} s (last console line: {:?})",
            timeout.as_secs_f32(),
            last_line(&seen)
        ))
    } else {
        let how = run
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "stopped".into());
        fails(format!(
            "UML exited ({how}) before the test guest reached its init (last console line: {:?})",
            last_line(&seen)
        ))
    }
}

/// `name` itself when it has a slash, else the first match in $PATH.
pub fn find_in_path(name: &Path) -> Option<PathBuf> {
    if name.as_os_str().as_bytes().contains(&b'/') {
        return is_executable(name).then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A statically linked busybox (`busybox-static`): /bin/busybox or the
/// first in $PATH. A dynamic one cannot run in an initramfs without its
/// libraries.
pub fn find_static_busybox() -> Option<PathBuf> {
    [
        Some(PathBuf::from("/bin/busybox")),
        find_in_path(Path::new("busybox")),
    ]
    .into_iter()
    .flatten()
    .find(|p| is_executable(p) && is_static_elf(p).unwrap_or(false))
}

/// An ELF64 file with no PT_INTERP program header.
pub fn is_static_elf(path: &Path) -> io::Result<bool> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 64];
    f.read_exact(&mut head)?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Ok(false); // not little-endian ELF64
    }
    let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
    let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8]));
    let (phentsize, phnum) = (u16_at(54) as usize, u16_at(56) as usize);
    if phentsize < 4 || phnum > 512 {
        return Ok(false);
    }
    let mut table = vec![0u8; phentsize * phnum];
    use std::io::Seek;
    f.seek(io::SeekFrom::Start(phoff))?;
    f.read_exact(&mut table)?;
    const PT_INTERP: u32 = 3;
    Ok(!table
        .chunks_exact(phentsize)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP))
}

/// A newc cpio archive (what the kernel unpacks as an initramfs) holding
/// `/init` (the script, mode 0755), `/bin/busybox`, `/bin/sh` -> busybox,
/// `/dev/console` and the usual empty mount points.
pub fn busybox_initramfs(busybox: &Path, init_script: &str) -> io::Result<Vec<u8>> {
    let bb = std::fs::read(busybox)?;
    let mut w = crate::vmlaunch::cpio::Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "root"] {
        w.entry(d, 0o040_755, 0, &[]);
    }
    // Character device 5:1; the kernel makes the node itself while
    // unpacking, so no privilege is needed here.
    w.entry("dev/console", 0o020_600, (5 << 8) | 1, &[]);
    w.entry("bin/busybox", 0o100_755, 0, &bb);
    w.entry("bin/sh", 0o120_777, 0, b"busybox");
    w.entry("init", 0o100_755, 0, init_script.as_bytes());
    Ok(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmlaunch::spec::NicSpec;

    const MAC0: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x10]);
    const MAC1: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x11]);
    const MAC2: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x12]);

    fn spec(transports: &[Transport]) -> NodeSpec {
        let mut s = NodeSpec::new("u1", &[]);
        s.kind = NodeKind::Uml;
        s.memory_mb = 128;
        s.nics = transports
            .iter()
            .map(|t| NicSpec {
                transport: Some(*t),
                ..NicSpec::on(Some("a"))
            })
            .collect();
        s.validate().unwrap();
        s
    }

    fn nic(index: usize, mac: MacAddr, transport: Transport, path: &str) -> UmlNic {
        UmlNic {
            index,
            mac,
            transport,
            port_path: path.into(),
        }
    }

    fn paths() -> UmlPaths {
        UmlPaths::new(Path::new("/run/ulan/lab/nodes/u1"))
    }

    fn strings(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_str().unwrap().to_string()).collect()
    }

    const HEAD: [&str; 4] = [
        "/usr/bin/linux.uml",
        "mem=128M",
        "umid=u1",
        "uml_dir=/run/ulan/lab/nodes/u1",
    ];
    const CONSOLES: [&str; 3] = ["con=null", "ssl=null", "con0=fd:0,fd:1"];
    const BIN: &str = "/usr/bin/linux.uml";

    fn want(middle: &[&str], tail: &[&str]) -> Vec<String> {
        HEAD.iter()
            .chain(middle)
            .chain(CONSOLES.iter())
            .chain(tail)
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn daemon_nic() {
        let s = spec(&[Transport::Daemon]);
        let nics = [nic(
            0,
            MAC0,
            Transport::Daemon,
            "/run/ulan/lab/ports/u1.eth0",
        )];
        let argv = uml_argv(&s, Path::new(BIN), &nics, None, &paths(), "").unwrap();
        assert_eq!(
            strings(&argv),
            want(
                &[],
                &["eth0=daemon,02:00:00:00:00:10,unix,/run/ulan/lab/ports/u1.eth0/ctl"]
            )
        );
    }

    #[test]
    fn vde_nic() {
        let s = spec(&[Transport::Vde]);
        let nics = [nic(0, MAC0, Transport::Vde, "/run/ulan/lab/ports/u1.eth0")];
        let argv = uml_argv(&s, Path::new(BIN), &nics, None, &paths(), "").unwrap();
        assert_eq!(
            strings(&argv),
            want(
                &[],
                &["eth0=vde,/run/ulan/lab/ports/u1.eth0,02:00:00:00:00:10"]
            )
        );
    }

    #[test]
    fn bess_nic() {
        let s = spec(&[Transport::Bess]);
        let nics = [nic(0, MAC0, Transport::Bess, "/run/ulan/lab/ports/u1.eth0")];
        let argv = uml_argv(&s, Path::new(BIN), &nics, None, &paths(), "").unwrap();
        assert_eq!(
            strings(&argv),
            want(
                &[],
                &["vec0:transport=bess,dst=/run/ulan/lab/ports/u1.eth0,\
                   src=/run/ulan/lab/nodes/u1/vec0.sock,mac=02:00:00:00:00:10"]
            )
        );
        assert_eq!(guest_ifname(Transport::Bess, 0), "vec0");
        assert_eq!(guest_ifname(Transport::Daemon, 3), "eth3");
    }

    #[test]
    fn several_nics_disk_append_and_extra_args_last() {
        let mut s = spec(&[Transport::Daemon, Transport::Bess, Transport::Vde]);
        s.extra_args = vec!["loglevel=8".into(), "x y".into()];
        s.initrd = Some("/images/u.cpio".into());
        // Given out of order: the argv is by index.
        let nics = [
            nic(2, MAC2, Transport::Vde, "/p/u1.eth2"),
            nic(0, MAC0, Transport::Daemon, "/p/u1.eth0"),
            nic(1, MAC1, Transport::Bess, "/p/u1.eth1"),
        ];
        let mut p = paths();
        p.cow = Some("/run/ulan/lab/nodes/u1/disk.cow".into());
        let argv = uml_argv(
            &s,
            Path::new(BIN),
            &nics,
            Some(Path::new("/images/root.img")),
            &p,
            "  root=/dev/ubda  ulan.ip=eth0:10.0.0.1/24 ",
        )
        .unwrap();
        assert_eq!(
            strings(&argv),
            want(
                &[
                    "initrd=/images/u.cpio",
                    "ubd0=/run/ulan/lab/nodes/u1/disk.cow,/images/root.img",
                ],
                &[
                    "eth0=daemon,02:00:00:00:00:10,unix,/p/u1.eth0/ctl",
                    "vec1:transport=bess,dst=/p/u1.eth1,src=/run/ulan/lab/nodes/u1/vec1.sock,\
                     mac=02:00:00:00:00:11",
                    "eth2=vde,/p/u1.eth2,02:00:00:00:00:12",
                    "root=/dev/ubda",
                    "ulan.ip=eth0:10.0.0.1/24",
                    "loglevel=8",
                    "x y",
                ]
            )
        );
    }

    #[test]
    fn plain_disk_and_unwired_nics() {
        // A NIC without a cable (not in `nics`) gets no option.
        let s = spec(&[Transport::Daemon, Transport::Daemon]);
        let nics = [nic(1, MAC1, Transport::Daemon, "/p/u1.eth1")];
        let argv = uml_argv(
            &s,
            Path::new(BIN),
            &nics,
            Some(Path::new("/disk.img")),
            &paths(),
            "",
        )
        .unwrap();
        assert_eq!(
            strings(&argv),
            want(
                &["ubd0=/disk.img"],
                &["eth1=daemon,02:00:00:00:00:11,unix,/p/u1.eth1/ctl"]
            )
        );
    }

    #[test]
    fn paths_with_spaces_are_quoted_for_the_kernel() {
        let s = spec(&[Transport::Daemon, Transport::Bess, Transport::Vde]);
        let nics = [
            nic(0, MAC0, Transport::Daemon, "/my ports/u1.eth0"),
            nic(1, MAC1, Transport::Bess, "/my ports/u1.eth1"),
            nic(2, MAC2, Transport::Vde, "/my ports/u1.eth2"),
        ];
        let argv = uml_argv(
            &s,
            Path::new("/opt/my uml/linux"),
            &nics,
            Some(Path::new("/my images/root.img")),
            &paths(),
            "",
        )
        .unwrap();
        let got = strings(&argv);
        // The binary is argv[0], never parsed by UML: as it is.
        assert_eq!(got[0], "/opt/my uml/linux");
        assert_eq!(got[4], "\"ubd0=/my images/root.img\"");
        assert_eq!(
            &got[8..],
            [
                "\"eth0=daemon,02:00:00:00:00:10,unix,/my ports/u1.eth0/ctl\"",
                "\"vec1:transport=bess,dst=/my ports/u1.eth1,src=/run/ulan/lab/nodes/u1/vec1.sock,mac=02:00:00:00:00:11\"",
                "\"eth2=vde,/my ports/u1.eth2,02:00:00:00:00:12\"",
            ]
        );
    }

    fn err(
        transports: &[Transport],
        nics: &[UmlNic],
        disk: Option<&str>,
        p: &UmlPaths,
    ) -> UmlError {
        uml_argv(
            &spec(transports),
            Path::new(BIN),
            nics,
            disk.map(Path::new),
            p,
            "",
        )
        .unwrap_err()
    }

    #[test]
    fn refuses_what_uml_cannot_parse() {
        let d = [Transport::Daemon];
        let b = [Transport::Bess];
        let p = paths();

        let e = err(&d, &[nic(0, MAC0, Transport::Daemon, "/a,b")], None, &p);
        assert!(matches!(e, UmlError::Separator { ch: ',', .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("\"/a,b/ctl\"") && msg.contains("','"), "{msg}");

        let e = err(&d, &[], Some("/img,1"), &p);
        assert!(matches!(e, UmlError::Separator { ch: ',', .. }), "{e}");
        let e = err(&d, &[], Some("/img:1"), &p);
        assert!(matches!(e, UmlError::Separator { ch: ':', .. }), "{e}");
        let e = err(&b, &[nic(0, MAC0, Transport::Bess, "/a=b")], None, &p);
        assert!(matches!(e, UmlError::Separator { ch: '=', .. }), "{e}");
        let e = err(&d, &[nic(0, MAC0, Transport::Daemon, "/a\"b")], None, &p);
        assert!(matches!(e, UmlError::Unquotable { .. }), "{e}");
        let e = err(&d, &[nic(0, MAC0, Transport::Daemon, "/a\nb")], None, &p);
        assert!(matches!(e, UmlError::Unquotable { .. }), "{e}");
        let e = err(&d, &[nic(0, MAC0, Transport::Daemon, "rel/dir")], None, &p);
        assert!(matches!(e, UmlError::Relative { .. }), "{e}");

        let long = format!("/{}", "x".repeat(104));
        let e = err(&d, &[nic(0, MAC0, Transport::Daemon, &long)], None, &p);
        assert!(
            matches!(e, UmlError::SocketPathTooLong { len: 109, .. }),
            "{e}"
        );
        // bess connects to the path itself: 107 bytes fit, 108 do not.
        let fits = format!("/{}", "x".repeat(106));
        assert!(uml_argv(
            &spec(&b),
            Path::new(BIN),
            &[nic(0, MAC0, Transport::Bess, &fits)],
            None,
            &p,
            ""
        )
        .is_ok());
        let e = err(
            &b,
            &[nic(0, MAC0, Transport::Bess, &format!("{fits}x"))],
            None,
            &p,
        );
        assert!(
            matches!(e, UmlError::SocketPathTooLong { len: 108, .. }),
            "{e}"
        );
        // The bess client's own socket is in the run dir: checked too.
        let deep = UmlPaths::new(Path::new(&format!("/{}", "r".repeat(100))));
        let e = err(&b, &[nic(0, MAC0, Transport::Bess, "/p/x")], None, &deep);
        assert!(e.to_string().contains("bess own socket"), "{e}");

        // UML's own options see quotes verbatim: no whitespace there.
        let spaced = UmlPaths::new(Path::new("/run/my lab/u1"));
        let e = err(&d, &[], None, &spaced);
        assert!(matches!(e, UmlError::Whitespace { .. }), "{e}");

        let e = err(&d, &[nic(1, MAC0, Transport::Daemon, "/p")], None, &p);
        assert_eq!(e, UmlError::NoSuchNic { index: 1 });
        let e = err(
            &d,
            &[
                nic(0, MAC0, Transport::Daemon, "/p"),
                nic(0, MAC1, Transport::Daemon, "/q"),
            ],
            None,
            &p,
        );
        assert_eq!(e, UmlError::DuplicateNic { index: 0 });
        let e = err(&d, &[nic(0, MAC0, Transport::Vde, "/p")], None, &p);
        assert!(matches!(e, UmlError::TransportMismatch { .. }), "{e}");
    }

    #[test]
    fn refuses_wrong_specs_and_overlong_command_lines() {
        let mut s = spec(&[]);
        s.kind = NodeKind::Qemu;
        let e = uml_argv(&s, Path::new(BIN), &[], None, &paths(), "").unwrap_err();
        assert!(matches!(e, UmlError::NotUml(_)));
        let mut s = spec(&[]);
        s.cpus = 2;
        let e = uml_argv(&s, Path::new(BIN), &[], None, &paths(), "").unwrap_err();
        assert_eq!(e, UmlError::Cpus(2));
        let mut s = spec(&[]);
        s.extra_args = vec!["x".repeat(5000)];
        let e = uml_argv(&s, Path::new(BIN), &[], None, &paths(), "").unwrap_err();
        assert!(matches!(e, UmlError::CommandLineTooLong { .. }), "{e}");
        let mut s = spec(&[]);
        s.initrd = Some("/my initrd".into());
        let e = uml_argv(&s, Path::new(BIN), &[], None, &paths(), "").unwrap_err();
        assert!(matches!(e, UmlError::Whitespace { .. }), "{e}");
    }

    #[test]
    fn qemu_transports_are_refused() {
        let e = nic_arg(&nic(0, MAC0, Transport::Stream, "/p"), &paths()).unwrap_err();
        assert!(e.to_string().contains("not a UML transport"), "{e}");
    }

    #[test]
    fn run_dir_preparation_removes_stale_bess_sockets_only() {
        let tmp = PrivateTempDir::new("uml-prep-test").unwrap();
        let p = UmlPaths::new(&tmp.path().join("node"));
        let nics = [nic(1, MAC1, Transport::Bess, "/p")];
        prepare_run_dir(&p, &nics).unwrap();
        assert!(p.run_dir.is_dir());
        let stale = std::os::unix::net::UnixListener::bind(p.bess_src(1)).unwrap();
        drop(stale);
        assert!(p.bess_src(1).exists());
        prepare_run_dir(&p, &nics).unwrap();
        assert!(!p.bess_src(1).exists());
        std::fs::write(p.bess_src(1), b"not a socket").unwrap();
        assert!(prepare_run_dir(&p, &nics).is_err());
    }

    #[test]
    fn command_logs_the_console_and_gets_its_own_group() {
        let tmp = PrivateTempDir::new("uml-cmd-test").unwrap();
        let p = UmlPaths::new(tmp.path());
        let argv: Vec<OsString> = ["/bin/sh", "-c", "echo console-line; echo err >&2"]
            .map(OsString::from)
            .to_vec();
        let mut cmd = uml_command(&argv, &p).unwrap();
        let st = cmd.status().unwrap();
        assert!(st.success());
        let log = std::fs::read_to_string(&p.console_log).unwrap();
        assert_eq!(log, "console-line\nerr\n");
        assert!(uml_command(&[], &p).is_err());
    }

    #[test]
    fn cpio_is_well_formed_newc() {
        let tmp = PrivateTempDir::new("uml-cpio-test").unwrap();
        let bb = tmp.path().join("bb");
        std::fs::write(&bb, b"BUSYBOX").unwrap();
        let a = busybox_initramfs(&bb, "#!/bin/sh\necho hi\n").unwrap();
        // Walk it: every header is newc, every entry 4-aligned, trailer last.
        let mut at = 0;
        let mut names = Vec::new();
        loop {
            assert_eq!(&a[at..at + 6], b"070701", "at {at}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap() as usize
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&a[at + 110..at + 110 + namesize - 1]).unwrap();
            assert_eq!(a[at + 110 + namesize - 1], 0);
            let data_at = (at + 110 + namesize).next_multiple_of(4);
            let data = &a[data_at..data_at + size];
            names.push(name.to_string());
            match name {
                "init" => {
                    assert_eq!(data, b"#!/bin/sh\necho hi\n");
                    assert_eq!(mode, 0o100_755);
                }
                "bin/busybox" => assert_eq!(data, b"BUSYBOX"),
                "bin/sh" => assert_eq!((data, mode), (&b"busybox"[..], 0o120_777)),
                "dev/console" => assert_eq!((field(9), field(10)), (5, 1)),
                _ => {}
            }
            at = (data_at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(at, a.len());
        assert!(names.contains(&"bin".to_string()) && names.contains(&"dev".to_string()));
    }

    #[test]
    fn static_elf_detection() {
        // The test binary itself is dynamically linked (PT_INTERP).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let tmp = PrivateTempDir::new("uml-elf-test").unwrap();
        let f = tmp.path().join("script");
        std::fs::write(&f, [b'#'; 100]).unwrap();
        assert!(!is_static_elf(&f).unwrap());
        std::fs::write(&f, b"\x7fELF").unwrap();
        assert!(is_static_elf(&f).is_err());
    }

    #[test]
    fn a_missing_binary_is_missing() {
        assert_eq!(
            probe_uml(Path::new("/nonexistent/linux.uml"), Duration::from_secs(1)),
            UmlStatus::Missing
        );
        assert_eq!(
            probe_uml(
                Path::new("surely-no-such-uml-binary-here"),
                Duration::from_secs(1)
            ),
            UmlStatus::Missing
        );
    }

    #[test]
    fn the_ptrace_failure_is_recognised() {
        let tmp = PrivateTempDir::new("uml-fake-test").unwrap();
        let fake = tmp.path().join("linux.uml");
        // What UML prints on AVX-512/AMX hosts, then it hangs.
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'Run /init as init process'\n\
             echo 'userspace - ptrace set fp regs failed, errno = 14'\nsleep 600\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        if find_static_busybox().is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "no static busybox under CI: .ci/run should install busybox-static"
            );
            eprintln!("SKIPPED: no static busybox for the probe's initramfs");
            return;
        }
        let t0 = std::time::Instant::now();
        let st = probe_uml(&fake, Duration::from_secs(20));
        assert_eq!(
            st,
            UmlStatus::Fails {
                reason: PTRACE_FP_REASON.into()
            }
        );
        // Seen, so no wait for the timeout.
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}
