//! The QEMU command line of a node, built as an argv vector (never through
//! a shell). Pure: everything it needs is passed in, so every flag is
//! unit-tested here.

pub mod accel;
pub mod qmp;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::vmlaunch::spec::{NodeSpec, Transport};
use crate::wire::MacAddr;

/// The virtio-serial port name the built-in image's exec agent listens on.
pub const AGENT_PORT_NAME: &str = "org.ulan.agent";

/// First PCI slot for NICs: NIC i sits at slot 0x10 + i, so the guest
/// enumerates them in NIC order (eth0 is NIC 0) whatever else is present.
const NIC_PCI_SLOT: usize = 0x10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QemuError {
    #[error("NIC {index}: transport {transport} is not a QEMU netdev")]
    Transport { index: usize, transport: Transport },
    #[error("NIC {index}: a dgram NIC needs its own local socket path")]
    NoLocalSocket { index: usize },
}

/// One NIC as QEMU sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuNic {
    pub mac: MacAddr,
    pub transport: Transport,
    /// The switch port: stream/dgram socket, or the vde port's directory.
    pub port_path: PathBuf,
    /// `dgram`: the guest side's own socket (the port expects it there).
    pub local_path: Option<PathBuf>,
}

/// Files QEMU serves or writes for ulan, all in the node's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPaths {
    pub qmp: PathBuf,
    pub console: PathBuf,
    pub console_log: PathBuf,
    /// The exec agent's socket, when the image has the agent.
    pub agent: Option<PathBuf>,
}

/// What the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QemuBoot {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line (only used with `kernel`).
    pub cmdline: String,
    /// The node's qcow2 overlay.
    pub disk: Option<PathBuf>,
}

/// QEMU's option syntax splits on commas; a literal comma is written twice.
fn escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

fn netdev(index: usize, nic: &QemuNic) -> Result<String, QemuError> {
    let id = format!("n{index}");
    let port = escape(&nic.port_path);
    Ok(match nic.transport {
        Transport::Stream => {
            format!("stream,id={id},server=off,addr.type=unix,addr.path={port}")
        }
        Transport::Dgram => {
            let local = nic
                .local_path
                .as_deref()
                .ok_or(QemuError::NoLocalSocket { index })?;
            format!(
                "dgram,id={id},local.type=unix,local.path={},remote.type=unix,remote.path={port}",
                escape(local)
            )
        }
        Transport::Vde => format!("vde,id={id},sock={port}"),
        Transport::VhostUser => format!("vhost-user,id={id},chardev=vu{index}"),
        transport @ (Transport::Daemon | Transport::Bess | Transport::Tap) => {
            return Err(QemuError::Transport { index, transport })
        }
    })
}

/// The argv after the binary name. `accel` comes from
/// [`crate::vmlaunch::qemu::accel`]; the user's `extra_args` go last, unchanged.
pub fn qemu_args(
    spec: &NodeSpec,
    nics: &[QemuNic],
    boot: &QemuBoot,
    paths: &QemuPaths,
    accel: &[String],
) -> Result<Vec<OsString>, QemuError> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},process=ulan-{}", spec.name, spec.name),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
    ];
    a.extend(accel.iter().cloned());
    let kvm = accel.iter().any(|a| a.starts_with("kvm"));
    a.extend([
        "-m".into(),
        format!("{}M", spec.memory_mb),
        "-smp".into(),
        spec.cpus.to_string(),
        // QMP: graceful stop, and how ulan knows QEMU is up.
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            escape(&paths.qmp)
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // Serial console: one interactive client at a time, always logged.
        "-chardev".into(),
        format!(
            "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
            escape(&paths.console),
            escape(&paths.console_log)
        ),
        "-serial".into(),
        "chardev:console".into(),
    ]);
    if let Some(kernel) = &boot.kernel {
        a.extend(["-kernel".into(), escape(kernel)]);
        if let Some(initrd) = &boot.initrd {
            a.extend(["-initrd".into(), escape(initrd)]);
        }
        a.extend(["-append".into(), boot.cmdline.clone()]);
    }
    if let Some(disk) = &boot.disk {
        a.extend([
            "-drive".into(),
            format!("file={},if=virtio,format=qcow2,discard=unmap", escape(disk)),
        ]);
    }
    if let Some(agent) = &paths.agent {
        a.extend([
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={},server=on,wait=off", escape(agent)),
            "-device".into(),
            format!("virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}"),
        ]);
    }
    if nics.iter().any(|n| n.transport == Transport::VhostUser) {
        // ulan reads and writes the guest's rings: its RAM must be shared
        // (a memfd, sealed by QEMU's default, which ulan requires).
        a.extend([
            "-object".into(),
            format!(
                "memory-backend-memfd,id=ulan-mem,size={}M,share=on",
                spec.memory_mb
            ),
            "-numa".into(),
            "node,memdev=ulan-mem".into(),
        ]);
    }
    for (i, nic) in nics.iter().enumerate() {
        if nic.transport == Transport::VhostUser {
            // reconnect: QEMU comes back to a restarted daemon's port.
            a.extend([
                "-chardev".into(),
                format!(
                    "socket,id=vu{i},path={},reconnect=1",
                    escape(&nic.port_path)
                ),
            ]);
        }
        a.extend([
            "-netdev".into(),
            netdev(i, nic)?,
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=n{i},mac={},addr={:#x}{}",
                nic.mac,
                NIC_PCI_SLOT + i,
                if nic.transport == Transport::VhostUser && !kvm {
                    // QEMU 7.2 segfaults starting a vhost-user NIC with
                    // MSI-X under TCG (no irqfd); INTx works.
                    ",vectors=0"
                } else {
                    ""
                }
            ),
        ]);
    }
    let mut argv: Vec<OsString> = a.into_iter().map(OsString::from).collect();
    argv.extend(spec.extra_args.iter().map(OsString::from));
    Ok(argv)
}

/// The kernel command line ulan gives the built-in image: console, and what
/// its init configures (hostname, addresses by MAC, routes, forwarding).
/// (A UML guest's console is its stdout: no `console=` for it.)
pub fn builtin_cmdline(spec: &NodeSpec, macs: &[MacAddr]) -> String {
    let mut c = Vec::new();
    if spec.kind == crate::vmlaunch::spec::NodeKind::Qemu {
        c.push("console=ttyS0".to_string());
    }
    c.extend([
        "panic=-1".to_string(),
        "quiet".into(),
        format!("ulan.hostname={}", spec.name),
    ]);
    for (nic, mac) in spec.nics.iter().zip(macs) {
        for ip in &nic.ip {
            c.push(format!("ulan.ip={mac},{ip}"));
        }
    }
    for r in &spec.routes {
        c.push(format!("ulan.route={},{}", r.to, r.via));
    }
    if spec.forward {
        c.push("ulan.forward=1".into());
    }
    if let Some(extra) = &spec.append {
        c.push(extra.clone());
    }
    c.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmlaunch::spec::RouteSpec;

    fn paths(agent: bool) -> QemuPaths {
        QemuPaths {
            qmp: "/r/n/qmp.sock".into(),
            console: "/r/n/console.sock".into(),
            console_log: "/r/n/console.log".into(),
            agent: agent.then(|| "/r/n/agent.sock".into()),
        }
    }

    fn nic(transport: Transport, port: &str) -> QemuNic {
        QemuNic {
            mac: "02:00:00:00:00:01".parse().unwrap(),
            transport,
            port_path: port.into(),
            local_path: (transport == Transport::Dgram).then(|| "/r/n/eth0.sock".into()),
        }
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter()
            .map(|s| s.into_string().unwrap())
            .collect::<Vec<_>>()
    }

    fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn every_transport_has_its_netdev() {
        let spec = NodeSpec::new("h1", &["a", "b", "c"]);
        let nics = [
            nic(Transport::Stream, "/r/ports/h1.eth0"),
            nic(Transport::Dgram, "/r/ports/h1.eth1"),
            nic(Transport::Vde, "/r/ports/h1.eth2"),
        ];
        let argv =
            strings(qemu_args(&spec, &nics, &QemuBoot::default(), &paths(false), &[]).unwrap());
        assert_eq!(
            after(&argv, "-netdev"),
            [
                "stream,id=n0,server=off,addr.type=unix,addr.path=/r/ports/h1.eth0",
                "dgram,id=n1,local.type=unix,local.path=/r/n/eth0.sock,remote.type=unix,remote.path=/r/ports/h1.eth1",
                "vde,id=n2,sock=/r/ports/h1.eth2",
            ]
        );
        assert_eq!(
            after(&argv, "-device"),
            [
                "virtio-net-pci,netdev=n0,mac=02:00:00:00:00:01,addr=0x10",
                "virtio-net-pci,netdev=n1,mac=02:00:00:00:00:01,addr=0x11",
                "virtio-net-pci,netdev=n2,mac=02:00:00:00:00:01,addr=0x12",
            ]
        );
    }

    #[test]
    fn machine_memory_consoles_and_accel() {
        let mut spec = NodeSpec::new("h1", &[]);
        spec.memory_mb = 512;
        spec.cpus = 2;
        let accel = vec!["-accel".to_string(), "tcg".to_string()];
        let argv =
            strings(qemu_args(&spec, &[], &QemuBoot::default(), &paths(true), &accel).unwrap());
        assert_eq!(after(&argv, "-m"), ["512M"]);
        assert_eq!(after(&argv, "-smp"), ["2"]);
        assert_eq!(after(&argv, "-accel"), ["tcg"]);
        assert_eq!(after(&argv, "-serial"), ["chardev:console"]);
        assert_eq!(
            after(&argv, "-chardev"),
            [
                "socket,id=qmp,path=/r/n/qmp.sock,server=on,wait=off",
                "socket,id=console,path=/r/n/console.sock,server=on,wait=off,logfile=/r/n/console.log,logappend=on",
                "socket,id=agent,path=/r/n/agent.sock,server=on,wait=off",
            ]
        );
        assert!(argv.contains(&"-nodefaults".to_string()));
        assert!(argv
            .contains(&"virtserialport,bus=vser0.0,chardev=agent,name=org.ulan.agent".to_string()));
    }

    #[test]
    fn boot_sources() {
        let spec = NodeSpec::new("h1", &[]);
        let boot = QemuBoot {
            kernel: Some("/i/vmlinuz".into()),
            initrd: Some("/i/initrd".into()),
            cmdline: "console=ttyS0 a=b".into(),
            disk: Some("/r/n/disk.qcow2".into()),
        };
        let argv = strings(qemu_args(&spec, &[], &boot, &paths(false), &[]).unwrap());
        assert_eq!(after(&argv, "-kernel"), ["/i/vmlinuz"]);
        assert_eq!(after(&argv, "-initrd"), ["/i/initrd"]);
        assert_eq!(after(&argv, "-append"), ["console=ttyS0 a=b"]);
        assert_eq!(
            after(&argv, "-drive"),
            ["file=/r/n/disk.qcow2,if=virtio,format=qcow2,discard=unmap"]
        );
        let none =
            strings(qemu_args(&spec, &[], &QemuBoot::default(), &paths(false), &[]).unwrap());
        for flag in ["-kernel", "-initrd", "-append", "-drive"] {
            assert!(!none.contains(&flag.to_string()), "{flag}");
        }
    }

    #[test]
    fn commas_in_paths_are_escaped_and_spaces_kept() {
        let spec = NodeSpec::new("h1", &["a"]);
        let nics = [nic(Transport::Stream, "/my dir/a,b")];
        let argv =
            strings(qemu_args(&spec, &nics, &QemuBoot::default(), &paths(false), &[]).unwrap());
        assert_eq!(
            after(&argv, "-netdev"),
            ["stream,id=n0,server=off,addr.type=unix,addr.path=/my dir/a,,b"]
        );
    }

    #[test]
    fn extra_args_come_last_and_unchanged() {
        let mut spec = NodeSpec::new("h1", &["a"]);
        spec.extra_args = vec!["-device".into(), "x; rm -rf /".into()];
        let nics = [nic(Transport::Stream, "/p")];
        let argv =
            strings(qemu_args(&spec, &nics, &QemuBoot::default(), &paths(true), &[]).unwrap());
        assert_eq!(&argv[argv.len() - 2..], ["-device", "x; rm -rf /"]);
    }

    #[test]
    fn uml_transports_and_missing_local_socket_are_errors() {
        let spec = NodeSpec::new("h1", &["a"]);
        let mut n = nic(Transport::Bess, "/p");
        assert_eq!(
            qemu_args(
                &spec,
                &[n.clone()],
                &QemuBoot::default(),
                &paths(false),
                &[]
            ),
            Err(QemuError::Transport {
                index: 0,
                transport: Transport::Bess
            })
        );
        n.transport = Transport::Dgram;
        n.local_path = None;
        assert_eq!(
            qemu_args(&spec, &[n], &QemuBoot::default(), &paths(false), &[]),
            Err(QemuError::NoLocalSocket { index: 0 })
        );
    }

    #[test]
    fn builtin_cmdline_carries_the_lab_file_settings() {
        let mut spec = NodeSpec::new("r1", &["a", "b"]);
        spec.nics[0].ip = vec!["10.0.1.1/24".parse().unwrap()];
        spec.nics[1].ip = vec![
            "10.0.2.1/24".parse().unwrap(),
            "10.0.3.1/24".parse().unwrap(),
        ];
        spec.routes.push(RouteSpec {
            to: "default".into(),
            via: "10.0.1.254".parse().unwrap(),
        });
        spec.forward = true;
        spec.append = Some("loglevel=7".into());
        let macs: Vec<MacAddr> = vec![
            "02:00:00:00:00:01".parse().unwrap(),
            "02:00:00:00:00:02".parse().unwrap(),
        ];
        assert_eq!(
            builtin_cmdline(&spec, &macs),
            "console=ttyS0 panic=-1 quiet ulan.hostname=r1 \
             ulan.ip=02:00:00:00:00:01,10.0.1.1/24 ulan.ip=02:00:00:00:00:02,10.0.2.1/24 \
             ulan.ip=02:00:00:00:00:02,10.0.3.1/24 ulan.route=default,10.0.1.254 \
             ulan.forward=1 loglevel=7"
        );
    }
}
