//! Combining CRC-32C values without reading the data again.
//!
//! The stream checks every image chunk twice over (its frame, and the
//! image file it belongs to); computing the chunk's CRC once and combining
//! it into both saves a pass over every byte. The `crc32c` crate's own
//! combine squares 32×32 bit matrices for every bit of the length, which
//! per megabyte chunk costs more than the CRC pass it saves; here the
//! length's operator, x^(8·len) modulo the CRC polynomial, is built from a
//! table of x^(2^k) by a few carry-less multiplications.

/// CRC-32C's polynomial (Castagnoli), bit-reversed as the CRC runs.
const POLY: u32 = 0x82F6_3B78;
/// The polynomial 1 (x^0) in the reversed bit order: the top bit.
const ONE: u32 = 1 << 31;

/// `a * b` modulo POLY, both in the reversed bit order.
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = ONE;
    while bit != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        // b times x: a shift, reduced by POLY when x^32 appears.
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit >>= 1;
    }
    product
}

/// x^(2^k) modulo POLY for k in 0..67 (a 64-bit length, times 8).
const X_POW_2K: [u32; 67] = {
    let mut table = [0u32; 67];
    table[0] = ONE >> 1; // x^1
    let mut k = 1;
    while k < 67 {
        table[k] = mul_mod(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// x^(8·len) modulo POLY: appending `len` zero bytes to a CRC's message.
fn shift_operator(len: usize) -> u32 {
    let mut op = ONE;
    // 8·len = len shifted left by 3: start at x^(2^3).
    let (mut rest, mut k) = (len as u64, 3);
    while rest != 0 {
        if rest & 1 != 0 {
            op = mul_mod(X_POW_2K[k], op);
        }
        rest >>= 1;
        k += 1;
    }
    op
}

/// The CRC-32C of A followed by B, from CRC(A), CRC(B) and B's length.
pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    mul_mod(shift_operator(len_b), crc_a) ^ crc_b
}

/// The CRC-32C of B, from CRC(A followed by B), CRC(A) and B's length.
pub fn strip_prefix(crc_ab: u32, crc_a: u32, len_b: usize) -> u32 {
    crc_ab ^ mul_mod(shift_operator(len_b), crc_a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_agrees_with_crc_over_the_concatenation() {
        let data: Vec<u8> = (0..(3u32 << 20) + 17).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for (a_len, b_len) in [(0, 0), (0, 5), (5, 0), (1, 1), (24, 1 << 20), (37, (1 << 20) + 21), (1 << 20, 2 << 20), (3, 3 << 20)] {
            let (a, b) = (&data[..a_len], &data[a_len..a_len + b_len]);
            let whole = crc32c::crc32c(&data[..a_len + b_len]);
            let (ca, cb) = (crc32c::crc32c(a), crc32c::crc32c(b));
            assert_eq!(combine(ca, cb, b_len), whole, "{a_len}+{b_len}");
            assert_eq!(combine(ca, cb, b_len), crc32c::crc32c_combine(ca, cb, b_len), "{a_len}+{b_len}");
            assert_eq!(strip_prefix(whole, ca, b_len), cb, "{a_len}+{b_len}");
        }
    }
}
