//! Where rows come from: a hub dataset, local parquet files, an imagefolder or a folder of images
//! with caption files. Every source yields [`RawRow`]s in a fixed order, so a row index means the
//! same image on every run.

use std::path::PathBuf;

use crate::folder::{CaptionFolder, read_caption_folder, read_imagefolder};
use crate::hub::HubDataset;
use crate::parquet::ParquetFile;
use crate::record::RawRow;
use crate::{Error, Result};

/// Column names of a parquet dataset (or keys of `metadata.jsonl`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Columns {
    /// The image column: a `datasets` Image struct `{bytes, path}` or plain bytes; default `image`.
    pub image: String,
    /// The caption column; default `text`. `None` when captions are not read (an instance prompt).
    pub caption: Option<String>,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl Columns {
    /// Sets [`Columns::image`].
    #[must_use]
    pub fn with_image(mut self, image: String) -> Self {
        self.image = image;
        self
    }

    /// Sets [`Columns::caption`].
    #[must_use]
    pub fn with_caption(mut self, caption: Option<String>) -> Self {
        self.caption = caption;
        self
    }
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            image: "image".into(),
            caption: Some("text".into()),
        }
    }
}

/// A dataset's location and layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A dataset repository on the hub; its parquet shards are downloaded into the HF cache.
    Hub(HubDataset),
    /// Local parquet files in the `datasets` layout, read in the given order.
    Parquet {
        /// The files.
        files: Vec<PathBuf>,
        /// Column names.
        columns: Columns,
    },
    /// A folder with `metadata.jsonl` (`file_name` plus a caption key), the `datasets` imagefolder.
    ImageFolder {
        /// The folder.
        root: PathBuf,
        /// The caption key in `metadata.jsonl`; default `text`; `None` to ignore captions.
        caption_column: Option<String>,
    },
    /// A folder of images, each with a `.txt` caption of the same stem (searched recursively,
    /// ordered by path): [`Source::CaptionFolder`] with [`CaptionFolder::new`]'s defaults.
    CaptionFiles {
        /// The folder.
        root: PathBuf,
        /// Read the `.txt` files (and require them); off when an instance prompt replaces captions.
        read_captions: bool,
    },
    /// A folder of images with caption files: any caption extension, flat or in kohya's
    /// `<repeats>_<class tokens>` subfolders ([`crate::FolderLayout`]).
    CaptionFolder(CaptionFolder),
}

/// A source after its files were found and checked: it knows its row count and reads rows by index.
pub(crate) enum OpenSource {
    Parquet(Vec<ParquetFile>),
    Rows(Vec<Result<RawRow>>),
}

impl Source {
    /// Opens the source. `captions_needed: false` skips caption columns and files entirely.
    ///
    /// # Errors
    /// Each reader's errors; [`Error::EmptySelection`] naming the folder or file for a source that
    /// holds no rows at all.
    pub(crate) fn open(&self, captions_needed: bool) -> Result<OpenSource> {
        let open = self.open_rows(captions_needed)?;
        if !open.is_empty() {
            return Ok(open);
        }
        let reason = match self {
            Source::Hub(hub) => format!("hub dataset `{}` has no rows", hub.repo_id),
            Source::Parquet { files, .. } => {
                let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                format!("{} hold(s) no rows", names.join(", "))
            }
            Source::ImageFolder { root, .. } => {
                format!("{}: no images listed in its metadata.jsonl", root.display())
            }
            Source::CaptionFiles { root, .. } => format!(
                "{}: no images (.png, .jpg, .jpeg, .webp) in the folder or its subfolders",
                root.display()
            ),
            Source::CaptionFolder(folder) => format!(
                "{}: no images (.png, .jpg, .jpeg, .webp) in the folder or its subfolders",
                folder.root.display()
            ),
        };
        Err(Error::EmptySelection { reason })
    }

    /// [`Self::open`] without its check for an empty source.
    fn open_rows(&self, captions_needed: bool) -> Result<OpenSource> {
        let columns_for = |columns: &Columns| Columns {
            image: columns.image.clone(),
            caption: columns.caption.clone().filter(|_| captions_needed),
        };
        match self {
            Source::Hub(hub) => {
                let files = hub.resolve()?;
                let columns = columns_for(&hub.columns);
                Ok(OpenSource::Parquet(
                    files
                        .iter()
                        .map(|f| ParquetFile::open(f, &columns))
                        .collect::<Result<_>>()?,
                ))
            }
            Source::Parquet { files, columns } => {
                if files.is_empty() {
                    return Err(Error::EmptySelection {
                        reason: "no parquet files given".into(),
                    });
                }
                let columns = columns_for(columns);
                Ok(OpenSource::Parquet(
                    files
                        .iter()
                        .map(|f| ParquetFile::open(f, &columns))
                        .collect::<Result<_>>()?,
                ))
            }
            Source::ImageFolder {
                root,
                caption_column,
            } => Ok(OpenSource::Rows(read_imagefolder(
                root,
                caption_column.as_deref().filter(|_| captions_needed),
            )?)),
            Source::CaptionFiles {
                root,
                read_captions,
            } => {
                let folder = CaptionFolder {
                    read_captions: *read_captions,
                    ..CaptionFolder::new(root.clone())
                };
                Ok(OpenSource::Rows(read_caption_folder(
                    &folder,
                    captions_needed,
                )?))
            }
            Source::CaptionFolder(folder) => Ok(OpenSource::Rows(read_caption_folder(
                folder,
                captions_needed,
            )?)),
        }
    }
}

impl OpenSource {
    /// Whether the source has no rows.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        match self {
            OpenSource::Parquet(files) => files.iter().map(ParquetFile::num_rows).sum(),
            OpenSource::Rows(rows) => rows.len(),
        }
    }

    /// The rows at the given global indices (ascending, distinct), one result per row.
    pub(crate) fn read_rows(self, indices: &[usize]) -> Result<Vec<Result<RawRow>>> {
        match self {
            OpenSource::Rows(rows) => {
                let mut rows: Vec<Option<Result<RawRow>>> = rows.into_iter().map(Some).collect();
                Ok(indices
                    .iter()
                    .map(|&i| {
                        rows.get_mut(i).and_then(Option::take).unwrap_or_else(|| {
                            Err(Error::EmptySelection {
                                reason: format!("row {i} is past the end"),
                            })
                        })
                    })
                    .collect())
            }
            OpenSource::Parquet(files) => {
                let mut out = Vec::with_capacity(indices.len());
                let mut first_row = 0usize;
                let mut rest = indices;
                for file in &files {
                    let end = first_row + file.num_rows();
                    let split = rest.partition_point(|&i| i < end);
                    let local: Vec<usize> = rest[..split].iter().map(|&i| i - first_row).collect();
                    if !local.is_empty() {
                        out.extend(file.read_rows(&local)?);
                    }
                    rest = &rest[split..];
                    first_row = end;
                }
                Ok(out)
            }
        }
    }
}
