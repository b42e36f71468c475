//! A look at a parquet file's footer before the `parquet` crate decodes it, for the one count the
//! crate (v60) trusts enough to allocate by: a schema element's `num_children`
//! (`schema_from_array_helper` reserves that many children before reading any). A malformed file
//! claiming 500 million children made it reserve 4 GB, and an allocation that fails aborts the
//! process — no error, no unwinding (found by the `parquet` fuzz target, docs/RELIABILITY.md).
//!
//! The footer is the file's metadata, a Thrift struct `FileMetaData` in the compact protocol
//! (apache/parquet-format `parquet.thrift`; the protocol: apache/thrift
//! `doc/specs/thrift-compact-protocol.md`), then its length (4 bytes, little-endian) and `PAR1`.
//! Field 2 of `FileMetaData` is the schema, a list of `SchemaElement` structs, depth first; field 5
//! of an element is its `num_children`. A tree of `n` elements has no node of more than `n - 1`
//! children, so a larger (or negative) count is refused here, naming the element. Anything this
//! reader cannot follow (another magic, a truncated or odd footer) is left to the crate, which
//! reports it as its own error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

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

/// Why the footer of `file` (`len` bytes long) is refused; `None` when it is sound or when this
/// reader cannot tell (the crate then decodes it and reports what it finds).
pub(crate) fn refusal(file: &mut File, len: u64) -> Option<String> {
    if len < 12 {
        return None;
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::End(-8)).ok()?;
    file.read_exact(&mut tail).ok()?;
    if &tail[4..] != b"PAR1" {
        return None;
    }
    let metadata_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if metadata_len + 8 > len {
        return None;
    }
    let mut metadata = vec![0u8; usize::try_from(metadata_len).ok()?];
    file.seek(SeekFrom::End(-8 - i64::try_from(metadata_len).ok()?))
        .ok()?;
    file.read_exact(&mut metadata).ok()?;
    let refusal = schema_refusal(&metadata);
    // The crate reads the file again from its start.
    file.seek(SeekFrom::Start(0)).ok()?;
    refusal
}

/// The refusal of a `FileMetaData` struct (module documentation), if any: its schema, a field of
/// another type than the crate reads, a list, set or map claiming more elements than the bytes left
/// could hold — or anything this reader cannot follow to the struct's end: a footer the crate would
/// read on from there is one it may misread (a sound file's footer is plain `parquet.thrift`).
fn schema_refusal(metadata: &[u8]) -> Option<String> {
    let mut reader = Compact::new(metadata);
    match reader.file_metadata() {
        Walk::Refused(refusal) => Some(refusal),
        Walk::End => None,
        Walk::Unreadable => Some(reader.refusal("its footer").unwrap_or_else(|| {
            format!(
                "the file is malformed: its footer cannot be read past byte {} of {}",
                reader.position(),
                metadata.len()
            )
        })),
    }
}

/// How a walk of a footer ended.
enum Walk {
    Refused(String),
    End,
    Unreadable,
}

/// A reader of the Thrift compact protocol over a byte slice; `None` on anything it cannot read.
pub(crate) struct Compact<'a> {
    bytes: &'a [u8],
    at: usize,
    /// A list, set or map that claimed more elements than the bytes left could hold (each takes at
    /// least one, booleans included): `(claimed, bytes left)`. The `parquet` crate (v60) skips the
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

    /// Walks a `FileMetaData` struct as the crate reads it: the refusal of its schema (field 2),
    /// its end, or where it cannot be read (see [`Compact::refusal`]).
    fn file_metadata(&mut self) -> Walk {
        let mut last_id = 0i16;
        loop {
            let Some((id, kind)) = self.field_header(&mut last_id) else {
                return Walk::Unreadable;
            };
            if kind == 0 {
                return Walk::End;
            }
            if id == 2 && (kind == kind::LIST || kind == kind::SET) {
                match self.schema_list() {
                    Some(Some(refusal)) => return Walk::Refused(refusal),
                    Some(None) => {}
                    None => return Walk::Unreadable,
                }
            } else if self.field(&types::FILE_META_DATA, id, kind, 0).is_none() {
                return Walk::Unreadable;
            }
        }
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
    fn list_header(&mut self) -> Option<(u64, u8)> {
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
    fn bounded(&mut self, size: u64) -> Option<u64> {
        let left = (self.bytes.len() - self.at) as u64;
        if size <= left {
            Some(size)
        } else {
            self.oversized.get_or_insert((size, left));
            None
        }
    }

    /// The schema list (its header next): each element's `num_children` against the list's size.
    /// `Some(None)` when sound (the reader then after the list), `None` when it cannot be read.
    fn schema_list(&mut self) -> Option<Option<String>> {
        let (size, element) = self.list_header()?;
        let size = self.bounded(size)?;
        if size > 0 && element != kind::STRUCT {
            self.mismatch.get_or_insert_with(|| {
                format!(
                    "the schema is a list of {}s, where SchemaElement structs are read",
                    types::wire_name(element)
                )
            });
            return None;
        }
        for index in 0..size {
            let mut last_id = 0;
            loop {
                let (id, kind) = self.field_header(&mut last_id)?;
                if kind == 0 {
                    break;
                }
                if id == 5 && kind == kind::I32 {
                    // Truncated to i32, as the crate's `read_i32` does.
                    let children = self.zigzag()? as i32;
                    if children < 0 || children as u64 >= size {
                        return Some(Some(format!(
                            "the file is malformed: schema element {index} claims {children} \
                             children in a schema of {size} elements"
                        )));
                    }
                } else {
                    self.field(&types::SCHEMA_ELEMENT, id, kind, 1)?;
                }
            }
        }
        Some(None)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `FileMetaData` prefix: version 1 (field 1, i32), then the schema (field 2) of `elements`,
    /// each given as its `num_children` (absent for a leaf) with a name, then the struct's end.
    fn metadata(elements: &[Option<i64>]) -> Vec<u8> {
        let mut bytes = vec![0x15]; // field 1, i32
        bytes.extend(zigzag(1));
        bytes.push(0x19); // field 2 (delta 1), list
        assert!(elements.len() < 15);
        bytes.push(((elements.len() as u8) << 4) | kind::STRUCT);
        for children in elements {
            bytes.extend([0x48, 1, b'x']); // field 4, binary "x"
            if let Some(n) = children {
                bytes.push(0x15); // field 5 (delta 1), i32
                bytes.extend(zigzag(*n));
            }
            bytes.push(0); // end of the element
        }
        bytes.push(0); // end of FileMetaData (a real footer goes on with rows, row groups …)
        bytes
    }

    #[test]
    fn a_sound_schema_passes_and_impossible_child_counts_are_named() {
        assert_eq!(schema_refusal(&metadata(&[Some(2), None, None])), None);
        assert_eq!(schema_refusal(&metadata(&[Some(1), Some(1), None])), None);
        let refusal = schema_refusal(&metadata(&[Some(536_870_996), None])).unwrap();
        // (The fuzzer's input wrote its count as a varint of 22 bytes; the crate reads on.)
        assert!(
            refusal.contains("schema element 0 claims 536870996 children in a schema of 2"),
            "{refusal}"
        );
        let refusal = schema_refusal(&metadata(&[Some(1), Some(-3)])).unwrap();
        assert!(refusal.contains("schema element 1 claims -3"), "{refusal}");
        // n elements hold at most n - 1 children of one node.
        assert!(schema_refusal(&metadata(&[Some(2), None])).is_some());
        // A varint of 12 bytes (zigzag 4: 2 children) is read on, as the crate reads it.
        let mut long = vec![0x15, 0x02, 0x19, 0x2c, 0x48, 1, b'x', 0x15, 0x84];
        long.extend([0x80; 10]);
        long.extend([0x00, 0x00, 0x48, 1, b'y', 0x00, 0x00]);
        let refusal = schema_refusal(&long).unwrap();
        assert!(
            refusal.contains("schema element 0 claims 2 children"),
            "{refusal}"
        );
    }

    #[test]
    fn lists_claiming_more_elements_than_bytes_are_refused_anywhere_in_the_footer() {
        // Field 1 (version), then field 3 (num_rows, i64), then field 5 (key_value_metadata): a
        // list of 2^31 booleans in 5 bytes, after a sound schema.
        let mut bytes = metadata(&[Some(1), None]);
        bytes.pop();
        bytes.extend([
            0x16, 0x02, 0x29, 0xf1, 0x80, 0x80, 0x80, 0x80, 0x08, 0x01, 0x01, 0x00,
        ]);
        let refusal = schema_refusal(&bytes).unwrap();
        assert!(
            refusal.contains("a list in its footer claims 2147483648 elements with 3 bytes left"),
            "{refusal}"
        );
        // As the schema's own list header.
        assert!(schema_refusal(&[0x19, 0xfc, 0xff, 0xff, 0xff, 0x0f]).is_some());
    }

    #[test]
    fn fields_of_another_type_than_the_crate_reads_are_refused() {
        // FileMetaData's version (field 1) as a struct, and a schema element's name (field 4) as
        // an i32.
        let refusal = schema_refusal(&[0x1c, 0x00, 0x00]).unwrap();
        assert!(
            refusal.contains("field 1 of FileMetaData is a struct, where a i32 is read"),
            "{refusal}"
        );
        let refusal = schema_refusal(&[0x15, 0x02, 0x19, 0x1c, 0x45, 0x02, 0x00, 0x00]).unwrap();
        assert!(
            refusal.contains("field 4 of SchemaElement is a i32, where a binary is read"),
            "{refusal}"
        );
        // A list of row groups holding i32s; a field the crate does not read (id 15) may be any type.
        let refusal = schema_refusal(&[0x49, 0x15, 0x02, 0x00]).unwrap();
        assert!(
            refusal.contains("a list of RowGroup holds i32s"),
            "{refusal}"
        );
        assert_eq!(schema_refusal(&[0xf5, 0x02, 0x00]), None);
    }

    #[test]
    fn what_it_cannot_follow_is_refused() {
        let whole = metadata(&[Some(2), None, None]);
        assert_eq!(schema_refusal(&whole), None);
        for cut in 0..whole.len() {
            let refusal = schema_refusal(&whole[..cut]).unwrap();
            assert!(
                refusal.contains("the file is malformed"),
                "cut at {cut}: {refusal}"
            );
        }
        // Nesting past the limit, in a field the crate skips (id 15); a UUID (16 bytes) is followed.
        let mut deep = vec![0xfc]; // field 15, struct
        deep.extend(std::iter::repeat_n(0x1c, 200));
        let refusal = schema_refusal(&deep).unwrap();
        assert!(refusal.contains("cannot be read past byte"), "{refusal}");
        let mut uuid = vec![0xfd];
        uuid.extend([7; 16]);
        uuid.push(0);
        assert_eq!(schema_refusal(&uuid), None);
    }
}
