//! Node consoles for browsers: one connection to a node's console socket,
//! shared by every viewer (QEMU serves one client at a time; here any
//! number watch and type).
//!
//! A hub reads the console and hands each chunk to every viewer's bounded
//! queue without waiting: a viewer whose queue is full (it does not read,
//! or reads slower than the guest prints) is dropped, and the others never
//! notice. What a viewer types goes to the console in the order it
//! arrives. A new viewer first gets the last [`BACKLOG`] bytes, so it
//! sees a prompt. The hub lets the console go when its last viewer leaves,
//! so `ulan console` can have it again.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Notify};

/// Bytes of recent output a new viewer gets first.
pub const BACKLOG: usize = 16 * 1024;

/// Why a viewer's output ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The console closed (the node stopped).
    ConsoleClosed,
    /// The viewer did not keep up and was dropped.
    TooSlow,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(
        "cannot connect to the console of node {node:?} at {path}: {source} (is the node running?)"
    )]
    Connect {
        node: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

struct ViewerSlot {
    id: u64,
    tx: mpsc::Sender<Bytes>,
}

struct HubState {
    viewers: Vec<ViewerSlot>,
    backlog: VecDeque<u8>,
    /// No viewer left or the console ended: attach makes a new hub.
    done: bool,
}

/// One node's console, shared.
pub struct Hub {
    node: String,
    state: Mutex<HubState>,
    input: mpsc::Sender<Bytes>,
    ended: AtomicBool,
    close: Notify,
    queue: usize,
    next_id: AtomicU64,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Viewers attached now.
    pub fn viewers(&self) -> usize {
        self.lock().viewers.len()
    }

    fn subscribe(self: &Arc<Self>) -> Option<Viewer> {
        let mut st = self.lock();
        if st.done {
            return None;
        }
        let (tx, rx) = mpsc::channel(self.queue.max(2));
        if !st.backlog.is_empty() {
            let first: Vec<u8> = st.backlog.iter().copied().collect();
            let _ = tx.try_send(Bytes::from(first));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        st.viewers.push(ViewerSlot { id, tx });
        Some(Viewer {
            hub: self.clone(),
            id,
            rx,
        })
    }

    fn leave(&self, id: u64) {
        let mut st = self.lock();
        st.viewers.retain(|v| v.id != id);
        if st.viewers.is_empty() && !st.done {
            st.done = true;
            self.close.notify_one();
        }
    }

    /// Hands `chunk` to every viewer; drops those whose queue is full.
    fn fan_out(&self, chunk: Bytes) {
        let mut st = self.lock();
        st.backlog.extend(chunk.iter().copied());
        let extra = st.backlog.len().saturating_sub(BACKLOG);
        st.backlog.drain(..extra);
        let before = st.viewers.len();
        st.viewers.retain(|v| match v.tx.try_send(chunk.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::info!(node = %self.node, viewer = v.id, "console viewer too slow: dropped");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if before > 0 && st.viewers.is_empty() && !st.done {
            st.done = true;
            self.close.notify_one();
        }
    }

    fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        let mut st = self.lock();
        st.done = true;
        st.viewers.clear();
    }
}

/// One viewer of a console: output comes from [`Viewer::recv`], input
/// goes with [`Viewer::send`]. Dropping it leaves the hub.
pub struct Viewer {
    hub: Arc<Hub>,
    id: u64,
    rx: mpsc::Receiver<Bytes>,
}

impl Viewer {
    /// The next output chunk, or why there is none any more.
    pub async fn recv(&mut self) -> Result<Bytes, EndReason> {
        match self.rx.recv().await {
            Some(b) => Ok(b),
            None if self.hub.ended.load(Ordering::SeqCst) => Err(EndReason::ConsoleClosed),
            None => Err(EndReason::TooSlow),
        }
    }

    /// Types `bytes` on the console. False when the console is gone.
    pub async fn send(&self, bytes: Bytes) -> bool {
        self.hub.input.send(bytes).await.is_ok()
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.hub.leave(self.id);
    }
}

/// The hubs of every node being watched.
pub struct Consoles {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    /// Chunks a viewer may have queued before it is dropped.
    queue: usize,
}

impl Consoles {
    pub fn new(queue: usize) -> Consoles {
        Consoles {
            hubs: Mutex::new(HashMap::new()),
            queue,
        }
    }

    /// A viewer of `node`'s console at `path`, sharing the hub when there
    /// is one.
    pub async fn attach(&self, node: &str, path: &Path) -> Result<Viewer, ConsoleError> {
        if let Some(v) = self.existing(node) {
            return Ok(v);
        }
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ConsoleError::Connect {
                node: node.into(),
                path: path.into(),
                source,
            })?;
        // Another viewer may have made a hub meanwhile: use it, and let
        // this connection go.
        let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = hubs.get(node).and_then(|h| h.subscribe()) {
            return Ok(v);
        }
        let (input_tx, input_rx) = mpsc::channel(64);
        let hub = Arc::new(Hub {
            node: node.into(),
            state: Mutex::new(HubState {
                viewers: Vec::new(),
                backlog: VecDeque::new(),
                done: false,
            }),
            input: input_tx,
            ended: AtomicBool::new(false),
            close: Notify::new(),
            queue: self.queue,
            next_id: AtomicU64::new(1),
        });
        let viewer = hub.subscribe().expect("a new hub takes viewers");
        hubs.insert(node.into(), hub.clone());
        tokio::spawn(run_hub(hub, stream, input_rx));
        Ok(viewer)
    }

    fn existing(&self, node: &str) -> Option<Viewer> {
        let hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        hubs.get(node).and_then(|h| h.subscribe())
    }

    /// The hub of `node`, while it has viewers.
    pub fn hub(&self, node: &str) -> Option<Arc<Hub>> {
        let hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        hubs.get(node).filter(|h| !h.lock().done).cloned()
    }
}

async fn run_hub(hub: Arc<Hub>, stream: UnixStream, mut input: mpsc::Receiver<Bytes>) {
    let (mut rd, mut wr) = stream.into_split();
    let reader = async {
        let mut buf = vec![0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => hub.fan_out(Bytes::copy_from_slice(&buf[..n])),
            }
        }
    };
    let writer = async {
        while let Some(b) = input.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = reader => hub.end(),
        _ = writer => hub.end(),
        _ = hub.close.notified() => {}
    }
    tracing::debug!(node = %hub.node, "console hub closed");
}
