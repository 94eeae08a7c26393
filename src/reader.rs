//! One checked reader for bytes that come from the network, the repository
//! or a file: every getter either returns the bytes it was asked for or
//! [`Truncated`], which says at which offset the input ended and how much
//! was missing. Nothing here panics, whatever the input.
//!
//! The reader knows nothing of what it reads: a decoder maps [`Truncated`]
//! into its own error with its own context (the LSN of a record, an object
//! key, an offset in a tar stream), e.g.
//! `r.u32_le().map_err(|t| DecodeError::Truncated { lsn, what: "xinfo", source: t })`.
//!
//! Integers come in both byte orders because both are on the wire: the
//! PostgreSQL protocol is big-endian, WAL and walvault's own formats are
//! little-endian. Offsets are counted from the start of the slice given to
//! [`ByteReader::new`] plus the base given to [`ByteReader::with_base`], so a
//! reader over a part of a larger buffer can report offsets in the whole.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

/// The input ended before a read could be satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("input ends at byte {end}: {need} byte(s) needed at byte {at}")]
pub struct Truncated {
    /// Offset where the read began.
    pub at: usize,
    /// Bytes the read needed (for a C string: at least one more than were
    /// left, as no terminator was found).
    pub need: usize,
    /// Offset where the input ends.
    pub end: usize,
}

/// A cursor over a byte slice; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ByteReader<'a> {
    /// What is not read yet.
    rest: &'a [u8],
    /// Offset of `rest[0]`.
    pos: usize,
}

macro_rules! int_getters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty, $from:ident;)*) => {
        $(
            $(#[$doc])*
            #[inline]
            pub fn $name(&mut self) -> Result<$ty, Truncated> {
                self.array().map(<$ty>::$from)
            }
        )*
    };
}

impl<'a> ByteReader<'a> {
    /// A reader at the start of `data` (offsets count from 0).
    #[inline]
    pub fn new(data: &'a [u8]) -> ByteReader<'a> {
        ByteReader { rest: data, pos: 0 }
    }

    /// A reader over `data` that sits at offset `base` of a larger input:
    /// positions and errors count from the start of that input.
    #[inline]
    pub fn with_base(data: &'a [u8], base: usize) -> ByteReader<'a> {
        ByteReader {
            rest: data,
            pos: base,
        }
    }

    /// Offset of the next byte to read.
    #[inline]
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left to read.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Whether everything was read.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The bytes left, without consuming them.
    #[inline]
    pub fn peek_rest(&self) -> &'a [u8] {
        self.rest
    }

    /// The bytes left, consumed: the reader is empty afterwards.
    #[inline]
    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.rest;
        self.pos = self.pos.saturating_add(r.len());
        self.rest = &[];
        r
    }

    #[cold]
    #[inline(never)]
    fn truncated(&self, need: usize) -> Truncated {
        Truncated {
            at: self.pos,
            need,
            end: self.pos.saturating_add(self.rest.len()),
        }
    }

    /// The next `n` bytes.
    #[inline]
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        match self.rest.split_at_checked(n) {
            Some((head, tail)) => {
                self.rest = tail;
                self.pos = self.pos.saturating_add(n);
                Ok(head)
            }
            None => Err(self.truncated(n)),
        }
    }

    /// The next `N` bytes as an array.
    #[inline]
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                self.pos = self.pos.saturating_add(N);
                Ok(*head)
            }
            None => Err(self.truncated(N)),
        }
    }

    /// Skip `n` bytes.
    #[inline]
    pub fn skip(&mut self, n: usize) -> Result<(), Truncated> {
        self.bytes(n).map(|_| ())
    }

    /// The bytes up to the next NUL, which is consumed too (the NUL is not
    /// part of the result).
    pub fn cstr(&mut self) -> Result<&'a [u8], Truncated> {
        let Some(end) = self.rest.iter().position(|&c| c == 0) else {
            return Err(self.truncated(self.rest.len() + 1));
        };
        let (s, tail) = self.rest.split_at(end);
        self.rest = tail.get(1..).unwrap_or_default();
        self.pos = self.pos.saturating_add(end + 1);
        Ok(s)
    }

    /// One byte.
    #[inline]
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        match self.rest.split_first() {
            Some((&b, tail)) => {
                self.rest = tail;
                self.pos = self.pos.saturating_add(1);
                Ok(b)
            }
            None => Err(self.truncated(1)),
        }
    }

    int_getters! {
        /// A little-endian u16.
        u16_le: u16, from_le_bytes;
        /// A big-endian u16.
        u16_be: u16, from_be_bytes;
        /// A big-endian i16.
        i16_be: i16, from_be_bytes;
        /// A little-endian u32.
        u32_le: u32, from_le_bytes;
        /// A big-endian u32.
        u32_be: u32, from_be_bytes;
        /// A big-endian i32.
        i32_be: i32, from_be_bytes;
        /// A little-endian u64.
        u64_le: u64, from_le_bytes;
        /// A big-endian u64.
        u64_be: u64, from_be_bytes;
        /// A little-endian i64.
        i64_le: i64, from_le_bytes;
        /// A big-endian i64.
        i64_be: i64, from_be_bytes;
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_in_both_byte_orders() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        let mut r = ByteReader::new(&data);
        assert_eq!(r.u16_le().unwrap(), 0x0201);
        assert_eq!(r.u16_be().unwrap(), 0x0304);
        assert_eq!(r.u32_le().unwrap(), 0x0807_0605);
        assert_eq!(r.position(), 8);
        assert_eq!(r.u64_be().unwrap(), 0x090a_0b0c_0d0e_0f10);
        assert!(r.is_empty());
        let mut r = ByteReader::new(&data);
        assert_eq!(r.u64_le().unwrap(), 0x0807_0605_0403_0201);
        assert_eq!(r.i64_be().unwrap(), 0x090a_0b0c_0d0e_0f10);
        let neg = (-2i32).to_be_bytes();
        assert_eq!(ByteReader::new(&neg).i32_be().unwrap(), -2);
        assert_eq!(ByteReader::new(&[0xff, 0xfe]).i16_be().unwrap(), -2);
        assert_eq!(
            ByteReader::new(&(-3i64).to_le_bytes()).i64_le().unwrap(),
            -3
        );
        assert_eq!(
            ByteReader::new(&[9, 8, 7]).u32_be(),
            Err(Truncated {
                at: 0,
                need: 4,
                end: 3
            })
        );
    }

    #[test]
    fn truncation_says_where_and_consumes_nothing() {
        let data = [1u8, 2, 3, 4, 5];
        let mut r = ByteReader::with_base(&data, 100);
        r.skip(3).unwrap();
        let e = r.u32_le().unwrap_err();
        assert_eq!(
            e,
            Truncated {
                at: 103,
                need: 4,
                end: 105
            }
        );
        assert_eq!(
            e.to_string(),
            "input ends at byte 105: 4 byte(s) needed at byte 103"
        );
        // nothing was consumed by the failed read
        assert_eq!(r.position(), 103);
        assert_eq!(r.bytes(2).unwrap(), &[4, 5]);
        assert_eq!(
            r.u8(),
            Err(Truncated {
                at: 105,
                need: 1,
                end: 105
            })
        );
        assert_eq!(r.skip(usize::MAX).unwrap_err().need, usize::MAX);
    }

    #[test]
    fn cstr_rest_and_peek() {
        let mut r = ByteReader::new(b"abc\0\0de");
        assert_eq!(r.cstr().unwrap(), b"abc");
        assert_eq!(r.cstr().unwrap(), b"");
        assert_eq!(r.position(), 5);
        assert_eq!(
            r.cstr(),
            Err(Truncated {
                at: 5,
                need: 3,
                end: 7
            })
        );
        assert_eq!(r.peek_rest(), b"de");
        assert_eq!(r.remaining(), 2);
        assert_eq!(r.rest(), b"de");
        assert_eq!(r.position(), 7);
        assert!(r.is_empty());
        assert_eq!(r.rest(), b"");
        assert_eq!(r.array::<0>().unwrap(), [0u8; 0]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        U8,
        U16Le,
        U16Be,
        I16Be,
        U32Le,
        U32Be,
        I32Be,
        U64Le,
        U64Be,
        I64Le,
        I64Be,
        Bytes(usize),
        Skip(usize),
        Array3,
        Cstr,
        Rest,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::U8),
            Just(Op::U16Le),
            Just(Op::U16Be),
            Just(Op::I16Be),
            Just(Op::U32Le),
            Just(Op::U32Be),
            Just(Op::I32Be),
            Just(Op::U64Le),
            Just(Op::U64Be),
            Just(Op::I64Le),
            Just(Op::I64Be),
            any::<usize>().prop_map(Op::Bytes),
            (0usize..20).prop_map(Op::Bytes),
            any::<usize>().prop_map(Op::Skip),
            (0usize..20).prop_map(Op::Skip),
            Just(Op::Array3),
            Just(Op::Cstr),
            Just(Op::Rest),
        ]
    }

    proptest! {
        /// Any sequence of reads on any input: no panic, a read either
        /// consumes exactly its width or fails and consumes nothing, and
        /// the position always accounts for every byte.
        #[test]
        fn no_getter_ever_panics(
            data in proptest::collection::vec(any::<u8>(), 0..64),
            base in 0usize..1000,
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let mut r = ByteReader::with_base(&data, base);
            for op in ops {
                let before = r.position();
                let left = r.remaining();
                let (ok, width) = match op {
                    Op::U8 => (r.u8().is_ok(), 1),
                    Op::U16Le => (r.u16_le().is_ok(), 2),
                    Op::U16Be => (r.u16_be().is_ok(), 2),
                    Op::I16Be => (r.i16_be().is_ok(), 2),
                    Op::U32Le => (r.u32_le().is_ok(), 4),
                    Op::U32Be => (r.u32_be().is_ok(), 4),
                    Op::I32Be => (r.i32_be().is_ok(), 4),
                    Op::U64Le => (r.u64_le().is_ok(), 8),
                    Op::U64Be => (r.u64_be().is_ok(), 8),
                    Op::I64Le => (r.i64_le().is_ok(), 8),
                    Op::I64Be => (r.i64_be().is_ok(), 8),
                    Op::Bytes(n) => (r.bytes(n).map(|b| b.len() == n).unwrap_or(false), n),
                    Op::Skip(n) => (r.skip(n).is_ok(), n),
                    Op::Array3 => (r.array::<3>().is_ok(), 3),
                    Op::Cstr => match r.cstr() {
                        Ok(s) => (true, s.len() + 1),
                        Err(e) => {
                            prop_assert_eq!(e.at, before);
                            prop_assert_eq!(e.end, before + left);
                            (false, 0)
                        }
                    },
                    Op::Rest => (r.rest().len() == left, left),
                };
                if ok {
                    prop_assert!(width <= left);
                    prop_assert_eq!(r.position(), before + width);
                } else {
                    prop_assert!(width > left || matches!(op, Op::Cstr));
                    prop_assert_eq!(r.position(), before);
                }
                prop_assert_eq!(r.position() + r.remaining(), base + data.len());
            }
        }

        /// Values read equal those written, in order.
        #[test]
        fn round_trip(a: u8, b: u16, c: i32, d: u64, e: i64, s in "[a-z]{0,10}") {
            let mut buf = vec![a];
            buf.extend_from_slice(&b.to_le_bytes());
            buf.extend_from_slice(&c.to_be_bytes());
            buf.extend_from_slice(&d.to_le_bytes());
            buf.extend_from_slice(&e.to_be_bytes());
            buf.extend_from_slice(s.as_bytes());
            buf.push(0);
            let mut r = ByteReader::new(&buf);
            prop_assert_eq!(r.u8().unwrap(), a);
            prop_assert_eq!(r.u16_le().unwrap(), b);
            prop_assert_eq!(r.i32_be().unwrap(), c);
            prop_assert_eq!(r.u64_le().unwrap(), d);
            prop_assert_eq!(r.i64_be().unwrap(), e);
            prop_assert_eq!(r.cstr().unwrap(), s.as_bytes());
            prop_assert!(r.is_empty());
        }
    }
}
