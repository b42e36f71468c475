//! One row of a dataset before decoding: where it came from, its image bytes (or file) and caption.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// Where a row came from, for error messages and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Row `row` (0-based) of a parquet file.
    ParquetRow {
        /// The parquet file.
        file: PathBuf,
        /// 0-based row index within the file.
        row: usize,
    },
    /// Line `line` (1-based) of an imagefolder's `metadata.jsonl`.
    MetadataLine {
        /// The `metadata.jsonl` file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// An image file of a folder.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::ParquetRow { file, row } => write!(f, "{} row {row}", file.display()),
            Origin::MetadataLine { file, line } => write!(f, "{} line {line}", file.display()),
            Origin::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// An image's encoded content, in memory or in a file (read when the dataset is opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// Encoded bytes (PNG, JPEG or WebP), as in a parquet `image.bytes` cell.
    Bytes(Vec<u8>),
    /// A file inside the dataset folder.
    File(PathBuf),
}

/// One dataset row: an image and its caption, as the source stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRow {
    /// Where the row came from.
    pub origin: Origin,
    /// The encoded image.
    pub image: ImageRef,
    /// The caption, if the source has one for this row.
    pub caption: Option<String>,
    /// How often the row appears per epoch (a kohya `<repeats>_<name>` folder's count; else 1).
    pub repeats: u32,
}

impl ImageRef {
    /// The encoded bytes, reading the file if needed.
    pub fn bytes(&self) -> Result<Vec<u8>> {
        match self {
            ImageRef::Bytes(bytes) => Ok(bytes.clone()),
            ImageRef::File(path) => std::fs::read(path).map_err(|e| Error::io(path, e)),
        }
    }
}

/// Joins a relative path written in a dataset to the dataset's folder, refusing absolute paths and
/// any `..` that would climb out of it (a dataset must not read arbitrary files of the machine).
pub(crate) fn resolve_inside(root: &Path, relative: &str, origin: &Origin) -> Result<PathBuf> {
    let escapes = || Error::PathEscapesRoot {
        origin: origin.clone(),
        path: relative.to_owned(),
        root: root.to_path_buf(),
    };
    let mut depth = 0usize;
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => depth = depth.checked_sub(1).ok_or_else(escapes)?,
            Component::RootDir | Component::Prefix(_) => return Err(escapes()),
        }
    }
    if depth == 0 {
        return Err(escapes());
    }
    Ok(root.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_the_root_resolve_and_escapes_are_refused() {
        let root = Path::new("/data/set");
        let origin = Origin::File(PathBuf::from("/data/set/metadata.jsonl"));
        assert_eq!(
            resolve_inside(root, "a/b.png", &origin).unwrap(),
            root.join("a/b.png")
        );
        assert_eq!(
            resolve_inside(root, "a/../b.png", &origin).unwrap(),
            root.join("a/../b.png")
        );
        for bad in ["../b.png", "a/../../b.png", "/etc/passwd", "", "."] {
            let err = resolve_inside(root, bad, &origin).unwrap_err();
            assert!(
                err.to_string().contains("escapes the dataset folder"),
                "{bad}: {err}"
            );
        }
    }
}
