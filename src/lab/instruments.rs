//! The lab's instruments on the control side: impairments and link state
//! of ports, and packet captures. The work on frames happens in the data
//! plane (`switch::impair`, `switch::capture`); this keeps what was asked
//! for, builds the data plane's pieces off its thread and answers the API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{not_found, Lab, LabError, PortInfo, State};
use crate::switch::capture::{self, CaptureReader, CaptureSink, CaptureStats, PortNamer};
use crate::switch::dataplane::{CaptureTarget, Command};
use crate::switch::impair::{DirectionSpec, ImpairSpec, Impairer};
use crate::switch::PortId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    #[default]
    Up,
    Down,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("a capture names a port or a lan, not both")]
    Target,
    #[error("snaplen must be between 64 and {}", capture::MAX_SNAPLEN)]
    Snaplen,
    #[error("cannot create the capture file {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the capture path must be absolute: {0}")]
    RelativePath(String),
    #[error("capture {0} writes to a file; only a capture made without a path can be streamed")]
    NotAStream(String),
    #[error("capture {0} is already being streamed")]
    StreamTaken(String),
    #[error("cannot start the capture's writer: {0}")]
    Writer(std::io::Error),
}

/// `POST /v1/captures`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub lan: Option<String>,
    /// Bytes kept of each frame (default 65535).
    #[serde(default)]
    pub snaplen: Option<u32>,
    /// A file to write; without one the capture is read from its stream.
    #[serde(default)]
    pub path: Option<String>,
}

/// A capture as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureInfo {
    pub id: String,
    /// `port` or `lan`.
    pub of: String,
    pub name: String,
    pub snaplen: u32,
    pub path: Option<String>,
    /// `running` or `ended`.
    pub state: String,
    /// Why it ended.
    pub reason: Option<String>,
    pub frames: u64,
    pub bytes: u64,
    /// Frames it could not keep up with (forwarding did not wait).
    pub dropped: u64,
    /// Seconds since the Unix epoch.
    pub started_s: f64,
}

struct CaptureEntry {
    num: u64,
    of: &'static str,
    name: String,
    snaplen: u32,
    path: Option<PathBuf>,
    stats: Arc<CaptureStats>,
    started: SystemTime,
    /// A stream capture's writer end, until its stream is opened.
    reader: Option<CaptureReader>,
    streamed: bool,
}

#[derive(Default)]
pub(super) struct Captures {
    next: u64,
    map: BTreeMap<String, CaptureEntry>,
}

impl CaptureEntry {
    fn info(&self, id: &str) -> CaptureInfo {
        let ended = self.stats.ended.load(Relaxed);
        CaptureInfo {
            id: id.to_string(),
            of: self.of.to_string(),
            name: self.name.clone(),
            snaplen: self.snaplen,
            path: self.path.as_ref().map(|p| p.display().to_string()),
            state: if ended { "ended" } else { "running" }.into(),
            reason: self.stats.reason(),
            frames: self.stats.frames.load(Relaxed),
            bytes: self.stats.bytes.load(Relaxed),
            dropped: self.stats.dropped.load(Relaxed),
            started_s: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }
}

/// A seed for a port's impairment draws: differs per port and run.
fn seed(id: PortId, dir: u64) -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ ((id as u64) << 32) ^ dir.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn built(spec: &Option<DirectionSpec>, id: PortId, dir: u64) -> Option<Box<Impairer>> {
    spec.as_ref()
        .filter(|d| !d.is_empty())
        .map(|d| Box::new(Impairer::new(d, seed(id, dir))))
}

impl Lab {
    fn port_id(&self, st: &State, name: &str) -> Result<PortId, LabError> {
        Ok(st
            .ports
            .get(name)
            .ok_or_else(|| not_found("port", name))?
            .id)
    }

    pub fn impairments(&self, port: &str) -> Result<ImpairSpec, LabError> {
        let st = self.state();
        let p = st.ports.get(port).ok_or_else(|| not_found("port", port))?;
        Ok(p.impairments.clone())
    }

    /// Replaces a port's impairments (both directions: a direction left
    /// out is cleared). Frames waiting under the old ones keep their place.
    pub fn set_impairments(&self, port: &str, spec: ImpairSpec) -> Result<ImpairSpec, LabError> {
        spec.validate()?;
        let mut st = self.state();
        let id = self.port_id(&st, port)?;
        self.dataplane.send(Command::SetImpairments {
            id,
            ingress: built(&spec.ingress, id, 1),
            egress: built(&spec.egress, id, 2),
        })?;
        let entry = st
            .ports
            .get_mut(port)
            .ok_or_else(|| not_found("port", port))?;
        // Empty directions are not kept, so GET shows what acts.
        entry.impairments = ImpairSpec {
            egress: spec.egress.filter(|d| !d.is_empty()),
            ingress: spec.ingress.filter(|d| !d.is_empty()),
        };
        tracing::info!(port, impairments = ?entry.impairments, "impairments set");
        Ok(entry.impairments.clone())
    }

    /// Sets a port's link up or down. A down port forwards nothing either
    /// way; when the port is a QEMU guest's NIC the guest's carrier follows
    /// (QMP `set_link`), if the guest is running. Returns the port and, if
    /// the guest's carrier could not be set, why.
    pub async fn set_port_link(
        &self,
        port: &str,
        link: LinkState,
    ) -> Result<(PortInfo, Option<String>), LabError> {
        let info = self.set_switch_link(port, link)?;
        let mut carrier = None;
        if let Some((node, i)) = self.port_nic(port) {
            if let Err(e) = self.set_nic_link(&node, i, link == LinkState::Up).await {
                tracing::info!(port, "the guest's carrier is not set: {e}");
                carrier = Some(e.to_string());
            }
        }
        Ok((info, carrier))
    }

    /// A port's shared state, for what follows it off the lab's lock (a
    /// guest's supervisor).
    pub(crate) fn port_shared(&self, port: &str) -> Option<Arc<crate::switch::stats::PortShared>> {
        self.state().ports.get(port).map(|p| p.shared.clone())
    }

    /// The switch's half of [`Lab::set_port_link`]: the data plane and
    /// what the API shows; the guest's carrier is left alone.
    pub(crate) fn set_switch_link(
        &self,
        port: &str,
        link: LinkState,
    ) -> Result<PortInfo, LabError> {
        let info = {
            let mut st = self.state();
            let id = self.port_id(&st, port)?;
            self.dataplane.send(Command::SetLink {
                id,
                up: link == LinkState::Up,
            })?;
            let entry = st
                .ports
                .get_mut(port)
                .ok_or_else(|| not_found("port", port))?;
            entry.link = link;
            entry
                .shared
                .link_down
                .store(link == LinkState::Down, Relaxed);
            State::port_info(port, entry)
        };
        tracing::info!(port, link = ?link, "link set");
        Ok(info)
    }

    /// Gives a port just made the link state and impairments its spec
    /// asks for (a lab file, a node's NIC, a restored lab). Defaults cost
    /// nothing. A guest NIC's carrier is set when its QEMU starts.
    pub(crate) fn apply_port_spec(
        &self,
        port: &str,
        link: LinkState,
        impairments: &ImpairSpec,
    ) -> Result<(), LabError> {
        if !impairments.is_empty() {
            self.set_impairments(port, impairments.clone())?;
        }
        if link != LinkState::Up {
            self.set_switch_link(port, link)?;
        }
        Ok(())
    }

    /// The link state a port was given (guest launches apply it).
    pub fn port_link(&self, port: &str) -> Option<LinkState> {
        self.state().ports.get(port).map(|p| p.link)
    }

    /// Every port's link state and impairments, by name.
    pub(crate) fn port_settings(&self) -> BTreeMap<String, (LinkState, ImpairSpec)> {
        self.state()
            .ports
            .iter()
            .map(|(n, p)| (n.clone(), (p.link, p.impairments.clone())))
            .collect()
    }

    fn captures(&self) -> std::sync::MutexGuard<'_, Captures> {
        self.captures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a capture of a port or a lan.
    pub fn start_capture(&self, req: CaptureRequest) -> Result<CaptureInfo, LabError> {
        let snaplen = req.snaplen.unwrap_or(capture::MAX_SNAPLEN);
        if !(64..=capture::MAX_SNAPLEN).contains(&snaplen) {
            return Err(CaptureError::Snaplen.into());
        }
        let (of, name, target) = {
            let st = self.state();
            match (&req.port, &req.lan) {
                (Some(p), None) => (
                    "port",
                    p.clone(),
                    CaptureTarget::Port(self.port_id(&st, p)?),
                ),
                (None, Some(l)) => {
                    let lan = st.lans.get(l).ok_or_else(|| not_found("lan", l))?;
                    ("lan", l.clone(), CaptureTarget::Lan(lan.id))
                }
                _ => return Err(CaptureError::Target.into()),
            }
        };
        let file = match &req.path {
            Some(p) => {
                let path = PathBuf::from(p);
                if !path.is_absolute() {
                    return Err(CaptureError::RelativePath(p.clone()).into());
                }
                let f = std::fs::File::create(&path).map_err(|source| CaptureError::File {
                    path: p.clone(),
                    source,
                })?;
                Some((path, f))
            }
            None => None,
        };
        let mut caps = self.captures();
        caps.next += 1;
        let num = caps.next;
        let id = format!("c{num}");
        let (tap, reader, stats) = capture::capture(num, snaplen);
        let mut entry = CaptureEntry {
            num,
            of,
            name: name.clone(),
            snaplen,
            path: file.as_ref().map(|(p, _)| p.clone()),
            stats,
            started: SystemTime::now(),
            reader: None,
            streamed: false,
        };
        match file {
            Some((_, f)) => self.spawn_writer(&id, reader, CaptureSink::File(f))?,
            None => entry.reader = Some(reader),
        }
        self.dataplane.send(Command::AddCapture { target, tap })?;
        tracing::info!(capture = id, of, name, "capture started");
        let info = entry.info(&id);
        caps.map.insert(id, entry);
        Ok(info)
    }

    fn namer(&self) -> PortNamer {
        let names: Arc<std::sync::Mutex<BTreeMap<PortId, String>>> =
            Arc::new(std::sync::Mutex::new(
                self.state()
                    .ports
                    .iter()
                    .map(|(n, p)| (p.id, n.clone()))
                    .collect(),
            ));
        Arc::new(move |id| names.lock().ok()?.get(&id).cloned())
    }

    fn spawn_writer(
        &self,
        id: &str,
        reader: CaptureReader,
        sink: CaptureSink,
    ) -> Result<(), LabError> {
        let commander = self.dataplane.commander();
        let num: u64 = id[1..].parse().unwrap_or(0);
        let label = id.to_string();
        reader
            .spawn(
                sink,
                self.namer(),
                Box::new(move |reason| {
                    tracing::info!(capture = label, "capture ended: {reason}");
                    // The writer is gone; the tap must go too.
                    let _ = commander.send(Command::RemoveCapture { id: num });
                }),
            )
            .map_err(|e| CaptureError::Writer(e).into())
    }

    pub fn capture_list(&self) -> Vec<CaptureInfo> {
        self.captures()
            .map
            .iter()
            .map(|(id, e)| e.info(id))
            .collect()
    }

    pub fn capture(&self, id: &str) -> Result<CaptureInfo, LabError> {
        let caps = self.captures();
        let e = caps.map.get(id).ok_or_else(|| not_found("capture", id))?;
        Ok(e.info(id))
    }

    /// Stops a capture and forgets it; returns once its file is complete,
    /// with its final counts.
    pub async fn stop_capture(&self, id: &str) -> Result<CaptureInfo, LabError> {
        let (num, stats, has_writer) = {
            let caps = self.captures();
            let e = caps.map.get(id).ok_or_else(|| not_found("capture", id))?;
            (e.num, e.stats.clone(), e.reader.is_none())
        };
        self.dataplane.send(Command::RemoveCapture { id: num })?;
        if has_writer {
            // The writer sees its queue closed once the data plane dropped
            // the tap, writes what is left and ends.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !stats.ended.load(Relaxed) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut caps = self.captures();
        let e = caps
            .map
            .remove(id)
            .ok_or_else(|| not_found("capture", id))?;
        let mut info = e.info(id);
        info.state = "ended".into();
        if info.reason.is_none() {
            info.reason = Some("stopped".into());
        }
        tracing::info!(
            capture = id,
            frames = info.frames,
            dropped = info.dropped,
            "capture stopped"
        );
        Ok(info)
    }

    /// Opens a stream capture's pcapng stream (once).
    pub fn capture_stream(&self, id: &str) -> Result<tokio::sync::mpsc::Receiver<Bytes>, LabError> {
        let reader = {
            let mut caps = self.captures();
            let e = caps
                .map
                .get_mut(id)
                .ok_or_else(|| not_found("capture", id))?;
            if e.path.is_some() {
                return Err(CaptureError::NotAStream(id.into()).into());
            }
            if e.streamed {
                return Err(CaptureError::StreamTaken(id.into()).into());
            }
            e.streamed = true;
            e.reader.take()
        };
        let Some(reader) = reader else {
            return Err(CaptureError::StreamTaken(id.into()).into());
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        self.spawn_writer(id, reader, CaptureSink::Stream(tx))?;
        Ok(rx)
    }

    /// Captures of a port or lan that is going away end with it: the
    /// data plane drops their taps; this gives the reason, and ends stream
    /// captures never opened.
    pub(super) fn end_captures_of(&self, of: &'static str, name: &str) {
        let mut caps = self.captures();
        for e in caps
            .map
            .values_mut()
            .filter(|e| e.of == of && e.name == name)
        {
            if let Ok(mut r) = e.stats.reason.lock() {
                r.get_or_insert_with(|| format!("the {of} was removed"));
            }
            if e.reader.take().is_some() {
                e.stats.ended.store(true, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_state_reads_and_writes_as_words() {
        assert_eq!(serde_json::to_string(&LinkState::Down).unwrap(), "\"down\"");
        let l: LinkState = serde_json::from_str("\"up\"").unwrap();
        assert_eq!(l, LinkState::Up);
        assert!(serde_json::from_str::<LinkState>("\"sideways\"").is_err());
    }
}
