//! A look at the page headers of a parquet column chunk before the `parquet` crate reads its pages,
//! for the sizes the crate (v60) allocates by before it has seen the data they describe:
//!
//! * a page's `uncompressed_page_size`: the buffer a compressed page is decompressed into is
//!   reserved at that size (`serialized_reader::decode_page`);
//! * a dictionary page's `num_values`: the dictionary is resized to that many values before they
//!   are decoded (`DictDecoder::set_dict`).
//!
//! A malformed file claiming gigabytes there made the reservation fail, and an allocation that
//! fails aborts the process (found by the `parquet` fuzz target, docs/RELIABILITY.md). Both claims
//! are bounded by the bytes the page really has: a codec expands its input by at most a fixed
//! factor (Snappy: a 3-byte copy element yields at most 64 bytes; Zstandard: a 4-byte RLE block
//! yields at most 128 KiB, the format's largest block), and a plain-encoded dictionary value takes
//! at least its physical type's width (a byte array its 4-byte length). The chunk itself must lie
//! inside the file, since the crate reserves a page's compressed bytes before reading them.
//!
//! A page header is the Thrift struct `PageHeader` (apache/parquet-format `parquet.thrift`) in the
//! compact protocol: field 1 the page type, 2 `uncompressed_page_size`, 3 `compressed_page_size`,
//! 7 the `DictionaryPageHeader` (its field 1: `num_values`), 8 the `DataPageHeaderV2` (its field 7:
//! `is_compressed`, true when absent). A header this reader cannot follow to its end within the
//! chunk is refused (the crate may misread it into a long skip); one longer than [`MAX_HEADER`], and
//! pages whose sizes run past the chunk, are left to the crate, which reports them as its own error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use parquet::basic::{Compression, Type};
use parquet::file::metadata::ColumnChunkMetaData;

use crate::parquet_compact::{Compact, kind};
use crate::parquet_thrift::{self as types, Def};

/// The page type of a dictionary page (`parquet.thrift`, `PageType`).
const DICTIONARY_PAGE: i64 = 2;

/// The first read of a page header; a header that does not fit is read again with more.
const FIRST_WINDOW: u64 = 4096;

/// The largest page header read (statistics of long values can make one long).
const MAX_HEADER: u64 = 16 << 20;

/// Why the column chunk `column` (of a file `file_len` bytes long) is refused; `None` when its
/// pages are sound or when this reader cannot tell (the crate then reads them and reports what it
/// finds). `Err` is a failed read of the file.
pub(crate) fn refusal(
    file: &mut File,
    file_len: u64,
    column: &ColumnChunkMetaData,
) -> std::io::Result<Option<String>> {
    let start = column
        .dictionary_page_offset()
        .unwrap_or_else(|| column.data_page_offset());
    let len = column.compressed_size();
    let (Ok(start), Ok(len)) = (u64::try_from(start), u64::try_from(len)) else {
        return Ok(Some(format!(
            "its chunk claims {len} bytes at offset {start}"
        )));
    };
    if start.checked_add(len).is_none_or(|end| end > file_len) {
        return Ok(Some(format!(
            "its chunk claims {len} bytes at offset {start}, past the end of the file \
             ({file_len} bytes)"
        )));
    }
    let expansion = match column.compression() {
        Compression::UNCOMPRESSED => None,
        Compression::SNAPPY => Some(("Snappy", 22)),
        Compression::ZSTD(_) => Some(("Zstandard", 32_768)),
        // Codecs this build cannot decompress: the crate refuses them before reserving anything.
        _ => return Ok(None),
    };
    let value_bits: i64 = match column.column_type() {
        Type::BOOLEAN => 1,
        Type::INT32 | Type::FLOAT | Type::BYTE_ARRAY => 32,
        Type::INT64 | Type::DOUBLE => 64,
        Type::INT96 => 96,
        Type::FIXED_LEN_BYTE_ARRAY => 8 * i64::from(column.column_descr().type_length().max(1)),
    };
    let (mut offset, mut remaining) = (start, len);
    let mut index = 0usize;
    while remaining > 0 {
        let header = match read_header(file, offset, remaining)? {
            Found::Header(header) => header,
            Found::Refused(refusal) => return Ok(Some(refusal)),
            Found::Unreadable => return Ok(None),
        };
        let (Ok(compressed), Ok(uncompressed)) = (
            u64::try_from(header.compressed),
            u64::try_from(header.uncompressed),
        ) else {
            return Ok(None);
        };
        let Some(left) = remaining
            .checked_sub(header.len)
            .and_then(|left| left.checked_sub(compressed))
        else {
            return Ok(None);
        };
        let page = if header.kind == DICTIONARY_PAGE {
            "its dictionary page".to_owned()
        } else {
            format!("its page {index}")
        };
        if let Some((codec, factor)) = expansion.filter(|_| header.compressed_data) {
            // A frame's own header makes the smallest input larger, never the output.
            if uncompressed > compressed.saturating_mul(factor) {
                return Ok(Some(format!(
                    "{page} claims {uncompressed} bytes decompressed from {compressed}; \
                     {codec} expands its input at most {factor}-fold"
                )));
            }
        }
        if let Some(values) = header.dictionary_values {
            let bits = i128::from(values) * i128::from(value_bits);
            if values < 0 || bits > 8 * i128::from(header.uncompressed) {
                return Ok(Some(format!(
                    "{page} claims {values} values of {value_bits} bits in {uncompressed} bytes"
                )));
            }
        }
        if header.kind != DICTIONARY_PAGE {
            index += 1;
        }
        offset += header.len + compressed;
        remaining = left;
    }
    Ok(None)
}

/// What [`refusal`] reads of a page header.
#[derive(Debug, PartialEq)]
struct Header {
    /// The header's length in bytes.
    len: u64,
    kind: i64,
    uncompressed: i64,
    compressed: i64,
    /// `num_values` of a dictionary page.
    dictionary_values: Option<i64>,
    /// Whether the page's data goes through the codec (a v2 data page may say it does not).
    compressed_data: bool,
}

/// What [`read_header`] finds at a page's start.
enum Found {
    Header(Header),
    /// A list in the header claims more elements than the chunk's bytes left could hold.
    Refused(String),
    /// Nothing this reader can follow.
    Unreadable,
}

/// The page header at `offset`, within `remaining` bytes: refused when it cannot be read from all
/// of them; left to the crate when it is longer than [`MAX_HEADER`].
fn read_header(file: &mut File, offset: u64, remaining: u64) -> std::io::Result<Found> {
    let mut window = FIRST_WINDOW.min(remaining);
    loop {
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(offset))?;
        (&mut *file).take(window).read_to_end(&mut bytes)?;
        let mut reader = Compact::new(&bytes);
        if let Some(header) = parse_header(&mut reader) {
            return Ok(Found::Header(header));
        }
        let whole = window >= remaining;
        // A field of the wrong type is one wherever the window ends; a list claiming more than
        // the bytes left, only when they are all the chunk's.
        if (reader.mismatch.is_some() || whole)
            && let Some(refusal) = reader.problem("a page header")
        {
            return Ok(Found::Refused(refusal));
        }
        if whole {
            // All the chunk's bytes left and still no header: the crate, reading on from there,
            // may misread it into a skip that takes seconds (found by the `parquet` fuzz target),
            // so it is refused here as a footer the walk cannot follow is.
            return Ok(Found::Refused(format!(
                "the page header at byte {offset} cannot be read within the chunk's {remaining} \
                 bytes left"
            )));
        }
        if window >= MAX_HEADER || (bytes.len() as u64) < window {
            return Ok(Found::Unreadable);
        }
        window = (window * 16).min(remaining).min(MAX_HEADER);
    }
}

/// A `PageHeader` where `reader` is (module documentation); `None` when it is cut short, lacks a
/// required field or cannot be read (the reader then tells whether a list claimed too much).
fn parse_header(reader: &mut Compact<'_>) -> Option<Header> {
    let (mut page_kind, mut uncompressed, mut compressed) = (None, None, None);
    let mut dictionary_values = None;
    let mut compressed_data = true;
    let mut last_id = 0i16;
    loop {
        let (id, field) = reader.field_header(&mut last_id)?;
        match (id, field) {
            (_, 0) => break,
            // Truncated to i32, as the crate's `read_i32` does.
            (1, kind::I32) => page_kind = Some(i64::from(reader.zigzag()? as i32)),
            (2, kind::I32) => uncompressed = Some(i64::from(reader.zigzag()? as i32)),
            (3, kind::I32) => compressed = Some(i64::from(reader.zigzag()? as i32)),
            (7, kind::STRUCT) => {
                dictionary_values = Some(struct_field(
                    reader,
                    &types::DICTIONARY_PAGE_HEADER,
                    1,
                    |r, field| {
                        (field == kind::I32).then(|| r.zigzag().map(|v| i64::from(v as i32)))?
                    },
                )??);
            }
            (8, kind::STRUCT) => {
                if let Some(flag) = struct_field(
                    reader,
                    &types::DATA_PAGE_HEADER_V2,
                    7,
                    |_, field| match field {
                        kind::TRUE => Some(true),
                        kind::FALSE => Some(false),
                        _ => None,
                    },
                )? {
                    compressed_data = flag;
                }
            }
            _ => reader.field(&types::PAGE_HEADER, id, field, 1)?,
        }
    }
    Some(Header {
        len: reader.position() as u64,
        kind: page_kind?,
        uncompressed: uncompressed?,
        compressed: compressed?,
        dictionary_values: dictionary_values.filter(|_| page_kind == Some(DICTIONARY_PAGE)),
        compressed_data,
    })
}

/// Reads a struct `def` (its fields next) as the crate reads it: `Some` of what `read` makes of
/// its field `wanted` (given the reader and the field's type, it reads the value; `None` for a
/// value it cannot read), the other fields read or skipped ([`Compact::field`]); `None` when the
/// struct cannot be read.
fn struct_field<T>(
    reader: &mut Compact<'_>,
    def: &Def,
    wanted: i16,
    mut read: impl FnMut(&mut Compact<'_>, u8) -> Option<T>,
) -> Option<Option<T>> {
    let mut found = None;
    let mut last_id = 0i16;
    loop {
        let (id, field) = reader.field_header(&mut last_id)?;
        if field == 0 {
            return Some(found);
        }
        if id == wanted && found.is_none() && def.field(id).is_some_and(|ty| ty.accepts(field)) {
            // Booleans live in the field header; others are read by `read`.
            found = read(reader, field);
            if found.is_none() && !matches!(field, kind::TRUE | kind::FALSE) {
                return None;
            }
        } else {
            reader.field(def, id, field, 2)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet_compact::zigzag;

    /// A page header: type, sizes, then a dictionary page header of `values` (field 7) or a v2
    /// data page header whose `is_compressed` is `flag` (field 8).
    fn header(kind: i64, uncompressed: i64, compressed: i64, tail: Tail) -> Vec<u8> {
        let mut bytes = vec![0x15];
        bytes.extend(zigzag(kind));
        bytes.push(0x15);
        bytes.extend(zigzag(uncompressed));
        bytes.push(0x15);
        bytes.extend(zigzag(compressed));
        match tail {
            Tail::Dictionary(values) => {
                bytes.push(0x4c); // field 7 (delta 4), struct
                bytes.push(0x15);
                bytes.extend(zigzag(values));
                bytes.push(0x15); // encoding PLAIN
                bytes.extend(zigzag(0));
                bytes.push(0);
            }
            Tail::V2(flag) => {
                bytes.push(0x5c); // field 8 (delta 5), struct
                bytes.push(0x15); // num_values
                bytes.extend(zigzag(3));
                bytes.push(0x60 | if flag { 1 } else { 2 }); // field 7 (delta 6), true or false
                bytes.push(0);
            }
            Tail::None => {}
        }
        bytes.push(0);
        bytes
    }

    enum Tail {
        Dictionary(i64),
        V2(bool),
        None,
    }

    fn parse(bytes: &[u8]) -> Option<Header> {
        parse_header(&mut Compact::new(bytes))
    }

    #[test]
    fn page_headers_are_read_as_the_crate_reads_them() {
        let bytes = header(2, 400, 100, Tail::Dictionary(17));
        assert_eq!(
            parse(&bytes),
            Some(Header {
                len: bytes.len() as u64,
                kind: 2,
                uncompressed: 400,
                compressed: 100,
                dictionary_values: Some(17),
                compressed_data: true,
            })
        );
        let v2 = parse(&header(3, 10, 10, Tail::V2(false))).unwrap();
        assert!(!v2.compressed_data);
        assert!(
            parse(&header(3, 10, 10, Tail::V2(true)))
                .unwrap()
                .compressed_data
        );
        assert_eq!(
            parse(&header(0, -5, 7, Tail::None)).unwrap().uncompressed,
            -5
        );
        // Cut short anywhere, or lacking a size: not read.
        for cut in 0..bytes.len() {
            assert_eq!(parse(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(parse(&[0x15, 0x04, 0x00]), None);
        // A field of another type than the crate reads: refused (not "cannot tell").
        let bytes = [0x15, 0x04, 0x16, 0x02, 0x00];
        let mut reader = Compact::new(&bytes);
        assert_eq!(parse_header(&mut reader), None);
        let refusal = reader.problem("a page header").unwrap();
        assert!(
            refusal.contains("field 2 of PageHeader is a i64, where a i32 is read"),
            "{refusal}"
        );
    }
}
