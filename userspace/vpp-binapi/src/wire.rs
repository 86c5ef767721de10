//! VPP's binary-API wire format.
//!
//! - Fields are packed back to back in declaration order, no padding.
//! - Integers are big-endian; `bool` is one byte; an enum is its `enumtype`.
//! - `f64` is the exception: VPP does not byte-swap it, so it travels in host order, which
//!   is little-endian on every platform VPP runs on (x86-64, arm64). We always write LE.
//! - Fixed arrays are N encoded elements; `u8[N]` are raw bytes.
//! - `string s[N]` is exactly N bytes, NUL-padded, at most N-1 characters;
//!   `string s[]` is a big-endian u32 byte count and the bytes.
//! - A variable array has no prefix of its own: its count is an earlier field.
//! - A union is the size of its largest arm, the chosen arm zero-padded.
//!
//! A frame on the socket is a 16-byte header (`u64 q`, `u32 data_len` big-endian,
//! `u32 gc_mark_timestamp`) and `data_len` bytes of payload.

/// Length of the socket frame header.
pub const FRAME_HEADER_LEN: usize = 16;

/// A message could not be encoded. Names the field (`message.field`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// A fixed-size string field holds more than it can carry.
    #[error("{field}: string of {len} bytes does not fit (at most {max})")]
    StringTooLong {
        /// `type.field`.
        field: &'static str,
        /// Bytes in the value.
        len: usize,
        /// Longest value the field takes (its size minus the NUL).
        max: usize,
    },
    /// A fixed-size string has a NUL byte inside (VPP would cut it there).
    #[error("{field}: string has a NUL byte at {at}")]
    StringHasNul {
        /// `type.field`.
        field: &'static str,
        /// Position of the NUL.
        at: usize,
    },
    /// A variable string longer than its u32 length prefix allows.
    #[error("{field}: string of {len} bytes is too long for the wire")]
    VarStringTooLong {
        /// `type.field`.
        field: &'static str,
        /// Bytes in the value.
        len: usize,
    },
    /// A variable array's count field disagrees with the array.
    #[error("{field}: count field {count_field} says {count} but the array has {len} elements")]
    CountMismatch {
        /// `type.array`.
        field: &'static str,
        /// The field holding the count.
        count_field: &'static str,
        /// Its value.
        count: u64,
        /// Elements in the array.
        len: usize,
    },
}

/// A payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ended inside a field.
    #[error("{field}: payload ends after {have} more bytes, {need} needed")]
    Truncated {
        /// What was being read.
        field: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A variable array's count is larger than the rest of the payload could hold.
    #[error("{field}: count {count} needs more bytes than the {have} left")]
    CountTooLarge {
        /// `type.array`.
        field: &'static str,
        /// The count read.
        count: u64,
        /// Bytes left.
        have: usize,
    },
    /// The payload's message id is not the expected message's.
    #[error("expected message {expected} (id {expected_id}), got id {got}")]
    WrongMessage {
        /// The expected message's name.
        expected: &'static str,
        /// Its id.
        expected_id: u16,
        /// The id found.
        got: u16,
    },
}

/// A value with a VPP wire encoding.
pub trait Wire: Sized {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError>;
    /// Reads one value.
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

/// A cursor over a payload.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { field, need: n, have: self.remaining() });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next `N` bytes as an array.
    pub fn array_bytes<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    /// A `string s[n]`: n bytes, cut at the first NUL. Bytes that are not UTF-8 are replaced
    /// (VPP does not promise UTF-8; a reply is never refused for it).
    pub fn fixed_string(&mut self, n: usize, field: &'static str) -> Result<String, DecodeError> {
        let b = self.take(n, field)?;
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        Ok(String::from_utf8_lossy(&b[..end]).into_owned())
    }

    /// A `string s[]`: u32 length, then the bytes.
    pub fn var_string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = u32::decode(self)? as usize;
        let b = self.take(len, field)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// `count` elements of at least `min_size` bytes each.
    pub fn array<T: Wire>(&mut self, count: u64, min_size: usize, field: &'static str) -> Result<Vec<T>, DecodeError> {
        if count.saturating_mul(min_size as u64) > self.remaining() as u64 {
            return Err(DecodeError::CountTooLarge { field, count, have: self.remaining() });
        }
        (0..count).map(|_| T::decode(self)).collect()
    }
}

macro_rules! be_int {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
                out.extend_from_slice(&self.to_be_bytes());
                Ok(())
            }
            fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Ok(<$t>::from_be_bytes(r.array_bytes(stringify!($t))?))
            }
        }
    )*};
}
be_int!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Wire for bool {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.push(u8::from(*self));
        Ok(())
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(r.take(1, "bool")?[0] != 0)
    }
}

impl Wire for f64 {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.extend_from_slice(&self.to_le_bytes());
        Ok(())
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(f64::from_le_bytes(r.array_bytes("f64")?))
    }
}

impl<T: Wire, const N: usize> Wire for [T; N] {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        for x in self {
            x.encode(out)?;
        }
        Ok(())
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let v: Vec<T> = (0..N).map(|_| T::decode(r)).collect::<Result<_, _>>()?;
        match v.try_into() {
            Ok(a) => Ok(a),
            Err(_) => unreachable!("exactly N elements were decoded"),
        }
    }
}

/// Writes `string field[n]`.
pub fn put_fixed_string(out: &mut Vec<u8>, s: &str, n: usize, field: &'static str) -> Result<(), EncodeError> {
    let b = s.as_bytes();
    if let Some(at) = b.iter().position(|&c| c == 0) {
        return Err(EncodeError::StringHasNul { field, at });
    }
    if b.len() >= n {
        return Err(EncodeError::StringTooLong { field, len: b.len(), max: n.saturating_sub(1) });
    }
    out.extend_from_slice(b);
    out.resize(out.len() + (n - b.len()), 0);
    Ok(())
}

/// Writes `string field[]`.
pub fn put_var_string(out: &mut Vec<u8>, s: &str, field: &'static str) -> Result<(), EncodeError> {
    let len = u32::try_from(s.len()).map_err(|_| EncodeError::VarStringTooLong { field, len: s.len() })?;
    len.encode(out)?;
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Checks that a count field agrees with its array.
pub fn check_count(field: &'static str, count_field: &'static str, count: u64, len: usize) -> Result<(), EncodeError> {
    if count != len as u64 {
        return Err(EncodeError::CountMismatch { field, count_field, count, len });
    }
    Ok(())
}

/// The bytes of a union holding `v` (zero-padded). Arms are plain fixed-size data (checked
/// when the types are generated), so encoding cannot fail.
pub fn union_bytes<T: Wire, const N: usize>(v: &T) -> [u8; N] {
    let mut buf = Vec::with_capacity(N);
    v.encode(&mut buf).expect("union arms are plain fixed-size data");
    let mut out = [0u8; N];
    out[..buf.len()].copy_from_slice(&buf);
    out
}

/// Reads a union's bytes as one of its arms.
pub fn union_arm<T: Wire, const N: usize>(bytes: &[u8; N]) -> T {
    T::decode(&mut Reader::new(bytes)).expect("union arms fit the union")
}

/// Encodes a value into a fresh buffer.
pub fn to_bytes<T: Wire>(v: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    v.encode(&mut out)?;
    Ok(out)
}

/// Decodes a whole buffer (trailing bytes are allowed, as VPP's own clients allow them).
pub fn from_bytes<T: Wire>(buf: &[u8]) -> Result<T, DecodeError> {
    T::decode(&mut Reader::new(buf))
}

/// Serde for fixed arrays of any length, as a JSON list.
pub mod serde_array {
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

    /// Serialises as a sequence.
    pub fn serialize<S: Serializer, T: Serialize, const N: usize>(a: &[T; N], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(a.iter())
    }

    /// Deserialises a sequence of exactly N elements.
    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
        d: D,
    ) -> Result<[T; N], D::Error> {
        let v: Vec<T> = Vec::deserialize(d)?;
        let len = v.len();
        v.try_into().map_err(|_| D::Error::invalid_length(len, &format!("{N} elements").as_str()))
    }
}

/// Builds the 16-byte frame header for a payload of `len` bytes.
pub fn frame_header(len: usize) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[8..12].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// The payload length a frame header announces.
pub fn frame_len(header: &[u8; FRAME_HEADER_LEN]) -> usize {
    u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_big_endian_and_f64_little_endian() {
        assert_eq!(to_bytes(&0x0102_0304u32).unwrap(), [1, 2, 3, 4]);
        assert_eq!(to_bytes(&-2i16).unwrap(), [0xff, 0xfe]);
        assert_eq!(to_bytes(&1.0f64).unwrap(), 1.0f64.to_le_bytes());
        assert_eq!(from_bytes::<u64>(&[0, 0, 0, 0, 0, 0, 1, 0]).unwrap(), 256);
    }

    #[test]
    fn fixed_strings_are_nul_padded_and_bounded() {
        let mut out = vec![];
        put_fixed_string(&mut out, "ab", 4, "t.s").unwrap();
        assert_eq!(out, b"ab\0\0");
        assert_eq!(Reader::new(&out).fixed_string(4, "t.s").unwrap(), "ab");
        let err = put_fixed_string(&mut vec![], "abcd", 4, "t.s").unwrap_err();
        assert_eq!(err, EncodeError::StringTooLong { field: "t.s", len: 4, max: 3 });
        assert!(err.to_string().contains("t.s"));
        assert!(matches!(put_fixed_string(&mut vec![], "a\0b", 8, "t.s"), Err(EncodeError::StringHasNul { .. })));
    }

    #[test]
    fn var_strings_carry_their_length() {
        let mut out = vec![];
        put_var_string(&mut out, "xyz", "t.s").unwrap();
        assert_eq!(out, [0, 0, 0, 3, b'x', b'y', b'z']);
        assert_eq!(Reader::new(&out).var_string("t.s").unwrap(), "xyz");
        assert!(matches!(Reader::new(&out[..5]).var_string("t.s"), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn arrays_refuse_counts_the_payload_cannot_hold() {
        let buf = [0u8; 8];
        let err = Reader::new(&buf).array::<u32>(1_000_000, 4, "t.a").unwrap_err();
        assert!(matches!(err, DecodeError::CountTooLarge { count: 1_000_000, .. }));
        assert_eq!(Reader::new(&buf).array::<u32>(2, 4, "t.a").unwrap(), vec![0, 0]);
    }

    #[test]
    fn frame_header_carries_the_length_big_endian() {
        let h = frame_header(0x1234);
        assert_eq!(h, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 0]);
        assert_eq!(frame_len(&h), 0x1234);
    }
}
