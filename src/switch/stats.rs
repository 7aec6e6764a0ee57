//! Per-port counters. The data plane keeps plain integers while it works on
//! a batch and adds them to these atomics once per batch; the API reads them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident),* $(,)?) => {
        /// Counters as plain integers, summed on the data plane per batch.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct PortCounters { $($(#[doc = $doc])+ pub $name: u64),* }

        /// The same counters, shared with the control side.
        #[derive(Debug, Default)]
        pub struct SharedCounters { $($name: AtomicU64),* }

        impl SharedCounters {
            pub fn add(&self, c: &PortCounters) {
                $(if c.$name != 0 { self.$name.fetch_add(c.$name, Relaxed); })*
            }
            pub fn load(&self) -> PortCounters {
                PortCounters { $($name: self.$name.load(Relaxed)),* }
            }
        }

        impl PortCounters {
            pub fn is_zero(&self) -> bool { $(self.$name == 0)&&* }

            /// Every counter: (name, its doc comment as one line, value),
            /// in declaration order. `/metrics` is made from this, so a
            /// counter added above shows there with no other change.
            pub fn fields(&self) -> [CounterField; COUNTER_COUNT] {
                [$(CounterField {
                    name: stringify!($name),
                    help: concat!($($doc),+),
                    value: self.$name,
                }),*]
            }
        }

        /// How many counters [`PortCounters`] has.
        pub const COUNTER_COUNT: usize = [$(stringify!($name)),*].len();
    };
}

counters! {
    /// Well-formed frames received from the client (forwarded or not).
    rx_frames,
    /// Bytes of those frames.
    rx_bytes,
    /// Frames sent to the client.
    tx_frames,
    /// Bytes of those frames.
    tx_bytes,
    /// Frames from the client not forwarded: the sum of the rx_drop_*
    /// reasons below. Runt, oversized and stranger ones are not in
    /// rx_frames.
    rx_dropped,
    /// Received while the port is on no lan.
    rx_drop_no_lan,
    /// Shorter than an Ethernet header.
    rx_drop_runt,
    /// Longer than 65535 bytes (or a stream length over the limit).
    rx_drop_oversized,
    /// Unicast to an address learned on the same port: filtered, as a
    /// learning bridge does.
    rx_drop_filtered,
    /// A vhost-user guest asked for checksum or segmentation work its
    /// frame does not allow (bad offsets, not TCP, lengths that disagree).
    rx_drop_bad_offload,
    /// A dgram port's datagrams from a sender other than its client (which
    /// keeps the port). While the port's socket is connected to its
    /// client, the kernel refuses such senders (EPERM) before ulan sees
    /// them.
    rx_drop_stranger,
    /// Received while the port is set down (`link: down`).
    rx_drop_link_down,
    /// Lost on purpose by the port's ingress impairment (loss_*).
    rx_drop_impair_loss,
    /// The ingress impairment's queue (delay, rate limit) was full.
    rx_drop_impair_queue,
    /// Waiting in the ingress impairment when the port left its lan.
    rx_drop_moved,
    /// Frames from the client the ingress impairment sent twice.
    rx_impair_duplicated,
    /// Frames from the client the ingress impairment corrupted.
    rx_impair_corrupted,
    /// Frames from the client the ingress impairment let skip its delay.
    rx_impair_reordered,
    /// Frames bound for this port that it could not take: sum of tx_drop_*.
    tx_dropped,
    /// The output queue was full (slow or stuck client).
    tx_drop_queue_full,
    /// No client connected, or a datagram client not heard from yet.
    tx_drop_no_peer,
    /// The send failed for another reason (client went away mid-batch).
    tx_drop_error,
    /// Still queued (or waiting in the egress impairment) for the lan the
    /// port left when it moved (or was detached): frames never cross lans.
    tx_drop_moved,
    /// Bound for this port while it is set down (`link: down`).
    tx_drop_link_down,
    /// Lost on purpose by the port's egress impairment (loss_*).
    tx_drop_impair_loss,
    /// The egress impairment's queue (delay, rate limit) was full.
    tx_drop_impair_queue,
    /// Frames to the client the egress impairment sent twice.
    tx_impair_duplicated,
    /// Frames to the client the egress impairment corrupted.
    tx_impair_corrupted,
    /// Frames to the client the egress impairment let skip its delay.
    tx_impair_reordered,
    /// Frames of this port (or from it, for a lan capture) a capture's
    /// queue could not take: the capture misses them, forwarding does not.
    capture_dropped,
    /// Clients that connected.
    connects,
    /// Clients that left or were disconnected.
    disconnects,
    /// Clients refused (a second client, a bad request).
    rejected_clients,
    /// Clients cut off for a protocol error (bad length, bad request).
    protocol_errors,
    /// Source addresses not learned because the lan's table is full.
    fdb_full,
}

/// One counter of [`PortCounters::fields`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterField {
    pub name: &'static str,
    /// The doc comment, its lines joined (each begins with a space).
    pub help: &'static str,
    pub value: u64,
}

/// What the control side sees of a port that lives on the data plane.
#[derive(Debug, Default)]
pub struct PortShared {
    pub counters: SharedCounters,
    /// A client is attached (stream/bess/vde connected, dgram heard from).
    pub up: AtomicBool,
    /// The port's link was set down (API or spec): what a guest NIC's
    /// carrier must follow when its QEMU starts or reconnects. The data
    /// plane learns it by its own command.
    pub link_down: AtomicBool,
}

impl PortShared {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed)
    }
}

/// How busy the data-plane thread is. It sums plain integers itself and
/// stores them here once per round (a few stores, no read-modify-write);
/// the control side only reads.
#[derive(Debug, Default)]
pub struct DataPlaneStats {
    /// The thread's kernel id (0 until it runs), for its CPU time in
    /// `/proc/self/task/TID/`.
    pub tid: AtomicU64,
    /// Rounds of the loop (each serves what one wakeup found).
    pub rounds: AtomicU64,
    /// Rounds that asked epoll (the others go on serving busy ports).
    pub polls: AtomicU64,
    /// Nanoseconds spent working: from the end of one epoll wait to the
    /// start of the next.
    pub busy_ns: AtomicU64,
    /// Nanoseconds spent waiting in epoll.
    pub wait_ns: AtomicU64,
    /// busy / (busy + wait) over the last tick (about a second), in
    /// millionths.
    pub busy_ppm: AtomicU64,
}

/// What [`DataPlaneStats`] holds, read at one time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DataPlaneLoad {
    pub tid: u64,
    pub rounds: u64,
    pub polls: u64,
    pub busy_ns: u64,
    pub wait_ns: u64,
    pub busy_ppm: u64,
}

impl DataPlaneStats {
    pub fn load(&self) -> DataPlaneLoad {
        DataPlaneLoad {
            tid: self.tid.load(Relaxed),
            rounds: self.rounds.load(Relaxed),
            polls: self.polls.load(Relaxed),
            busy_ns: self.busy_ns.load(Relaxed),
            wait_ns: self.wait_ns.load(Relaxed),
            busy_ppm: self.busy_ppm.load(Relaxed),
        }
    }
}

/// The data plane's own running sums, published into [`DataPlaneStats`].
#[derive(Debug, Default)]
pub(crate) struct LoadMeter {
    rounds: u64,
    polls: u64,
    busy_ns: u64,
    wait_ns: u64,
    /// busy_ns and wait_ns at the last tick.
    window: (u64, u64),
}

impl LoadMeter {
    /// One round; `waited` is the time spent in epoll and `worked` the
    /// time since the previous wait ended, both in nanoseconds, or None
    /// when the round did not ask epoll.
    pub(crate) fn round(&mut self, poll: Option<(u64, u64)>) {
        self.rounds += 1;
        if let Some((worked, waited)) = poll {
            self.polls += 1;
            self.busy_ns += worked;
            self.wait_ns += waited;
        }
    }

    pub(crate) fn publish(&self, to: &DataPlaneStats) {
        to.rounds.store(self.rounds, Relaxed);
        to.polls.store(self.polls, Relaxed);
        to.busy_ns.store(self.busy_ns, Relaxed);
        to.wait_ns.store(self.wait_ns, Relaxed);
    }

    /// Once a tick: the busy share since the previous tick.
    pub(crate) fn tick(&mut self, to: &DataPlaneStats) {
        let busy = self.busy_ns - self.window.0;
        let wait = self.wait_ns - self.window.1;
        self.window = (self.busy_ns, self.wait_ns);
        if let Some(ppm) = (busy.saturating_mul(1_000_000)).checked_div(busy + wait) {
            to.busy_ppm.store(ppm, Relaxed);
        }
    }
}
