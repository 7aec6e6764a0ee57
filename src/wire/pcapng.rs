//! pcapng, the capture format Wireshark, tshark and tcpdump read: the
//! blocks ulan writes (section header, one interface per port, enhanced
//! packets with their direction) and a splitter that finds whole blocks in
//! a byte stream, so a capture cut off at any point still ends on a block.

/// Block types.
pub const SHB: u32 = 0x0A0D_0D0A;
pub const IDB: u32 = 0x0000_0001;
pub const EPB: u32 = 0x0000_0006;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
const LINKTYPE_ETHERNET: u16 = 1;
const OPT_END: u16 = 0;
const OPT_COMMENT_OR_NAME: u16 = 2; // shb_hardware is 2 too; if_name is 2
const SHB_USERAPPL: u16 = 4;
const IF_TSRESOL: u16 = 9;
const EPB_FLAGS: u16 = 2;
/// Largest block the splitter accepts (a 64 KiB frame plus headers).
pub const MAX_BLOCK: usize = 256 * 1024;

/// Which way a frame crossed the port, from the port's client's side of
/// the wire: `Inbound` came from the client into the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + pad4(value.len()) - value.len(), 0);
}

/// Writes a block: type, length, `body`, options, length.
fn block(out: &mut Vec<u8>, kind: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start + 4) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
}

/// The section header that starts every file.
pub fn section_header(out: &mut Vec<u8>) {
    block(out, SHB, |b| {
        b.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(-1i64).to_le_bytes());
        option(
            b,
            SHB_USERAPPL,
            concat!("ulan ", env!("CARGO_PKG_VERSION")).as_bytes(),
        );
        option(b, OPT_END, &[]);
    });
}

/// An Ethernet interface named `name`, timestamps in nanoseconds.
pub fn interface(out: &mut Vec<u8>, name: &str, snaplen: u32) {
    block(out, IDB, |b| {
        b.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&snaplen.to_le_bytes());
        option(b, OPT_COMMENT_OR_NAME, name.as_bytes());
        option(b, IF_TSRESOL, &[9]);
        option(b, OPT_END, &[]);
    });
}

/// Bytes an enhanced packet block adds around its (padded) data: the
/// header, the direction option, the end of options and the trailer.
pub const EPB_OVERHEAD: usize = 28 + 8 + 4 + 4;

/// The length of the enhanced packet block holding `caplen` bytes.
pub fn packet_len(caplen: usize) -> usize {
    EPB_OVERHEAD + pad4(caplen)
}

/// Offset of an enhanced packet block's interface id (the capture writer
/// renumbers blocks in place).
pub const EPB_IFACE_AT: usize = 8;

/// One frame on interface `iface` (its index in the file), `ts_ns` since
/// the Unix epoch, `data` already cut to the snap length.
pub fn packet(
    out: &mut Vec<u8>,
    iface: u32,
    ts_ns: u64,
    orig_len: u32,
    dir: Direction,
    data: &[u8],
) {
    let at = out.len();
    out.resize(at + packet_len(data.len()), 0);
    packet_into(&mut out[at..], iface, ts_ns, orig_len, dir, data);
}

/// [`packet`] into `out`, which is exactly [`packet_len`]`(data.len())`
/// bytes: the data plane writes blocks straight into a capture's ring.
pub fn packet_into(
    out: &mut [u8],
    iface: u32,
    ts_ns: u64,
    orig_len: u32,
    dir: Direction,
    data: &[u8],
) {
    let len = packet_len(data.len());
    debug_assert_eq!(out.len(), len);
    let flags: u32 = match dir {
        Direction::Inbound => 1,
        Direction::Outbound => 2,
    };
    let (head, rest) = out.split_at_mut(28);
    let put = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(head, 0, EPB);
    put(head, 4, len as u32);
    put(head, EPB_IFACE_AT, iface);
    put(head, 12, (ts_ns >> 32) as u32);
    put(head, 16, ts_ns as u32);
    put(head, 20, data.len() as u32);
    put(head, 24, orig_len);
    let padded = pad4(data.len());
    rest[..data.len()].copy_from_slice(data);
    rest[data.len()..padded].fill(0);
    let tail = &mut rest[padded..];
    tail[0..2].copy_from_slice(&EPB_FLAGS.to_le_bytes());
    tail[2..4].copy_from_slice(&4u16.to_le_bytes());
    put(tail, 4, flags);
    put(tail, 8, u32::from(OPT_END)); // code 0, length 0
    put(tail, 12, len as u32);
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcapngError {
    #[error(
        "block at offset {offset} has length {len}, not a multiple of 4 between 12 and {MAX_BLOCK}"
    )]
    BadLength { offset: u64, len: u32 },
    #[error("the stream does not start with a pcapng section header")]
    NotPcapng,
}

/// Cuts a pcapng byte stream (in little-endian, as ulan writes it) into
/// whole blocks as bytes arrive.
#[derive(Debug, Default)]
pub struct BlockSplitter {
    pending: Vec<u8>,
    offset: u64,
    started: bool,
}

impl BlockSplitter {
    pub fn new() -> BlockSplitter {
        BlockSplitter::default()
    }

    /// Adds `bytes`; returns how many bytes of whole blocks are ready at
    /// the front of [`BlockSplitter::pending`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<usize, PcapngError> {
        self.pending.extend_from_slice(bytes);
        let mut at = 0usize;
        while self.pending.len() - at >= 8 {
            let head = &self.pending[at..at + 8];
            let kind = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            if !self.started {
                if kind != SHB {
                    return Err(PcapngError::NotPcapng);
                }
                self.started = true;
            }
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            if len < 12 || len % 4 != 0 || len as usize > MAX_BLOCK {
                return Err(PcapngError::BadLength {
                    offset: self.offset + at as u64,
                    len,
                });
            }
            if self.pending.len() - at < len as usize {
                break;
            }
            at += len as usize;
        }
        Ok(at)
    }

    /// The bytes held; the first `n` (from [`BlockSplitter::push`]) are
    /// whole blocks.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Forgets the first `n` bytes once written.
    pub fn consume(&mut self, n: usize) {
        self.pending.drain(..n.min(self.pending.len()));
        self.offset += n as u64;
    }
}

/// One block read back (tests and tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block<'a> {
    pub kind: u32,
    pub body: &'a [u8],
}

/// Reads every whole block of a little-endian pcapng buffer.
pub fn blocks(mut buf: &[u8]) -> Result<Vec<Block<'_>>, PcapngError> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    while !buf.is_empty() {
        if buf.len() < 12 {
            return Err(PcapngError::BadLength {
                offset,
                len: buf.len() as u32,
            });
        }
        let kind = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len < 12 || len % 4 != 0 || len as usize > buf.len() {
            return Err(PcapngError::BadLength { offset, len });
        }
        let trailer = &buf[len as usize - 4..len as usize];
        if u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]) != len {
            return Err(PcapngError::BadLength { offset, len });
        }
        out.push(Block {
            kind,
            body: &buf[8..len as usize - 4],
        });
        buf = &buf[len as usize..];
        offset += len as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place encoder writes what the generic block writer would.
    #[test]
    fn packet_in_place_matches_the_block_writer() {
        for n in [0usize, 1, 2, 3, 4, 5, 60, 61, 1514, 9000] {
            let data: Vec<u8> = (0..n).map(|i| i as u8 ^ 0x5a).collect();
            for (dir, flags) in [(Direction::Inbound, 1u32), (Direction::Outbound, 2)] {
                let mut want = Vec::new();
                block(&mut want, EPB, |b| {
                    b.extend_from_slice(&3u32.to_le_bytes());
                    b.extend_from_slice(&0x1234u32.to_le_bytes());
                    b.extend_from_slice(&0x5678_9abcu32.to_le_bytes());
                    b.extend_from_slice(&(n as u32).to_le_bytes());
                    b.extend_from_slice(&(n as u32 + 7).to_le_bytes());
                    b.extend_from_slice(&data);
                    b.resize(b.len() + pad4(n) - n, 0);
                    option(b, EPB_FLAGS, &flags.to_le_bytes());
                    option(b, OPT_END, &[]);
                });
                let mut got = vec![0xffu8; 3]; // appends after what is there
                packet(&mut got, 3, 0x1234_5678_9abc, n as u32 + 7, dir, &data);
                assert_eq!(&got[..3], &[0xff; 3]);
                assert_eq!(&got[3..], &want[..], "{n} bytes {dir:?}");
                assert_eq!(want.len(), packet_len(n));
            }
        }
    }

    fn sample() -> Vec<u8> {
        let mut b = Vec::new();
        section_header(&mut b);
        interface(&mut b, "r1-0", 65535);
        packet(
            &mut b,
            0,
            1_700_000_000_123_456_789,
            61,
            Direction::Inbound,
            &[7; 61],
        );
        packet(
            &mut b,
            0,
            1_700_000_000_123_456_790,
            1500,
            Direction::Outbound,
            &[1; 96],
        );
        b
    }

    #[test]
    fn blocks_read_back_with_their_fields() {
        let b = sample();
        let blocks = blocks(&b).unwrap();
        let kinds: Vec<u32> = blocks.iter().map(|b| b.kind).collect();
        assert_eq!(kinds, vec![SHB, IDB, EPB, EPB]);
        let epb = blocks[2].body;
        assert_eq!(u32::from_le_bytes(epb[0..4].try_into().unwrap()), 0);
        let ts = (u32::from_le_bytes(epb[4..8].try_into().unwrap()) as u64) << 32
            | u32::from_le_bytes(epb[8..12].try_into().unwrap()) as u64;
        assert_eq!(ts, 1_700_000_000_123_456_789);
        assert_eq!(u32::from_le_bytes(epb[12..16].try_into().unwrap()), 61);
        assert_eq!(&epb[20..81], &[7; 61][..]);
        let cut = blocks[3].body;
        assert_eq!(u32::from_le_bytes(cut[12..16].try_into().unwrap()), 96);
        assert_eq!(u32::from_le_bytes(cut[16..20].try_into().unwrap()), 1500);
        // The interface is named.
        assert!(blocks[1].body.windows(4).any(|w| w == b"r1-0"));
    }

    #[test]
    fn the_splitter_finds_whole_blocks_at_any_cut() {
        let b = sample();
        let ends: Vec<usize> = {
            let mut at = 0;
            blocks(&b)
                .unwrap()
                .iter()
                .map(|blk| {
                    at += blk.body.len() + 12;
                    at
                })
                .collect()
        };
        for cut in 0..=b.len() {
            let mut s = BlockSplitter::new();
            let n = s.push(&b[..cut]).unwrap();
            let whole = ends
                .iter()
                .copied()
                .filter(|&e| e <= cut)
                .max()
                .unwrap_or(0);
            assert_eq!(n, whole, "cut at {cut}");
            s.consume(n);
            let m = s.push(&b[cut..]).unwrap();
            assert_eq!(n + m, b.len());
        }
    }

    #[test]
    fn hostile_streams_are_refused_not_buffered_forever() {
        let mut s = BlockSplitter::new();
        assert_eq!(s.push(b"GET / HTTP/1.1\r\n"), Err(PcapngError::NotPcapng));
        let mut b = Vec::new();
        section_header(&mut b);
        let mut s = BlockSplitter::new();
        s.push(&b).unwrap();
        let mut bad = EPB.to_le_bytes().to_vec();
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(s.push(&bad), Err(PcapngError::BadLength { .. })));
        let mut odd = EPB.to_le_bytes().to_vec();
        odd.extend_from_slice(&13u32.to_le_bytes());
        assert!(blocks(&[b.clone(), odd.clone(), vec![0; 8]].concat()).is_err());
        assert!(blocks(&b[..b.len() - 1]).is_err());
        // A trailer that disagrees with the header.
        let mut t = b.clone();
        let n = t.len();
        t[n - 1] ^= 1;
        assert!(blocks(&t).is_err());
    }
}
