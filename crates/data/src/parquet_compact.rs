//! A reader of the Thrift compact protocol (apache/thrift `doc/specs/thrift-compact-protocol.md`) that
//! walks parquet metadata as the `parquet` crate (v60) reads it, for the checks of
//! [`crate::parquet_footer`] and [`crate::parquet_pages`]: known fields at the types the crate reads
//! them as ([`crate::parquet_thrift`]), everything else skipped as the crate skips it. Where the walk
//! and the crate part ways, the crate reads on from a place the walk never saw, and malformed files
//! there kept it looping for seconds (found by the `parquet` fuzz target, docs/RELIABILITY.md).
//! Every method returns `None` on what it cannot read; [`Compact::mismatch`] and
//! [`Compact::oversized`] tell the caller why when that was a field of the wrong type or a container
//! claiming more elements than the bytes left could hold.

use crate::parquet_thrift::{self as types, Def, Ty};

/// Thrift compact protocol type ids (`thrift-compact-protocol.md`, "Field types").
pub(crate) mod kind {
    pub const TRUE: u8 = 1;
    pub const FALSE: u8 = 2;
    pub const BYTE: u8 = 3;
    pub const I16: u8 = 4;
    pub const I32: u8 = 5;
    pub const I64: u8 = 6;
    pub const DOUBLE: u8 = 7;
    pub const BINARY: u8 = 8;
    pub const LIST: u8 = 9;
    pub const SET: u8 = 10;
    pub const MAP: u8 = 11;
    pub const STRUCT: u8 = 12;
    pub const UUID: u8 = 13;
}

/// How deep this reader follows nested structs and containers before leaving the footer to the
/// crate (Parquet's own metadata nests a few levels).
const MAX_DEPTH: usize = 64;

/// A reader of the Thrift compact protocol over a byte slice; `None` on anything it cannot read.
pub(crate) struct Compact<'a> {
    bytes: &'a [u8],
    at: usize,
    /// A list, set or map that claimed more elements than the bytes left could hold (in a sound
    /// file each takes at least one, booleans included): `(claimed, bytes left)`. The `parquet` crate (v60) skips the
    /// booleans of a list it does not know without reading a byte, so such a claim of 2³¹ elements
    /// kept it looping for seconds (found by the `parquet` fuzz target).
    pub(crate) oversized: Option<(u64, u64)>,
    /// A field or list element of another type than the `parquet` crate reads it as
    /// ([`crate::parquet_thrift`]), described.
    pub(crate) mismatch: Option<String>,
}

impl<'a> Compact<'a> {
    /// A reader at the start of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            at: 0,
            oversized: None,
            mismatch: None,
        }
    }

    /// The refusal for a field of the wrong type, or an oversized list, set or map, read in `place`
    /// (e.g. "its footer"), if there was one: "the file is malformed: " and [`Compact::problem`].
    pub(crate) fn refusal(&self, place: &str) -> Option<String> {
        self.problem(place)
            .map(|problem| format!("the file is malformed: {problem}"))
    }

    /// What was wrong in `place`: a field of the wrong type, or an oversized list, set or map.
    pub(crate) fn problem(&self, place: &str) -> Option<String> {
        self.mismatch
            .as_ref()
            .map(|mismatch| format!("in {place}, {mismatch}"))
            .or_else(|| {
                self.oversized.map(|(claimed, left)| {
                    format!("a list in {place} claims {claimed} elements with {left} bytes left")
                })
            })
    }

    /// Reads field `id` of wire type `wire` in a struct `def`: as the crate reads it where `def`
    /// has the field (a field of another type is noted in [`Compact::mismatch`]: `None`), else
    /// skipped by its own type.
    pub(crate) fn field(&mut self, def: &Def, id: i16, wire: u8, depth: usize) -> Option<()> {
        let Some(ty) = def.field(id) else {
            return self.skip(wire, depth);
        };
        if !ty.accepts(wire) {
            self.mismatch.get_or_insert_with(|| {
                format!(
                    "field {id} of {} is a {}, where a {} is read",
                    def.name,
                    types::wire_name(wire),
                    ty.name()
                )
            });
            return None;
        }
        self.value(ty, wire, depth)
    }

    /// Reads a value of type `ty` (its wire type `wire` accepted).
    fn value(&mut self, ty: Ty, wire: u8, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match ty {
            Ty::Struct(def) => {
                let mut last_id = 0i16;
                loop {
                    let (id, field) = self.field_header(&mut last_id)?;
                    if field == 0 {
                        return Some(());
                    }
                    self.field(def, id, field, depth + 1)?;
                }
            }
            Ty::List(element) => {
                let (size, element_wire) = self.list_header()?;
                let size = self.bounded(size)?;
                if size > 0 && !element.accepts(element_wire) {
                    self.mismatch.get_or_insert_with(|| {
                        format!(
                            "a list of {} holds {}s",
                            element.name(),
                            types::wire_name(element_wire)
                        )
                    });
                    return None;
                }
                for _ in 0..size {
                    match element {
                        Ty::Bool => self.advance(1)?,
                        other => self.value(*other, element_wire, depth + 1)?,
                    }
                }
                Some(())
            }
            // A scalar: its bytes are the same read or skipped.
            _ => self.skip(wire, depth),
        }
    }

    /// How many bytes have been read.
    pub(crate) fn position(&self) -> usize {
        self.at
    }

    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// An unsigned varint as the crate reads it (`read_vlq`): any number of bytes, bits shifted
    /// past the 64th wrapping around, so that this reader sees the values the crate will.
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f).wrapping_shl(shift);
            if b & 0x80 == 0 {
                return Some(value);
            }
            shift = shift.wrapping_add(7);
        }
    }

    pub(crate) fn zigzag(&mut self) -> Option<i64> {
        let v = self.varint()?;
        Some((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn advance(&mut self, n: u64) -> Option<()> {
        let end = self.at.checked_add(usize::try_from(n).ok()?)?;
        (end <= self.bytes.len()).then(|| self.at = end)
    }

    /// A field header: `(field id, type)`; type 0 is the end of the struct.
    pub(crate) fn field_header(&mut self, last_id: &mut i16) -> Option<(i16, u8)> {
        let b = self.byte()?;
        let kind = b & 0x0f;
        if kind == 0 {
            return Some((0, 0));
        }
        let delta = b >> 4;
        // As the crate reads them: a full id truncated to i16, a delta added to the last.
        let id = if delta == 0 {
            self.zigzag()? as i16
        } else {
            last_id.wrapping_add(i16::from(delta))
        };
        *last_id = id;
        Some((id, kind))
    }

    /// A list or set header: `(size, element type)`.
    pub(crate) fn list_header(&mut self) -> Option<(u64, u8)> {
        let b = self.byte()?;
        if b == 0 {
            // Some writers mark an empty list with a zero byte.
            return Some((0, kind::BYTE));
        }
        let size = match b >> 4 {
            15 => self.varint()?,
            short => u64::from(short),
        };
        Some((size, b & 0x0f))
    }

    /// Skips one value of type `kind` as the `parquet` crate (v60, `skip_till_depth`) does: a
    /// boolean takes no byte, even as a list, set or map element, where the protocol gives it one.
    /// Following the crate rather than the protocol keeps the walk where the crate reads: a footer
    /// whose list of booleans the crate skipped short of its bytes then read the rest as a list of
    /// two billion elements (found by the `parquet` fuzz target).
    pub(crate) fn skip(&mut self, kind: u8, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match kind {
            kind::TRUE | kind::FALSE => Some(()),
            kind::BYTE => self.advance(1),
            kind::I16 | kind::I32 | kind::I64 => self.varint().map(|_| ()),
            kind::DOUBLE => self.advance(8),
            kind::UUID => self.advance(16),
            kind::BINARY => {
                let len = self.varint()?;
                self.advance(len)
            }
            kind::LIST | kind::SET => {
                let (size, element) = self.list_header()?;
                for _ in 0..self.bounded(size)? {
                    self.skip(element, depth + 1)?;
                }
                Some(())
            }
            kind::MAP => {
                let size = self.varint()?;
                if size == 0 {
                    return Some(());
                }
                let kinds = self.byte()?;
                for _ in 0..self.bounded(size)? {
                    self.skip(kinds >> 4, depth + 1)?;
                    self.skip(kinds & 0x0f, depth + 1)?;
                }
                Some(())
            }
            kind::STRUCT => {
                let mut last_id = 0;
                loop {
                    let (_, field) = self.field_header(&mut last_id)?;
                    if field == 0 {
                        return Some(());
                    }
                    self.skip(field, depth + 1)?;
                }
            }
            _ => None,
        }
    }

    /// `size` when the bytes left could hold that many elements (each takes at least one); else
    /// `None`, noted in [`Compact::oversized`].
    pub(crate) fn bounded(&mut self, size: u64) -> Option<u64> {
        let left = (self.bytes.len() - self.at) as u64;
        if size <= left {
            Some(size)
        } else {
            self.oversized.get_or_insert((size, left));
            None
        }
    }
}

/// `v` in the compact protocol's zigzag varint, for tests that write Thrift bytes.
#[cfg(test)]
pub(crate) fn zigzag(v: i64) -> Vec<u8> {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}
