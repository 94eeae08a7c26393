//! Compression, encryption and content ids for repository data.
//!
//! Pure functions over byte slices, no I/O: the repository calls them from rayon
//! workers. Every decoder bounds its output by a length the caller already
//! trusts, so a hostile object cannot make walvault allocate without limit.

mod crypto;

pub use crypto::{
    with_id_width, BlockId, CryptoError, IdHasher, Keys, MasterKey, AEAD_OVERHEAD,
    BLOCK_ID_FUNCTIONS,
};

/// Seal `plaintext` under a raw 32-byte key (used to wrap master keys).
pub fn crypto_seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    crypto::seal_with(&crypto::cipher(key), aad, plaintext)
}

/// Open what [`crypto_seal`] produced.
pub fn crypto_open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    crypto::open_with(&crypto::cipher(key), aad, sealed)
}

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

thread_local! {
    /// Each thread's zstd contexts, made once: a context allocates and
    /// clears its tables when it is made, which cost 5 % of a backup's CPU
    /// when every group of blocks got a new one (`perf`, 2026-12-07).
    static ZSTD_COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// zstd at `level` with this thread's context.
fn zstd_compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    ZSTD_COMPRESSOR.with(|cell| {
        let mut held = cell.borrow_mut();
        let c = match &mut *held {
            Some((l, c)) if *l == level => c,
            slot => &mut slot.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        c.compress(data)
    })
}

/// zstd-decode `data` into `dst` with this thread's context; the bytes
/// written.
fn zstd_decompress(data: &[u8], dst: &mut [u8]) -> std::io::Result<usize> {
    ZSTD_DECOMPRESSOR.with(|cell| {
        let mut held = cell.borrow_mut();
        let d = match &mut *held {
            Some(d) => d,
            slot => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress_to_buffer(data, dst)
    })
}

/// Why compressed bytes do not decompress to the length expected.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// A length the input could never expand to (refused before allocating).
    #[error("{stored} compressed bytes cannot hold {raw_len} bytes ({algo})")]
    CannotHold {
        /// Compressed bytes given.
        stored: usize,
        /// Length claimed.
        raw_len: usize,
        /// The algorithm.
        algo: Compression,
    },
    /// LZ4 refused the bytes.
    #[error("lz4: {0}")]
    Lz4(#[source] lz4_flex::block::DecompressError),
    /// Zstandard refused the bytes.
    #[error("zstd: {0}")]
    Zstd(#[source] std::io::Error),
    /// The bytes decompressed to another length.
    #[error("decompressed to {got} bytes, expected {expected}")]
    WrongLength {
        /// Bytes produced.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
}

/// A compression name that is not one walvault knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression {0:?}: use lz4, zstd, zstd:LEVEL (1-22) or none")]
pub struct UnknownCompression(pub String);

/// How a blob's bytes are compressed. Stored as one byte next to the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Stored as is (also chosen when compression would not save space).
    None,
    /// LZ4 block format (lz4_flex): fast enough to never be the bottleneck.
    #[default]
    Lz4,
    /// Zstandard at the given level (1-22, or a fast level -1 to -7):
    /// smaller, slower.
    Zstd(i32),
}

impl Compression {
    /// The byte stored in pack headers, index entries and object headers.
    pub fn id(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd(_) => 2,
        }
    }

    /// The algorithm for a stored byte (level is irrelevant for decompression).
    pub fn from_id(id: u8) -> Option<Compression> {
        match id {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            2 => Some(Compression::Zstd(0)),
            _ => None,
        }
    }

    /// Compress `data`. Returns the algorithm actually used: `None` when the
    /// result would not be smaller than the input.
    pub fn compress(self, data: &[u8]) -> (Compression, Vec<u8>) {
        let out = match self {
            Compression::None => return (Compression::None, data.to_vec()),
            Compression::Lz4 => lz4_flex::block::compress(data),
            Compression::Zstd(level) => match zstd_compress(data, level) {
                Ok(v) => v,
                Err(_) => return (Compression::None, data.to_vec()),
            },
        };
        if out.len() >= data.len() {
            (Compression::None, data.to_vec())
        } else {
            (self, out)
        }
    }

    /// Decompress `data` into exactly `raw_len` bytes.
    ///
    /// Both decoders allocate `raw_len` before decoding, so a claimed length
    /// that the input could never expand to is refused first: a 50-byte object
    /// must not make walvault allocate gigabytes (LZ4 expands a byte at most
    /// 255 times; zstd at most about 32 768 times, with RLE blocks).
    pub fn decompress(self, data: &[u8], raw_len: usize) -> Result<Vec<u8>, DecompressError> {
        let mut out = Vec::new();
        self.decompress_into(data, raw_len, &mut out)?;
        Ok(out)
    }

    /// Decompress `data` into exactly `raw_len` bytes appended to `out` (as
    /// [`Compression::decompress`], without a buffer of its own: a restore
    /// decodes neighbouring blocks straight into the buffer it writes). On
    /// error `out` is left as it was.
    pub fn decompress_into(
        self,
        data: &[u8],
        raw_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), DecompressError> {
        let most = match self {
            Compression::None => data.len(),
            Compression::Lz4 => data.len().saturating_mul(255).saturating_add(64),
            Compression::Zstd(_) => data
                .len()
                .saturating_mul(32 * 1024)
                .saturating_add(128 * 1024),
        };
        if raw_len > most {
            return Err(DecompressError::CannotHold {
                stored: data.len(),
                raw_len,
                algo: self,
            });
        }
        let start = out.len();
        let got = match self {
            Compression::None => {
                out.extend_from_slice(data);
                Ok(data.len())
            }
            Compression::Lz4 => {
                out.resize(start + raw_len, 0);
                let dst = out.get_mut(start..).unwrap_or_default();
                lz4_flex::block::decompress_into(data, dst).map_err(DecompressError::Lz4)
            }
            Compression::Zstd(_) => {
                out.resize(start + raw_len, 0);
                let dst = out.get_mut(start..).unwrap_or_default();
                zstd_decompress(data, dst).map_err(DecompressError::Zstd)
            }
        };
        // on error `out` is left as it was
        match got {
            Ok(n) if n == raw_len => Ok(()),
            Ok(n) => {
                out.truncate(start);
                Err(DecompressError::WrongLength {
                    got: n,
                    expected: raw_len,
                })
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Lz4 => write!(f, "lz4"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

impl FromStr for Compression {
    type Err = UnknownCompression;
    /// `none`, `lz4`, `zstd` (level 3) or `zstd:LEVEL` (1 to 22, or one of
    /// zstd's fast levels, -1 to -7).
    fn from_str(s: &str) -> Result<Compression, UnknownCompression> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(3)),
            _ => match s.strip_prefix("zstd:").and_then(|l| l.parse::<i32>().ok()) {
                Some(l) if (1..=22).contains(&l) || (-7..=-1).contains(&l) => {
                    Ok(Compression::Zstd(l))
                }
                _ => Err(UnknownCompression(s.to_owned())),
            },
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Bytes from lower- or upper-case hex; `None` for anything else.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn incompressible_data_is_stored() {
        let data: Vec<u8> = (0..4096).map(|_| rand::random()).collect();
        let (c, out) = Compression::Lz4.compress(&data);
        assert_eq!(c, Compression::None);
        assert_eq!(out, data);
    }

    #[test]
    fn impossible_lengths_are_refused_before_allocating() {
        for c in [Compression::Lz4, Compression::Zstd(3)] {
            let e = c.decompress(&[0u8; 50], 1 << 40).unwrap_err();
            assert!(
                matches!(e, DecompressError::CannotHold { stored: 50, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("cannot hold"), "{e}");
        }
        // the real extremes still decode: a zero block at each algorithm's best ratio
        for c in [Compression::Lz4, Compression::Zstd(19)] {
            let zeros = vec![0u8; 16 << 20];
            let (used, packed) = c.compress(&zeros);
            assert_eq!(used.decompress(&packed, zeros.len()).unwrap(), zeros);
        }
    }

    #[test]
    fn parse_compression() {
        assert_eq!("lz4".parse::<Compression>().unwrap(), Compression::Lz4);
        assert_eq!(
            "zstd:19".parse::<Compression>().unwrap(),
            Compression::Zstd(19)
        );
        assert!("zstd:0".parse::<Compression>().is_err());
        assert!("gzip".parse::<Compression>().is_err());
        // zstd's fast levels
        let fast = "zstd:-1".parse::<Compression>().unwrap();
        assert_eq!(fast, Compression::Zstd(-1));
        assert_eq!(fast.to_string(), "zstd:-1");
        assert!("zstd:-8".parse::<Compression>().is_err());
        let page: Vec<u8> = (0..8192u32).map(|i| (i % 7 * (i / 512)) as u8).collect();
        let (used, packed) = fast.compress(&page);
        assert!(packed.len() < page.len() / 2, "{}", packed.len());
        assert_eq!(used.decompress(&packed, page.len()).unwrap(), page);
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(0u8..4, 0..20000), algo in 0u8..3) {
            let c = match algo { 0 => Compression::None, 1 => Compression::Lz4, _ => Compression::Zstd(3) };
            let (used, out) = c.compress(&data);
            prop_assert_eq!(used.decompress(&out, data.len()).unwrap(), data);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), raw in 0usize..100_000, algo in 0u8..3) {
            let _ = Compression::from_id(algo).unwrap().decompress(&data, raw);
        }

        /// Appends after what `out` holds; on error leaves it as it was.
        #[test]
        fn decompress_into_appends_or_leaves_alone(
            data in proptest::collection::vec(0u8..4, 1..5000),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
            algo in 0u8..3,
        ) {
            let c = match algo { 0 => Compression::None, 1 => Compression::Lz4, _ => Compression::Zstd(3) };
            let (used, packed) = c.compress(&data);
            let mut out = b"before".to_vec();
            used.decompress_into(&packed, data.len(), &mut out).unwrap();
            prop_assert_eq!(&out[..6], b"before");
            prop_assert_eq!(&out[6..], &data[..]);
            let mut out = b"before".to_vec();
            if used.decompress_into(&junk, data.len(), &mut out).is_err() {
                prop_assert_eq!(out, b"before".to_vec());
            }
        }

        #[test]
        fn hex_round_trip(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(from_hex(&to_hex(&data)).unwrap(), data);
        }
    }
}
