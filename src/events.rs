//! Topology and port events, fanned out to `/v1/events` subscribers.
//! Emitting never blocks: a subscriber that falls behind loses old events
//! and is told so, the emitter (possibly the data plane) never waits.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::ports::PortKind;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    LanAdded {
        lan: String,
    },
    LanRemoved {
        lan: String,
    },
    PortAdded {
        port: String,
        kind: PortKind,
        lan: Option<String>,
        path: String,
    },
    PortRemoved {
        port: String,
    },
    PortMoved {
        port: String,
        from: Option<String>,
        to: Option<String>,
    },
    /// A client attached to the port.
    PortUp {
        port: String,
        peer: Option<String>,
    },
    /// The port's client left or was cut off.
    PortDown {
        port: String,
        reason: String,
    },
    /// A client's attach was refused (a bad tap handover): the port's
    /// current client, if any, is untouched.
    PortRefused {
        port: String,
        reason: String,
    },
    NodeAdded {
        node: String,
    },
    NodeRemoved {
        node: String,
    },
    /// starting, running, stopping, stopped or crashed, with why.
    NodeState {
        node: String,
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::LanAdded { .. } => "lan_added",
            Event::LanRemoved { .. } => "lan_removed",
            Event::PortAdded { .. } => "port_added",
            Event::PortRemoved { .. } => "port_removed",
            Event::PortMoved { .. } => "port_moved",
            Event::PortUp { .. } => "port_up",
            Event::PortDown { .. } => "port_down",
            Event::PortRefused { .. } => "port_refused",
            Event::NodeAdded { .. } => "node_added",
            Event::NodeRemoved { .. } => "node_removed",
            Event::NodeState { .. } => "node_state",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// Increases by one per event, so a reader can tell it missed some.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Debug)]
pub struct EventSink {
    tx: broadcast::Sender<EventRecord>,
    seq: std::sync::Mutex<u64>,
}

impl Default for EventSink {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        EventSink {
            tx,
            seq: std::sync::Mutex::new(1),
        }
    }

    pub fn emit(&self, event: Event) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // Numbered and sent under one lock: the data plane and the control
        // side both emit, and readers take a gap in the numbers for missed
        // events, so the numbers must go out in order.
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let n = *seq;
        *seq += 1;
        // No subscriber is not an error.
        let _ = self.tx.send(EventRecord {
            seq: n,
            time_ms,
            event,
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.tx.subscribe()
    }
}
