//! Typed views over raw bytes: Ethernet addresses and headers.
//!
//! Everything here takes `&[u8]` that came from outside and checks it once;
//! after `EthernetFrame::new_checked` the accessors cannot index out of bounds.

pub mod checksum;
pub mod offload;
pub mod pcapng;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Shortest frame ulan forwards: destination, source and EtherType.
pub const ETH_HEADER_LEN: usize = 14;
/// Longest frame ulan forwards. Matches the 16-bit limit of the stream
/// framing QEMU accepts and leaves room for jumbo and GSO-sized frames.
pub const MAX_FRAME_LEN: usize = 65535;

/// A 48-bit IEEE MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group (multicast or broadcast) addresses have the I/G bit set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// A unicast address that a switch may learn.
    pub fn is_learnable(&self) -> bool {
        !self.is_multicast() && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address (want six hex octets separated by ':'): {0:?}")]
pub struct MacParseError(pub String);

/// A MAC address as it appears in JSON and YAML: `"02:00:00:00:00:01"`.
impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a MAC address")))
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.chars().take(40).collect());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("runt frame: {0} bytes, an Ethernet header needs 14")]
    Runt(usize),
    #[error("oversized frame: {0} bytes, the limit is 65535")]
    Oversized(usize),
}

/// A checked view of an Ethernet frame.
#[derive(Clone, Copy)]
pub struct EthernetFrame<'a> {
    bytes: &'a [u8],
}

impl<'a> EthernetFrame<'a> {
    /// Checks the length once; afterwards the header accessors are infallible.
    pub fn new_checked(bytes: &'a [u8]) -> Result<Self, FrameError> {
        check_frame_len(bytes.len())?;
        Ok(EthernetFrame { bytes })
    }

    pub fn dst(&self) -> MacAddr {
        MacAddr(self.bytes[0..6].try_into().expect("checked length"))
    }

    pub fn src(&self) -> MacAddr {
        MacAddr(self.bytes[6..12].try_into().expect("checked length"))
    }

    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes([self.bytes[12], self.bytes[13]])
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// The one length rule every port kind applies to what it receives.
pub fn check_frame_len(len: usize) -> Result<(), FrameError> {
    if len < ETH_HEADER_LEN {
        Err(FrameError::Runt(len))
    } else if len > MAX_FRAME_LEN {
        Err(FrameError::Oversized(len))
    } else {
        Ok(())
    }
}

/// Writes a minimal frame header into `buf` (tests and benchmarks build
/// frames with it).
pub fn write_header(buf: &mut [u8], dst: MacAddr, src: MacAddr, ethertype: u16) {
    buf[0..6].copy_from_slice(&dst.0);
    buf[6..12].copy_from_slice(&src.0);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_flags() {
        let m: MacAddr = "02:00:00:aa:bb:0c".parse().unwrap();
        assert_eq!(m.to_string(), "02:00:00:aa:bb:0c");
        assert!(m.is_learnable());
        assert!(!m.is_multicast());
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!(!MacAddr([0; 6]).is_learnable());
    }

    #[test]
    fn mac_rejects_hostile_text() {
        for bad in [
            "",
            "02:00:00:aa:bb",
            "02:00:00:aa:bb:0c:0d",
            "2:00:00:aa:bb:0c",
            "zz:00:00:aa:bb:0c",
            "02-00-00-aa-bb-0c",
            "+2:00:00:aa:bb:0c",
            "02:00:00:aa:bb:0\u{e9}",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn frame_length_rules() {
        assert_eq!(
            EthernetFrame::new_checked(&[0; 13]).err(),
            Some(FrameError::Runt(13))
        );
        assert!(EthernetFrame::new_checked(&[]).is_err());
        assert!(EthernetFrame::new_checked(&vec![0; 65536]).is_err());
        assert!(EthernetFrame::new_checked(&vec![0; 65535]).is_ok());
        let mut f = [0u8; 60];
        let a: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        write_header(&mut f, MacAddr::BROADCAST, a, 0x0800);
        let v = EthernetFrame::new_checked(&f).unwrap();
        assert_eq!(v.dst(), MacAddr::BROADCAST);
        assert_eq!(v.src(), a);
        assert_eq!(v.ethertype(), 0x0800);
    }
}
