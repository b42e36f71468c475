//! The bad inputs the cases write into their folder `{d}`.

use std::path::Path;

use super::harness::{copy_dir, fixture, write};

/// A tensor of a safetensors file: name, element type, shape, bytes.
pub type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// A safetensors header's free-form entries.
type Header = Option<std::collections::HashMap<String, String>>;

/// `{d}/images`: the fixtures' imagefolder (8 images and `metadata.jsonl`), to be spoiled.
pub fn imagefolder(d: &Path) {
    copy_dir(&fixture("captioned-images/imagefolder"), &d.join("images"));
}

/// `{d}/model`: a copy of the tiny SDXL model, to be spoiled.
pub fn model(d: &Path) {
    copy_dir(&fixture("tiny-sdxl"), &d.join("model"));
}

/// `{d}/captions`: two PNGs with `.txt` captions (a caption folder).
pub fn caption_folder(d: &Path) {
    let images = fixture("captioned-images/imagefolder");
    for (i, name) in ["000.png", "001.png"].iter().enumerate() {
        std::fs::create_dir_all(d.join("captions")).unwrap();
        std::fs::copy(images.join(name), d.join("captions").join(name)).unwrap();
        write(d, &format!("captions/00{i}.txt"), format!("caption {i}\n"));
    }
}

/// The tensors and header of a safetensors file.
fn tensors(path: &Path) -> (Vec<RawTensor>, Header) {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut out: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (out, header.metadata().clone())
}

/// Writes fixture `lora/<from>` to `{d}/<to>` with `edit` applied to its tensors.
pub fn edited_lora(d: &Path, from: &str, to: &str, edit: impl Fn(&mut Vec<RawTensor>)) {
    let (mut list, metadata) = tensors(&fixture(&format!("lora/{from}")));
    edit(&mut list);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = list
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap();
            (name.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, metadata).unwrap();
    write(d, to, bytes);
}

/// The first `n` bytes of fixture `from`, as `{d}/<to>`.
pub fn truncated(d: &Path, from: &Path, to: &str, n: usize) {
    let bytes = std::fs::read(from).unwrap();
    write(d, to, &bytes[..n.min(bytes.len())]);
}
