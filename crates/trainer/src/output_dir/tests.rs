//! Unit tests of `output_dir`.

use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("output-dir-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn temporary_names_are_ours_only() {
    for name in [
        "pytorch_lora_weights.safetensors.tmp4242",
        ".metrics.jsonl.tmp-17",
        ".model_card.json.tmp-1",
        "base_vs_lora.png.tmp",
        "step-000050.png.tmp",
        "optimizer.safetensors.tmp",
    ] {
        assert!(is_temporary(name), "{name}");
    }
    for name in [
        "notes.tmp",
        "data.csv.tmp",
        ".tmp",
        "x.png.tmpx",
        "x.png.tmp-",
        "x.png.tmp-1a",
        ".safetensors.tmp1",
        "pytorch_lora_weights.safetensors",
        "checkpoint-5",
    ] {
        assert!(!is_temporary(name), "{name}");
    }
}

#[test]
fn leftovers_are_removed_and_nothing_else() {
    let dir = scratch("leftovers");
    let store = CheckpointStore::new(&dir);
    for folder in [
        "logs",
        "validation",
        "checkpoint-5",
        ".checkpoint-10.tmp-99",
    ] {
        fs::create_dir_all(dir.join(folder)).unwrap();
    }
    let leftovers = [
        "pytorch_lora_weights.safetensors.tmp99",
        "logs/.metrics.jsonl.tmp-99",
        "validation/step-000050.png.tmp",
        "loss.png.tmp",
    ];
    let kept = [
        "pytorch_lora_weights.safetensors",
        "logs/metrics.jsonl",
        "notes.tmp",
        "checkpoint-5/optimizer.safetensors.tmp",
    ];
    for name in leftovers.iter().chain(&kept) {
        fs::write(dir.join(name), b"x").unwrap();
    }
    let mut removed = clean_leftovers(&store).unwrap();
    removed.sort();
    let mut expected: Vec<PathBuf> = leftovers.iter().map(|name| dir.join(name)).collect();
    expected.push(dir.join(".checkpoint-10.tmp-99"));
    expected.sort();
    assert_eq!(removed, expected);
    for name in kept {
        assert!(dir.join(name).exists(), "{name} was removed");
    }
    assert!(clean_leftovers(&store).unwrap().is_empty());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_previous_run_is_found_and_moved_aside_whole() {
    let dir = scratch("aside");
    let store = CheckpointStore::new(&dir);
    assert!(PreviousRun::find(&store).unwrap().is_empty());
    fs::write(dir.join(LOCK_FILE), b"pid 1\n").unwrap();
    fs::create_dir_all(dir.join("notes")).unwrap();
    assert!(
        PreviousRun::find(&store).unwrap().is_empty(),
        "the lock and other files are no run"
    );
    for step in [5, 10, 15, 20] {
        fs::create_dir_all(dir.join(format!("checkpoint-{step}"))).unwrap();
    }
    fs::create_dir_all(dir.join("logs")).unwrap();
    fs::write(dir.join("logs/events.out.tfevents.1.host.1.0"), b"").unwrap();
    fs::write(dir.join(LORA_FILE), b"lora").unwrap();
    let previous = PreviousRun::find(&store).unwrap();
    assert_eq!(
        previous,
        PreviousRun {
            checkpoints: vec![5, 10, 15, 20],
            finished: vec![LORA_FILE],
            logs: true,
        }
    );
    assert_eq!(
        previous.describe(),
        format!("checkpoint-5, … (4 checkpoints), checkpoint-20, {LORA_FILE}, logs/")
    );

    let first = move_aside(&dir).unwrap();
    let name = first.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(MOVED_ASIDE_PREFIX) && name.ends_with('Z'),
        "{name}"
    );
    assert_eq!(
        name.len(),
        MOVED_ASIDE_PREFIX.len() + "20261206T141005Z".len()
    );
    let mut left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [LOCK_FILE.to_owned(), name.clone()]);
    assert!(first.join("checkpoint-20").is_dir() && first.join(LORA_FILE).is_file());
    assert!(first.join("notes").is_dir() && first.join("logs").is_dir());
    assert!(PreviousRun::find(&store).unwrap().is_empty());

    // A second overwrite in the same second gets its own folder, beside the first.
    fs::write(dir.join(LORA_FILE), b"second").unwrap();
    let second = move_aside(&dir).unwrap();
    assert_ne!(second, first);
    assert_eq!(second.parent(), Some(dir.as_path()));
    assert_eq!(fs::read(second.join(LORA_FILE)).unwrap(), b"second");
    assert_eq!(fs::read(first.join(LORA_FILE)).unwrap(), b"lora");
    let _ = fs::remove_dir_all(&dir);
}
