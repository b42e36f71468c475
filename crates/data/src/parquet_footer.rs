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
//! children, so a larger (or negative) count is refused here, naming the element.
//!
//! The whole footer is walked as the crate reads it ([`crate::parquet_compact`]): a field of another
//! type than the crate reads, a container claiming more elements than the bytes left, and anything
//! the walk cannot follow to the struct's end are refused too, since the crate reading on from there
//! misread such footers into skips of seconds. A file too short for a footer, without the `PAR1`
//! magic or with a footer length past its start is left to the crate, which reports it as its own
//! error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use crate::parquet_compact::{Compact, kind};
use crate::parquet_thrift as types;

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

impl Compact<'_> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet_compact::zigzag;

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
