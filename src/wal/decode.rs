//! The WAL record reader, sans-IO: bytes in (any chunking), records out,
//! every record's CRC-32C checked.
//!
//! Layout (PostgreSQL 13–18, `access/xlog_internal.h`, `access/xlogrecord.h`):
//! WAL is a sequence of 8 KiB pages; each starts with a page header
//! (`XLogPageHeaderData`, 24 bytes; `XLogLongPageHeaderData`, 40 bytes, on
//! the first page of a segment) whose `xlp_pageaddr` is the page's own LSN.
//! Records (`XLogRecord`: 24-byte header, then block headers, block data and
//! main data) start 8-byte aligned and may span pages (and segments): the
//! continuation follows the next page's header, which carries
//! `XLP_FIRST_IS_CONTRECORD` and the bytes remaining in `xlp_rem_len`. After
//! an `XLOG_SWITCH` record the rest of the segment is unused.
//!
//! End of WAL (not an error): a zero `xl_tot_len`, or a page whose header is
//! not the page expected (zeros of a `.partial`, recycled old WAL).

use crate::pg::{Lsn, WalSegSize};

/// XLOG_BLCKSZ: the WAL page size of every build walvault supports.
pub const PAGE: u64 = 8192;
/// SizeOfXLogShortPHD.
const SHORT_HEADER: u64 = 24;
/// SizeOfXLogLongPHD.
const LONG_HEADER: u64 = 40;
/// SizeOfXLogRecord.
pub const RECORD_HEADER: usize = 24;
/// Largest record accepted (PostgreSQL's XLogRecordMaxSize is just under 1 GiB).
const MAX_RECORD: u32 = 1 << 30;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
/// Resource manager of XLOG records, and the XLOG_SWITCH info.
const RM_XLOG_ID: u8 = 0;
const XLOG_SWITCH: u8 = 0x40;

/// Why decoding failed; every variant carries the LSN where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A record's CRC does not match its bytes.
    #[error("record at {lsn} fails its CRC check (stored {stored:08x}, computed {computed:08x})")]
    BadCrc {
        /// Start of the record.
        lsn: Lsn,
        /// xl_crc.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A page header with an unknown magic.
    #[error("WAL page at {lsn} has magic {magic:#06x}, not a PostgreSQL 13-18 WAL page")]
    BadMagic {
        /// The page.
        lsn: Lsn,
        /// xlp_magic.
        magic: u16,
    },
    /// A record length that cannot be.
    #[error("record at {lsn} claims {len} bytes")]
    BadRecordLength {
        /// Start of the record.
        lsn: Lsn,
        /// xl_tot_len.
        len: u32,
    },
    /// A continuation page that does not continue the record.
    #[error("page at {lsn} does not continue the record before it ({reason})")]
    BadContinuation {
        /// The page.
        lsn: Lsn,
        /// What is wrong.
        reason: String,
    },
    /// A record's block headers or data do not add up.
    #[error("record at {lsn} is malformed: {reason}")]
    Malformed {
        /// Start of the record.
        lsn: Lsn,
        /// What is wrong.
        reason: String,
    },
}

/// One whole record: its header fields and its bytes (header included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Start LSN.
    pub lsn: Lsn,
    /// First byte after the record (before alignment).
    pub end: Lsn,
    /// xl_xid.
    pub xid: u32,
    /// xl_prev.
    pub prev: Lsn,
    /// xl_info.
    pub info: u8,
    /// xl_rmid.
    pub rmid: u8,
    /// The record, header first, page headers removed (only the header for
    /// records other than XLOG and transaction ones when the reader was
    /// made with [`WalReader::headers_only_for_other_records`]).
    pub bytes: Vec<u8>,
}

/// What [`WalReader::next_record`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A record.
    Record(RawRecord),
    /// The bytes fed so far end inside the next record or page header.
    NeedMore,
    /// Valid WAL ends at this LSN (zeros, or a page that does not follow).
    End(Lsn),
}

/// Reads records from WAL bytes fed in order.
#[derive(Debug)]
pub struct WalReader {
    seg: WalSegSize,
    /// LSN of `buf[0]` (always a page start).
    buf_start: Lsn,
    buf: Vec<u8>,
    /// Where the next record (or page header) is.
    pos: Lsn,
    /// Skip a continuation at the first page (decoding began at a page
    /// boundary without the record that continues there).
    skip_contrecord: bool,
    /// The PostgreSQL major of the WAL, from the first page magic.
    major: Option<u32>,
    ended: Option<Lsn>,
    /// Keep every record's bytes (else only XLOG and transaction records',
    /// the ones walvault interprets; the others carry their header only).
    all_bodies: bool,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn maxalign(l: u64) -> u64 {
    (l + 7) & !7
}

/// What reading a page header found.
enum PageRead {
    Header(PageHeader),
    NeedMore,
    NotThisPage,
}

/// A page header as read.
struct PageHeader {
    info: u16,
    rem_len: u32,
    len: u64,
}

impl WalReader {
    /// Read WAL from `start`, a page boundary (usually a segment start);
    /// a record continuing into that page from before is skipped.
    pub fn new(start: Lsn, seg: WalSegSize) -> WalReader {
        let page_start = Lsn(start.0 - start.0 % PAGE);
        WalReader {
            seg,
            buf_start: page_start,
            buf: Vec::new(),
            pos: start,
            skip_contrecord: start.0 % PAGE == 0,
            major: None,
            ended: None,
            all_bodies: true,
        }
    }

    /// Keep the bytes of XLOG and transaction records only (others carry
    /// just their 24-byte header): every CRC is still checked, and reading
    /// skips copying the bulk of the WAL (heap and index changes, images).
    pub fn headers_only_for_other_records(mut self) -> WalReader {
        self.all_bodies = false;
        self
    }

    /// The PostgreSQL major version the page magic names, once a page was read.
    pub fn major(&self) -> Option<u32> {
        self.major
    }

    /// Where the next record is expected.
    pub fn position(&self) -> Lsn {
        self.pos
    }

    /// Add the bytes that follow those fed before.
    pub fn feed(&mut self, data: &[u8]) {
        // drop whole pages before the current position
        let keep_from = (self.pos.0 - self.pos.0 % PAGE).max(self.buf_start.0);
        let drop = (keep_from - self.buf_start.0) as usize;
        if drop > 0 && drop <= self.buf.len() {
            self.buf.drain(..drop);
            self.buf_start = Lsn(keep_from);
        }
        self.buf.extend_from_slice(data);
    }

    fn have(&self, lsn: u64, len: u64) -> bool {
        lsn >= self.buf_start.0 && lsn + len <= self.buf_start.0 + self.buf.len() as u64
    }

    fn slice(&self, lsn: u64, len: u64) -> &[u8] {
        let at = (lsn - self.buf_start.0) as usize;
        &self.buf[at..at + len as usize]
    }

    /// The header of the page at `page` (a page start): `NotThisPage` when
    /// it is not the page expected there (end of WAL), `Err` for a page that
    /// looks like WAL of an unknown version.
    fn page_header(&mut self, page: u64) -> Result<PageRead, DecodeError> {
        let long = page % self.seg.bytes() == 0;
        let len = if long { LONG_HEADER } else { SHORT_HEADER };
        if !self.have(page, len) {
            return Ok(PageRead::NeedMore);
        }
        let h = self.slice(page, len);
        let magic = u16_at(h, 0);
        let info = u16_at(h, 2);
        let pageaddr = u64_at(h, 8);
        let rem_len = u32_at(h, 16);
        if pageaddr != page {
            return Ok(PageRead::NotThisPage);
        }
        let major = crate::wal::verify::KNOWN_PAGE_MAGICS
            .iter()
            .find(|(m, _)| *m == magic)
            .map(|(_, v)| *v)
            .ok_or(DecodeError::BadMagic {
                lsn: Lsn(page),
                magic,
            })?;
        self.major.get_or_insert(major);
        if long != (info & XLP_LONG_HEADER != 0) {
            return Err(DecodeError::BadContinuation {
                lsn: Lsn(page),
                reason: "long header flag does not match the segment start".into(),
            });
        }
        Ok(PageRead::Header(PageHeader { info, rem_len, len }))
    }

    /// The next record, or what stops it.
    pub fn next_record(&mut self) -> Result<Next, DecodeError> {
        if let Some(e) = self.ended {
            return Ok(Next::End(e));
        }
        loop {
            // at a page start: its header first
            if self.pos.0 % PAGE == 0 {
                let page = self.pos.0;
                let h = match self.page_header(page)? {
                    PageRead::Header(h) => h,
                    PageRead::NeedMore => return Ok(Next::NeedMore),
                    PageRead::NotThisPage => return Ok(self.end(page)),
                };
                self.pos = Lsn(page + h.len);
                if h.info & XLP_FIRST_IS_CONTRECORD != 0 {
                    if !self.skip_contrecord {
                        return Err(DecodeError::BadContinuation {
                            lsn: Lsn(page),
                            reason: "a continuation where a new record should start".into(),
                        });
                    }
                    // the tail of a record that began before us: skip it
                    let room = PAGE - h.len;
                    if u64::from(h.rem_len) >= room {
                        self.pos = Lsn(page + PAGE);
                        continue;
                    }
                    self.pos = Lsn(maxalign(page + h.len + u64::from(h.rem_len)));
                }
                self.skip_contrecord = false;
                if self.pos.0 % PAGE == 0 {
                    continue;
                }
            }
            self.skip_contrecord = false;
            return self.read_record();
        }
    }

    fn end(&mut self, at: u64) -> Next {
        self.ended = Some(Lsn(at));
        Next::End(Lsn(at))
    }

    fn read_record(&mut self) -> Result<Next, DecodeError> {
        let start = self.pos.0;
        let on_page = PAGE - start % PAGE;
        if !self.have(start, 4) {
            return Ok(Next::NeedMore);
        }
        let tot_len = u32_at(self.slice(start, 4), 0);
        if tot_len == 0 {
            return Ok(self.end(start));
        }
        if (tot_len as usize) < RECORD_HEADER || tot_len > MAX_RECORD {
            return Err(DecodeError::BadRecordLength {
                lsn: self.pos,
                len: tot_len,
            });
        }
        // gather the record across pages (without copying until it is whole)
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let first = u64::from(tot_len).min(on_page);
        if !self.have(start, first) {
            return Ok(Next::NeedMore);
        }
        pieces.push((start, first));
        let mut got = first;
        let mut page = start - start % PAGE + PAGE;
        while got < u64::from(tot_len) {
            let h = match self.page_header(page)? {
                PageRead::Header(h) => h,
                PageRead::NeedMore => return Ok(Next::NeedMore),
                // WAL ends inside this record: it was never completed
                PageRead::NotThisPage => return Ok(self.end(start)),
            };
            let rest = u64::from(tot_len) - got;
            if h.info & XLP_FIRST_IS_CONTRECORD == 0 || u64::from(h.rem_len) != rest {
                // an overwritten (aborted) continuation ends the valid WAL
                return Ok(self.end(start));
            }
            let take = rest.min(PAGE - h.len);
            if !self.have(page + h.len, take) {
                return Ok(Next::NeedMore);
            }
            pieces.push((page + h.len, take));
            got += take;
            page += PAGE;
        }
        // the header (it may straddle pages), then the CRC over the rest of
        // the record and the header up to xl_crc, without copying the record
        let mut header = [0u8; RECORD_HEADER];
        let mut filled = 0;
        let mut crc = 0u32;
        for (at, len) in &pieces {
            let sl = self.slice(*at, *len);
            let h = (RECORD_HEADER - filled).min(sl.len());
            header[filled..filled + h].copy_from_slice(&sl[..h]);
            filled += h;
            if h < sl.len() {
                crc = crc32c::crc32c_append(crc, &sl[h..]);
            }
        }
        let (last_at, last_len) = pieces[pieces.len() - 1];
        let end = last_at + last_len;
        let stored = u32_at(&header, 20);
        let computed = crc32c::crc32c_append(crc, &header[..20]);
        if stored != computed {
            return Err(DecodeError::BadCrc {
                lsn: self.pos,
                stored,
                computed,
            });
        }
        let rmid = header[17];
        let bytes = if self.all_bodies || rmid == RM_XLOG_ID || rmid == 1 {
            let mut b = Vec::with_capacity(tot_len as usize);
            for (at, len) in &pieces {
                b.extend_from_slice(self.slice(*at, *len));
            }
            b
        } else {
            header.to_vec()
        };
        let rec = RawRecord {
            lsn: self.pos,
            end: Lsn(end),
            xid: u32_at(&header, 4),
            prev: Lsn(u64_at(&header, 8)),
            info: header[16],
            rmid,
            bytes,
        };
        self.pos = if rec.rmid == RM_XLOG_ID && rec.info & 0xF0 == XLOG_SWITCH {
            // the rest of the segment is unused
            let s = self.seg.bytes();
            Lsn((end.div_ceil(s)) * s)
        } else {
            Lsn(maxalign(end))
        };
        Ok(Next::Record(rec))
    }
}

/// The main data of a record (what follows its block headers and block
/// data), found by walking the block headers as `DecodeXLogRecord` does.
/// `major` decides the image-compression flag layout (13–14 vs 15+).
pub fn main_data(rec: &RawRecord, major: u32) -> Result<&[u8], DecodeError> {
    let b = &rec.bytes;
    let bad = |reason: &str| DecodeError::Malformed {
        lsn: rec.lsn,
        reason: reason.to_owned(),
    };
    let mut at = RECORD_HEADER;
    let mut data_total: usize = 0;
    let mut main_len: usize = 0;
    let need = |at: usize, n: usize| -> Result<(), DecodeError> {
        if at + n > b.len() {
            Err(bad("block headers run past the record"))
        } else {
            Ok(())
        }
    };
    while b.len() - at > data_total {
        need(at, 1)?;
        let id = b[at];
        at += 1;
        match id {
            255 => {
                need(at, 1)?;
                main_len = usize::from(b[at]);
                at += 1;
                data_total += main_len;
            }
            254 => {
                need(at, 4)?;
                main_len = u32_at(b, at) as usize;
                at += 4;
                data_total += main_len;
            }
            253 => {
                need(at, 2)?;
                at += 2; // replication origin
            }
            252 => {
                need(at, 4)?;
                at += 4; // top-level xid
            }
            0..=32 => {
                need(at, 3)?;
                let flags = b[at];
                data_total += usize::from(u16_at(b, at + 1));
                at += 3;
                if flags & 0x10 != 0 {
                    // image: length, hole offset, info (+ hole length when
                    // compressed with a hole)
                    need(at, 5)?;
                    let len = usize::from(u16_at(b, at));
                    let bimg_info = b[at + 4];
                    at += 5;
                    let compressed = if major >= 15 {
                        bimg_info & 0x1C != 0
                    } else {
                        bimg_info & 0x02 != 0
                    };
                    if bimg_info & 0x01 != 0 && compressed {
                        need(at, 2)?;
                        at += 2;
                    }
                    data_total += len;
                }
                if flags & 0x80 == 0 {
                    need(at, 12)?;
                    at += 12; // RelFileLocator
                }
                need(at, 4)?;
                at += 4; // block number
            }
            _ => return Err(bad(&format!("unknown block id {id}"))),
        }
    }
    if b.len() - at != data_total {
        return Err(bad("block data lengths do not add up"));
    }
    Ok(&b[b.len() - main_len..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Random bytes, with or without a valid-looking first page header,
        /// in two chunks: never a panic, and the reader stops.
        #[test]
        fn random_input_never_panics(
            mut data in proptest::collection::vec(any::<u8>(), 0..40_000),
            cut in any::<usize>(),
            patch in any::<bool>(),
        ) {
            let seg = WalSegSize::new(1 << 20).unwrap();
            if patch && data.len() >= 40 {
                data[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
                data[2..4].copy_from_slice(&2u16.to_le_bytes());
                data[8..16].copy_from_slice(&(3u64 << 20).to_le_bytes());
            }
            let at = if data.is_empty() { 0 } else { cut % data.len() };
            let mut r = WalReader::new(Lsn(3 << 20), seg);
            r.feed(&data[..at]);
            let mut fed = false;
            for _ in 0..100_000 {
                match r.next_record() {
                    Ok(Next::Record(rec)) => {
                        let _ = main_data(&rec, 15);
                    }
                    Ok(Next::NeedMore) if !fed => {
                        r.feed(&data[at..]);
                        fed = true;
                    }
                    _ => break,
                }
            }
        }
    }
}
