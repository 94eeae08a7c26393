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

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use crate::pg::{Lsn, WalSegSize};
use crate::reader::{ByteReader, Truncated};

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
    /// A record, or the page header before it, ends inside a field.
    #[error("record at {lsn} is cut short in its {what}: {source}")]
    Truncated {
        /// Start of the record.
        lsn: Lsn,
        /// What was being read.
        what: &'static str,
        /// Where (offsets in the record, header included).
        source: Truncated,
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

fn maxalign(l: u64) -> u64 {
    (l + 7) & !7
}

/// What reading a page header found.
enum PageRead {
    Header(PageHeader),
    NeedMore,
    NotThisPage,
}

/// A page header as read (XLogPageHeaderData).
struct PageHeader {
    /// xlp_info.
    info: u16,
    /// xlp_rem_len.
    rem_len: u32,
    /// Its size: SizeOfXLogShortPHD or SizeOfXLogLongPHD.
    len: u64,
    /// The PostgreSQL major its xlp_magic names.
    major: u32,
}

/// The fields of an XLogRecord header.
struct RecordHeader {
    xid: u32,
    prev: u64,
    info: u8,
    rmid: u8,
    crc: u32,
}

impl RecordHeader {
    /// Parse the 24 bytes of an XLogRecord (xl_tot_len, checked by the
    /// caller, is skipped).
    fn parse(h: &[u8; RECORD_HEADER]) -> Result<RecordHeader, Truncated> {
        let mut r = ByteReader::new(h);
        r.skip(4)?; // xl_tot_len
        let xid = r.u32_le()?;
        let prev = r.u64_le()?;
        let info = r.u8()?;
        let rmid = r.u8()?;
        r.skip(2)?; // padding
        let crc = r.u32_le()?;
        Ok(RecordHeader {
            xid,
            prev,
            info,
            rmid,
            crc,
        })
    }
}

impl WalReader {
    /// Read WAL from `start`, a page boundary (usually a segment start);
    /// a record continuing into that page from before is skipped.
    pub fn new(start: Lsn, seg: WalSegSize) -> WalReader {
        let page_start = Lsn::new(start.get() - start.get() % PAGE);
        WalReader {
            seg,
            buf_start: page_start,
            buf: Vec::new(),
            pos: start,
            skip_contrecord: start.get() % PAGE == 0,
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
        let keep_from = (self.pos.get() - self.pos.get() % PAGE).max(self.buf_start.get());
        let drop = (keep_from - self.buf_start.get()) as usize;
        if drop > 0 && drop <= self.buf.len() {
            self.buf.drain(..drop);
            self.buf_start = Lsn::new(keep_from);
        }
        self.buf.extend_from_slice(data);
    }

    /// The `len` bytes at `lsn`, when they were fed.
    fn slice(&self, lsn: u64, len: u64) -> Option<&[u8]> {
        let at = usize::try_from(lsn.checked_sub(self.buf_start.get())?).ok()?;
        let end = at.checked_add(usize::try_from(len).ok()?)?;
        self.buf.get(at..end)
    }

    /// The header of the page at `page` (a page start): `NotThisPage` when
    /// it is not the page expected there (end of WAL), `Err` for a page that
    /// looks like WAL of an unknown version.
    fn page_header(&self, page: u64) -> Result<PageRead, DecodeError> {
        let long = page % self.seg.bytes() == 0;
        let len = if long { LONG_HEADER } else { SHORT_HEADER };
        let Some(h) = self.slice(page, len) else {
            return Ok(PageRead::NeedMore);
        };
        let cut = |source| DecodeError::Truncated {
            lsn: Lsn::new(page),
            what: "page header",
            source,
        };
        let mut r = ByteReader::new(h);
        let magic = r.u16_le().map_err(cut)?;
        let info = r.u16_le().map_err(cut)?;
        r.skip(4).map_err(cut)?; // xlp_tli
        let pageaddr = r.u64_le().map_err(cut)?;
        let rem_len = r.u32_le().map_err(cut)?;
        if pageaddr != page {
            return Ok(PageRead::NotThisPage);
        }
        let major = crate::wal::verify::KNOWN_PAGE_MAGICS
            .iter()
            .find(|(m, _)| *m == magic)
            .map(|(_, v)| *v)
            .ok_or(DecodeError::BadMagic {
                lsn: Lsn::new(page),
                magic,
            })?;
        if long != (info & XLP_LONG_HEADER != 0) {
            return Err(DecodeError::BadContinuation {
                lsn: Lsn::new(page),
                reason: "long header flag does not match the segment start".into(),
            });
        }
        Ok(PageRead::Header(PageHeader {
            info,
            rem_len,
            len,
            major,
        }))
    }

    /// The next record, or what stops it.
    pub fn next_record(&mut self) -> Result<Next, DecodeError> {
        if let Some(e) = self.ended {
            return Ok(Next::End(e));
        }
        loop {
            // at a page start: its header first
            if self.pos.get() % PAGE == 0 {
                let page = self.pos.get();
                let h = match self.page_header(page)? {
                    PageRead::Header(h) => h,
                    PageRead::NeedMore => return Ok(Next::NeedMore),
                    PageRead::NotThisPage => return Ok(self.end(page)),
                };
                self.major.get_or_insert(h.major);
                self.pos = Lsn::new(page + h.len);
                if h.info & XLP_FIRST_IS_CONTRECORD != 0 {
                    if !self.skip_contrecord {
                        return Err(DecodeError::BadContinuation {
                            lsn: Lsn::new(page),
                            reason: "a continuation where a new record should start".into(),
                        });
                    }
                    // the tail of a record that began before us: skip it
                    let room = PAGE - h.len;
                    if u64::from(h.rem_len) >= room {
                        self.pos = Lsn::new(page + PAGE);
                        continue;
                    }
                    self.pos = Lsn::new(maxalign(page + h.len + u64::from(h.rem_len)));
                }
                self.skip_contrecord = false;
                if self.pos.get() % PAGE == 0 {
                    continue;
                }
            }
            self.skip_contrecord = false;
            return self.read_record();
        }
    }

    fn end(&mut self, at: u64) -> Next {
        self.ended = Some(Lsn::new(at));
        Next::End(Lsn::new(at))
    }

    fn read_record(&mut self) -> Result<Next, DecodeError> {
        let start = self.pos.get();
        let on_page = PAGE - start % PAGE;
        let Some(len_word) = self.slice(start, 4) else {
            return Ok(Next::NeedMore);
        };
        let tot_len =
            ByteReader::new(len_word)
                .u32_le()
                .map_err(|source| DecodeError::Truncated {
                    lsn: self.pos,
                    what: "length",
                    source,
                })?;
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
        let first = u64::from(tot_len).min(on_page);
        let Some(piece) = self.slice(start, first) else {
            return Ok(Next::NeedMore);
        };
        let mut pieces: Vec<&[u8]> = vec![piece];
        let mut got = first;
        // first byte after the record
        let mut end = start + first;
        let mut page = start - start % PAGE + PAGE;
        let mut major = None;
        while got < u64::from(tot_len) {
            let h = match self.page_header(page)? {
                PageRead::Header(h) => h,
                PageRead::NeedMore => return Ok(Next::NeedMore),
                // WAL ends inside this record: it was never completed
                PageRead::NotThisPage => return Ok(self.end(start)),
            };
            major.get_or_insert(h.major);
            let rest = u64::from(tot_len) - got;
            if h.info & XLP_FIRST_IS_CONTRECORD == 0 || u64::from(h.rem_len) != rest {
                // an overwritten (aborted) continuation ends the valid WAL
                return Ok(self.end(start));
            }
            let take = rest.min(PAGE - h.len);
            let Some(piece) = self.slice(page + h.len, take) else {
                return Ok(Next::NeedMore);
            };
            pieces.push(piece);
            got += take;
            end = page + h.len + take;
            page += PAGE;
        }
        // the header (it may straddle pages), then the CRC over the rest of
        // the record and the header up to xl_crc, without copying the record
        let mut header = [0u8; RECORD_HEADER];
        let mut filled = 0;
        let mut crc = 0u32;
        for sl in &pieces {
            let want = RECORD_HEADER - filled;
            let (head, body) = sl.split_at_checked(want).unwrap_or((sl, &[]));
            if let Some(dst) = header.get_mut(filled..filled + head.len()) {
                dst.copy_from_slice(head);
            }
            filled += head.len();
            if !body.is_empty() {
                crc = crc32c::crc32c_append(crc, body);
            }
        }
        let head = RecordHeader::parse(&header).map_err(|source| DecodeError::Truncated {
            lsn: self.pos,
            what: "header",
            source,
        })?;
        let computed = match header.get(..20) {
            Some(upto_crc) => crc32c::crc32c_append(crc, upto_crc),
            None => crc,
        };
        if head.crc != computed {
            return Err(DecodeError::BadCrc {
                lsn: self.pos,
                stored: head.crc,
                computed,
            });
        }
        let bytes = if self.all_bodies || head.rmid == RM_XLOG_ID || head.rmid == 1 {
            let mut b = Vec::with_capacity(tot_len as usize);
            for p in &pieces {
                b.extend_from_slice(p);
            }
            b
        } else {
            header.to_vec()
        };
        let rec = RawRecord {
            lsn: self.pos,
            end: Lsn::new(end),
            xid: head.xid,
            prev: Lsn::new(head.prev),
            info: head.info,
            rmid: head.rmid,
            bytes,
        };
        if let Some(m) = major {
            self.major.get_or_insert(m);
        }
        self.pos = if rec.rmid == RM_XLOG_ID && rec.info & 0xF0 == XLOG_SWITCH {
            // the rest of the segment is unused
            let s = self.seg.bytes();
            Lsn::new((end.div_ceil(s)) * s)
        } else {
            Lsn::new(maxalign(end))
        };
        Ok(Next::Record(rec))
    }
}

/// The main data of a record (what follows its block headers and block
/// data), found by walking the block headers as `DecodeXLogRecord` does.
/// `major` decides the image-compression flag layout (13–14 vs 15+).
pub fn main_data(rec: &RawRecord, major: u32) -> Result<&[u8], DecodeError> {
    let bad = |reason: &str| DecodeError::Malformed {
        lsn: rec.lsn,
        reason: reason.to_owned(),
    };
    let cut = |source| DecodeError::Truncated {
        lsn: rec.lsn,
        what: "block headers",
        source,
    };
    let mut r = ByteReader::new(&rec.bytes);
    r.skip(RECORD_HEADER).map_err(cut)?;
    // bytes of block data and main data after the headers, as they claim
    let mut data_total: usize = 0;
    let mut main_len: usize = 0;
    while r.remaining() > data_total {
        let id = r.u8().map_err(cut)?;
        match id {
            // XLR_BLOCK_ID_DATA_SHORT
            255 => {
                main_len = usize::from(r.u8().map_err(cut)?);
                data_total = data_total.saturating_add(main_len);
            }
            // XLR_BLOCK_ID_DATA_LONG
            254 => {
                main_len = r.u32_le().map_err(cut)? as usize;
                data_total = data_total.saturating_add(main_len);
            }
            // XLR_BLOCK_ID_ORIGIN: replication origin
            253 => r.skip(2).map_err(cut)?,
            // XLR_BLOCK_ID_TOPLEVEL_XID
            252 => r.skip(4).map_err(cut)?,
            // XLogRecordBlockHeader
            0..=32 => {
                let flags = r.u8().map_err(cut)?;
                data_total = data_total.saturating_add(usize::from(r.u16_le().map_err(cut)?));
                if flags & 0x10 != 0 {
                    // XLogRecordBlockImageHeader: length, hole offset, info
                    // (+ hole length when compressed with a hole)
                    let len = usize::from(r.u16_le().map_err(cut)?);
                    r.skip(2).map_err(cut)?;
                    let bimg_info = r.u8().map_err(cut)?;
                    let compressed = if major >= 15 {
                        bimg_info & 0x1C != 0
                    } else {
                        bimg_info & 0x02 != 0
                    };
                    if bimg_info & 0x01 != 0 && compressed {
                        r.skip(2).map_err(cut)?;
                    }
                    data_total = data_total.saturating_add(len);
                }
                if flags & 0x80 == 0 {
                    r.skip(12).map_err(cut)?; // RelFileLocator
                }
                r.skip(4).map_err(cut)?; // block number
            }
            _ => return Err(bad(&format!("unknown block id {id}"))),
        }
    }
    let data = r.peek_rest();
    if data.len() != data_total {
        return Err(bad("block data lengths do not add up"));
    }
    // main data comes last; its length is counted in data_total
    data.len()
        .checked_sub(main_len)
        .and_then(|from| data.get(from..))
        .ok_or_else(|| bad("block data lengths do not add up"))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_cut_block_header_says_where() {
        let mut bytes = vec![0u8; RECORD_HEADER];
        bytes.extend_from_slice(&[0, 0x00]); // block 0, flags, then nothing
        let rec = RawRecord {
            lsn: Lsn::new(0x0100_0028),
            end: Lsn::new(0x0100_0042),
            xid: 0,
            prev: Lsn::new(0),
            info: 0,
            rmid: 10,
            bytes,
        };
        let e = main_data(&rec, 15).unwrap_err();
        assert_eq!(
            e,
            DecodeError::Truncated {
                lsn: Lsn::new(0x0100_0028),
                what: "block headers",
                source: Truncated {
                    at: 26,
                    need: 2,
                    end: 26
                }
            }
        );
        assert_eq!(
            e.to_string(),
            "record at 0/1000028 is cut short in its block headers: \
             input ends at byte 26: 2 byte(s) needed at byte 26"
        );
    }

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
            let mut r = WalReader::new(Lsn::new(3 << 20), seg);
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
