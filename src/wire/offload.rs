//! Finishing in software what a guest's virtio-net header asks of the
//! device: filling a partial checksum and cutting a TCP super-frame into
//! segments, for ports that carry bare, complete Ethernet frames.
//!
//! A guest offered CSUM and HOST_TSO4/6 may hand over a frame whose L4
//! checksum holds only the pseudo-header sum (Linux CHECKSUM_PARTIAL,
//! `VIRTIO_NET_HDR_F_NEEDS_CSUM`) and/or a TCP frame of up to 64 KiB that
//! is to be cut into segments of `gso_size` payload bytes (what Linux's
//! `tcp_gso_segment` does). [`Offload`] is that request, read from the
//! header with [`Offload::from_virtio`]; [`complete_checksum`] fills the
//! checksum in place; a [`Segmenter`] turns any frame and request into
//! complete frames, in scratch space it allocates once.
//!
//! Nothing here trusts the frame or the header: lengths come from the
//! packet's own headers (never from `hdr_len`), every length field must
//! agree with the frame, and anything else is an [`OffloadError`].
//!
//! What is accepted for segmentation: Ethernet with at most one 802.1Q or
//! 802.1ad tag; IPv4 with or without options, not a fragment; IPv6 whose
//! next header is TCP (extension headers are refused: Linux guests do not
//! put them on TSO frames, and walking them is a parser of its own); TCP
//! with or without options (copied to every segment). UDP fragmentation
//! offload (gso types UDP and UDP_L4) is not offered and is refused.

use thiserror::Error;

use super::checksum;
use super::{ETH_HEADER_LEN, MAX_FRAME_LEN};

/// virtio-net header flag: the checksum is partial (see [`Offload::needs_csum`]).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// virtio-net header flag: the checksum has been checked. Meaningful
/// towards a guest only; from one it is ignored (the frame is complete).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// Or-ed into the gso type: the super-frame may have CWR set (HOST_ECN).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// The smallest `gso_size` accepted. It bounds the work one super-frame
/// can cause: at most [`MAX_SEGMENTS`] frames. Linux's floor for the send
/// MSS is 48 (`net.ipv4.tcp_min_snd_mss`) and TCP timestamps take 12 of
/// that, so a guest talking to a peer that announces the smallest MSS Linux
/// accepts still gets through; smaller sizes only come from a guest that
/// means harm.
pub const MIN_GSO_SIZE: u16 = 32;
/// The most segments one super-frame can become.
pub const MAX_SEGMENTS: usize = MAX_FRAME_LEN.div_ceil(MIN_GSO_SIZE as usize);
/// Longest headers of a segment: Ethernet with a tag, IPv4 with 40 bytes of
/// options, TCP with 40 bytes of options (IPv6 without extension headers
/// is shorter).
pub const MAX_HEADERS_LEN: usize = ETH_HEADER_LEN + 4 + 60 + 60;
/// The Segmenter's scratch space: the worst case of [`MAX_SEGMENTS`]
/// segments each carrying the longest headers.
const SCRATCH_LEN: usize = MAX_FRAME_LEN + (MAX_SEGMENTS - 1) * MAX_HEADERS_LEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
/// Offset of the checksum in a TCP header.
const TCP_CSUM_OFFSET: u16 = 16;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// What a frame's virtio-net header asks of whoever sends it on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM: the L4 checksum at csum_start+csum_offset holds only the
    /// pseudo-header sum; the sum over [csum_start, end) must be folded in.
    pub needs_csum: bool,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub gso: Gso,
    /// Payload bytes per segment (virtio gso_size).
    pub gso_size: u16,
    /// virtio hdr_len (a hint only; never trusted for bounds).
    pub hdr_len: u16,
}

/// The segmentation a frame asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Gso {
    #[default]
    None,
    /// TCP over IPv4; `ecn`: the frame may carry CWR (virtio GSO_ECN).
    Tcp4 { ecn: bool },
    /// TCP over IPv6.
    Tcp6 { ecn: bool },
}

/// What a receiving port takes as it is: for a vhost-user port, the
/// virtio-net guest features its driver acked (GUEST_CSUM, GUEST_TSO4,
/// GUEST_TSO6, GUEST_ECN); for a socket port, nothing ([`Accepts::NONE`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepts {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
}

impl Accepts {
    /// Complete frames only.
    pub const NONE: Accepts = Accepts {
        csum: false,
        tso4: false,
        tso6: false,
        ecn: false,
    };
}

/// Why a frame or header cannot be finished. Each is a drop with a reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OffloadError {
    #[error("virtio-net header flags {0:#04x} have bits other than NEEDS_CSUM and DATA_VALID")]
    UnknownFlags(u8),
    #[error("virtio-net gso type {0:#04x} is not one ulan knows")]
    UnknownGsoType(u8),
    #[error("UDP segmentation (virtio-net gso type {0}) is not offered")]
    UdpGso(u8),
    #[error("virtio-net gso type has the ECN bit but asks for no segmentation")]
    EcnWithoutGso,
    #[error("gso_size {size} is below the smallest accepted, {min}")]
    GsoSizeTooSmall { size: u16, min: u16 },
    #[error("checksum start {start} lies in the Ethernet header")]
    CsumInEthernetHeader { start: u16 },
    #[error("checksum offset {0} is odd: no Internet checksum sits there")]
    CsumOffsetOdd(u16),
    #[error("checksum at {start}+{offset} does not fit in {len} bytes")]
    CsumOutOfFrame { start: u16, offset: u16, len: usize },
    #[error("checksum request {start}+{offset} of a TCP segmentation frame is not the TCP checksum at {tcp}+16")]
    CsumNotTcp { start: u16, offset: u16, tcp: usize },
    #[error("frame of {0} bytes is longer than 65535")]
    FrameTooLong(usize),
    #[error("frame of {have} bytes is too short for its {what} (needs {need})")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("more than one VLAN tag")]
    StackedVlan,
    #[error("EtherType {0:#06x} is not IPv4 or IPv6")]
    NotIp(u16),
    #[error("EtherType {ethertype:#06x} but IP version {version}")]
    IpVersionMismatch { ethertype: u16, version: u8 },
    #[error("TCP segmentation for IPv{want} asked of an IPv{found} packet")]
    GsoWrongIpVersion { want: u8, found: u8 },
    #[error("IPv4 header length {0} words is below 5")]
    Ipv4HeaderLen(u8),
    #[error("IPv4 fragment (MF or fragment offset set) cannot be segmented")]
    Fragment,
    #[error("IP protocol / next header {0} is not TCP")]
    NotTcp(u8),
    #[error("IPv6 extension header {0} before TCP is not supported for segmentation")]
    Ipv6ExtensionHeader(u8),
    #[error("{field} says {says} bytes but the frame has {actual}")]
    LengthMismatch {
        field: &'static str,
        says: usize,
        actual: usize,
    },
    #[error("TCP data offset {0} words is below 5")]
    TcpHeaderLen(u8),
    #[error("{0} segments is more than {max}", max = MAX_SEGMENTS)]
    TooManySegments(usize),
    /// What the checks before it rule out; never expected.
    #[error("internal error in ulan's offload code (please report): {0}")]
    Bug(&'static str),
}

impl Offload {
    /// Nothing to do: a complete frame.
    pub fn is_none(&self) -> bool {
        !self.needs_csum && self.gso == Gso::None
    }

    /// From the raw virtio-net header fields, checking only what can be
    /// checked without the frame. Fields the request does not use are
    /// zeroed (csum_start/csum_offset without NEEDS_CSUM, gso_size without
    /// segmentation), so equal requests compare equal. Segmentation without
    /// NEEDS_CSUM (which the virtio spec forbids a driver) is accepted, as
    /// Linux accepts it: the TCP checksum of every segment is computed from
    /// scratch anyway. DATA_VALID is ignored.
    pub fn from_virtio(
        flags: u8,
        gso_type: u8,
        hdr_len: u16,
        gso_size: u16,
        csum_start: u16,
        csum_offset: u16,
    ) -> Result<Offload, OffloadError> {
        if flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0 {
            return Err(OffloadError::UnknownFlags(flags));
        }
        let ecn = gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let gso = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE if ecn => return Err(OffloadError::EcnWithoutGso),
            VIRTIO_NET_HDR_GSO_NONE => Gso::None,
            VIRTIO_NET_HDR_GSO_TCPV4 => Gso::Tcp4 { ecn },
            VIRTIO_NET_HDR_GSO_TCPV6 => Gso::Tcp6 { ecn },
            t @ (VIRTIO_NET_HDR_GSO_UDP | VIRTIO_NET_HDR_GSO_UDP_L4) => {
                return Err(OffloadError::UdpGso(t))
            }
            _ => return Err(OffloadError::UnknownGsoType(gso_type)),
        };
        let needs_csum = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        let off = Offload {
            needs_csum,
            csum_start: if needs_csum { csum_start } else { 0 },
            csum_offset: if needs_csum { csum_offset } else { 0 },
            gso,
            gso_size: if gso == Gso::None { 0 } else { gso_size },
            hdr_len,
        };
        off.check_header()?;
        Ok(off)
    }

    /// The same fields back (flags, gso_type, hdr_len, gso_size,
    /// csum_start, csum_offset), for writing a header towards a guest that
    /// accepts them.
    pub fn to_virtio(&self) -> (u8, u8, u16, u16, u16, u16) {
        let flags = if self.needs_csum {
            VIRTIO_NET_HDR_F_NEEDS_CSUM
        } else {
            0
        };
        let ecn_bit = |ecn: bool| if ecn { VIRTIO_NET_HDR_GSO_ECN } else { 0 };
        let gso_type = match self.gso {
            Gso::None => VIRTIO_NET_HDR_GSO_NONE,
            Gso::Tcp4 { ecn } => VIRTIO_NET_HDR_GSO_TCPV4 | ecn_bit(ecn),
            Gso::Tcp6 { ecn } => VIRTIO_NET_HDR_GSO_TCPV6 | ecn_bit(ecn),
        };
        (
            flags,
            gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )
    }

    /// Whether a port that takes `to` can be given the frame as it is,
    /// with this request in its header; otherwise [`Segmenter::finish`]
    /// first. Segmentation implies a partial checksum, so every gso type
    /// also needs `csum` (as virtio's GUEST_TSO4/6 need GUEST_CSUM).
    pub fn fits(&self, to: Accepts) -> bool {
        let csum = !self.needs_csum || to.csum;
        match self.gso {
            Gso::None => csum,
            Gso::Tcp4 { ecn } => to.csum && to.tso4 && (!ecn || to.ecn),
            Gso::Tcp6 { ecn } => to.csum && to.tso6 && (!ecn || to.ecn),
        }
    }

    /// The checks [`Offload::from_virtio`] makes, again for a request built
    /// by hand.
    fn check_header(&self) -> Result<(), OffloadError> {
        if self.needs_csum {
            if usize::from(self.csum_start) < ETH_HEADER_LEN {
                return Err(OffloadError::CsumInEthernetHeader {
                    start: self.csum_start,
                });
            }
            if self.csum_offset % 2 != 0 {
                return Err(OffloadError::CsumOffsetOdd(self.csum_offset));
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > MAX_FRAME_LEN {
                return Err(self.csum_out_of(MAX_FRAME_LEN));
            }
        }
        if self.gso != Gso::None && self.gso_size < MIN_GSO_SIZE {
            return Err(OffloadError::GsoSizeTooSmall {
                size: self.gso_size,
                min: MIN_GSO_SIZE,
            });
        }
        Ok(())
    }

    fn csum_out_of(&self, len: usize) -> OffloadError {
        OffloadError::CsumOutOfFrame {
            start: self.csum_start,
            offset: self.csum_offset,
            len,
        }
    }
}

/// Length of the fields [`Offload`] uses at the front of every virtio-net
/// header (virtio_net_hdr; v1 adds num_buffers after them).
pub const VIRTIO_HDR_FIELDS_LEN: usize = 10;

/// Reads the request from the first [`VIRTIO_HDR_FIELDS_LEN`] bytes of a
/// little-endian virtio-net header (a vhost-user ring's, or a tap's with
/// IFF_VNET_HDR on a little-endian host).
pub fn offload_from_header(h: &[u8; VIRTIO_HDR_FIELDS_LEN]) -> Result<Offload, OffloadError> {
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    Offload::from_virtio(h[0], h[1], u16_at(2), u16_at(4), u16_at(6), u16_at(8))
}

/// Writes the request into the first [`VIRTIO_HDR_FIELDS_LEN`] bytes of
/// a virtio-net header; the rest of `h` (num_buffers) is left alone.
pub fn write_header(off: &Offload, h: &mut [u8; VIRTIO_HDR_FIELDS_LEN]) {
    let (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) = off.to_virtio();
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
}

/// Fills the checksum a NEEDS_CSUM frame asks for, in place: the ones'
/// complement sum over `[csum_start, end)` (which includes the pseudo-header
/// sum the guest left in the field), complemented, at
/// `csum_start + csum_offset`. A result of 0 is written as 0xffff, as Linux
/// does: the same value in ones' complement for TCP, and the only correct
/// one for UDP, where 0 means "no checksum". Protocol-agnostic, like the
/// device virtio describes; the gso fields are not looked at. Does nothing
/// without `needs_csum`.
pub fn complete_checksum(frame: &mut [u8], off: &Offload) -> Result<(), OffloadError> {
    if !off.needs_csum {
        return Ok(());
    }
    off.check_header()?;
    let start = usize::from(off.csum_start);
    let at = start + usize::from(off.csum_offset);
    let out_of_frame = || off.csum_out_of(frame.len());
    let covered = frame.get(start..).ok_or_else(out_of_frame)?;
    if at + 2 > frame.len() {
        return Err(out_of_frame());
    }
    let value = match checksum::finish(checksum::sum(covered, 0)) {
        0 => 0xffff,
        v => v,
    };
    put16(frame, at, value).ok_or_else(|| off.csum_out_of(frame.len()))
}

/// Where the headers of a TCP frame are, as read from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Start of the IP header.
    l3: usize,
    /// Start of the TCP header.
    l4: usize,
    /// Start of the TCP payload: the length of all headers.
    payload: usize,
    v6: bool,
}

fn get16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *b.get(at)?,
        *b.get(at.checked_add(1)?)?,
    ]))
}

fn put16(b: &mut [u8], at: usize, v: u16) -> Option<()> {
    b.get_mut(at..at.checked_add(2)?)?
        .copy_from_slice(&v.to_be_bytes());
    Some(())
}

fn truncated(frame: &[u8], what: &'static str, need: usize) -> OffloadError {
    OffloadError::Truncated {
        what,
        need,
        have: frame.len(),
    }
}

/// The frame has at least `need` bytes, for its `what`.
fn need(frame: &[u8], what: &'static str, need: usize) -> Result<(), OffloadError> {
    if frame.len() < need {
        Err(truncated(frame, what, need))
    } else {
        Ok(())
    }
}

fn byte(frame: &[u8], at: usize, what: &'static str) -> Result<u8, OffloadError> {
    frame
        .get(at)
        .copied()
        .ok_or_else(|| truncated(frame, what, at + 1))
}

fn word(frame: &[u8], at: usize, what: &'static str) -> Result<u16, OffloadError> {
    get16(frame, at).ok_or_else(|| truncated(frame, what, at + 2))
}

/// Reads and checks the headers of a TCP frame that asks for `gso`.
fn parse_tcp(frame: &[u8], gso: Gso) -> Result<Layout, OffloadError> {
    let want: u8 = if matches!(gso, Gso::Tcp6 { .. }) {
        6
    } else {
        4
    };
    let mut ethertype = word(frame, 12, "Ethernet header")?;
    let mut l3 = ETH_HEADER_LEN;
    if matches!(ethertype, ETHERTYPE_VLAN | ETHERTYPE_QINQ) {
        ethertype = word(frame, 16, "VLAN tag")?;
        l3 += 4;
        if matches!(ethertype, ETHERTYPE_VLAN | ETHERTYPE_QINQ) {
            return Err(OffloadError::StackedVlan);
        }
    }
    let (version_expected, ip_min) = match ethertype {
        ETHERTYPE_IPV4 => (4, 20),
        ETHERTYPE_IPV6 => (6, 40),
        other => return Err(OffloadError::NotIp(other)),
    };
    let what = if version_expected == 4 {
        "IPv4 header"
    } else {
        "IPv6 header"
    };
    need(frame, what, l3 + ip_min)?;
    let b0 = byte(frame, l3, what)?;
    let version = b0 >> 4;
    if version != version_expected {
        return Err(OffloadError::IpVersionMismatch { ethertype, version });
    }
    if version != want {
        return Err(OffloadError::GsoWrongIpVersion {
            want,
            found: version,
        });
    }
    let l4 = if version == 4 {
        let ihl = b0 & 0x0f;
        if ihl < 5 {
            return Err(OffloadError::Ipv4HeaderLen(ihl));
        }
        let l4 = l3 + usize::from(ihl) * 4;
        need(frame, "IPv4 options", l4)?;
        let total = usize::from(word(frame, l3 + 2, what)?);
        if total != frame.len() - l3 {
            return Err(OffloadError::LengthMismatch {
                field: "IPv4 total length",
                says: total,
                actual: frame.len() - l3,
            });
        }
        if word(frame, l3 + 6, what)? & 0x3fff != 0 {
            return Err(OffloadError::Fragment);
        }
        let protocol = byte(frame, l3 + 9, what)?;
        if protocol != IPPROTO_TCP {
            return Err(OffloadError::NotTcp(protocol));
        }
        l4
    } else {
        let l4 = l3 + 40;
        let payload_len = usize::from(word(frame, l3 + 4, what)?);
        if payload_len != frame.len() - l4 {
            return Err(OffloadError::LengthMismatch {
                field: "IPv6 payload length",
                says: payload_len,
                actual: frame.len() - l4,
            });
        }
        match byte(frame, l3 + 6, what)? {
            IPPROTO_TCP => {}
            // Hop-by-hop, routing, fragment, ESP, AH, destination options,
            // mobility, HIP, shim6, and the two experimental numbers.
            h @ (0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254) => {
                return Err(OffloadError::Ipv6ExtensionHeader(h))
            }
            other => return Err(OffloadError::NotTcp(other)),
        }
        l4
    };
    need(frame, "TCP header", l4 + 20)?;
    let doff = byte(frame, l4 + 12, "TCP header")? >> 4;
    if doff < 5 {
        return Err(OffloadError::TcpHeaderLen(doff));
    }
    let payload = l4 + usize::from(doff) * 4;
    need(frame, "TCP options", payload)?;
    Ok(Layout {
        l3,
        l4,
        payload,
        v6: version == 6,
    })
}

/// Reusable scratch space for finished frames. Allocated once by
/// [`Segmenter::new`] (about 350 KiB of zeroed memory, which the kernel
/// backs with pages only as they are first written: a 64 KiB frame cut at
/// the usual MSS touches about 70 KiB); [`Segmenter::finish`] never
/// allocates.
pub struct Segmenter {
    buf: Box<[u8]>,
}

impl Default for Segmenter {
    fn default() -> Self {
        Self::new()
    }
}

impl Segmenter {
    pub fn new() -> Self {
        Segmenter {
            buf: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
        }
    }

    /// Turns `frame` + `off` into complete frames (every checksum valid:
    /// IPv4 header checksum, TCP checksum over pseudo-header + segment),
    /// each at most headers + `gso_size` payload bytes. For a frame with
    /// needs_csum but no gso, yields one frame with the checksum filled
    /// (see [`complete_checksum`]). For `off.is_none()`, yields the frame
    /// unchanged (borrowed, not copied). A TCP frame whose payload fits in
    /// one segment yields that one frame, finished the same way as a
    /// segment.
    ///
    /// Each segment gets the super-frame's headers with: IPv4 total length
    /// and header checksum, or IPv6 payload length, for its own size; IPv4
    /// ID + i; TCP sequence number + its payload offset; FIN and PSH only
    /// on the last segment, CWR only on the first; the TCP checksum
    /// computed from scratch (what the guest left in the field is not
    /// used).
    pub fn finish<'a>(
        &'a mut self,
        frame: &'a [u8],
        off: &Offload,
    ) -> Result<Segments<'a>, OffloadError> {
        if off.is_none() {
            return Ok(Segments::one(frame));
        }
        if frame.len() > MAX_FRAME_LEN {
            return Err(OffloadError::FrameTooLong(frame.len()));
        }
        if off.gso == Gso::None {
            let out = self
                .buf
                .get_mut(..frame.len())
                .ok_or(OffloadError::FrameTooLong(frame.len()))?;
            out.copy_from_slice(frame);
            complete_checksum(out, off)?;
            return Ok(Segments::one(out));
        }
        off.check_header()?;
        let layout = parse_tcp(frame, off.gso)?;
        if off.needs_csum
            && (usize::from(off.csum_start) != layout.l4 || off.csum_offset != TCP_CSUM_OFFSET)
        {
            return Err(OffloadError::CsumNotTcp {
                start: off.csum_start,
                offset: off.csum_offset,
                tcp: layout.l4,
            });
        }
        let (headers, payload) = frame
            .split_at_checked(layout.payload)
            .ok_or_else(|| truncated(frame, "TCP options", layout.payload))?;
        let mss = usize::from(off.gso_size);
        let count = payload.len().div_ceil(mss).max(1);
        if count > MAX_SEGMENTS {
            return Err(OffloadError::TooManySegments(count));
        }
        let stride = layout.payload + mss;
        let total = (count - 1) * stride + layout.payload + (payload.len() - (count - 1) * mss);
        let out = self
            .buf
            .get_mut(..total)
            .ok_or(OffloadError::Bug("segments larger than the scratch space"))?;
        let mut chunks = payload.chunks(mss);
        for (i, seg) in out.chunks_mut(stride).enumerate() {
            let chunk = chunks.next().unwrap_or(&[]);
            write_segment(seg, headers, chunk, layout, i, count, mss)
                .ok_or(OffloadError::Bug("a segment does not fit its layout"))?;
        }
        Ok(Segments {
            rest: out,
            stride,
            left: count,
        })
    }
}

/// Writes segment `i` of `count` into `seg` (exactly headers + chunk
/// long). `None` only if the layout does not fit `seg`, which
/// [`parse_tcp`] rules out.
fn write_segment(
    seg: &mut [u8],
    headers: &[u8],
    chunk: &[u8],
    layout: Layout,
    i: usize,
    count: usize,
    mss: usize,
) -> Option<()> {
    let Layout {
        l3,
        l4,
        payload,
        v6,
    } = layout;
    if seg.len() != payload + chunk.len() || headers.len() != payload {
        return None;
    }
    seg.get_mut(..payload)?.copy_from_slice(headers);
    seg.get_mut(payload..)?.copy_from_slice(chunk);
    let len = seg.len();
    let tcp_len = len - l4;
    if v6 {
        put16(seg, l3 + 4, u16::try_from(len - l4).ok()?)?;
    } else {
        put16(seg, l3 + 2, u16::try_from(len - l3).ok()?)?;
        let id = get16(seg, l3 + 4)?.wrapping_add(i as u16);
        put16(seg, l3 + 4, id)?;
        put16(seg, l3 + 10, 0)?;
        let ip_csum = checksum::finish(checksum::sum(seg.get(l3..l4)?, 0));
        put16(seg, l3 + 10, ip_csum)?;
    }
    let seq_at = seg.get_mut(l4 + 4..l4 + 8)?;
    let seq = u32::from_be_bytes(<[u8; 4]>::try_from(&*seq_at).ok()?);
    seq_at.copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
    let flags = seg.get_mut(l4 + 13)?;
    if i + 1 < count {
        *flags &= !(TCP_FIN | TCP_PSH);
    }
    if i > 0 {
        *flags &= !TCP_CWR;
    }
    put16(seg, l4 + 16, 0)?;
    let pseudo = if v6 {
        checksum::pseudo_header_v6(
            seg.get(l3 + 8..l3 + 24)?.try_into().ok()?,
            seg.get(l3 + 24..l3 + 40)?.try_into().ok()?,
            IPPROTO_TCP,
            u32::try_from(tcp_len).ok()?,
        )
    } else {
        checksum::pseudo_header_v4(
            seg.get(l3 + 12..l3 + 16)?.try_into().ok()?,
            seg.get(l3 + 16..l3 + 20)?.try_into().ok()?,
            IPPROTO_TCP,
            u16::try_from(tcp_len).ok()?,
        )
    };
    let tcp_csum = checksum::finish(checksum::sum(seg.get(l4..)?, pseudo));
    put16(seg, l4 + 16, tcp_csum)
}

/// The frames [`Segmenter::finish`] made, in order: an iterator of
/// `&[u8]`, one complete Ethernet frame each. Knows its length
/// (`ExactSizeIterator`) and is cheap to clone, so it can be walked twice
/// (e.g. once to build `sendmmsg` vectors). It borrows the Segmenter until
/// dropped.
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    /// The frames not yet yielded, back to back.
    rest: &'a [u8],
    /// Length of each frame but the last.
    stride: usize,
    /// Frames not yet yielded.
    left: usize,
}

impl<'a> Segments<'a> {
    fn one(frame: &'a [u8]) -> Self {
        Segments {
            rest: frame,
            stride: frame.len(),
            left: 1,
        }
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self.left {
            0 => None,
            1 => {
                self.left = 0;
                Some(std::mem::take(&mut self.rest))
            }
            _ => {
                let (this, rest) = self.rest.split_at_checked(self.stride)?;
                self.left -= 1;
                self.rest = rest;
                Some(this)
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Segments<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::offload_check::{
        check, l4_checksum_ok, ones_sum, partial_frame, view, TcpSpec,
    };

    fn finish_all(seg: &mut Segmenter, frame: &[u8], off: &Offload) -> Vec<Vec<u8>> {
        match seg.finish(frame, off) {
            Ok(out) => out.map(<[u8]>::to_vec).collect(),
            Err(e) => panic!("refused: {e} ({off:?})"),
        }
    }

    /// Segments `spec`'s frame and checks the result with the independent
    /// checker; returns the segments.
    fn segment_ok(seg: &mut Segmenter, spec: &TcpSpec) -> Vec<Vec<u8>> {
        let (frame, off) = spec.build();
        let out = finish_all(seg, &frame, &off);
        let refs: Vec<&[u8]> = out.iter().map(Vec::as_slice).collect();
        if let Err(e) = check(&frame, &off, &refs) {
            panic!("{e} for {spec:?}");
        }
        out
    }

    #[test]
    fn constants_are_virtio_net_ones() {
        use virtio_bindings::bindings::virtio_net as v;
        assert_eq!(
            u32::from(VIRTIO_NET_HDR_F_NEEDS_CSUM),
            v::VIRTIO_NET_HDR_F_NEEDS_CSUM
        );
        assert_eq!(
            u32::from(VIRTIO_NET_HDR_F_DATA_VALID),
            v::VIRTIO_NET_HDR_F_DATA_VALID
        );
        assert_eq!(
            u32::from(VIRTIO_NET_HDR_GSO_NONE),
            v::VIRTIO_NET_HDR_GSO_NONE
        );
        assert_eq!(
            u32::from(VIRTIO_NET_HDR_GSO_TCPV4),
            v::VIRTIO_NET_HDR_GSO_TCPV4
        );
        assert_eq!(u32::from(VIRTIO_NET_HDR_GSO_UDP), v::VIRTIO_NET_HDR_GSO_UDP);
        assert_eq!(
            u32::from(VIRTIO_NET_HDR_GSO_TCPV6),
            v::VIRTIO_NET_HDR_GSO_TCPV6
        );
        assert_eq!(
            u32::from(VIRTIO_NET_HDR_GSO_UDP_L4),
            v::VIRTIO_NET_HDR_GSO_UDP_L4
        );
        assert_eq!(u32::from(VIRTIO_NET_HDR_GSO_ECN), v::VIRTIO_NET_HDR_GSO_ECN);
        assert_eq!(MAX_SEGMENTS, 2048);
    }

    #[test]
    fn header_fields_round_trip() {
        for flags in [0, 1, 2, 3] {
            for gso_type in [0, 1, 4, 0x81, 0x84] {
                let off = Offload::from_virtio(flags, gso_type, 66, 1448, 34, 16).unwrap();
                assert_eq!(off.needs_csum, flags & 1 != 0);
                let gso = match gso_type {
                    0 => Gso::None,
                    1 => Gso::Tcp4 { ecn: false },
                    4 => Gso::Tcp6 { ecn: false },
                    0x81 => Gso::Tcp4 { ecn: true },
                    _ => Gso::Tcp6 { ecn: true },
                };
                assert_eq!(off.gso, gso);
                assert_eq!(off.is_none(), flags & 1 == 0 && gso_type == 0);
                let (f, t, h, s, cs, co) = off.to_virtio();
                assert_eq!(f, flags & 1, "DATA_VALID is not carried");
                assert_eq!(t, gso_type);
                assert_eq!(h, 66);
                assert_eq!(s, if gso_type == 0 { 0 } else { 1448 });
                assert_eq!((cs, co), if flags & 1 != 0 { (34, 16) } else { (0, 0) });
                assert_eq!(Offload::from_virtio(f, t, h, s, cs, co), Ok(off));
            }
        }
        // Unused fields do not make requests differ.
        assert_eq!(
            Offload::from_virtio(0, 0, 0, 7, 3, 5),
            Ok(Offload::default())
        );
        assert!(Offload::default().is_none());
    }

    #[test]
    fn hostile_headers_are_refused() {
        use OffloadError as E;
        type Case = ((u8, u8, u16, u16, u16, u16), fn(&OffloadError) -> bool);
        let cases: &[Case] = &[
            ((4, 0, 0, 0, 0, 0), |e| matches!(e, E::UnknownFlags(4))),
            ((0x81, 1, 0, 1448, 34, 16), |e| {
                matches!(e, E::UnknownFlags(0x81))
            }),
            ((1, 2, 0, 1448, 34, 16), |e| {
                matches!(e, E::UnknownGsoType(2))
            }),
            ((1, 6, 0, 1448, 34, 16), |e| {
                matches!(e, E::UnknownGsoType(6))
            }),
            ((1, 0x7f, 0, 1448, 34, 16), |e| {
                matches!(e, E::UnknownGsoType(0x7f))
            }),
            ((1, 3, 0, 1448, 34, 6), |e| matches!(e, E::UdpGso(3))),
            ((1, 5, 0, 1448, 34, 6), |e| matches!(e, E::UdpGso(5))),
            ((1, 0x85, 0, 1448, 34, 6), |e| matches!(e, E::UdpGso(5))),
            ((1, 0x80, 0, 0, 34, 16), |e| matches!(e, E::EcnWithoutGso)),
            ((1, 1, 0, 0, 34, 16), |e| {
                matches!(e, E::GsoSizeTooSmall { size: 0, .. })
            }),
            ((1, 4, 0, MIN_GSO_SIZE - 1, 54, 16), |e| {
                matches!(e, E::GsoSizeTooSmall { .. })
            }),
            ((0, 1, 0, 1, 0, 0), |e| {
                matches!(e, E::GsoSizeTooSmall { .. })
            }),
            ((1, 0, 0, 0, 13, 16), |e| {
                matches!(e, E::CsumInEthernetHeader { start: 13 })
            }),
            ((1, 0, 0, 0, 0, 0), |e| {
                matches!(e, E::CsumInEthernetHeader { .. })
            }),
            ((1, 0, 0, 0, 34, 7), |e| matches!(e, E::CsumOffsetOdd(7))),
            ((1, 0, 0, 0, 65530, 4), |e| {
                matches!(e, E::CsumOutOfFrame { .. })
            }),
            ((1, 0, 0, 0, u16::MAX, u16::MAX - 1), |e| {
                matches!(e, E::CsumOutOfFrame { .. })
            }),
        ];
        for &((f, t, h, s, cs, co), is) in cases {
            match Offload::from_virtio(f, t, h, s, cs, co) {
                Err(e) => assert!(is(&e), "{:?}: unexpected {e:?} ({e})", (f, t, s, cs, co)),
                Ok(o) => panic!("{:?} accepted as {o:?}", (f, t, h, s, cs, co)),
            }
        }
        // The smallest accepted sizes are accepted.
        assert!(Offload::from_virtio(1, 1, 0, MIN_GSO_SIZE, 14, 0).is_ok());
        assert!(Offload::from_virtio(1, 0, 0, 0, 65533, 0).is_ok());
    }

    #[test]
    fn what_fits_which_port() {
        let csum = Offload {
            needs_csum: true,
            csum_start: 34,
            csum_offset: 16,
            ..Offload::default()
        };
        let tso4 = Offload {
            gso: Gso::Tcp4 { ecn: false },
            gso_size: 1448,
            ..csum
        };
        let tso6_ecn = Offload {
            gso: Gso::Tcp6 { ecn: true },
            ..tso4
        };
        let all = Accepts {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
        };
        assert!(Offload::default().fits(Accepts::NONE));
        for o in [csum, tso4, tso6_ecn] {
            assert!(!o.fits(Accepts::NONE), "{o:?}");
            assert!(o.fits(all), "{o:?}");
        }
        let csum_only = Accepts {
            csum: true,
            ..Accepts::NONE
        };
        assert!(csum.fits(csum_only));
        assert!(!tso4.fits(csum_only));
        assert!(tso4.fits(Accepts { tso6: false, ..all }));
        assert!(!tso4.fits(Accepts { tso4: false, ..all }));
        assert!(!tso4.fits(Accepts { csum: false, ..all }));
        assert!(!tso6_ecn.fits(Accepts { ecn: false, ..all }));
        assert!(tso6_ecn.fits(Accepts { tso4: false, ..all }));
    }

    #[test]
    fn tcp_super_frames_become_valid_segments() {
        let mut seg = Segmenter::new();
        let mut frames = 0;
        for v6 in [false, true] {
            for vlan in [false, true] {
                for (ipo, tcpo) in [(0, 0), (0, 3), (10, 10), (1, 1)] {
                    for (payload_len, gso_size) in [
                        (60_000, 1448),
                        (1448 * 10, 1448),
                        (1448 * 10 + 1, 1448),
                        (1448 * 10 - 1, 1448),
                        (9000, 1220),
                        (2, 32),
                        (64_000, 32),
                        (40_000, 65_535),
                        (3001, 1000),
                    ] {
                        let spec = TcpSpec {
                            v6,
                            vlan,
                            ip_option_words: ipo,
                            tcp_option_words: tcpo,
                            payload_len,
                            gso_size,
                            ..TcpSpec::default()
                        };
                        let out = segment_ok(&mut seg, &spec);
                        let want = payload_len.div_ceil(usize::from(gso_size)).max(1);
                        assert_eq!(out.len(), want, "{spec:?}");
                        frames += out.len();
                    }
                }
            }
        }
        assert!(frames > 10_000);
    }

    #[test]
    fn segment_headers_in_detail() {
        let mut seg = Segmenter::new();
        let spec = TcpSpec {
            payload_len: 3000,
            gso_size: 1400,
            seq: u32::MAX - 100,
            ip_id: u16::MAX,
            flags: 0x80 | 0x40 | 0x10 | 0x08 | 0x01, // CWR ECE ACK PSH FIN
            ecn: true,
            tcp_option_words: 3,
            ..TcpSpec::default()
        };
        let (frame, off) = spec.build();
        assert_eq!(off.gso, Gso::Tcp4 { ecn: true });
        let out = finish_all(&mut seg, &frame, &off);
        let hl = 14 + 20 + 32;
        let lens: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(lens, [hl + 1400, hl + 1400, hl + 200]);
        let tot: Vec<u16> = out
            .iter()
            .map(|s| u16::from_be_bytes([s[16], s[17]]))
            .collect();
        assert_eq!(tot, [20 + 32 + 1400, 20 + 32 + 1400, 20 + 32 + 200]);
        let ids: Vec<u16> = out
            .iter()
            .map(|s| u16::from_be_bytes([s[18], s[19]]))
            .collect();
        assert_eq!(ids, [u16::MAX, 0, 1]);
        let seqs: Vec<u32> = out
            .iter()
            .map(|s| u32::from_be_bytes([s[38], s[39], s[40], s[41]]))
            .collect();
        assert_eq!(
            seqs,
            [u32::MAX - 100, 1400 - 101, 2800 - 101],
            "sequence numbers wrap"
        );
        let flags: Vec<u8> = out.iter().map(|s| s[47]).collect();
        assert_eq!(
            flags,
            [0x80 | 0x40 | 0x10, 0x40 | 0x10, 0x40 | 0x10 | 0x08 | 0x01]
        );
        for s in &out {
            let v = view(s).unwrap();
            assert_eq!(ones_sum(&s[14..34]), 0xffff, "IPv4 header checksum");
            assert!(l4_checksum_ok(s, &v));
            // The ECT codepoint stays on every segment.
            assert_eq!(s[15], 0x02);
        }
    }

    #[test]
    fn ipv6_segment_lengths() {
        let mut seg = Segmenter::new();
        let spec = TcpSpec {
            v6: true,
            vlan: true,
            payload_len: 2500,
            gso_size: 1000,
            tcp_option_words: 0,
            ..TcpSpec::default()
        };
        let out = segment_ok(&mut seg, &spec);
        let plen: Vec<u16> = out
            .iter()
            .map(|s| u16::from_be_bytes([s[18 + 4], s[18 + 5]]))
            .collect();
        assert_eq!(plen, [1020, 1020, 520]);
        assert!(out.iter().all(|s| s[12..16] == [0x81, 0x00, 0x20, 0x07]));
    }

    #[test]
    fn payload_that_fits_one_segment_is_one_frame() {
        let mut seg = Segmenter::new();
        for v6 in [false, true] {
            for payload_len in [0, 1, 1447, 1448] {
                let spec = TcpSpec {
                    v6,
                    payload_len,
                    flags: 0x80 | 0x19,
                    ..TcpSpec::default()
                };
                let (frame, off) = spec.build();
                let out = segment_ok(&mut seg, &spec);
                assert_eq!(out.len(), 1);
                // Same frame, the TCP checksum filled in (and the IPv4
                // header checksum, which was right, unchanged).
                let l4 = if v6 { 54 } else { 34 };
                assert_eq!(out[0][..l4 + 16], frame[..l4 + 16]);
                assert_eq!(out[0][l4 + 18..], frame[l4 + 18..]);
                let mut by_csum = frame.clone();
                complete_checksum(&mut by_csum, &off).unwrap();
                let v = view(&by_csum).unwrap();
                assert!(l4_checksum_ok(&by_csum, &v));
                assert!(l4_checksum_ok(&out[0], &v));
            }
        }
    }

    #[test]
    fn segmentation_without_needs_csum_is_accepted() {
        let mut seg = Segmenter::new();
        let (mut frame, off) = TcpSpec::default().build();
        let off = Offload {
            needs_csum: false,
            csum_start: 0,
            csum_offset: 0,
            ..off
        };
        // Whatever is in the field does not matter.
        frame[34 + 16] = 0x55;
        let out = finish_all(&mut seg, &frame, &off);
        let refs: Vec<&[u8]> = out.iter().map(Vec::as_slice).collect();
        check(&frame, &off, &refs).unwrap();
    }

    #[test]
    fn complete_checksum_fills_udp_and_tcp() {
        let mut seg = Segmenter::new();
        for v6 in [false, true] {
            for vlan in [false, true] {
                for proto in [6, 17] {
                    for len in [0, 1, 2, 3, 17, 1000, 1473] {
                        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                        let (frame, off) = partial_frame(v6, vlan, proto, &payload);
                        let v = view(&frame).unwrap();
                        assert!(!l4_checksum_ok(&frame, &v) || len == 0 && proto == 6);
                        let mut done = frame.clone();
                        complete_checksum(&mut done, &off).unwrap();
                        assert!(l4_checksum_ok(&done, &v), "v6 {v6} proto {proto} len {len}");
                        let at = usize::from(off.csum_start + off.csum_offset);
                        assert_eq!(done[..at], frame[..at]);
                        assert_eq!(done[at + 2..], frame[at + 2..]);
                        // finish copies and does the same, leaving the input.
                        let out = finish_all(&mut seg, &frame, &off);
                        assert_eq!(out, [done.clone()]);
                        let refs: Vec<&[u8]> = out.iter().map(Vec::as_slice).collect();
                        check(&frame, &off, &refs).unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn udp_checksum_zero_is_sent_as_ffff() {
        for v6 in [false, true] {
            // Pick the last payload word so that the whole sum is 0xffff,
            // i.e. the checksum comes out as 0.
            let (frame, _) = partial_frame(v6, false, 17, &[9, 8, 7, 6, 0, 0]);
            let v = view(&frame).unwrap();
            let mut zeroed = frame.clone();
            zeroed[v.l4 + 6..v.l4 + 8].copy_from_slice(&[0, 0]);
            let mut pseudo_and_udp = Vec::new();
            if v6 {
                pseudo_and_udp.extend_from_slice(&zeroed[v.l3 + 8..v.l3 + 40]);
                pseudo_and_udp.extend_from_slice(&[0, 0, 0, 14, 0, 0, 0, 17]);
            } else {
                pseudo_and_udp.extend_from_slice(&zeroed[v.l3 + 12..v.l3 + 20]);
                pseudo_and_udp.extend_from_slice(&[0, 17, 0, 14]);
            }
            pseudo_and_udp.extend_from_slice(&zeroed[v.l4..]);
            let fill = 0xffff - ones_sum(&pseudo_and_udp);
            let mut payload = [9, 8, 7, 6, 0, 0];
            payload[4..].copy_from_slice(&fill.to_be_bytes());
            let (mut frame, off) = partial_frame(v6, false, 17, &payload);
            complete_checksum(&mut frame, &off).unwrap();
            assert_eq!(frame[v.l4 + 6..v.l4 + 8], [0xff, 0xff], "v6 {v6}");
            assert!(l4_checksum_ok(&frame, &v));
        }
    }

    #[test]
    fn complete_frames_are_borrowed_unchanged() {
        let mut seg = Segmenter::new();
        let frame = [7u8; 3];
        let out: Vec<&[u8]> = seg.finish(&frame, &Offload::default()).unwrap().collect();
        assert_eq!(out.len(), 1);
        assert!(std::ptr::eq(out[0], &frame[..]));
        let empty: [u8; 0] = [];
        assert_eq!(seg.finish(&empty, &Offload::default()).unwrap().len(), 1);
        let mut f = frame;
        assert_eq!(complete_checksum(&mut f, &Offload::default()), Ok(()));
        assert_eq!(f, frame);
    }

    #[test]
    fn segments_is_an_exact_size_iterator_that_can_be_walked_twice() {
        let mut seg = Segmenter::new();
        let (frame, off) = TcpSpec {
            payload_len: 5000,
            gso_size: 1000,
            ..TcpSpec::default()
        }
        .build();
        let it = seg.finish(&frame, &off).unwrap();
        assert_eq!(it.len(), 5);
        let again = it.clone();
        let mut it = it;
        it.next();
        assert_eq!(it.len(), 4);
        assert_eq!(it.size_hint(), (4, Some(4)));
        assert_eq!(again.count(), 5);
    }

    /// One mutation of a valid frame or its request, and what it must be
    /// refused as.
    type Hostile = (
        &'static str,
        fn(&mut Vec<u8>, &mut Offload),
        fn(&OffloadError) -> bool,
    );

    #[test]
    fn hostile_frames_are_refused() {
        use OffloadError as E;
        let cases: &[Hostile] = &[
            (
                "longer than 64 KiB",
                |f, _| f.resize(65536, 0),
                |e| matches!(e, E::FrameTooLong(65536)),
            ),
            (
                "ARP",
                |f, _| f[12..14].copy_from_slice(&[8, 6]),
                |e| matches!(e, E::NotIp(0x0806)),
            ),
            (
                "two VLAN tags",
                |f, _| {
                    f.splice(12..12, [0x88, 0xa8, 0, 1, 0x81, 0, 0, 2]);
                },
                |e| matches!(e, E::StackedVlan),
            ),
            (
                "IPv4 frame, TCPv6 request",
                |_, o| o.gso = Gso::Tcp6 { ecn: false },
                |e| matches!(e, E::GsoWrongIpVersion { want: 6, found: 4 }),
            ),
            (
                "EtherType IPv4, version 6",
                |f, _| f[14] = 0x65,
                |e| matches!(e, E::IpVersionMismatch { version: 6, .. }),
            ),
            (
                "IHL 4",
                |f, _| f[14] = 0x44,
                |e| matches!(e, E::Ipv4HeaderLen(4)),
            ),
            (
                "IHL 0",
                |f, _| f[14] = 0x40,
                |e| matches!(e, E::Ipv4HeaderLen(0)),
            ),
            (
                "IHL 15 with short total length",
                |f, _| {
                    f[14] = 0x4f;
                    f.truncate(14 + 50);
                    f[16..18].copy_from_slice(&50u16.to_be_bytes());
                },
                |e| {
                    matches!(
                        e,
                        E::Truncated {
                            what: "IPv4 options",
                            ..
                        }
                    )
                },
            ),
            (
                "more fragments",
                |f, _| f[20] |= 0x20,
                |e| matches!(e, E::Fragment),
            ),
            (
                "fragment offset",
                |f, _| f[21] = 1,
                |e| matches!(e, E::Fragment),
            ),
            ("UDP", |f, _| f[23] = 17, |e| matches!(e, E::NotTcp(17))),
            (
                "total length + 1",
                |f, _| {
                    let t = u16::from_be_bytes([f[16], f[17]]) + 1;
                    f[16..18].copy_from_slice(&t.to_be_bytes());
                },
                |e| {
                    matches!(
                        e,
                        E::LengthMismatch {
                            field: "IPv4 total length",
                            ..
                        }
                    )
                },
            ),
            (
                "total length - 1",
                |f, _| {
                    let t = u16::from_be_bytes([f[16], f[17]]) - 1;
                    f[16..18].copy_from_slice(&t.to_be_bytes());
                },
                |e| matches!(e, E::LengthMismatch { .. }),
            ),
            (
                "trailing padding",
                |f, _| f.push(0),
                |e| matches!(e, E::LengthMismatch { .. }),
            ),
            (
                "TCP data offset 4",
                |f, _| f[46] = 0x40,
                |e| matches!(e, E::TcpHeaderLen(4)),
            ),
            (
                "TCP data offset past the end",
                |f, _| {
                    f[46] = 0xf0;
                    f.truncate(34 + 40);
                    f[16..18].copy_from_slice(&60u16.to_be_bytes());
                },
                |e| {
                    matches!(
                        e,
                        E::Truncated {
                            what: "TCP options",
                            ..
                        }
                    )
                },
            ),
            (
                "checksum start not TCP",
                |_, o| o.csum_start += 2,
                |e| matches!(e, E::CsumNotTcp { tcp: 34, .. }),
            ),
            (
                "checksum offset of UDP",
                |_, o| o.csum_offset = 6,
                |e| matches!(e, E::CsumNotTcp { offset: 6, .. }),
            ),
            (
                "checksum in the Ethernet header",
                |_, o| o.csum_start = 4,
                |e| matches!(e, E::CsumInEthernetHeader { start: 4 }),
            ),
            (
                "gso_size 0",
                |_, o| o.gso_size = 0,
                |e| matches!(e, E::GsoSizeTooSmall { size: 0, .. }),
            ),
            (
                "gso_size 1",
                |_, o| o.gso_size = 1,
                |e| matches!(e, E::GsoSizeTooSmall { size: 1, .. }),
            ),
            (
                "runt",
                |f, _| f.truncate(13),
                |e| {
                    matches!(
                        e,
                        E::Truncated {
                            what: "Ethernet header",
                            ..
                        }
                    )
                },
            ),
            (
                "tag cut short",
                |f, _| {
                    f.truncate(16);
                    f[12..14].copy_from_slice(&[0x81, 0]);
                },
                |e| {
                    matches!(
                        e,
                        E::Truncated {
                            what: "VLAN tag",
                            ..
                        }
                    )
                },
            ),
        ];
        let mut seg = Segmenter::new();
        let (frame, off) = TcpSpec::default().build();
        assert!(seg.finish(&frame, &off).is_ok());
        for (what, mutate, is) in cases {
            let mut f = frame.clone();
            let mut o = off;
            mutate(&mut f, &mut o);
            match seg.finish(&f, &o) {
                Err(e) => assert!(is(&e), "{what}: unexpected {e:?} ({e})"),
                Ok(out) => panic!("{what}: accepted as {} frames", out.len()),
            }
        }
    }

    #[test]
    fn hostile_ipv6_frames_are_refused() {
        use OffloadError as E;
        let cases: &[Hostile] = &[
            (
                "hop-by-hop options",
                |f, _| f[20] = 0,
                |e| matches!(e, E::Ipv6ExtensionHeader(0)),
            ),
            (
                "fragment header",
                |f, _| f[20] = 44,
                |e| matches!(e, E::Ipv6ExtensionHeader(44)),
            ),
            ("UDP", |f, _| f[20] = 17, |e| matches!(e, E::NotTcp(17))),
            (
                "payload length + 1",
                |f, _| {
                    let t = u16::from_be_bytes([f[18], f[19]]) + 1;
                    f[18..20].copy_from_slice(&t.to_be_bytes());
                },
                |e| {
                    matches!(
                        e,
                        E::LengthMismatch {
                            field: "IPv6 payload length",
                            ..
                        }
                    )
                },
            ),
            (
                "jumbogram length 0",
                |f, _| f[18..20].copy_from_slice(&[0, 0]),
                |e| matches!(e, E::LengthMismatch { says: 0, .. }),
            ),
            (
                "IPv6 frame, TCPv4 request",
                |_, o| o.gso = Gso::Tcp4 { ecn: false },
                |e| matches!(e, E::GsoWrongIpVersion { want: 4, found: 6 }),
            ),
            (
                "EtherType IPv6, version 4",
                |f, _| f[14] = 0x45,
                |e| matches!(e, E::IpVersionMismatch { version: 4, .. }),
            ),
            (
                "checksum start at IPv4's TCP",
                |_, o| o.csum_start = 34,
                |e| matches!(e, E::CsumNotTcp { tcp: 54, .. }),
            ),
            (
                "too long",
                |f, _| f.resize(65536, 0),
                |e| matches!(e, E::FrameTooLong(_)),
            ),
        ];
        let mut seg = Segmenter::new();
        let (frame, off) = TcpSpec {
            v6: true,
            ..TcpSpec::default()
        }
        .build();
        assert!(seg.finish(&frame, &off).is_ok());
        for (what, mutate, is) in cases {
            let mut f = frame.clone();
            let mut o = off;
            mutate(&mut f, &mut o);
            match seg.finish(&f, &o) {
                Err(e) => assert!(is(&e), "{what}: unexpected {e:?} ({e})"),
                Ok(out) => panic!("{what}: accepted as {} frames", out.len()),
            }
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let mut seg = Segmenter::new();
        for v6 in [false, true] {
            for vlan in [false, true] {
                let (frame, off) = TcpSpec {
                    v6,
                    vlan,
                    payload_len: 300,
                    gso_size: 100,
                    ip_option_words: 2,
                    tcp_option_words: 3,
                    ..TcpSpec::default()
                }
                .build();
                for len in 0..frame.len() {
                    assert!(
                        seg.finish(&frame[..len], &off).is_err(),
                        "v6 {v6} vlan {vlan}: {len} of {} bytes accepted",
                        frame.len()
                    );
                }
                let (csum_frame, csum_off) = partial_frame(v6, vlan, 17, &[1, 2, 3]);
                let at = usize::from(csum_off.csum_start + csum_off.csum_offset);
                for len in 0..at + 2 {
                    let mut f = csum_frame[..len].to_vec();
                    assert!(matches!(
                        complete_checksum(&mut f, &csum_off),
                        Err(OffloadError::CsumOutOfFrame { .. })
                    ));
                    assert!(seg.finish(&csum_frame[..len], &csum_off).is_err());
                }
            }
        }
    }

    /// The `offload` fuzz target's checks over pseudo-random inputs (a
    /// cheap stand-in that runs with every `cargo test`).
    #[test]
    fn random_inputs_are_refused_or_finished_right() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seg = Segmenter::new();
        let (mut accepted, mut refused) = ([0; 2], [0; 2]);
        for round in 0..20_000 {
            let mode = (round % 2) as u8;
            let len = match mode {
                // Raw: a header and up to 200 bytes; built: parameters
                // and a few mutations (none in every fourth).
                0 => 11 + (next() % 200) as usize,
                _ if round % 8 == 1 => 17,
                _ => 17 + (next() % 12) as usize,
            };
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            data[0] = mode;
            if mode == 1 && round % 16 != 1 {
                data[1] |= 8; // small payloads: fast enough for debug builds
            }
            if crate::testkit::offload_check::run(&mut seg, &data) {
                accepted[usize::from(mode)] += 1;
            } else {
                refused[usize::from(mode)] += 1;
            }
        }
        // Both outcomes are reached in both modes.
        assert!(
            accepted.iter().chain(&refused).all(|&n| n > 20),
            "{accepted:?} {refused:?}"
        );
    }
}
