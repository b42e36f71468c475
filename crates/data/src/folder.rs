//! Folder datasets: an `imagefolder` with `metadata.jsonl` (the `datasets` ImageFolder builder's
//! layout: one JSON object per line with a `file_name` relative to the folder and caption columns)
//! and a folder of images with a `.txt` caption of the same stem next to each (kohya's layout).

use std::path::{Path, PathBuf};

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
            })
        })();
        rows.push(row);
    }
    Ok(rows)
}

/// Lists the images under `root` (recursively, sorted by path) with their `.txt` captions.
/// With `read_captions`, an image without a caption file fails its row.
pub(crate) fn read_caption_files(root: &Path, read_captions: bool) -> Result<Vec<Result<RawRow>>> {
    let mut images = Vec::new();
    collect_images(root, &mut images)?;
    images.sort();
    Ok(images
        .into_iter()
        .map(|image| {
            let caption = if read_captions {
                let caption_path = image.with_extension("txt");
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
            Ok(RawRow {
                origin: Origin::File(image.clone()),
                image: ImageRef::File(image),
                caption,
            })
        })
        .collect())
}

fn collect_images(folder: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            collect_images(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}
