//! What the `parquet` crate (v60) reads each field of a footer or page header as, for
//! [`crate::parquet_compact::Compact`] to walk them the same way.
//!
//! The crate reads a field it knows by its id, as the type the format gives it, whatever type the
//! field's header says (its `thrift_struct!` readers and `parquet_metadata_from_bytes`); a field
//! of another type is read from the wrong bytes, and the rest of the struct from the wrong place.
//! From there any bytes can look like a list of two billion booleans in a field the crate skips, and
//! the crate skips a list's booleans without reading a byte (`skip_till_depth`): a footer of 1.5 KB
//! kept it busy for seconds, and nesting makes that hours (found by the `parquet` fuzz target,
//! docs/RELIABILITY.md). So a field the crate knows must have the type it reads, and a list's
//! elements too; with that, the crate reads what the walker reads, and every list the walker sees
//! is one whose claimed length the bytes could hold. Fields the crate does not know (or builds
//! without the `encryption` feature do not) are skipped by both, by their own types.
//!
//! The tables follow `parquet.thrift` (apache/parquet-format) as the crate reads it:
//! `src/file/metadata/thrift/mod.rs` (FileMetaData, RowGroup, ColumnChunk, ColumnMetaData,
//! Statistics, SizeStatistics, GeospatialStatistics, the page headers), `src/file/metadata/mod.rs`
//! (KeyValue, PageEncodingStats, SortingColumn), `src/basic.rs` (LogicalType and its structs,
//! TimeUnit, ColumnOrder). Enums are i32 on the wire; an empty struct is read as one byte, 0.

use crate::parquet_compact::kind;

/// A type as the crate reads it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ty {
    Bool,
    I8,
    I16,
    I32,
    I64,
    Double,
    Binary,
    List(&'static Ty),
    Struct(&'static Def),
}

/// A struct (or union) and the fields the crate reads in it: `(id, type)`.
#[derive(Debug)]
pub(crate) struct Def {
    pub(crate) name: &'static str,
    pub(crate) fields: &'static [(i16, Ty)],
}

impl Def {
    /// The type of field `id`, when the crate reads it.
    pub(crate) fn field(&self, id: i16) -> Option<Ty> {
        self.fields
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, ty)| *ty)
    }
}

impl Ty {
    /// Whether a value of wire type `wire` is what the crate reads as this type.
    pub(crate) fn accepts(self, wire: u8) -> bool {
        match self {
            Ty::Bool => wire == kind::TRUE || wire == kind::FALSE,
            Ty::I8 => wire == kind::BYTE,
            Ty::I16 => wire == kind::I16,
            Ty::I32 => wire == kind::I32,
            Ty::I64 => wire == kind::I64,
            Ty::Double => wire == kind::DOUBLE,
            Ty::Binary => wire == kind::BINARY,
            Ty::List(_) => wire == kind::LIST || wire == kind::SET,
            Ty::Struct(_) => wire == kind::STRUCT,
        }
    }

    /// The type's name in messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::I8 => "i8",
            Ty::I16 => "i16",
            Ty::I32 => "i32",
            Ty::I64 => "i64",
            Ty::Double => "double",
            Ty::Binary => "binary",
            Ty::List(_) => "list",
            Ty::Struct(def) => def.name,
        }
    }
}

/// The name of wire type `wire` in messages.
pub(crate) fn wire_name(wire: u8) -> &'static str {
    match wire {
        kind::TRUE | kind::FALSE => "bool",
        kind::BYTE => "i8",
        kind::I16 => "i16",
        kind::I32 => "i32",
        kind::I64 => "i64",
        kind::DOUBLE => "double",
        kind::BINARY => "binary",
        kind::LIST => "list",
        kind::SET => "set",
        kind::MAP => "map",
        kind::STRUCT => "struct",
        _ => "unknown type",
    }
}

const EMPTY: Def = Def {
    name: "an empty struct",
    fields: &[],
};
const E: Ty = Ty::Struct(&EMPTY);

const DECIMAL: Def = Def {
    name: "DecimalType",
    fields: &[(1, Ty::I32), (2, Ty::I32)],
};
const TIME_UNIT: Def = Def {
    name: "TimeUnit",
    fields: &[(1, E), (2, E), (3, E)],
};
const TIMESTAMP: Def = Def {
    name: "TimeType/TimestampType",
    fields: &[(1, Ty::Bool), (2, Ty::Struct(&TIME_UNIT))],
};
const INT: Def = Def {
    name: "IntType",
    fields: &[(1, Ty::I8), (2, Ty::Bool)],
};
const VARIANT: Def = Def {
    name: "VariantType",
    fields: &[(1, Ty::I8)],
};
const GEOMETRY: Def = Def {
    name: "GeometryType",
    fields: &[(1, Ty::Binary)],
};
const GEOGRAPHY: Def = Def {
    name: "GeographyType",
    fields: &[(1, Ty::Binary), (2, Ty::I32)],
};
const LOGICAL_TYPE: Def = Def {
    name: "LogicalType",
    fields: &[
        (1, E),
        (2, E),
        (3, E),
        (4, E),
        (5, Ty::Struct(&DECIMAL)),
        (6, E),
        (7, Ty::Struct(&TIMESTAMP)),
        (8, Ty::Struct(&TIMESTAMP)),
        (10, Ty::Struct(&INT)),
        (11, E),
        (12, E),
        (13, E),
        (14, E),
        (15, E),
        (16, Ty::Struct(&VARIANT)),
        (17, Ty::Struct(&GEOMETRY)),
        (18, Ty::Struct(&GEOGRAPHY)),
        (19, E),
    ],
};

/// `SchemaElement`.
pub(crate) const SCHEMA_ELEMENT: Def = Def {
    name: "SchemaElement",
    fields: &[
        (1, Ty::I32),
        (2, Ty::I32),
        (3, Ty::I32),
        (4, Ty::Binary),
        (5, Ty::I32),
        (6, Ty::I32),
        (7, Ty::I32),
        (8, Ty::I32),
        (9, Ty::I32),
        (10, Ty::Struct(&LOGICAL_TYPE)),
    ],
};

const STATISTICS: Def = Def {
    name: "Statistics",
    fields: &[
        (1, Ty::Binary),
        (2, Ty::Binary),
        (3, Ty::I64),
        (4, Ty::I64),
        (5, Ty::Binary),
        (6, Ty::Binary),
        (7, Ty::Bool),
        (8, Ty::Bool),
        (9, Ty::I64),
    ],
};
const PAGE_ENCODING_STATS: Def = Def {
    name: "PageEncodingStats",
    fields: &[(1, Ty::I32), (2, Ty::I32), (3, Ty::I32)],
};
const SIZE_STATISTICS: Def = Def {
    name: "SizeStatistics",
    fields: &[
        (1, Ty::I64),
        (2, Ty::List(&Ty::I64)),
        (3, Ty::List(&Ty::I64)),
    ],
};
const BOUNDING_BOX: Def = Def {
    name: "BoundingBox",
    fields: &[
        (1, Ty::Double),
        (2, Ty::Double),
        (3, Ty::Double),
        (4, Ty::Double),
        (5, Ty::Double),
        (6, Ty::Double),
        (7, Ty::Double),
        (8, Ty::Double),
    ],
};
const GEOSPATIAL_STATISTICS: Def = Def {
    name: "GeospatialStatistics",
    fields: &[(1, Ty::Struct(&BOUNDING_BOX)), (2, Ty::List(&Ty::I32))],
};
const COLUMN_META_DATA: Def = Def {
    name: "ColumnMetaData",
    fields: &[
        (1, Ty::I32),
        (2, Ty::List(&Ty::I32)),
        (4, Ty::I32),
        (5, Ty::I64),
        (6, Ty::I64),
        (7, Ty::I64),
        (9, Ty::I64),
        (10, Ty::I64),
        (11, Ty::I64),
        (12, Ty::Struct(&STATISTICS)),
        (13, Ty::List(&Ty::Struct(&PAGE_ENCODING_STATS))),
        (14, Ty::I64),
        (15, Ty::I32),
        (16, Ty::Struct(&SIZE_STATISTICS)),
        (17, Ty::Struct(&GEOSPATIAL_STATISTICS)),
    ],
};
const COLUMN_CHUNK: Def = Def {
    name: "ColumnChunk",
    fields: &[
        (1, Ty::Binary),
        (2, Ty::I64),
        (3, Ty::Struct(&COLUMN_META_DATA)),
        (4, Ty::I64),
        (5, Ty::I32),
        (6, Ty::I64),
        (7, Ty::I32),
    ],
};
const SORTING_COLUMN: Def = Def {
    name: "SortingColumn",
    fields: &[(1, Ty::I32), (2, Ty::Bool), (3, Ty::Bool)],
};
const ROW_GROUP: Def = Def {
    name: "RowGroup",
    fields: &[
        (1, Ty::List(&Ty::Struct(&COLUMN_CHUNK))),
        (2, Ty::I64),
        (3, Ty::I64),
        (4, Ty::List(&Ty::Struct(&SORTING_COLUMN))),
        (5, Ty::I64),
        (7, Ty::I16),
    ],
};
const KEY_VALUE: Def = Def {
    name: "KeyValue",
    fields: &[(1, Ty::Binary), (2, Ty::Binary)],
};
const COLUMN_ORDER: Def = Def {
    name: "ColumnOrder",
    fields: &[(1, E), (2, E), (3, E)],
};

/// `FileMetaData`, the footer (its schema, field 2, is read by the schema check itself).
pub(crate) const FILE_META_DATA: Def = Def {
    name: "FileMetaData",
    fields: &[
        (1, Ty::I32),
        (2, Ty::List(&Ty::Struct(&SCHEMA_ELEMENT))),
        (3, Ty::I64),
        (4, Ty::List(&Ty::Struct(&ROW_GROUP))),
        (5, Ty::List(&Ty::Struct(&KEY_VALUE))),
        (6, Ty::Binary),
        (7, Ty::List(&Ty::Struct(&COLUMN_ORDER))),
    ],
};

const DATA_PAGE_HEADER: Def = Def {
    name: "DataPageHeader",
    fields: &[
        (1, Ty::I32),
        (2, Ty::I32),
        (3, Ty::I32),
        (4, Ty::I32),
        (5, Ty::Struct(&STATISTICS)),
    ],
};
/// `DictionaryPageHeader`.
pub(crate) const DICTIONARY_PAGE_HEADER: Def = Def {
    name: "DictionaryPageHeader",
    fields: &[(1, Ty::I32), (2, Ty::I32), (3, Ty::Bool)],
};
/// `DataPageHeaderV2`.
pub(crate) const DATA_PAGE_HEADER_V2: Def = Def {
    name: "DataPageHeaderV2",
    fields: &[
        (1, Ty::I32),
        (2, Ty::I32),
        (3, Ty::I32),
        (4, Ty::I32),
        (5, Ty::I32),
        (6, Ty::I32),
        (7, Ty::Bool),
        (8, Ty::Struct(&STATISTICS)),
    ],
};
/// `PageHeader`.
pub(crate) const PAGE_HEADER: Def = Def {
    name: "PageHeader",
    fields: &[
        (1, Ty::I32),
        (2, Ty::I32),
        (3, Ty::I32),
        (4, Ty::I32),
        (5, Ty::Struct(&DATA_PAGE_HEADER)),
        (6, E),
        (7, Ty::Struct(&DICTIONARY_PAGE_HEADER)),
        (8, Ty::Struct(&DATA_PAGE_HEADER_V2)),
    ],
};
