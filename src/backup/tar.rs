//! A streaming, sans-IO parser for the tar archives BASE_BACKUP sends.
//!
//! PostgreSQL writes ustar headers (`src/port/tar.c`): names of at most 99
//! bytes, sizes in octal or, past 8 GiB, in base-256; regular files, directories
//! and symlinks (tablespace links under `pg_tblspc/`). The server may end an
//! archive without the two zero blocks of a tar trailer, so the end of the
//! stream at an entry boundary is a clean end too.
//!
//! Input arrives as arbitrary chunks (CopyData payloads); file contents are
//! handed out as zero-copy slices of those chunks.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use bytes::Bytes;

use crate::reader::ByteReader;

const BLOCK: usize = 512;

/// What a tar entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link to `target`.
    Symlink(String),
}

/// A parsed tar header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    /// Path inside the archive (no leading "./", no trailing '/').
    pub path: String,
    /// Kind of entry.
    pub kind: EntryKind,
    /// Bytes of content that follow.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, unix seconds.
    pub mtime: i64,
}

/// What the parser found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEvent {
    /// A new entry starts.
    Entry(TarHeader),
    /// Content of the current entry.
    Data(Bytes),
    /// The current entry's content is complete.
    EntryEnd,
    /// The tar trailer (two zero blocks) was seen.
    End,
}

/// Malformed or truncated tar input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tar stream is malformed at byte {offset}: {kind}")]
pub struct TarError {
    /// Offset in the stream where the problem was found.
    pub offset: u64,
    /// What is wrong.
    pub kind: TarErrorKind,
}

/// What is wrong with a tar stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TarErrorKind {
    /// A header after the first zero block of the trailer.
    #[error("a zero block followed by a header")]
    HeaderAfterZeroBlock,
    /// Padding after file content that is not zeros.
    #[error("non-zero padding after file content")]
    NonZeroPadding,
    /// Bytes after the trailer.
    #[error("data after the end of the archive")]
    DataAfterEnd,
    /// The stream ends inside a file's content.
    #[error("truncated: {left} bytes of a file missing")]
    TruncatedFile {
        /// Bytes of content missing.
        left: u64,
    },
    /// The stream ends inside the padding after a file.
    #[error("truncated: {left} bytes of padding missing")]
    TruncatedPadding {
        /// Bytes of padding missing.
        left: usize,
    },
    /// The stream ends inside a header.
    #[error("truncated inside a header")]
    TruncatedHeader,
    /// A header whose checksum does not match.
    #[error("header checksum {stored} does not match {computed}")]
    Checksum {
        /// chksum, as stored.
        stored: u64,
        /// The sum of the header's bytes.
        computed: u64,
    },
    /// A name that is not UTF-8.
    #[error("the {field} is not UTF-8")]
    NotUtf8 {
        /// The header field.
        field: &'static str,
    },
    /// A number field that is not octal.
    #[error("{field} {text:?} is not octal")]
    NotOctal {
        /// The header field.
        field: &'static str,
        /// Its text.
        text: String,
    },
    /// A base-256 number past 64 bits.
    #[error("{field} overflows")]
    Overflow {
        /// The header field.
        field: &'static str,
    },
    /// A path that could escape the target directory.
    #[error("unsafe path {0:?}")]
    UnsafePath(String),
    /// An entry type walvault does not restore.
    #[error("unsupported entry type {kind:?} for {path}")]
    UnsupportedType {
        /// The path.
        path: String,
        /// The typeflag.
        kind: char,
    },
}

#[derive(Debug)]
enum State {
    Header,
    Data { left: u64, pad: usize },
    Padding(usize),
    Trailer,
    Done,
}

/// The parser; feed it chunks, collect events.
#[derive(Debug)]
pub struct TarParser {
    state: State,
    header: Vec<u8>,
    offset: u64,
}

impl Default for TarParser {
    fn default() -> Self {
        TarParser::new()
    }
}

impl TarParser {
    /// A parser at the start of an archive.
    pub fn new() -> TarParser {
        TarParser {
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            offset: 0,
        }
    }

    /// Parse `chunk`, appending events to `out`.
    pub fn feed(&mut self, mut chunk: Bytes, out: &mut Vec<TarEvent>) -> Result<(), TarError> {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Header | State::Trailer => {
                    let take = (BLOCK - self.header.len()).min(chunk.len());
                    let head = chunk.split_to(take);
                    self.header.extend_from_slice(&head);
                    self.offset += take as u64;
                    if self.header.len() < BLOCK {
                        continue;
                    }
                    let block = std::mem::take(&mut self.header);
                    let zero = block.iter().all(|&b| b == 0);
                    match (&self.state, zero) {
                        (State::Trailer, true) => {
                            self.state = State::Done;
                            out.push(TarEvent::End);
                        }
                        (State::Trailer, false) => {
                            return Err(self.err(TarErrorKind::HeaderAfterZeroBlock))
                        }
                        (_, true) => self.state = State::Trailer,
                        (_, false) => {
                            let h = parse_header(&block).map_err(|k| self.err(k))?;
                            let size = h.size;
                            out.push(TarEvent::Entry(h));
                            if size == 0 {
                                out.push(TarEvent::EntryEnd);
                                self.state = State::Header;
                            } else {
                                let pad =
                                    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize;
                                self.state = State::Data { left: size, pad };
                            }
                        }
                    }
                    self.header.clear();
                }
                State::Data { left, pad } => {
                    let take = (*left).min(chunk.len() as u64) as usize;
                    out.push(TarEvent::Data(chunk.split_to(take)));
                    *left -= take as u64;
                    self.offset += take as u64;
                    if *left == 0 {
                        out.push(TarEvent::EntryEnd);
                        self.state = State::Padding(*pad);
                    }
                }
                State::Padding(n) => {
                    let take = (*n).min(chunk.len());
                    let pad = chunk.split_to(take);
                    if pad.iter().any(|&b| b != 0) {
                        self.offset += pad.iter().position(|&b| b != 0).unwrap_or(0) as u64;
                        return Err(self.err(TarErrorKind::NonZeroPadding));
                    }
                    self.offset += take as u64;
                    *n -= take;
                    if *n == 0 {
                        self.state = State::Header;
                    }
                }
                State::Done => return Err(self.err(TarErrorKind::DataAfterEnd)),
            }
        }
        if let State::Padding(0) = self.state {
            self.state = State::Header;
        }
        Ok(())
    }

    /// Check that the stream ended cleanly: after the trailer, or between
    /// entries (the server may omit the trailer).
    pub fn finish(&self) -> Result<(), TarError> {
        match (&self.state, self.header.is_empty()) {
            (State::Done, _) | (State::Header, true) | (State::Padding(0), _) => Ok(()),
            (State::Trailer, true) => Ok(()),
            (State::Data { left, .. }, _) => {
                Err(self.err(TarErrorKind::TruncatedFile { left: *left }))
            }
            (State::Padding(n), _) => Err(self.err(TarErrorKind::TruncatedPadding { left: *n })),
            _ => Err(self.err(TarErrorKind::TruncatedHeader)),
        }
    }

    fn err(&self, kind: TarErrorKind) -> TarError {
        TarError {
            offset: self.offset,
            kind,
        }
    }
}

/// A NUL-terminated (or full-width) text field.
fn field_str(b: &[u8], field: &'static str) -> Result<String, TarErrorKind> {
    let text = b.split(|&c| c == 0).next().unwrap_or(b);
    String::from_utf8(text.to_vec()).map_err(|_| TarErrorKind::NotUtf8 { field })
}

/// A number field: octal text, or base-256 when the high bit is set.
fn octal(b: &[u8], field: &'static str) -> Result<u64, TarErrorKind> {
    if let Some((&first, rest)) = b.split_first().filter(|(&c, _)| c & 0x80 != 0) {
        // base-256 (GNU / PostgreSQL for sizes of 8 GiB and more)
        let mut v: u64 = u64::from(first & 0x7f);
        for &c in rest {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(c)))
                .ok_or(TarErrorKind::Overflow { field })?;
        }
        return Ok(v);
    }
    let s: String = b
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as char)
        .collect::<String>()
        .trim()
        .to_owned();
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(&s, 8).map_err(|_| TarErrorKind::NotOctal { field, text: s })
}

/// The fields of a ustar header (POSIX.1-1988, `src/port/tar.c`), in order.
struct RawHeader<'a> {
    name: &'a [u8],
    mode: &'a [u8],
    size: &'a [u8],
    mtime: &'a [u8],
    chksum: &'a [u8],
    typeflag: u8,
    linkname: &'a [u8],
    magic: &'a [u8],
    prefix: &'a [u8],
}

impl<'a> RawHeader<'a> {
    fn split(h: &'a [u8; BLOCK]) -> Option<RawHeader<'a>> {
        let mut r = ByteReader::new(h);
        let name = r.bytes(100).ok()?;
        let mode = r.bytes(8).ok()?;
        r.skip(16).ok()?; // uid, gid
        let size = r.bytes(12).ok()?;
        let mtime = r.bytes(12).ok()?;
        let chksum = r.bytes(8).ok()?;
        let typeflag = r.u8().ok()?;
        let linkname = r.bytes(100).ok()?;
        let magic = r.bytes(6).ok()?;
        r.skip(2 + 32 + 32 + 8 + 8).ok()?; // version, uname, gname, devmajor, devminor
        let prefix = r.bytes(155).ok()?;
        Some(RawHeader {
            name,
            mode,
            size,
            mtime,
            chksum,
            typeflag,
            linkname,
            magic,
            prefix,
        })
    }
}

fn parse_header(block: &[u8]) -> Result<TarHeader, TarErrorKind> {
    let h: &[u8; BLOCK] = block
        .try_into()
        .map_err(|_| TarErrorKind::TruncatedHeader)?;
    let f = RawHeader::split(h).ok_or(TarErrorKind::TruncatedHeader)?;
    let stored = octal(f.chksum, "checksum")?;
    // the sum of the header's bytes, the checksum field counted as spaces
    let sum_of = |b: &[u8]| b.iter().map(|&c| u64::from(c)).sum::<u64>();
    let sum = sum_of(h) - sum_of(f.chksum) + 8 * u64::from(b' ');
    if sum != stored {
        return Err(TarErrorKind::Checksum {
            stored,
            computed: sum,
        });
    }
    let mut path = field_str(f.name, "name")?;
    if f.magic.starts_with(b"ustar") {
        let prefix = field_str(f.prefix, "name prefix")?;
        if !prefix.is_empty() {
            path = format!("{prefix}/{path}");
        }
    }
    let path = path
        .trim_start_matches("./")
        .trim_end_matches('/')
        .to_owned();
    if path.is_empty() || path.split('/').any(|s| s == "..") || path.starts_with('/') {
        return Err(TarErrorKind::UnsafePath(path));
    }
    let size = octal(f.size, "size")?;
    let kind = match f.typeflag {
        b'0' | 0 => EntryKind::File,
        b'5' => EntryKind::Directory,
        b'2' => EntryKind::Symlink(field_str(f.linkname, "link target")?),
        t => {
            return Err(TarErrorKind::UnsupportedType {
                path,
                kind: t as char,
            })
        }
    };
    let size = if kind == EntryKind::File { size } else { 0 };
    Ok(TarHeader {
        path,
        kind,
        size,
        mode: (octal(f.mode, "mode")? & 0o7777) as u32,
        mtime: octal(f.mtime, "mtime")? as i64,
    })
}

/// Build a ustar header (tests and fuzzing use it to make archives).
pub fn make_header(path: &str, kind: &EntryKind, size: u64, mode: u32, mtime: i64) -> [u8; BLOCK] {
    /// `b` cut to `len - 1` bytes and NUL-padded to `len`.
    fn text(h: &mut Vec<u8>, b: &[u8], len: usize) {
        h.extend(b.iter().take(len - 1));
        h.resize(h.len() + (len - b.len().min(len - 1)), 0);
    }
    /// `v` in octal, `len - 1` digits (the low ones), then a NUL.
    fn number(h: &mut Vec<u8>, v: u64, len: usize) {
        let s = format!("{v:0width$o}", width = len - 1);
        h.extend(s.bytes().skip(s.len() - (len - 1)));
        h.push(0);
    }
    let mut h = Vec::with_capacity(BLOCK);
    text(&mut h, path.as_bytes(), 100);
    number(&mut h, u64::from(mode), 8);
    number(&mut h, 0, 8); // uid
    number(&mut h, 0, 8); // gid
    number(&mut h, size, 12);
    number(&mut h, mtime.max(0) as u64, 12);
    let chksum_at = h.len();
    h.extend_from_slice(b"        ");
    let (typeflag, link) = match kind {
        EntryKind::File => (b'0', ""),
        EntryKind::Directory => (b'5', ""),
        EntryKind::Symlink(t) => (b'2', t.as_str()),
    };
    h.push(typeflag);
    text(&mut h, link.as_bytes(), 100);
    h.extend_from_slice(b"ustar\0");
    h.extend_from_slice(b"00");
    h.resize(BLOCK, 0);
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    for (d, c) in h.iter_mut().skip(chksum_at).zip(s.bytes()) {
        *d = c;
    }
    let mut out = [0u8; BLOCK];
    for (d, c) in out.iter_mut().zip(h) {
        *d = c;
    }
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn archive(files: &[(&str, EntryKind, Vec<u8>)], trailer: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (p, k, data) in files {
            out.extend_from_slice(&make_header(p, k, data.len() as u64, 0o600, 1_700_000_000));
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        }
        if trailer {
            out.extend_from_slice(&[0u8; 2 * BLOCK]);
        }
        out
    }

    fn sample() -> Vec<(&'static str, EntryKind, Vec<u8>)> {
        vec![
            (
                "backup_label",
                EntryKind::File,
                b"START WAL LOCATION: 0/2000028\n".to_vec(),
            ),
            ("base", EntryKind::Directory, vec![]),
            (
                "base/1/1259",
                EntryKind::File,
                (0..20_000u32).map(|i| i as u8).collect(),
            ),
            (
                "pg_tblspc/16390",
                EntryKind::Symlink("/srv/ts".into()),
                vec![],
            ),
            ("empty", EntryKind::File, vec![]),
            ("exact", EntryKind::File, vec![7; 1024]),
        ]
    }

    /// Files (path, kind, content) the parser reports for `data` cut into
    /// chunks at `cuts`.
    fn parse_all(
        data: &[u8],
        cuts: &[usize],
    ) -> Result<Vec<(String, EntryKind, Vec<u8>)>, TarError> {
        let mut p = TarParser::new();
        let mut events = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&data.len())) {
            p.feed(Bytes::copy_from_slice(&data[last..c]), &mut events)?;
            last = c;
        }
        p.finish()?;
        let mut files = Vec::new();
        for e in events {
            match e {
                TarEvent::Entry(h) => files.push((h.path, h.kind, Vec::new())),
                TarEvent::Data(d) => files.last_mut().unwrap().2.extend_from_slice(&d),
                TarEvent::EntryEnd | TarEvent::End => {}
            }
        }
        Ok(files)
    }

    #[test]
    fn every_split_gives_the_same_files() {
        for trailer in [true, false] {
            let data = archive(&sample(), trailer);
            let want: Vec<_> = sample()
                .into_iter()
                .map(|(p, k, d)| (p.to_owned(), k, d))
                .collect();
            for cut in 0..=data.len() {
                assert_eq!(parse_all(&data, &[cut]).unwrap(), want, "cut at {cut}");
            }
        }
    }

    #[test]
    fn truncation_is_an_error_except_between_entries() {
        let data = archive(&sample(), true);
        let boundaries: Vec<usize> = {
            let mut b = vec![0];
            let mut at = 0;
            for (_, _, d) in sample() {
                at += BLOCK + d.len().div_ceil(BLOCK) * BLOCK;
                b.push(at);
            }
            b.push(at + BLOCK);
            b.push(at + 2 * BLOCK);
            b
        };
        for n in 0..data.len() {
            let r = parse_all(&data[..n], &[]);
            assert_eq!(
                r.is_ok(),
                boundaries.contains(&n),
                "truncated at {n}: {r:?}"
            );
        }
    }

    #[test]
    fn bad_checksum_and_unsafe_paths() {
        let mut data = archive(&sample(), true);
        data[10] ^= 1;
        assert!(matches!(
            parse_all(&data, &[]).unwrap_err().kind,
            TarErrorKind::Checksum { .. }
        ));
        let evil = archive(&[("../etc/passwd", EntryKind::File, vec![1])], true);
        assert_eq!(
            parse_all(&evil, &[]).unwrap_err(),
            TarError {
                offset: 512,
                kind: TarErrorKind::UnsafePath("../etc/passwd".into())
            }
        );
    }

    #[test]
    fn base256_sizes() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 1;
        f[10] = 2; // 0x0201
        assert_eq!(octal(&f, "size").unwrap(), 0x201);
    }

    proptest! {
        #[test]
        fn random_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..3000), cut in 0usize..3000) {
            let cut = cut.min(data.len());
            let _ = parse_all(&data, &[cut]);
        }

        #[test]
        fn corrupted_archives_never_panic(flip in 0usize..5000, bit in 0u8..8) {
            let mut data = archive(&sample(), true);
            let i = flip % data.len();
            data[i] ^= 1 << bit;
            let _ = parse_all(&data, &[i / 2]);
        }
    }
}
