//! Folder datasets: an `imagefolder` with `metadata.jsonl` (the `datasets` ImageFolder builder's
//! layout: one JSON object per line with a `file_name` relative to the folder and caption columns)
//! and a folder of images with a caption file of the same stem next to each ([`CaptionFolder`]),
//! flat or in kohya's `<repeats>_<class tokens>` subfolders.

use std::path::{Path, PathBuf};

use crate::caption::py_strip;
use crate::record::{ImageRef, Origin, RawRow, resolve_inside};
use crate::{Error, Result};

/// File extensions read as images (the `image` crate is built with PNG, JPEG and WebP).
const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Reads `root/metadata.jsonl` into rows, in file order. `caption_column` is the key holding the
/// caption (`None`: captions are not needed and not read).
pub(crate) fn read_imagefolder(
    root: &Path,
    caption_column: Option<&str>,
) -> Result<Vec<Result<RawRow>>> {
    let metadata_path = root.join("metadata.jsonl");
    let text = std::fs::read_to_string(&metadata_path).map_err(|e| Error::io(&metadata_path, e))?;
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index + 1;
        let metadata_error = |problem: String| Error::Metadata {
            path: metadata_path.clone(),
            line: line_number,
            problem,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| metadata_error(format!("not JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| metadata_error("not a JSON object".into()))?;
        let origin = Origin::MetadataLine {
            file: metadata_path.clone(),
            line: line_number,
        };
        let row = (|| {
            let file_name = object
                .get("file_name")
                .and_then(|v| v.as_str())
                .ok_or_else(|| metadata_error("no string `file_name`".into()))?;
            let image = ImageRef::File(resolve_inside(root, file_name, &origin)?);
            let caption = match caption_column {
                None => None,
                Some(column) => Some(
                    object
                        .get(column)
                        .and_then(|v| v.as_str())
                        .ok_or_else(|| metadata_error(format!("no string caption `{column}`")))?
                        .to_owned(),
                ),
            };
            Ok(RawRow {
                origin: origin.clone(),
                image,
                caption,
                repeats: 1,
            })
        })();
        rows.push(row);
    }
    Ok(rows)
}

/// How the images of a [`CaptionFolder`] are laid out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FolderLayout {
    /// Images anywhere under the root (searched recursively), each used once; an image without a
    /// caption file fails its row when captions are read.
    #[default]
    Flat,
    /// kohya's DreamBooth layout (sd-scripts `train_data_dir`): the root holds subfolders named
    /// `<repeats>_<class tokens>` (e.g. `10_sks dog`). Each subfolder's images (not those of deeper
    /// folders) appear `<repeats>` times per epoch ([`crate::Item::repeats`]), and an image without
    /// a caption file gets the folder's class tokens (the text after the first `_`, e.g. `sks dog`)
    /// as its caption. A caption file's first line, stripped, is the caption, as kohya reads it.
    /// Hidden subfolders (`.name`) are ignored. A subfolder without a count, a count below 1, an
    /// image directly in the root or an empty caption file is an error (kohya skips the folders
    /// with a warning and refuses the empty file).
    KohyaRepeats,
    /// A kohya `[[datasets.subsets]]` folder (`image_dir`): the images directly in the root (not in
    /// subfolders), each caption file's first line, stripped, as its caption, and `class_tokens` for
    /// an image without one (an error when there are none).
    KohyaSubset {
        /// The subset's `class_tokens`.
        class_tokens: Option<String>,
    },
}

impl FolderLayout {
    /// [`FolderLayout::KohyaRepeats`] when `root` holds no image itself and every visible
    /// subfolder is named `<number>_…`; otherwise [`FolderLayout::Flat`].
    pub fn detect(root: &Path) -> Self {
        let Ok(entries) = std::fs::read_dir(root) else {
            return Self::Flat;
        };
        let mut subfolders = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') || (!path.is_dir() && !is_image(&path)) {
                continue;
            }
            let counted = path.is_dir()
                && name
                    .split_once('_')
                    .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !counted {
                return Self::Flat;
            }
            subfolders += 1;
        }
        if subfolders > 0 {
            Self::KohyaRepeats
        } else {
            Self::Flat
        }
    }
}

/// A folder of images with a caption file of the same stem next to each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionFolder {
    /// The folder.
    pub root: PathBuf,
    /// Read the caption files; off when an instance prompt replaces captions.
    pub read_captions: bool,
    /// The caption files' extension, e.g. `.txt` (the default here) or `.caption` (kohya's
    /// default); a missing leading dot is added, as kohya does.
    pub caption_extension: String,
    /// Where the images are and how often each is used.
    pub layout: FolderLayout,
}

impl CaptionFolder {
    /// `root` with `.txt` captions, read, [`FolderLayout::Flat`].
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            read_captions: true,
            caption_extension: ".txt".into(),
            layout: FolderLayout::Flat,
        }
    }

    /// `root` in kohya's `<repeats>_<class tokens>` layout with `.txt` captions, read.
    pub fn kohya(root: impl Into<PathBuf>) -> Self {
        Self {
            layout: FolderLayout::KohyaRepeats,
            ..Self::new(root)
        }
    }

    /// The caption file of `image`: its path without the extension, plus the caption extension.
    fn caption_path(&self, image: &Path) -> PathBuf {
        let mut path = image.with_extension("").into_os_string();
        if !self.caption_extension.starts_with('.') {
            path.push(".");
        }
        path.push(&self.caption_extension);
        PathBuf::from(path)
    }
}

/// Lists the images of `folder` (sorted by path) with their captions when `read_captions` (and
/// `folder.read_captions`).
pub(crate) fn read_caption_folder(
    folder: &CaptionFolder,
    read_captions: bool,
) -> Result<Vec<Result<RawRow>>> {
    if folder.caption_extension.trim_start_matches('.').is_empty() {
        return Err(Error::InvalidOption {
            option: "caption_extension",
            problem: format!("`{}` names no extension", folder.caption_extension),
        });
    }
    let read_captions = read_captions && folder.read_captions;
    match &folder.layout {
        FolderLayout::Flat => {
            let mut images = Vec::new();
            collect_images(&folder.root, &mut images)?;
            images.sort();
            Ok(images
                .into_iter()
                .map(|image| {
                    let caption = if read_captions {
                        let caption_path = folder.caption_path(&image);
                        match std::fs::read_to_string(&caption_path) {
                            Ok(text) => Some(text.trim().to_owned()),
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                return Err(Error::MissingCaptionFile {
                                    image,
                                    caption: caption_path,
                                });
                            }
                            Err(e) => return Err(Error::io(caption_path, e)),
                        }
                    } else {
                        None
                    };
                    Ok(row(image, caption, 1))
                })
                .collect())
        }
        FolderLayout::KohyaSubset { class_tokens } => {
            let mut images = Vec::new();
            list_images(&folder.root, &mut images, &mut Vec::new())?;
            images.sort();
            Ok(images
                .into_iter()
                .map(|image| {
                    if !read_captions {
                        return Ok(row(image, None, 1));
                    }
                    let caption_path = folder.caption_path(&image);
                    let caption = match (read_kohya_caption(&caption_path)?, class_tokens.as_ref())
                    {
                        (Some(caption), _) => caption,
                        (None, Some(tokens)) => tokens.clone(),
                        (None, None) => {
                            return Err(Error::MissingCaptionFile {
                                image,
                                caption: caption_path,
                            });
                        }
                    };
                    Ok(row(image, Some(caption), 1))
                })
                .collect())
        }
        FolderLayout::KohyaRepeats => {
            let mut rows = Vec::new();
            for (subfolder, repeats, class_tokens) in kohya_subfolders(&folder.root)? {
                let mut images = Vec::new();
                list_images(&subfolder, &mut images, &mut Vec::new())?;
                images.sort();
                rows.extend(images.into_iter().map(|image| {
                    let caption = if read_captions {
                        let caption_path = folder.caption_path(&image);
                        Some(
                            read_kohya_caption(&caption_path)?
                                .unwrap_or_else(|| class_tokens.clone()),
                        )
                    } else {
                        None
                    };
                    Ok(row(image, caption, repeats))
                }));
            }
            Ok(rows)
        }
    }
}

fn row(image: PathBuf, caption: Option<String>, repeats: u32) -> RawRow {
    RawRow {
        origin: Origin::File(image.clone()),
        image: ImageRef::File(image),
        caption,
        repeats,
    }
}

/// The `<repeats>_<class tokens>` subfolders of a kohya-layout root, sorted by path, with their
/// repeat counts and class tokens (kohya's `extract_dreambooth_params` in `library/config_util.py`).
fn kohya_subfolders(root: &Path) -> Result<Vec<(PathBuf, u32, String)>> {
    let mut subfolders = Vec::new();
    let mut stray_images = Vec::new();
    list_images(root, &mut stray_images, &mut subfolders)?;
    if let Some(image) = stray_images.into_iter().min() {
        return Err(Error::KohyaFolder {
            path: image,
            problem: "an image directly in a kohya-layout folder; kohya reads only the images \
                      of its `<repeats>_<class tokens>` subfolders"
                .into(),
        });
    }
    subfolders.sort();
    let mut out = Vec::new();
    for subfolder in subfolders {
        let name = subfolder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        let (count, class_tokens) = name.split_once('_').unwrap_or((&name, ""));
        let bad = |problem: String| Error::KohyaFolder {
            path: subfolder.clone(),
            problem,
        };
        let repeats: i64 = count.trim().parse().map_err(|_| {
            bad(format!(
                "`{name}` is not named `<repeats>_<class tokens>` (e.g. `10_sks dog`); \
                 kohya would ignore this folder"
            ))
        })?;
        let repeats = u32::try_from(repeats)
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| {
                bad(format!(
                    "{repeats} repeats; at least 1 is needed (kohya would ignore this folder)"
                ))
            })?;
        out.push((subfolder, repeats, class_tokens.to_owned()));
    }
    if out.is_empty() {
        return Err(Error::EmptySelection {
            reason: format!(
                "{} has no `<repeats>_<class tokens>` subfolders",
                root.display()
            ),
        });
    }
    Ok(out)
}

/// A caption file as kohya's `DreamBoothDataset` reads it: the first line, stripped; `None` if
/// there is no file; an empty file is an error.
fn read_kohya_caption(path: &Path) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    if text.is_empty() {
        return Err(Error::BadCell {
            origin: Origin::File(path.to_path_buf()),
            problem: "the caption file is empty (kohya refuses it too)".into(),
        });
    }
    // Python's universal newlines: `\r\n`, `\r` and `\n` all end a line.
    let first = text.split(['\n', '\r']).next().unwrap_or_default();
    Ok(Some(py_strip(first).to_owned()))
}

/// The images directly in `folder` and its subfolders (not descended into).
fn list_images(folder: &Path, images: &mut Vec<PathBuf>, folders: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let path = entry.path();
        // Follows symbolic links, as kohya's `glob` and `is_dir` do.
        let metadata = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if metadata.is_dir() {
            folders.push(path);
        } else if is_image(&path) {
            images.push(path);
        }
    }
    Ok(())
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn collect_images(folder: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            collect_images(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}
