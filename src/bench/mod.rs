//! Frame-rate benchmarks for users (`ulan bench`) and for the project
//! (`cargo bench`): one generator, one checking sink and one RFC 2544-style
//! test runner, shared by both.
//!
//! - [`frames`]: what is sent (sequence-numbered, time-stamped frames of the
//!   testkit's traffic layout) and how arrivals are counted and timed.
//! - [`link`]: the two ends of a path through a switch: Unix-socket clients
//!   (dgram, stream, vde) or a pair of vhost-user frontends.
//! - [`rfc2544`]: paced trials, and from them throughput (binary search),
//!   latency percentiles, frame loss at chosen rates and back-to-back bursts.
//!
//! One thread sends and receives (the machines this runs on may have two
//! cores, the switch needs the other): a trial interleaves batches of sends
//! with draining the sink, paced by the clock.

use std::io;
use std::time::Duration;

use crate::testkit::vhost_frontend::traffic::TrafficError;
use crate::testkit::vhost_frontend::VhostFrontendError;

pub mod frames;
pub mod link;
pub mod rfc2544;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(
        "frame size {0} is out of range: sizes count the 4-byte FCS, as RFC 2544 does, \
         and go from {min} to {max}",
        min = frames::MIN_SIZE,
        max = frames::MAX_SIZE
    )]
    BadSize(usize),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("vhost-user: {0}")]
    Vhost(#[from] VhostFrontendError),
    #[error(transparent)]
    Traffic(#[from] TrafficError),
    #[error("a stream record of {0} bytes is larger than any frame: the stream is out of step")]
    BadRecord(usize),
    #[error("no frame got through the path in {0:?}: is it forwarding?")]
    NoPath(Duration),
    #[error("{0}")]
    Peer(String),
    #[error("interrupted")]
    Interrupted,
}
