//! The Internet checksum (RFC 1071): the ones' complement of the ones'
//! complement sum of 16-bit big-endian words.
//!
//! A running sum is a `u64` that is added to with [`sum`] and [`add`] and
//! folded to 16 bits only at the end ([`fold`], [`finish`]). Eight bytes are
//! added at a time with an end-around carry; that is the same sum, because
//! 2^64 - 1 is a multiple of 2^16 - 1.

/// Adds `bytes` to the running sum `acc`, as 16-bit words starting at
/// `bytes[0]`; an odd last byte counts as the high half of a word. Sums of
/// several pieces may be chained when every piece but the last has an even
/// length.
pub fn sum(bytes: &[u8], mut acc: u64) -> u64 {
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        if let Ok(w) = <[u8; 8]>::try_from(w) {
            acc = add(acc, u64::from_be_bytes(w));
        }
    }
    let mut tail = [0u8; 8];
    for (t, b) in tail.iter_mut().zip(words.remainder()) {
        *t = *b;
    }
    add(acc, u64::from_be_bytes(tail))
}

/// Ones' complement addition of two running sums.
pub fn add(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    // No second overflow: after a carry, s <= 2^64 - 2.
    s + u64::from(carry)
}

/// The running sum folded to 16 bits (not complemented): what Linux leaves
/// in the checksum field of a CHECKSUM_PARTIAL packet is this of the
/// pseudo-header.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The value for a checksum field: the complement of the folded sum.
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// The running sum of the IPv4 pseudo-header for an upper-layer packet of
/// `len` bytes (RFC 793 section 3.1, RFC 768).
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], protocol: u8, len: u16) -> u64 {
    let acc = u64::from(u32::from_be_bytes(src)) + u64::from(u32::from_be_bytes(dst));
    acc + u64::from(protocol) + u64::from(len)
}

/// The running sum of the IPv6 pseudo-header (RFC 8200 section 8.1).
pub fn pseudo_header_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, len: u32) -> u64 {
    let acc = sum(&dst, sum(&src, 0));
    add(acc, u64::from(len) + u64::from(next_header))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Word by word, the way RFC 1071 states it.
    fn by_words(bytes: &[u8]) -> u16 {
        let mut s: u32 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let hi = u32::from(bytes[i]) << 8;
            let lo = bytes.get(i + 1).map_or(0, |b| u32::from(*b));
            s += hi | lo;
            s = (s & 0xffff) + (s >> 16);
            i += 2;
        }
        s as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&b, 0)), 0xddf2);
        assert_eq!(finish(sum(&b, 0)), !0xddf2);
    }

    #[test]
    fn same_as_word_by_word_for_every_length_and_alignment() {
        let mut x: u32 = 12345;
        let data: Vec<u8> = (0..2000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        for start in 0..9 {
            for len in (0..300).chain([1499, 1500, 1991]) {
                let b = &data[start..start + len];
                let got = fold(sum(b, 0));
                let want = by_words(b);
                // 0 and 0xffff are both zero in ones' complement.
                assert!(
                    got == want || (got % 0xffff == 0 && want % 0xffff == 0),
                    "start {start} len {len}: {got:#x} vs {want:#x}"
                );
            }
        }
        let ones = vec![0xffu8; 65535];
        assert_eq!(fold(sum(&ones, 0)) % 0xffff, by_words(&ones) % 0xffff);
    }

    #[test]
    fn chained_even_pieces_equal_one_sum() {
        let b: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        let whole = fold(sum(&b, 0));
        let chained = fold(sum(&b[600..], sum(&b[10..600], sum(&b[..10], 0))));
        assert_eq!(whole, chained);
        assert_eq!(fold(add(sum(&b[..10], 0), sum(&b[10..], 0))), whole);
    }

    #[test]
    fn pseudo_headers_match_their_byte_layout() {
        let src = [192, 0, 2, 1];
        let dst = [198, 51, 100, 7];
        let mut v4 = Vec::new();
        v4.extend_from_slice(&src);
        v4.extend_from_slice(&dst);
        v4.extend_from_slice(&[0, 6, 0x05, 0xdc]);
        assert_eq!(fold(pseudo_header_v4(src, dst, 6, 1500)), by_words(&v4));
        let s6: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        let d6: [u8; 16] = core::array::from_fn(|i| 255 - i as u8 * 3);
        let mut v6 = Vec::new();
        v6.extend_from_slice(&s6);
        v6.extend_from_slice(&d6);
        v6.extend_from_slice(&70000u32.to_be_bytes());
        v6.extend_from_slice(&[0, 0, 0, 17]);
        assert_eq!(fold(pseudo_header_v6(s6, d6, 17, 70000)), by_words(&v6));
    }
}
