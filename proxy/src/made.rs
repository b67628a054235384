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

/// Each byte's two lower-case hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = hex_pairs();

const fn hex_pairs() -> [[u8; 2]; 256] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [DIGITS[byte >> 4], DIGITS[byte & 0xf]];
        byte += 1;
    }
    pairs
}

/// Writes `bytes` as lower-case hex digits, two per byte, into the start
/// of `out`, and returns how many it wrote.
pub(crate) fn hex(out: &mut [u8], bytes: &[u8]) -> usize {
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*byte)]);
    }
    2 * bytes.len().min(out.len() / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_writes_two_lower_case_digits_per_byte() {
        let mut out = [b'.'; 10];
        assert_eq!(hex(&mut out, &[0x00, 0x9f, 0xa0, 0xff]), 8);
        assert_eq!(&out, b"009fa0ff..");
        // Never past the end of `out`.
        let mut short = [b'.'; 3];
        assert_eq!(hex(&mut short, &[0x12, 0x34]), 2);
        assert_eq!(&short, b"12.");
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
