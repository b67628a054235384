//! Header values the proxy makes itself (request ids, trace context),
//! written as hex digits; those that are cloned (a request id goes to every
//! attempt) cut from a per-thread arena. A leaf module: it depends on
//! nothing in the crate.

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;

/// How many bytes of header values one arena chunk holds (113 request
/// ids).
const ARENA_CHUNK: usize = 4096;

thread_local! {
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A header value the proxy made, copied into this thread's arena.
///
/// PERF: values are cut from a shared chunk, so making one allocates
/// nothing (one chunk per 4 KiB of values) and cloning one (a retry keeps
/// a copy of the request's headers) is a reference count, where a value
/// made from its own `Vec` allocates again on its first clone. A chunk is
/// freed with the last value cut from it.
pub(crate) fn value(bytes: &[u8]) -> HeaderValue {
    let shared = ARENA.with(|arena| {
        let mut arena = arena.borrow_mut();
        if arena.capacity() - arena.len() < bytes.len() {
            *arena = BytesMut::with_capacity(ARENA_CHUNK.max(bytes.len()));
        }
        arena.extend_from_slice(bytes);
        arena.split().freeze()
    });
    // Only the proxy's own values come here: hex digits and dashes.
    HeaderValue::from_maybe_shared(shared).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// `x` as 16 lower-case hex digits, most significant first.
pub(crate) fn hex_u64(x: u64) -> [u8; 16] {
    hex_be(x.to_be_bytes())
}

/// `x` as 32 lower-case hex digits, most significant first.
pub(crate) fn hex_u128(x: u128) -> [u8; 32] {
    hex_be(x.to_be_bytes())
}

/// Big-endian `bytes` as lower-case hex digits, two per byte (`D` is
/// twice `N`, a multiple of 4).
///
/// PERF: computed eight digits at a time in a `u64` (each nibble spread
/// to a byte, then offset to its digit), about a third of the
/// instructions of a table lookup and two-byte copy per byte.
fn hex_be<const N: usize, const D: usize>(bytes: [u8; N]) -> [u8; D] {
    let mut out = [0; D];
    let (words, _) = bytes.as_chunks::<4>();
    for (digits, word) in out.chunks_exact_mut(8).zip(words) {
        digits.copy_from_slice(&hex_u32(u32::from_be_bytes(*word)));
    }
    out
}

/// `x` as 8 lower-case hex digits, most significant first.
fn hex_u32(x: u32) -> [u8; 8] {
    // Nibble i (from the least significant) to byte i.
    let mut v = u64::from(x);
    v = (v | v << 16) & 0x0000_ffff_0000_ffff;
    v = (v | v << 8) & 0x00ff_00ff_00ff_00ff;
    v = (v | v << 4) & 0x0f0f_0f0f_0f0f_0f0f;
    // Bytes of 10 and over get `a` - `0` - 10 more than `0`; no byte
    // carries into the next (at most 15 + 48 + 39).
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    let digits = v + 0x3030_3030_3030_3030 + letters * 39;
    // Byte i holds nibble i: the most significant digit goes first.
    digits.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_match_formatting() {
        for x in [
            0,
            1,
            9,
            10,
            15,
            16,
            0xdead_beef,
            u64::MAX,
            0x0123_4567_89ab_cdef,
        ] {
            assert_eq!(hex_u64(x), *format!("{x:016x}").as_bytes());
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..1000 {
            let x = rng.u128(..);
            assert_eq!(hex_u128(x), *format!("{x:032x}").as_bytes());
        }
    }

    #[test]
    fn values_share_a_chunk_and_outlive_it() {
        let first = value(b"abc");
        let second = value(b"def");
        assert_eq!(first, "abc");
        assert_eq!(second, "def");
        // A value longer than a chunk gets a chunk of its own.
        let long = vec![b'a'; ARENA_CHUNK + 1];
        assert_eq!(value(&long).len(), ARENA_CHUNK + 1);
        assert_eq!(first, "abc");
    }
}
