//! kohya's training hashes (`sshs_model_hash`, `sshs_legacy_hash`) equal those of kohya's own
//! `precalculate_safetensors_hashes` (sd-scripts `library/train_util.py`, run by the `kohya_hashes`
//! generator) on the same tensors and header entries: a small file, one over 1 MiB + 64 KiB (so the
//! legacy hash reads a whole window inside the data) in three float types, and one without metadata.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeMap;
use std::path::Path;

use lora::format::hashes::training_hashes;
use serde_json::Value;
use tch::{Kind, Tensor};
use test_support::fixture;

/// `((i * multiplier) % modulus - shift) / divisor` for i = 0.., as the generator made it.
fn pattern_tensor(spec: &Value) -> (String, Tensor) {
    let int = |name: &str| spec[name].as_i64().unwrap();
    let shape: Vec<i64> = spec["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_i64().unwrap())
        .collect();
    let count: i64 = shape.iter().product();
    let values: Vec<f64> = (0..count)
        .map(|i| {
            ((i * int("multiplier")) % int("modulus") - int("shift")) as f64 / int("divisor") as f64
        })
        .collect();
    let kind = match spec["dtype"].as_str().unwrap() {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        other => panic!("dtype {other}"),
    };
    let tensor = Tensor::from_slice(&values).to_kind(kind).reshape(&shape);
    (spec["key"].as_str().unwrap().to_owned(), tensor)
}

#[test]
fn hashes_equal_kohyas_own() {
    let text = std::fs::read_to_string(fixture("kohya-hashes.json")).unwrap();
    let document: Value = serde_json::from_str(&text).unwrap();
    let cases = document["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tensors: BTreeMap<String, Tensor> = case["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(pattern_tensor)
            .collect();
        let metadata: BTreeMap<String, String> = case["metadata"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let hashes = training_hashes(Path::new(name), &tensors, &metadata).unwrap();
        assert_eq!(
            hashes.model_hash, case["sshs_model_hash"],
            "{name}: model hash"
        );
        assert_eq!(
            hashes.legacy_hash, case["sshs_legacy_hash"],
            "{name}: legacy hash"
        );
        // A1111's hash of the file on disk reads only the data: a file of the same tensors with
        // another header (here none) has the same one.
        let path = std::env::temp_dir().join(format!(
            "kohya-hashes-{}-{name}.safetensors",
            std::process::id()
        ));
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &path).unwrap();
        let on_disk = lora::format::hashes::file_model_hash(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(on_disk, case["sshs_model_hash"], "{name}: file hash");
    }
    // The large case's legacy hash reads real data (not the empty window of a short file).
    assert_ne!(cases[1]["sshs_legacy_hash"], "e3b0c442");
}
