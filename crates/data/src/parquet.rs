//! Parquet files in the layout the `datasets` library writes (`Dataset.to_parquet`, the hub's
//! `data/*.parquet` shards): an image column whose Arrow storage type is `struct<bytes: binary,
//! path: string>` (datasets `features/image.py`) and a string caption column.
//!
//! Only the two configured columns are read, and only the row groups that hold selected rows, so
//! taking the first 75 rows of a 700 MB shard reads one row group.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use parquet::schema::types::Type;

use crate::record::{ImageRef, Origin, RawRow, resolve_inside};
use crate::source::Columns;
use crate::{Error, Result};

/// Runs a call into the `parquet` crate, turning a panic into [`Error::Parquet`] naming the file:
/// the reader (v60) panics on some malformed files (negative column offsets, a dictionary page
/// missing, a length past the buffer: found by the `parquet` fuzz target, docs/RELIABILITY.md).
fn guarded<T>(path: &Path, read: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(Error::Parquet {
            path: path.to_path_buf(),
            source: parquet::errors::ParquetError::General(format!(
                "the file is malformed (the parquet reader failed: {what})"
            )),
        })
    })
}

/// One opened parquet file with its validated columns.
pub(crate) struct ParquetFile {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    projection: Type,
    columns: Columns,
    /// The rows of its row groups, checked against the footer ([`row_count`]).
    rows: usize,
    /// The file's length in bytes.
    len: u64,
}

/// The number of rows of the file `reader` reads (`len` bytes long): the sum of its row groups'
/// rows, which must be what the footer says and no more than the file's bytes (every row holds an
/// image of at least a byte). A malformed footer can claim any count, and the rows are listed
/// before any is read (taking the first N, shuffling a subset): a claim of 2⁶⁰ rows asked for an
/// index list no allocation can hold (found by the `parquet` fuzz target, docs/RELIABILITY.md).
fn row_count(reader: &SerializedFileReader<File>, len: u64) -> std::result::Result<usize, String> {
    let metadata = reader.metadata();
    let mut sum = 0u64;
    for group in 0..reader.num_row_groups() {
        let rows = metadata.row_group(group).num_rows();
        sum = u64::try_from(rows)
            .ok()
            .and_then(|rows| sum.checked_add(rows))
            .ok_or_else(|| {
                format!("the file is malformed: row group {group} claims {rows} rows")
            })?;
    }
    let claimed = metadata.file_metadata().num_rows();
    if u64::try_from(claimed).ok() != Some(sum) {
        return Err(format!(
            "the file is malformed: its footer claims {claimed} rows, its row groups hold {sum}"
        ));
    }
    if sum > len {
        return Err(format!(
            "the file is malformed: it claims {sum} rows in {len} bytes"
        ));
    }
    usize::try_from(sum).map_err(|_| format!("{sum} rows are more than this machine can index"))
}

impl ParquetFile {
    /// Opens `path` and checks that the configured columns exist with usable types.
    pub(crate) fn open(path: &Path, columns: &Columns) -> Result<Self> {
        guarded(path, || Self::open_unguarded(path, columns))
    }

    fn open_unguarded(path: &Path, columns: &Columns) -> Result<Self> {
        let parquet_error = |source| Error::Parquet {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let malformed = |problem: String| Error::Parquet {
            path: path.to_path_buf(),
            source: parquet::errors::ParquetError::General(problem),
        };
        if let Some(problem) = crate::parquet_footer::refusal(&mut file, len) {
            return Err(malformed(problem));
        }
        let reader = SerializedFileReader::new(file).map_err(parquet_error)?;
        let rows = row_count(&reader, len).map_err(malformed)?;
        let root = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema_ptr();
        let find = |column: &str| -> Result<Arc<Type>> {
            root.get_fields()
                .iter()
                .find(|f| f.name() == column)
                .cloned()
                .ok_or_else(|| Error::MissingColumn {
                    path: path.to_path_buf(),
                    column: column.to_owned(),
                    available: root
                        .get_fields()
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        let image = find(&columns.image)?;
        check_image_type(path, &image)?;
        let mut wanted = vec![image.name().to_owned()];
        if let Some(caption_column) = &columns.caption {
            let caption = find(caption_column)?;
            if caption.is_group() {
                return Err(Error::ColumnType {
                    path: path.to_path_buf(),
                    column: caption_column.clone(),
                    found: "a struct".into(),
                    expected: "a string column",
                });
            }
            wanted.push(caption.name().to_owned());
        }
        // The projection keeps the file's column order.
        let fields = root
            .get_fields()
            .iter()
            .filter(|f| wanted.iter().any(|w| w == f.name()))
            .cloned();
        let projection = Type::group_type_builder(root.name())
            .with_fields(fields.collect())
            .build()
            .map_err(parquet_error)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            projection,
            columns: columns.clone(),
            rows,
            len,
        })
    }

    /// Refuses row group `group` when a page header of a projected column claims a size its bytes
    /// cannot hold ([`crate::parquet_pages`]), before the crate reserves memory by it.
    fn check_pages(&self, group: usize) -> Result<()> {
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let projected = self.projection.get_fields();
        for column in self.reader.metadata().row_group(group).columns() {
            let top = column.column_path().parts().first();
            if !projected.iter().any(|f| Some(&f.name().to_owned()) == top) {
                continue;
            }
            let refusal = crate::parquet_pages::refusal(&mut file, self.len, column)
                .map_err(|e| Error::io(&self.path, e))?;
            if let Some(problem) = refusal {
                return Err(Error::Parquet {
                    path: self.path.clone(),
                    source: parquet::errors::ParquetError::General(format!(
                        "the file is malformed: row group {group}, column `{}`: {problem}",
                        column.column_path().string()
                    )),
                });
            }
        }
        Ok(())
    }

    /// Number of rows in the file, from its footer.
    pub(crate) fn num_rows(&self) -> usize {
        self.rows
    }

    /// Reads the rows at the given 0-based indices (ascending), one result per row: a bad cell
    /// fails only its row, a bad file fails the call.
    pub(crate) fn read_rows(&self, rows: &[usize]) -> Result<Vec<Result<RawRow>>> {
        guarded(&self.path, || self.read_rows_unguarded(rows))
    }

    fn read_rows_unguarded(&self, rows: &[usize]) -> Result<Vec<Result<RawRow>>> {
        let parquet_error = |source| Error::Parquet {
            path: self.path.clone(),
            source,
        };
        let mut out = Vec::with_capacity(rows.len());
        let mut wanted = rows.iter().copied().peekable();
        let mut group_start = 0usize;
        for group in 0..self.reader.num_row_groups() {
            let group_rows = self.reader.metadata().row_group(group).num_rows();
            let group_end = group_start + usize::try_from(group_rows).unwrap_or(0);
            if wanted.peek().is_some_and(|&row| row < group_end) {
                self.check_pages(group)?;
                let group_reader = self.reader.get_row_group(group).map_err(parquet_error)?;
                let iter =
                    RowIter::from_row_group(Some(self.projection.clone()), group_reader.as_ref())
                        .map_err(parquet_error)?;
                for (offset, row) in iter.enumerate() {
                    let index = group_start + offset;
                    if wanted.peek() != Some(&index) {
                        continue;
                    }
                    wanted.next();
                    let row = row.map_err(parquet_error)?;
                    out.push(self.convert(index, &row));
                    if wanted.peek().is_none_or(|&next| next >= group_end) {
                        break;
                    }
                }
            }
            group_start = group_end;
        }
        if let Some(row) = wanted.next() {
            return Err(Error::BadCell {
                origin: Origin::ParquetRow {
                    file: self.path.clone(),
                    row,
                },
                problem: format!("the file has only {group_start} rows"),
            });
        }
        Ok(out)
    }

    fn convert(&self, index: usize, row: &Row) -> Result<RawRow> {
        let origin = Origin::ParquetRow {
            file: self.path.clone(),
            row: index,
        };
        let bad = |problem: String| Error::BadCell {
            origin: origin.clone(),
            problem,
        };
        let cell = |column: &str| {
            row.get_column_iter()
                .find(|(name, _)| *name == column)
                .map(|(_, f)| f)
        };
        let image = match cell(&self.columns.image) {
            Some(Field::Group(image)) => {
                let part = |name: &str| {
                    image
                        .get_column_iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, f)| f)
                };
                match (part("bytes"), part("path")) {
                    (Some(Field::Bytes(bytes)), _) => ImageRef::Bytes(bytes.data().to_vec()),
                    (_, Some(Field::Str(relative))) => {
                        let folder = self.path.parent().unwrap_or(Path::new("."));
                        ImageRef::File(resolve_inside(folder, relative, &origin)?)
                    }
                    _ => {
                        return Err(bad(format!(
                            "`{}` has neither bytes nor a path",
                            self.columns.image
                        )));
                    }
                }
            }
            Some(Field::Bytes(bytes)) => ImageRef::Bytes(bytes.data().to_vec()),
            Some(Field::Null) | None => {
                return Err(bad(format!("`{}` is null", self.columns.image)));
            }
            Some(other) => {
                return Err(bad(format!(
                    "`{}` holds {other}, not an image",
                    self.columns.image
                )));
            }
        };
        let caption = match &self.columns.caption {
            None => None,
            Some(column) => match cell(column) {
                Some(Field::Str(text)) => Some(text.clone()),
                Some(Field::Null) | None => None,
                Some(other) => {
                    return Err(bad(format!(
                        "caption `{column}` holds {other}, not a string"
                    )));
                }
            },
        };
        Ok(RawRow {
            origin,
            image,
            caption,
            repeats: 1,
        })
    }
}

/// Accepts the `datasets` Image struct (with a `bytes` or `path` member) or a plain binary column.
fn check_image_type(path: &Path, image: &Type) -> Result<()> {
    let acceptable = if image.is_group() {
        image
            .get_fields()
            .iter()
            .any(|f| f.name() == "bytes" || f.name() == "path")
    } else {
        image.get_physical_type() == parquet::basic::Type::BYTE_ARRAY
    };
    if acceptable {
        Ok(())
    } else {
        Err(Error::ColumnType {
            path: path.to_path_buf(),
            column: image.name().to_owned(),
            found: format!("a {} column", image.get_physical_type()),
            expected: "a struct<bytes, path> or binary column",
        })
    }
}
