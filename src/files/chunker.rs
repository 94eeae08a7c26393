//! Content-defined chunking of a stream (FastCDC, `fastcdc::v2020`): the
//! cut points depend on the bytes around them, not on offsets, so an edit
//! or an insertion changes only the chunks it touches.
//!
//! Bytes arrive in pieces of any size; a cut is final once the buffer holds
//! at least [`MAX_CHUNK`] bytes after the last one (a cut is never further
//! than that), so the chunks are those of one pass over the whole stream.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::FastCDC;

/// Smallest chunk (but the last of a file).
pub const MIN_CHUNK: usize = 256 << 10;
/// Average chunk aimed at.
pub const AVG_CHUNK: usize = 1 << 20;
/// Largest chunk.
pub const MAX_CHUNK: usize = 4 << 20;

/// Cuts a stream into chunks.
#[derive(Debug, Default)]
pub struct Chunker {
    buf: BytesMut,
}

impl Chunker {
    /// An empty chunker.
    pub fn new() -> Chunker {
        Chunker::default()
    }

    /// Add bytes; the chunks now final, in order.
    pub fn push(&mut self, data: &[u8]) -> Vec<Bytes> {
        self.buf.extend_from_slice(data);
        self.cut(false)
    }

    /// The stream ended: the remaining chunks.
    pub fn finish(mut self) -> Vec<Bytes> {
        self.cut(true)
    }

    fn cut(&mut self, end: bool) -> Vec<Bytes> {
        let mut out = Vec::new();
        loop {
            let n = self.buf.len();
            if n == 0 || (!end && n < MAX_CHUNK) {
                return out;
            }
            let cdc = FastCDC::new(&self.buf, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
            let (_, at) = cdc.cut(0, n);
            let at = at.clamp(1, n);
            out.push(self.buf.split_to(at).freeze());
        }
    }
}

/// The chunks of `data` in one pass (tests and small inputs).
pub fn chunks_of(data: &[u8]) -> Vec<Bytes> {
    let mut c = Chunker::new();
    let mut out = c.push(data);
    out.extend(c.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Pieces of any size give the chunks of one pass; chunks stay within
    /// bounds and cover the input.
    #[test]
    fn pieces_do_not_change_the_cuts() {
        let data = noise(13 << 20, 7);
        let whole = chunks_of(&data);
        for piece in [1 << 10, 777_777, 5 << 20] {
            let mut c = Chunker::new();
            let mut got = Vec::new();
            for p in data.chunks(piece) {
                got.extend(c.push(p));
            }
            got.extend(c.finish());
            assert_eq!(got, whole, "piece {piece}");
        }
        assert_eq!(whole.concat(), data);
        let (last, rest) = whole.split_last().expect("chunks");
        assert!(rest
            .iter()
            .all(|c| (MIN_CHUNK..=MAX_CHUNK).contains(&c.len())));
        assert!(last.len() <= MAX_CHUNK);
        assert!(whole.len() >= 4, "{} chunks of 13 MiB", whole.len());
    }

    /// An insertion near the start changes the first chunk(s) only.
    #[test]
    fn an_insertion_changes_few_chunks() {
        let data = noise(12 << 20, 3);
        let mut edited = b"0123456789".repeat(10);
        edited.extend_from_slice(&data);
        let a: std::collections::HashSet<Bytes> = chunks_of(&data).into_iter().collect();
        let b = chunks_of(&edited);
        let new = b.iter().filter(|c| !a.contains(*c)).count();
        assert!(new <= 2, "{new} of {} chunks changed", b.len());
        assert!(chunks_of(&[]).is_empty());
        assert_eq!(chunks_of(b"tiny"), vec![Bytes::from_static(b"tiny")]);
    }
}
