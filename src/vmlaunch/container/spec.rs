//! The container fields of a node spec (`cmd`, `env`, `workdir`,
//! `hostname`, `pids_max`), checked here so that spec.rs stays about what
//! every node kind shares.

use crate::vmlaunch::spec::{Accel, NodeKind, NodeSpec};

/// Linux's own bounds: a hostname is at most 64 bytes; pids.max at most
/// PID_MAX_LIMIT (4M).
pub const MAX_HOSTNAME_LEN: usize = 64;
pub const MAX_PIDS: u32 = 4 * 1024 * 1024;
pub const MAX_ARGS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerSpecError {
    #[error("{field} is for container nodes only (this node is {kind})")]
    NotContainer { field: &'static str, kind: NodeKind },
    #[error("{field} is not used by container nodes")]
    NotForContainer { field: &'static str },
    #[error("cmd: {0}")]
    Cmd(&'static str),
    #[error("env entry {index}: {message}")]
    Env { index: usize, message: &'static str },
    #[error("workdir {0:?} must be an absolute path inside the container")]
    Workdir(String),
    #[error("hostname {0:?}: 1 to {MAX_HOSTNAME_LEN} letters, digits, '-' or '.'")]
    Hostname(String),
    #[error("pids_max must be between 1 and {MAX_PIDS}, not {0}")]
    Pids(u32),
}

fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Checks the container fields of `spec`, and that a container node uses
/// none of the guests' fields (kernel, initrd, ...).
pub fn validate(spec: &NodeSpec) -> Result<(), ContainerSpecError> {
    if spec.kind != NodeKind::Container {
        for (field, used) in [
            ("cmd", !spec.cmd.is_empty()),
            ("env", !spec.env.is_empty()),
            ("workdir", spec.workdir.is_some()),
            ("hostname", spec.hostname.is_some()),
            ("pids_max", spec.pids_max.is_some()),
        ] {
            if used {
                return Err(ContainerSpecError::NotContainer {
                    field,
                    kind: spec.kind,
                });
            }
        }
        return Ok(());
    }
    for (field, used) in [
        ("kernel", spec.kernel.is_some()),
        ("initrd", spec.initrd.is_some()),
        ("append", spec.append.is_some()),
        ("binary", spec.binary.is_some()),
        ("extra_args", !spec.extra_args.is_empty()),
        ("accel", spec.accel != Accel::Auto),
    ] {
        if used {
            return Err(ContainerSpecError::NotForContainer { field });
        }
    }
    if spec.cmd.len() > MAX_ARGS {
        return Err(ContainerSpecError::Cmd("at most 256 arguments"));
    }
    if spec.cmd.first().is_some_and(|c| c.is_empty()) {
        return Err(ContainerSpecError::Cmd("the program name is empty"));
    }
    if spec.cmd.iter().any(|a| a.contains('\0')) {
        return Err(ContainerSpecError::Cmd("an argument contains a NUL byte"));
    }
    if spec.env.len() > MAX_ARGS {
        return Err(ContainerSpecError::Env {
            index: MAX_ARGS,
            message: "at most 256 entries",
        });
    }
    for (index, e) in spec.env.iter().enumerate() {
        let message = match e.split_once('=') {
            _ if e.contains('\0') => "contains a NUL byte",
            None => "is not KEY=VALUE",
            Some(("", _)) => "has an empty KEY",
            Some(_) => continue,
        };
        return Err(ContainerSpecError::Env { index, message });
    }
    if let Some(w) = &spec.workdir {
        if !w.starts_with('/') || w.contains(['\0', '\n']) || w.split('/').any(|c| c == "..") {
            return Err(ContainerSpecError::Workdir(short(w)));
        }
    }
    if let Some(h) = &spec.hostname {
        let ok = !h.is_empty()
            && h.len() <= MAX_HOSTNAME_LEN
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(ContainerSpecError::Hostname(short(h)));
        }
    }
    if let Some(p) = spec.pids_max {
        if !(1..=MAX_PIDS).contains(&p) {
            return Err(ContainerSpecError::Pids(p));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> NodeSpec {
        let mut s = NodeSpec::new("c1", &[]);
        s.kind = NodeKind::Container;
        s
    }

    #[test]
    fn a_plain_container_is_valid() {
        let mut s = container();
        s.cmd = vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()];
        s.env = vec!["A=1".into(), "B=".into(), "C=x=y".into()];
        s.workdir = Some("/tmp".into());
        s.hostname = Some("r1.lab".into());
        s.pids_max = Some(64);
        s.validate().unwrap();
    }

    #[test]
    fn container_fields_on_a_guest_are_refused() {
        let mut s = NodeSpec::new("g", &[]);
        s.cmd = vec!["x".into()];
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("cmd is for container nodes"), "{e}");
        let mut s = NodeSpec::new("g", &[]);
        s.pids_max = Some(3);
        assert!(s.validate().unwrap_err().to_string().contains("pids_max"));
    }

    #[test]
    fn guest_fields_on_a_container_are_refused() {
        let mut s = container();
        s.kernel = Some("/boot/vmlinuz".into());
        assert!(s.validate().unwrap_err().to_string().contains("kernel"));
        let mut s = container();
        s.accel = Accel::Kvm;
        assert!(s.validate().unwrap_err().to_string().contains("accel"));
    }

    #[test]
    fn bad_container_fields_name_the_field() {
        type Edit = Box<dyn Fn(&mut NodeSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s.cmd = vec!["".into()]), "cmd"),
            (Box::new(|s| s.cmd = vec!["a\0b".into()]), "cmd"),
            (Box::new(|s| s.cmd = vec!["x".into(); 300]), "cmd"),
            (Box::new(|s| s.env = vec!["NOEQ".into()]), "env entry 0"),
            (
                Box::new(|s| s.env = vec!["A=1".into(), "=v".into()]),
                "env entry 1",
            ),
            (Box::new(|s| s.workdir = Some("rel".into())), "workdir"),
            (Box::new(|s| s.workdir = Some("/a/../..".into())), "workdir"),
            (Box::new(|s| s.hostname = Some("".into())), "hostname"),
            (Box::new(|s| s.hostname = Some("a b".into())), "hostname"),
            (Box::new(|s| s.hostname = Some("h".repeat(65))), "hostname"),
            (Box::new(|s| s.pids_max = Some(0)), "pids_max"),
            (Box::new(|s| s.pids_max = Some(u32::MAX)), "pids_max"),
            (Box::new(|s| s.memory_mb = 0), "memory_mb"),
            (Box::new(|s| s.memory_mb = 1 << 30), "memory_mb"),
        ];
        for (edit, field) in cases {
            let mut s = container();
            edit(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
