//! The lab's desired state on disk, so that a daemon that was killed comes
//! back with the same lab: its lans, its ports, its nodes (specs, NIC
//! lans) and which nodes were stopped on purpose.
//!
//! The state is the lab file the lab would save (`Lab::spec`) plus the
//! names of the stopped nodes, as JSON in `lab-state.json` in the lab's
//! data folder (`$XDG_DATA_HOME/ulan/labs/LAB/`, beside the persistent
//! disks). It is written after every change, atomically: a temporary
//! file, fsync, rename, fsync of the folder. A mutating API request
//! returns only once its change is on disk; node state changes of their
//! own (a crash) are written as the event comes. An empty lab has no
//! file, so `ulan down` (which removes everything) forgets the lab.
//!
//! When the daemon starts it restores the file: lans, plain ports, then
//! every node (made stopped), and the nodes that were not stopped are then
//! started again from their spec (a persistent node on its persistent
//! overlay). Guests do not outlive the daemon (they die with it, by
//! `PR_SET_PDEATHSIG`): they are restarted, whatever their transport. A
//! file that cannot be read as a lab state (truncated, garbage, an
//! invalid lab) is renamed aside with a log line saying where, and the
//! daemon starts with an empty lab.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::events::Event;
use crate::lab::Lab;
use crate::labfile::LabFile;
use crate::vmlaunch::node::NodeState;

/// The state file's name in the lab's data folder.
pub const STATE_FILE: &str = "lab-state.json";
const FORMAT: &str = "ulan-lab-state";
const VERSION: u32 = 1;
/// A state file larger than this is not one ulan wrote.
const MAX_STATE: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read the lab state {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the lab state {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot write the lab state {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What is on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedLab {
    pub format: String,
    pub version: u32,
    pub lab: LabFile,
    /// Nodes stopped on purpose: restored stopped.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub stopped: BTreeSet<String>,
}

impl SavedLab {
    pub fn new(lab: LabFile, stopped: BTreeSet<String>) -> SavedLab {
        SavedLab {
            format: FORMAT.into(),
            version: VERSION,
            lab,
            stopped,
        }
    }

    fn is_empty(&self) -> bool {
        self.lab.lans.is_empty() && self.lab.ports.is_empty() && self.lab.nodes.is_empty()
    }
}

/// The state file of a lab whose nodes keep their disks in `data_dir`
/// (`.../labs/LAB/nodes`): beside it, in the lab's data folder.
pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.parent().unwrap_or(data_dir).join(STATE_FILE)
}

/// The state file of lab `lab` with the default data folder.
pub fn default_state_path(lab: &str) -> PathBuf {
    state_path(&crate::vmlaunch::node::NodeConfig::for_lab(lab).data_dir)
}

/// Reads the state file. `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<SavedLab>, PersistError> {
    let read_err = |source| PersistError::Read {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |message: String| PersistError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(corrupt("not a plain file".into()));
    }
    let mut text = Vec::new();
    file.take(MAX_STATE + 1)
        .read_to_end(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_STATE {
        return Err(corrupt(format!("larger than {MAX_STATE} bytes")));
    }
    let saved: SavedLab = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    if saved.format != FORMAT || saved.version != VERSION {
        return Err(corrupt(format!(
            "format {:?} version {}, this ulan reads {FORMAT:?} version {VERSION}",
            saved.format, saved.version
        )));
    }
    saved.lab.check().map_err(|e| corrupt(e.to_string()))?;
    Ok(Some(saved))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `saved` atomically (temporary file, fsync, rename, fsync of the
/// folder); an empty lab removes the file instead.
pub fn save(path: &Path, saved: &SavedLab) -> Result<(), PersistError> {
    let write_err = |source| PersistError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    if saved.is_empty() {
        return match std::fs::remove_file(path) {
            Ok(()) => fsync_dir(dir).map_err(write_err),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(write_err(e)),
        };
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
            .map_err(write_err)?;
    }
    let mut text = serde_json::to_vec_pretty(saved)
        .map_err(|e| write_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    text.push(b'\n');
    let tmp = path.with_extension("json.tmp");
    // Ours, left by a write that was cut short.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

/// Renames a state file that cannot be used out of the way, keeping it
/// for the user; returns where it went.
pub fn set_aside(path: &Path, why: &str) -> Option<PathBuf> {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // Never over an earlier one.
    let aside = (0..1000)
        .map(|n| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{why}-{ms}"));
            if n > 0 {
                name.push(format!("-{n}"));
            }
            PathBuf::from(name)
        })
        .find(|p| p.symlink_metadata().is_err())?;
    match std::fs::rename(path, &aside) {
        Ok(()) => Some(aside),
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot move the lab state aside: {e}");
            None
        }
    }
}

/// Keeps the lab's state file up to date. Writes are serialized and
/// skipped when nothing that is persisted changed.
pub struct Persister {
    lab: std::sync::Weak<Lab>,
    path: PathBuf,
    /// Off once the daemon began to stop (it stops its guests: not what
    /// is wanted back).
    enabled: Mutex<bool>,
    last: tokio::sync::Mutex<Option<SavedLab>>,
    /// Nodes restored stopped: still stopped on purpose while they have
    /// not been started since.
    restored_stopped: BTreeSet<String>,
}

impl Persister {
    pub fn new(lab: &Arc<Lab>, path: PathBuf, restored: Option<&SavedLab>) -> Arc<Persister> {
        Arc::new(Persister {
            lab: Arc::downgrade(lab),
            path,
            enabled: Mutex::new(true),
            last: tokio::sync::Mutex::new(restored.cloned()),
            restored_stopped: restored.map(|s| s.stopped.clone()).unwrap_or_default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn set_enabled(&self, on: bool) {
        *self.enabled.lock().unwrap_or_else(|e| e.into_inner()) = on;
    }

    fn enabled(&self) -> bool {
        *self.enabled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lab's desired state now.
    pub fn capture(&self, lab: &Lab) -> SavedLab {
        let stopped = lab
            .nodes()
            .into_iter()
            .filter(|n| match n.state {
                NodeState::Stopped | NodeState::Stopping => {
                    // Never started by this daemon: stopped on purpose
                    // only if it was restored so (else its start failed).
                    n.started_ms.is_some() || self.restored_stopped.contains(&n.name)
                }
                _ => false,
            })
            .map(|n| n.name)
            .collect();
        SavedLab::new(lab.spec(), stopped)
    }

    /// Writes the state if it changed. Returns once it is on disk.
    pub async fn flush(&self) {
        let Some(lab) = self.lab.upgrade() else {
            return;
        };
        let mut last = self.last.lock().await;
        if !self.enabled() {
            return;
        }
        let now = self.capture(&lab);
        if last.as_ref() == Some(&now) {
            return;
        }
        let path = self.path.clone();
        let state = now.clone();
        match tokio::task::spawn_blocking(move || save(&path, &state)).await {
            Ok(Ok(())) => {
                tracing::debug!(path = %self.path.display(), "lab state saved");
                *last = Some(now);
            }
            Ok(Err(e)) => tracing::error!("{e}"),
            Err(e) => tracing::error!("saving the lab state: {e}"),
        }
    }
}

/// Reads the state file at the daemon's start and brings back its lans,
/// ports and nodes (nodes made stopped). A file that cannot be used is
/// set aside. Returns the state restored, if any.
pub async fn restore(lab: &Arc<Lab>, path: &Path) -> Option<SavedLab> {
    let saved = match load(path) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            let aside = set_aside(path, "corrupt");
            tracing::error!(
                kept_as = %aside.as_ref().map_or("-".into(), |p| p.display().to_string()),
                "{e}; it was moved aside and the lab starts empty"
            );
            return None;
        }
    };
    let mut failed = Vec::new();
    for lan in &saved.lab.lans {
        if let Err(e) = lab.add_lan(lan) {
            failed.push(format!("lan {lan}: {e}"));
        }
    }
    for p in &saved.lab.ports {
        let made = lab
            .add_port(&p.name, p.kind, p.lan.as_deref())
            .and_then(|_| lab.apply_port_spec(&p.name, p.link, &p.impairments));
        if let Err(e) = made {
            failed.push(format!("port {}: {e}", p.name));
        }
    }
    for n in &saved.lab.nodes {
        if let Err(e) = lab.add_node_with(n.clone(), false).await {
            failed.push(format!("node {}: {e}", n.name));
        }
    }
    tracing::info!(
        path = %path.display(),
        lans = saved.lab.lans.len(),
        ports = saved.lab.ports.len(),
        nodes = saved.lab.nodes.len(),
        "lab restored from its saved state"
    );
    if !failed.is_empty() {
        // What could not be brought back must not be lost when the state
        // is written again: keep this file.
        let copy = {
            let mut name = path.as_os_str().to_owned();
            name.push(".unrestored");
            PathBuf::from(name)
        };
        let kept = std::fs::copy(path, &copy).is_ok();
        for f in &failed {
            tracing::error!(
                kept_as = %if kept { copy.display().to_string() } else { "-".into() },
                "could not restore {f}"
            );
        }
    }
    Some(saved)
}

/// Resolves once the stop flag is `true` or its sender is gone.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// After [`restore`] and once the API serves: starts the nodes that were
/// not stopped (in the background) and keeps the state file up to date
/// until `stop`. Nodes restored and not started yet are saved as wanted
/// running ([`Persister::capture`]), so a change or a stop meanwhile loses
/// nothing.
pub async fn keep(
    lab: Arc<Lab>,
    persister: Arc<Persister>,
    restored: Option<SavedLab>,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = lab.events().subscribe();
    let to_start: Vec<String> = restored
        .iter()
        .flat_map(|s| s.lab.nodes.iter().filter(|n| !s.stopped.contains(&n.name)))
        .map(|n| n.name.clone())
        .collect();
    let starter = lab.clone();
    tokio::spawn(async move {
        for name in to_start {
            match starter.start_node(&name).await {
                Ok(_) => tracing::info!(node = %name, "restored node started"),
                Err(e) => tracing::error!(node = %name, "cannot start a restored node: {e}"),
            }
        }
    });
    persister.flush().await;
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            ev = events.recv() => match ev {
                Ok(rec) if matches!(rec.event, Event::PortUp { .. } | Event::PortDown { .. }) => {}
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    persister.flush().await
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    // The last changes, then nothing more: stopping the daemon stops its
    // guests, which is not what the user wants back next time.
    persister.flush().await;
    persister.set_enabled(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedLab {
        let lab = crate::labfile::parse(
            "lans: [a, b]\nports:\n  - {name: p, kind: vde, lan: a}\n",
            "t",
        )
        .unwrap();
        SavedLab::new(lab, BTreeSet::new())
    }

    #[test]
    fn saves_atomically_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(STATE_FILE);
        assert_eq!(load(&path).unwrap(), None);
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        assert!(!path.with_extension("json.tmp").exists());
        // An empty lab has no file.
        save(&path, &SavedLab::new(LabFile::default(), BTreeSet::new())).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn truncated_garbage_and_invalid_states_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        save(&path, &sample()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut invalid = sample();
        invalid.lab.ports[0].lan = Some("nowhere".into());
        let cases: Vec<Vec<u8>> = vec![
            good[..good.len() / 2].to_vec(),
            Vec::new(),
            b"\x00\xffgarbage".to_vec(),
            serde_json::to_vec(&invalid).unwrap(),
            String::from_utf8(good.clone())
                .unwrap()
                .replace("\"version\": 1", "\"version\": 7")
                .into_bytes(),
        ];
        for (i, bytes) in cases.into_iter().enumerate() {
            std::fs::write(&path, bytes).unwrap();
            assert!(
                matches!(load(&path), Err(PersistError::Corrupt { .. })),
                "case {i}"
            );
        }
        let aside = set_aside(&path, "corrupt").unwrap();
        assert!(aside.exists() && !path.exists());
    }
}
