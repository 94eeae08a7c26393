//! Backend messages of the PostgreSQL protocol v3, sans-IO: [`parse`] takes
//! bytes already received and returns whole messages, never panicking on bad
//! input. Frontend messages are encoded with `postgres_protocol`.
//!
//! Own parsing (rather than `postgres_protocol::message::backend`) because
//! replication needs CopyBothResponse ('W'), which that parser does not know.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use bytes::{Buf, Bytes, BytesMut};

use crate::reader::{ByteReader, Truncated};

/// Largest message accepted (1 GiB, PostgreSQL's own limit for a field).
pub const MAX_MESSAGE: usize = 1 << 30;

/// Fields of an ErrorResponse / NoticeResponse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerMessage {
    /// ERROR, FATAL, PANIC, WARNING, NOTICE, ...
    pub severity: String,
    /// SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// DETAIL.
    pub detail: Option<String>,
    /// HINT.
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; DETAIL: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; HINT: {h}")?;
        }
        Ok(())
    }
}

/// An authentication request ('R').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// AuthenticationOk.
    Ok,
    /// Send the password in clear text.
    Cleartext,
    /// Send md5(md5(password + user) + salt).
    Md5([u8; 4]),
    /// SASL with these mechanisms.
    Sasl(Vec<String>),
    /// Next SASL server message.
    SaslContinue(Bytes),
    /// Last SASL server message.
    SaslFinal(Bytes),
    /// A method walvault does not speak (Kerberos, GSS, SSPI).
    Unsupported(i32),
}

/// One backend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// 'R'.
    Authentication(Auth),
    /// 'S'.
    ParameterStatus {
        /// Name.
        name: String,
        /// Value.
        value: String,
    },
    /// 'K'.
    BackendKeyData,
    /// 'Z' with the transaction status byte.
    ReadyForQuery(u8),
    /// 'T': column names.
    RowDescription(Vec<String>),
    /// 'D': column values (None for NULL).
    DataRow(Vec<Option<Bytes>>),
    /// 'C': command tag.
    CommandComplete(String),
    /// 'I'.
    EmptyQueryResponse,
    /// 'E'.
    Error(ServerMessage),
    /// 'N'.
    Notice(ServerMessage),
    /// 'H'.
    CopyOutResponse,
    /// 'W'.
    CopyBothResponse,
    /// 'G'.
    CopyInResponse,
    /// 'd'.
    CopyData(Bytes),
    /// 'c'.
    CopyDone,
    /// Any other tag (ignored by the client).
    Other(u8),
}

/// What is wrong with received bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A length word outside 4 bytes..[`MAX_MESSAGE`].
    #[error("protocol error: a {tag:?} message announces an invalid length {len} (4 to 1 GiB)")]
    BadLength {
        /// The message tag.
        tag: char,
        /// The length word.
        len: usize,
    },
    /// A message whose body ends inside one of its fields.
    #[error(
        "protocol error in a {tag:?} message of {len} bytes: its {field} is cut short ({source})"
    )]
    Truncated {
        /// The message tag.
        tag: char,
        /// Length of the body, bytes.
        len: usize,
        /// The field being read.
        field: &'static str,
        /// Where in the body (offsets from its first byte).
        source: Truncated,
    },
}

/// Take one whole message off the front of `buf`, if it holds one.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Backend>, WireError> {
    let Some(header) = buf.first_chunk::<5>() else {
        return Ok(None);
    };
    let [tag, l0, l1, l2, l3] = *header;
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(WireError::BadLength {
            tag: tag as char,
            len,
        });
    }
    if buf.len() < len + 1 {
        // no reserve(len): a hostile length must not allocate a gigabyte up
        // front; the reader grows the buffer as bytes actually arrive
        return Ok(None);
    }
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    decode(tag, &body).map(Some)
}

/// A reader over a message body that names the field it fails in.
struct Body<'a> {
    bytes: &'a Bytes,
    r: ByteReader<'a>,
    tag: u8,
}

impl<'a> Body<'a> {
    fn err(&self, field: &'static str) -> impl FnOnce(Truncated) -> WireError {
        let (tag, len) = (self.tag as char, self.bytes.len());
        move |source| WireError::Truncated {
            tag,
            len,
            field,
            source,
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        self.r.u8().map_err(self.err(field))
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, WireError> {
        self.r.i16_be().map_err(self.err(field))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, WireError> {
        self.r.i32_be().map_err(self.err(field))
    }

    fn skip(&mut self, n: usize, field: &'static str) -> Result<(), WireError> {
        self.r.skip(n).map_err(self.err(field))
    }

    /// The next `n` bytes, zero-copy.
    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, WireError> {
        let b = self.r.bytes(n).map_err(self.err(field))?;
        Ok(self.bytes.slice_ref(b))
    }

    /// The rest of the body, zero-copy.
    fn rest(&mut self) -> Bytes {
        self.bytes.slice_ref(self.r.rest())
    }

    fn cstr(&mut self, field: &'static str) -> Result<String, WireError> {
        let s = self.r.cstr().map_err(self.err(field))?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }
}

fn decode(tag: u8, b: &Bytes) -> Result<Backend, WireError> {
    let mut b = Body {
        bytes: b,
        r: ByteReader::new(b),
        tag,
    };
    Ok(match tag {
        b'R' => Backend::Authentication(auth(&mut b)?),
        b'S' => Backend::ParameterStatus {
            name: b.cstr("parameter name")?,
            value: b.cstr("parameter value")?,
        },
        b'K' => Backend::BackendKeyData,
        b'Z' => Backend::ReadyForQuery(b.u8("transaction status")?),
        b'T' => {
            let n = b.i16("column count")?;
            let mut cols = Vec::with_capacity(n.clamp(0, 1024) as usize);
            for _ in 0..n {
                cols.push(b.cstr("column name")?);
                b.skip(18, "column description")?;
            }
            Backend::RowDescription(cols)
        }
        b'D' => {
            let n = b.i16("column count")?;
            let mut vals = Vec::with_capacity(n.clamp(0, 1024) as usize);
            for _ in 0..n {
                let len = b.i32("value length")?;
                if len < 0 {
                    vals.push(None);
                } else {
                    vals.push(Some(b.bytes(len as usize, "column value")?));
                }
            }
            Backend::DataRow(vals)
        }
        b'C' => Backend::CommandComplete(b.cstr("command tag")?),
        b'I' => Backend::EmptyQueryResponse,
        b'E' => Backend::Error(fields(&mut b)?),
        b'N' => Backend::Notice(fields(&mut b)?),
        b'H' => Backend::CopyOutResponse,
        b'W' => Backend::CopyBothResponse,
        b'G' => Backend::CopyInResponse,
        b'd' => Backend::CopyData(b.rest()),
        b'c' => Backend::CopyDone,
        other => Backend::Other(other),
    })
}

fn auth(b: &mut Body<'_>) -> Result<Auth, WireError> {
    Ok(match b.i32("authentication type")? {
        0 => Auth::Ok,
        3 => Auth::Cleartext,
        5 => Auth::Md5(b.r.array().map_err(b.err("MD5 salt"))?),
        10 => {
            let mut mechs = Vec::new();
            loop {
                let m = b.cstr("SASL mechanism")?;
                if m.is_empty() {
                    break;
                }
                mechs.push(m);
            }
            Auth::Sasl(mechs)
        }
        11 => Auth::SaslContinue(b.rest()),
        12 => Auth::SaslFinal(b.rest()),
        other => Auth::Unsupported(other),
    })
}

fn fields(b: &mut Body<'_>) -> Result<ServerMessage, WireError> {
    let mut m = ServerMessage::default();
    loop {
        let code = b.u8("field type")?;
        if code == 0 {
            return Ok(m);
        }
        let v = b.cstr("field value")?;
        match code {
            b'V' => m.severity = v,
            b'S' if m.severity.is_empty() => m.severity = v,
            b'C' => m.code = v,
            b'M' => m.message = v,
            b'D' => m.detail = Some(v),
            b'H' => m.hint = Some(v),
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn messages_split_at_every_offset() {
        let mut stream = frame(
            b'E',
            b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0",
        );
        stream.extend(frame(b'W', &[0, 0, 0]));
        stream.extend(frame(b'd', b"payload"));
        stream.extend(frame(b'Z', b"I"));
        for cut in 0..stream.len() {
            let mut buf = BytesMut::from(&stream[..cut]);
            let mut got = Vec::new();
            while let Some(m) = parse(&mut buf).unwrap() {
                got.push(m);
            }
            buf.extend_from_slice(&stream[cut..]);
            while let Some(m) = parse(&mut buf).unwrap() {
                got.push(m);
            }
            assert_eq!(got.len(), 4, "cut at {cut}");
            let Backend::Error(e) = &got[0] else { panic!() };
            assert_eq!(e.code, "42704");
            assert_eq!(got[1], Backend::CopyBothResponse);
            assert_eq!(got[2], Backend::CopyData(Bytes::from_static(b"payload")));
        }
    }

    /// Regression (found by fuzzing): a header announcing a 1 GiB message made
    /// the parser reserve a gigabyte before a single byte of it arrived.
    #[test]
    fn a_huge_announced_length_allocates_nothing() {
        let mut buf = BytesMut::from(&[b'd', 0x3f, 0xff, 0xff, 0xff, 1, 2, 3][..]);
        assert_eq!(parse(&mut buf).unwrap(), None);
        assert!(
            buf.capacity() < 1 << 20,
            "reserved {} bytes",
            buf.capacity()
        );
    }

    #[test]
    fn a_cut_field_says_which_and_where() {
        let mut buf = BytesMut::from(&frame(b'D', &[0, 1, 0, 0, 0, 9, b'x'])[..]);
        let e = parse(&mut buf).unwrap_err();
        assert_eq!(
            e,
            WireError::Truncated {
                tag: 'D',
                len: 7,
                field: "column value",
                source: Truncated {
                    at: 6,
                    need: 9,
                    end: 7
                }
            }
        );
        assert_eq!(
            e.to_string(),
            "protocol error in a 'D' message of 7 bytes: its column value is cut short \
             (input ends at byte 7: 9 byte(s) needed at byte 6)"
        );
        let mut buf = BytesMut::from(&[b'Z', 0, 0, 0, 3][..]);
        assert_eq!(
            parse(&mut buf),
            Err(WireError::BadLength { tag: 'Z', len: 3 })
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = parse(&mut buf) {}
        }

        #[test]
        fn framed_garbage_never_panics(tag in prop::sample::select(b"RSKZTDCIENHWGdc".to_vec()), body in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut buf = BytesMut::from(&frame(tag, &body)[..]);
            let _ = parse(&mut buf);
        }
    }
}
