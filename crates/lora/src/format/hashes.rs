//! kohya's training hashes of a LoRA file, `sshs_model_hash` and `sshs_legacy_hash`: what
//! sd-scripts' `networks/lora.py` (`LoRANetwork.save_weights`) puts in every `.safetensors` it
//! writes, computed by `library/train_util.py` (`precalculate_safetensors_hashes`,
//! `addnet_hash_safetensors`, `addnet_hash_legacy`) so that sd-webui-additional-networks and A1111
//! need not hash the file when they index it.
//!
//! Both hash the file as it would be serialized with only the `ss_*` header entries (other entries,
//! such as `modelspec.*` or the hashes themselves, may change after training):
//!
//! - model hash: the SHA-256 (hex) of everything after the header, i.e. the tensor data in
//!   safetensors' order;
//! - legacy hash: the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB of that file
//!   (fewer or none when the file is shorter: then it is the hash of what is there).

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use tch::Tensor;

use super::io;
use crate::Result;

/// The header entry of the model hash.
pub const MODEL_HASH_KEY: &str = "sshs_model_hash";
/// The header entry of the legacy hash.
pub const LEGACY_HASH_KEY: &str = "sshs_legacy_hash";

/// kohya's two training hashes of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingHashes {
    /// `sshs_model_hash`: SHA-256 of the tensor data, 64 hex digits.
    pub model_hash: String,
    /// `sshs_legacy_hash`: 8 hex digits.
    pub legacy_hash: String,
}

const LEGACY_OFFSET: usize = 0x10_0000;
const LEGACY_LENGTH: usize = 0x1_0000;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hashes of a file holding `tensors` and `metadata`, as kohya computes them (only the
/// `ss_*` entries of `metadata` count). `path` names the file in errors.
///
/// # Errors
/// [`crate::Error::UnsupportedDtype`] and safetensors errors naming `path`.
pub fn training_hashes(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<TrainingHashes> {
    let training: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(key, _)| key.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(hashes_of_bytes(&io::serialize(path, tensors, &training)?))
}

/// The model hash of a safetensors file as it is on disk: the SHA-256 (hex) of everything after
/// its header, whatever the header holds. It equals `sshs_model_hash` for a file whose header has
/// only `ss_*` entries; A1111 computes it of every LoRA it applies ("addnet" hash) and writes its
/// first 12 digits in an image's `Lora hashes`.
///
/// # Errors
/// [`crate::Error::Io`] naming `path`.
pub fn file_model_hash(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| crate::Error::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(hashes_of_bytes(&bytes).model_hash)
}

/// The hashes of a serialized file (`bytes` starts with the 8-byte header length).
fn hashes_of_bytes(bytes: &[u8]) -> TrainingHashes {
    let header = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes);
    let data_start = usize::try_from(header)
        .ok()
        .and_then(|n| n.checked_add(8))
        .map_or(bytes.len(), |start| start.min(bytes.len()));
    let legacy_start = LEGACY_OFFSET.min(bytes.len());
    let legacy_end = (LEGACY_OFFSET + LEGACY_LENGTH).min(bytes.len());
    let legacy = hex(&Sha256::digest(&bytes[legacy_start..legacy_end]));
    TrainingHashes {
        model_hash: hex(&Sha256::digest(&bytes[data_start..])),
        legacy_hash: legacy[..8].to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_files_hash_what_is_there() {
        // A file shorter than 1 MiB: the legacy window is empty, SHA-256 of no bytes.
        let mut bytes = 16u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}              ");
        bytes.extend_from_slice(b"abc");
        let hashes = hashes_of_bytes(&bytes);
        assert_eq!(hashes.legacy_hash, "e3b0c442");
        assert_eq!(
            hashes.model_hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
