//! Backend messages of the PostgreSQL protocol v3, sans-IO: [`parse`] takes
//! bytes already received and returns whole messages, never panicking on bad
//! input. Frontend messages are encoded with `postgres_protocol`.
//!
//! Own parsing (rather than `postgres_protocol::message::backend`) because
//! replication needs CopyBothResponse ('W'), which that parser does not know.

use bytes::{Buf, Bytes, BytesMut};

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
#[error("protocol error in a {tag:?} message: {reason}")]
pub struct WireError {
    /// The message tag.
    pub tag: char,
    /// What is wrong.
    pub reason: String,
}

/// Take one whole message off the front of `buf`, if it holds one.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Backend>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let err = |reason: String| WireError {
        tag: tag as char,
        reason,
    };
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(err(format!("invalid length {len}")));
    }
    if buf.len() < len + 1 {
        // no reserve(len): a hostile length must not allocate a gigabyte up
        // front; the reader grows the buffer as bytes actually arrive
        return Ok(None);
    }
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    decode(tag, body).map(Some).map_err(err)
}

fn decode(tag: u8, mut b: Bytes) -> Result<Backend, String> {
    Ok(match tag {
        b'R' => Backend::Authentication(auth(&mut b)?),
        b'S' => Backend::ParameterStatus {
            name: cstr(&mut b)?,
            value: cstr(&mut b)?,
        },
        b'K' => Backend::BackendKeyData,
        b'Z' => Backend::ReadyForQuery(u8_(&mut b)?),
        b'T' => {
            let n = i16_(&mut b)?;
            let mut cols = Vec::with_capacity(n.clamp(0, 1024) as usize);
            for _ in 0..n {
                cols.push(cstr(&mut b)?);
                need(&b, 18)?;
                b.advance(18);
            }
            Backend::RowDescription(cols)
        }
        b'D' => {
            let n = i16_(&mut b)?;
            let mut vals = Vec::with_capacity(n.clamp(0, 1024) as usize);
            for _ in 0..n {
                let len = i32_(&mut b)?;
                if len < 0 {
                    vals.push(None);
                } else {
                    need(&b, len as usize)?;
                    vals.push(Some(b.split_to(len as usize)));
                }
            }
            Backend::DataRow(vals)
        }
        b'C' => Backend::CommandComplete(cstr(&mut b)?),
        b'I' => Backend::EmptyQueryResponse,
        b'E' => Backend::Error(fields(&mut b)?),
        b'N' => Backend::Notice(fields(&mut b)?),
        b'H' => Backend::CopyOutResponse,
        b'W' => Backend::CopyBothResponse,
        b'G' => Backend::CopyInResponse,
        b'd' => Backend::CopyData(b),
        b'c' => Backend::CopyDone,
        other => Backend::Other(other),
    })
}

fn need(b: &Bytes, n: usize) -> Result<(), String> {
    if b.len() < n {
        Err(format!("truncated: {n} bytes needed, {} left", b.len()))
    } else {
        Ok(())
    }
}

fn u8_(b: &mut Bytes) -> Result<u8, String> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn i16_(b: &mut Bytes) -> Result<i16, String> {
    need(b, 2)?;
    Ok(b.get_i16())
}

fn i32_(b: &mut Bytes) -> Result<i32, String> {
    need(b, 4)?;
    Ok(b.get_i32())
}

fn cstr(b: &mut Bytes) -> Result<String, String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or("string without terminator")?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Ok(s)
}

fn auth(b: &mut Bytes) -> Result<Auth, String> {
    Ok(match i32_(b)? {
        0 => Auth::Ok,
        3 => Auth::Cleartext,
        5 => {
            need(b, 4)?;
            let mut salt = [0u8; 4];
            b.copy_to_slice(&mut salt);
            Auth::Md5(salt)
        }
        10 => {
            let mut mechs = Vec::new();
            loop {
                let m = cstr(b)?;
                if m.is_empty() {
                    break;
                }
                mechs.push(m);
            }
            Auth::Sasl(mechs)
        }
        11 => Auth::SaslContinue(b.split_off(0)),
        12 => Auth::SaslFinal(b.split_off(0)),
        other => Auth::Unsupported(other),
    })
}

fn fields(b: &mut Bytes) -> Result<ServerMessage, String> {
    let mut m = ServerMessage::default();
    loop {
        let code = u8_(b)?;
        if code == 0 {
            return Ok(m);
        }
        let v = cstr(b)?;
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
