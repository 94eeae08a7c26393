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

use bytes::Bytes;

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
#[error("tar stream is malformed at byte {offset}: {reason}")]
pub struct TarError {
    /// Offset in the stream where the problem was found.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
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
                    self.header.extend_from_slice(&chunk[..take]);
                    let _ = chunk.split_to(take);
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
                            return Err(self.err("a zero block followed by a header"))
                        }
                        (_, true) => self.state = State::Trailer,
                        (_, false) => {
                            let h = parse_header(&block).map_err(|r| self.err(&r))?;
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
                    if chunk[..take].iter().any(|&b| b != 0) {
                        return Err(self.err("non-zero padding after file content"));
                    }
                    let _ = chunk.split_to(take);
                    self.offset += take as u64;
                    *n -= take;
                    if *n == 0 {
                        self.state = State::Header;
                    }
                }
                State::Done => return Err(self.err("data after the end of the archive")),
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
                Err(self.err(&format!("truncated: {left} bytes of a file missing")))
            }
            (State::Padding(n), _) => {
                Err(self.err(&format!("truncated: {n} bytes of padding missing")))
            }
            _ => Err(self.err("truncated inside a header")),
        }
    }

    fn err(&self, reason: &str) -> TarError {
        TarError {
            offset: self.offset,
            reason: reason.to_owned(),
        }
    }
}

fn field_str(b: &[u8]) -> Result<String, String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8(b[..end].to_vec()).map_err(|_| "a name is not UTF-8".to_owned())
}

fn octal(b: &[u8], what: &str) -> Result<u64, String> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        // base-256 (GNU / PostgreSQL for sizes of 8 GiB and more)
        let mut v: u64 = u64::from(b[0] & 0x7f);
        for &c in &b[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(c)))
                .ok_or_else(|| format!("{what} overflows"))?;
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
    u64::from_str_radix(&s, 8).map_err(|_| format!("{what} {s:?} is not octal"))
}

fn parse_header(h: &[u8]) -> Result<TarHeader, String> {
    let stored = octal(&h[148..156], "checksum")?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum != stored {
        return Err(format!("header checksum {stored} does not match {sum}"));
    }
    let mut path = field_str(&h[0..100])?;
    if &h[257..262] == b"ustar" {
        let prefix = field_str(&h[345..500])?;
        if !prefix.is_empty() {
            path = format!("{prefix}/{path}");
        }
    }
    let path = path
        .trim_start_matches("./")
        .trim_end_matches('/')
        .to_owned();
    if path.is_empty() || path.split('/').any(|s| s == "..") || path.starts_with('/') {
        return Err(format!("unsafe path {path:?}"));
    }
    let size = octal(&h[124..136], "size")?;
    let kind = match h[156] {
        b'0' | 0 => EntryKind::File,
        b'5' => EntryKind::Directory,
        b'2' => EntryKind::Symlink(field_str(&h[157..257])?),
        t => return Err(format!("unsupported entry type {:?} for {path}", t as char)),
    };
    let size = if kind == EntryKind::File { size } else { 0 };
    Ok(TarHeader {
        path,
        kind,
        size,
        mode: (octal(&h[100..108], "mode")? & 0o7777) as u32,
        mtime: octal(&h[136..148], "mtime")? as i64,
    })
}

/// Build a ustar header (tests and fuzzing use it to make archives).
pub fn make_header(path: &str, kind: &EntryKind, size: u64, mode: u32, mtime: i64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let name = path.as_bytes();
    h[..name.len().min(99)].copy_from_slice(&name[..name.len().min(99)]);
    let put = |h: &mut [u8; BLOCK], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}", width = len - 1);
        h[at..at + len - 1].copy_from_slice(&s.as_bytes()[s.len() - (len - 1)..]);
    };
    put(&mut h, 100, 8, u64::from(mode));
    put(&mut h, 108, 8, 0);
    put(&mut h, 116, 8, 0);
    put(&mut h, 124, 12, size);
    put(&mut h, 136, 12, mtime.max(0) as u64);
    h[156] = match kind {
        EntryKind::File => b'0',
        EntryKind::Directory => b'5',
        EntryKind::Symlink(t) => {
            h[157..157 + t.len().min(99)].copy_from_slice(&t.as_bytes()[..t.len().min(99)]);
            b'2'
        }
    };
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

#[cfg(test)]
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
        assert!(parse_all(&data, &[])
            .unwrap_err()
            .reason
            .contains("checksum"));
        let evil = archive(&[("../etc/passwd", EntryKind::File, vec![1])], true);
        assert!(parse_all(&evil, &[]).unwrap_err().reason.contains("unsafe"));
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
