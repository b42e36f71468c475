//! The checkpoint store: saving, listing, resolving `--resume_from_checkpoint`, pruning and
//! cleaning up, and its crash safety when the writing process is killed with SIGKILL at random
//! moments (the test binary re-runs itself as the writer).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use trainer::Error;
use trainer::checkpoint::{CheckpointStore, write_atomic};

/// A fresh, empty folder under the system's temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "trainer-checkpoints-{}-{name}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The names in a folder, sorted.
fn names(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(folder)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn steps(store: &CheckpointStore) -> Vec<u64> {
    store
        .list()
        .unwrap()
        .into_iter()
        .map(|(step, _)| step)
        .collect()
}

/// Saves a checkpoint holding one file, `value.txt`.
fn save_value(store: &CheckpointStore, step: u64, value: &str) -> PathBuf {
    store
        .save(step, |folder| {
            write_atomic(&folder.join("value.txt"), value.as_bytes())
        })
        .unwrap()
}

#[test]
fn saved_checkpoints_are_listed_by_step_under_their_final_name() {
    let scratch = Scratch::new("save");
    let output_dir = scratch.0.join("run"); // created by the first save
    let store = CheckpointStore::new(&output_dir);
    assert_eq!(store.latest().unwrap(), None);

    for step in [20, 5, 100] {
        let path = save_value(&store, step, &format!("step {step}"));
        assert_eq!(path, output_dir.join(format!("checkpoint-{step}")));
        assert_eq!(path, store.checkpoint_path(step));
    }
    let listed = store.list().unwrap();
    assert_eq!(
        listed.iter().map(|(step, _)| *step).collect::<Vec<_>>(),
        [5, 20, 100]
    );
    for (step, path) in &listed {
        assert_eq!(
            fs::read_to_string(path.join("value.txt")).unwrap(),
            format!("step {step}")
        );
        assert_eq!(names(path), ["value.txt"], "no temporary file left inside");
    }
    assert_eq!(
        store.latest().unwrap(),
        Some((100, output_dir.join("checkpoint-100")))
    );
    assert_eq!(
        names(&output_dir),
        ["checkpoint-100", "checkpoint-20", "checkpoint-5"]
    );
}

#[test]
fn names_that_only_look_like_checkpoints_are_ignored() {
    let scratch = Scratch::new("names");
    let store = CheckpointStore::new(&scratch.0);
    save_value(&store, 2, "real");
    for folder in [
        "checkpoint-abc",
        "checkpoint-5.tmp-1",
        "checkpoint-007",
        "checkpoint-",
        "checkpoint-+9",
        ".checkpoint-9.tmp-1",
        ".checkpoint-8.old-1",
        ".trash-checkpoint-3-1",
        "Checkpoint-4",
        "logs",
    ] {
        fs::create_dir(scratch.0.join(folder)).unwrap();
    }
    fs::write(scratch.0.join("checkpoint-6"), b"a file, not a folder").unwrap();
    fs::write(scratch.0.join("checkpoint-7.safetensors"), b"a file").unwrap();

    assert_eq!(steps(&store), [2]);
    assert_eq!(store.latest().unwrap().map(|(step, _)| step), Some(2));
    assert_eq!(
        store.resolve("latest").unwrap().map(|(step, _)| step),
        Some(2)
    );
}

#[derive(Debug)]
enum WriterError {
    Store(#[allow(dead_code)] Error), // shown through Debug when a test fails
    Refused(&'static str),
}

impl From<Error> for WriterError {
    fn from(error: Error) -> Self {
        Self::Store(error)
    }
}

#[test]
fn saving_a_step_again_replaces_the_old_checkpoint_whole() {
    let scratch = Scratch::new("replace");
    let store = CheckpointStore::new(&scratch.0);
    save_value(&store, 10, "old");
    write_atomic(&store.checkpoint_path(10).join("only-in-old.txt"), b"stale").unwrap();
    save_value(&store, 11, "eleven");

    let path = save_value(&store, 10, "new");
    assert_eq!(steps(&store), [10, 11]);
    assert_eq!(fs::read_to_string(path.join("value.txt")).unwrap(), "new");
    assert_eq!(
        names(&path),
        ["value.txt"],
        "nothing of the old checkpoint is kept"
    );
    assert_eq!(
        names(&scratch.0),
        ["checkpoint-10", "checkpoint-11"],
        "no temporary or trash folder is left"
    );
}

#[test]
fn a_failed_write_leaves_no_trace_and_keeps_the_existing_checkpoint() {
    let scratch = Scratch::new("failed-write");
    let store = CheckpointStore::new(&scratch.0);
    save_value(&store, 3, "kept");

    for step in [3, 4] {
        let result = store.save(step, |folder| -> Result<(), WriterError> {
            fs::write(folder.join("half.bin"), [0u8; 1000]).unwrap();
            Err(WriterError::Refused("the model could not be serialised"))
        });
        assert!(
            matches!(result, Err(WriterError::Refused(reason)) if reason.contains("serialised")),
            "{result:?}"
        );
    }
    assert_eq!(names(&scratch.0), ["checkpoint-3"]);
    assert_eq!(
        fs::read_to_string(store.checkpoint_path(3).join("value.txt")).unwrap(),
        "kept"
    );
}

#[test]
fn a_file_in_the_way_of_a_checkpoint_is_an_error_naming_it() {
    let scratch = Scratch::new("file-in-the-way");
    let store = CheckpointStore::new(&scratch.0);
    fs::write(scratch.0.join("checkpoint-8"), b"not a folder").unwrap();
    let error = store.save(8, |_| Ok::<(), Error>(())).unwrap_err();
    assert!(matches!(error, Error::Checkpoint { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains(&format!("{}", scratch.0.join("checkpoint-8").display())),
        "{error}"
    );
    assert_eq!(
        names(&scratch.0),
        ["checkpoint-8"],
        "the temporary folder is removed"
    );

    let output_dir_is_a_file = CheckpointStore::new(scratch.0.join("checkpoint-8"));
    let error = output_dir_is_a_file.list().unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    assert!(error.to_string().contains("checkpoint-8"), "{error}");
}

#[test]
fn resume_from_checkpoint_takes_latest_or_a_checkpoint_folder() {
    let scratch = Scratch::new("resolve");
    let output_dir = scratch.0.join("run");
    let store = CheckpointStore::new(&output_dir);
    assert_eq!(
        store.resolve("latest").unwrap(),
        None,
        "no output folder yet: start fresh"
    );
    fs::create_dir(&output_dir).unwrap();
    assert_eq!(
        store.resolve("latest").unwrap(),
        None,
        "no checkpoint yet: start fresh"
    );

    let five = save_value(&store, 5, "five");
    save_value(&store, 50, "fifty");
    assert_eq!(
        store.resolve("latest").unwrap(),
        Some((50, output_dir.join("checkpoint-50")))
    );
    assert_eq!(
        store.resolve(five.to_str().unwrap()).unwrap(),
        Some((5, five.clone()))
    );
    assert_eq!(
        store
            .resolve(&format!("{}/", five.display()))
            .unwrap()
            .map(|(step, _)| step),
        Some(5)
    );
    // A bare name is looked for inside the output folder, as diffusers does.
    assert_eq!(
        store.resolve("checkpoint-5").unwrap(),
        Some((5, five.clone()))
    );

    let missing = output_dir.join("checkpoint-7");
    let not_a_checkpoint = scratch.0.join("weights");
    fs::create_dir(&not_a_checkpoint).unwrap();
    let a_file = output_dir.join("checkpoint-9");
    fs::write(&a_file, b"file").unwrap();
    for (arg, expected) in [
        (missing.to_str().unwrap(), "no such checkpoint folder"),
        ("checkpoint-7", "no such checkpoint folder"),
        (
            not_a_checkpoint.to_str().unwrap(),
            "not a checkpoint folder",
        ),
        (a_file.to_str().unwrap(), "no such checkpoint folder"),
        ("", "expected `latest`"),
    ] {
        let error = store.resolve(arg).unwrap_err();
        assert!(
            matches!(error, Error::ResumeFromCheckpoint { .. }),
            "{arg}: {error:?}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("--resume_from_checkpoint {arg}")),
            "{message}"
        );
        assert!(message.contains(expected), "{message}");
    }
    let relative_miss = store.resolve("checkpoint-7").unwrap_err().to_string();
    assert!(
        relative_miss.contains(&missing.display().to_string()),
        "names where it looked: {relative_miss}"
    );
}

#[test]
fn prune_keeps_the_newest_checkpoints() {
    let scratch = Scratch::new("prune");
    let store = CheckpointStore::new(&scratch.0);
    assert_eq!(
        store.prune(3).unwrap(),
        Vec::<u64>::new(),
        "nothing to prune, not even a folder"
    );
    for step in [100, 200, 300, 400, 500] {
        save_value(&store, step, "x");
    }
    fs::create_dir(scratch.0.join("checkpoint-abc")).unwrap();
    assert_eq!(store.prune(3).unwrap(), [100, 200]);
    assert_eq!(steps(&store), [300, 400, 500]);
    assert_eq!(store.prune(3).unwrap(), Vec::<u64>::new());
    assert_eq!(store.prune(1).unwrap(), [300, 400]);
    assert_eq!(
        names(&scratch.0),
        ["checkpoint-500", "checkpoint-abc"],
        "no trash left, other folders kept"
    );
    assert_eq!(store.prune(0).unwrap(), [500]);
    assert_eq!(names(&scratch.0), ["checkpoint-abc"]);
}

#[test]
fn clean_stale_removes_leftovers_and_restores_a_checkpoint_moved_aside() {
    let scratch = Scratch::new("clean");
    let store = CheckpointStore::new(&scratch.0);
    assert_eq!(
        store.clean_stale().unwrap(),
        Vec::<PathBuf>::new(),
        "a missing output folder is clean"
    );
    save_value(&store, 6, "new six");
    let make_folder = |name: &str, value: &str| {
        let folder = scratch.0.join(name);
        fs::create_dir_all(folder.join("nested")).unwrap();
        fs::write(folder.join("value.txt"), value).unwrap();
        fs::write(folder.join("nested/part.bin"), [1u8; 64]).unwrap();
    };
    make_folder(".checkpoint-7.tmp-4242", "half-written seven");
    make_folder(".trash-checkpoint-3-4242", "half-deleted three");
    make_folder(".checkpoint-4.old-4242", "complete four, moved aside"); // checkpoint-4 is missing
    make_folder(".checkpoint-6.old-4242", "old six"); // checkpoint-6 was saved again
    fs::write(
        scratch.0.join(".pytorch_lora_weights.safetensors.tmp-4242"),
        b"half a file",
    )
    .unwrap();
    // The user's own things stay.
    fs::write(scratch.0.join("notes.txt"), b"mine").unwrap();
    fs::write(scratch.0.join(".gitignore"), b"*").unwrap();
    fs::create_dir(scratch.0.join("checkpoint-abc")).unwrap();

    let removed: BTreeSet<PathBuf> = store.clean_stale().unwrap().into_iter().collect();
    let expected: BTreeSet<PathBuf> = [
        ".checkpoint-7.tmp-4242",
        ".trash-checkpoint-3-4242",
        ".checkpoint-6.old-4242",
        ".pytorch_lora_weights.safetensors.tmp-4242",
    ]
    .into_iter()
    .map(|name| scratch.0.join(name))
    .collect();
    assert_eq!(removed, expected);
    assert_eq!(
        names(&scratch.0),
        [
            ".gitignore",
            "checkpoint-4",
            "checkpoint-6",
            "checkpoint-abc",
            "notes.txt"
        ]
    );
    assert_eq!(
        fs::read_to_string(store.checkpoint_path(4).join("value.txt")).unwrap(),
        "complete four, moved aside"
    );
    assert_eq!(
        fs::read_to_string(store.checkpoint_path(6).join("value.txt")).unwrap(),
        "new six"
    );
    assert_eq!(
        store.clean_stale().unwrap(),
        Vec::<PathBuf>::new(),
        "a second clean finds nothing"
    );
}

#[test]
fn write_atomic_replaces_a_file_whole_and_names_a_bad_path() {
    let scratch = Scratch::new("atomic");
    let path = scratch.0.join("pytorch_lora_weights.safetensors");
    write_atomic(&path, b"first version, rather long").unwrap();
    write_atomic(&path, b"second").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"second");
    assert_eq!(names(&scratch.0), ["pytorch_lora_weights.safetensors"]);

    let in_missing_folder = scratch.0.join("no-such-folder/file.bin");
    let error = write_atomic(&in_missing_folder, b"x").unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains(&in_missing_folder.display().to_string()),
        "{error}"
    );

    let error = write_atomic(Path::new("/"), b"x").unwrap_err();
    assert!(matches!(error, Error::Checkpoint { .. }), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// Crash safety under SIGKILL.
//
// The test binary re-runs itself with `WRITER_DIR` set, selecting the ignored test
// `checkpoint_writer_process`, which saves checkpoints in a loop the way the trainer does (clean
// up, resume from the latest, save, prune) and prints a marker before and after each operation.
// The parent kills it at seeded random moments and checks what a resumed run would find.

/// Set in the writer's environment: the output folder it writes to.
const WRITER_DIR: &str = "TRAINER_CHECKPOINT_WRITER_DIR";
/// Set in the writer's environment when it should stop (exit cleanly) after saving this step.
const WRITER_STOP_AT: &str = "TRAINER_CHECKPOINT_WRITER_STOP_AT";
/// `--checkpoints_total_limit` of the writer.
const KEEP: usize = 3;
/// The files of a checkpoint and their sizes: 3 MiB in all, one in a sub-folder.
const FILES: [(&str, usize); 4] = [
    ("unet_lora.bin", 2 << 20),
    ("optimizer.bin", 1 << 20),
    ("text_encoder/lora.bin", 48 << 10),
    ("random_states.bin", 4 << 10),
];
/// Written last, so a folder that has it has everything (the store must never show one without).
const MANIFEST: &str = "manifest.txt";

/// splitmix64: seeded delays and file contents, without a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The content of file `index` of checkpoint `step` saved for the `generation`-th time: it
/// differs for every step, generation and file, so a mixed-up or stale file is caught.
fn content(step: u64, generation: u64, index: usize, len: usize) -> Vec<u8> {
    let mut rng = SplitMix(step << 16 | generation << 8 | index as u64);
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        bytes.extend_from_slice(&rng.next().to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// Fills a checkpoint folder as a trainer would: big files written in pieces, then the manifest.
/// A pause after each piece stands for the device-to-host copies and serialisation that a
/// trainer interleaves with its writes; without it, writing 3 MiB takes a millisecond beside the
/// fsyncs, and hardly any kill would land inside a file.
fn write_checkpoint(folder: &Path, step: u64, generation: u64) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let mut manifest = format!("step {step}\ngeneration {generation}\n");
    for (index, (name, len)) in FILES.iter().enumerate() {
        let path = folder.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut file = fs::File::create(&path).map_err(io(&path))?;
        for piece in content(step, generation, index, *len).chunks(256 << 10) {
            file.write_all(piece).map_err(io(&path))?;
            std::thread::sleep(Duration::from_millis(3));
        }
        manifest.push_str(&format!("file {name} {len}\n"));
    }
    fs::write(folder.join(MANIFEST), manifest).map_err(io(folder))
}

/// Checks that a listed checkpoint is complete and holds what `write_checkpoint` wrote for its
/// step (of either generation); panics naming the problem otherwise.
fn verify_checkpoint(step: u64, folder: &Path) {
    let manifest = fs::read_to_string(folder.join(MANIFEST)).unwrap_or_else(|e| {
        panic!(
            "{}: listed as a checkpoint but has no readable manifest: {e}",
            folder.display()
        )
    });
    let mut lines = manifest.lines();
    assert_eq!(
        lines.next(),
        Some(format!("step {step}").as_str()),
        "{}: manifest of another step",
        folder.display()
    );
    let generation: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("generation "))
        .unwrap()
        .parse()
        .unwrap();
    let mut expected_files = BTreeSet::from([MANIFEST.to_owned()]);
    for (index, ((name, len), line)) in FILES.iter().zip(lines).enumerate() {
        assert_eq!(
            line,
            format!("file {name} {len}"),
            "{}: manifest",
            folder.display()
        );
        let bytes = fs::read(folder.join(name)).unwrap();
        assert!(
            bytes == content(step, generation, index, *len),
            "{}/{name}: wrong content",
            folder.display()
        );
        expected_files.insert((*name).to_owned());
    }
    let mut found = BTreeSet::new();
    collect_files(folder, folder, &mut found);
    assert_eq!(found, expected_files, "{}: files", folder.display());
}

fn collect_files(root: &Path, folder: &Path, found: &mut BTreeSet<String>) {
    for entry in fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(root, &path, found);
        } else {
            found.insert(
                path.strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
}

/// Prints a progress marker for the parent (stdout is line-buffered, so each line leaves at once).
fn marker(text: String) {
    println!("writer: {text}");
}

/// The writer process. Does nothing unless started by `checkpoints_survive_sigkill_at_random_moments`.
#[test]
#[ignore = "the writer process of checkpoints_survive_sigkill_at_random_moments, which starts it"]
fn checkpoint_writer_process() {
    let Some(output_dir) = std::env::var_os(WRITER_DIR) else {
        return;
    };
    let stop_at: Option<u64> = std::env::var(WRITER_STOP_AT)
        .ok()
        .map(|s| s.parse().unwrap());
    let store = CheckpointStore::new(PathBuf::from(output_dir));
    let cleaned = store.clean_stale().unwrap();
    // A run killed between a save and its prune left one checkpoint too many; without this a
    // series of such kills would pile them up.
    store.prune(KEEP).unwrap();
    let first = store.latest().unwrap().map_or(1, |(step, _)| step + 1);
    marker(format!("ready {first} cleaned {}", cleaned.len()));
    // The cap only matters if the parent dies without killing us.
    for step in first..=stop_at.unwrap_or(first + 5000) {
        // Every third step is saved twice, so that kills also land in a save replacing a checkpoint.
        let generations = if step.is_multiple_of(3) { 2 } else { 1 };
        for generation in 0..generations {
            marker(format!("begin {step} {generation}"));
            store
                .save(step, |folder| {
                    write_checkpoint(folder, step, generation)?;
                    marker(format!("written {step} {generation}"));
                    Ok::<(), Error>(())
                })
                .unwrap();
            marker(format!("saved {step} {generation}"));
        }
        store.prune(KEEP).unwrap();
        marker(format!("pruned {step}"));
    }
}

/// A started writer, its stdout read line by line on a thread.
struct Writer {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Writer {
    fn start(output_dir: &Path, stop_at: Option<u64>) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "checkpoint_writer_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_DIR, output_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match stop_at {
            Some(step) => command.env(WRITER_STOP_AT, step.to_string()),
            None => command.env_remove(WRITER_STOP_AT),
        };
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The harness's `test checkpoint_writer_process ... ` precedes the first marker.
                if let Some((_, text)) = line.split_once("writer: ")
                    && sender.send(text.to_owned()).is_err()
                {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the marker that says the writer has cleaned up and starts saving.
    fn wait_ready(&mut self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let ready = line
                    .strip_prefix("ready ")
                    .map(|rest| rest.split(' ').next().unwrap().parse().unwrap());
                self.seen.push(line);
                if let Some(first) = ready {
                    return first;
                }
            } else if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the writer exited before it was ready ({status}): {}",
                    self.stderr()
                );
            }
        }
        panic!("the writer did not get ready within two minutes");
    }

    /// All markers printed so far (after the writer has exited: all of them).
    fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        &self.seen
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

/// Where the last marker says the writer was when it died.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    /// Before the first `begin`.
    StartingUp,
    /// After a `begin`, before its files were all written.
    WritingFiles,
    /// After the files were written, before the save returned: flushing them, renaming.
    FlushingOrRenaming,
    /// After a save returned, before the prune that follows it returned.
    InsidePrune,
    /// After a prune returned, before the next save began.
    BetweenSteps,
}

fn moment(markers: &[String]) -> Moment {
    match markers.last().map(|line| line.split(' ').next().unwrap()) {
        Some("begin") => Moment::WritingFiles,
        Some("written") => Moment::FlushingOrRenaming,
        Some("saved") => Moment::InsidePrune,
        Some("pruned") => Moment::BetweenSteps,
        _ => Moment::StartingUp,
    }
}

/// The step of the last `saved` marker: that checkpoint was complete before the kill.
fn last_saved(markers: &[String]) -> Option<u64> {
    markers.iter().rev().find_map(|line| {
        line.strip_prefix("saved ")
            .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
    })
}

#[test]
fn checkpoints_survive_sigkill_at_random_moments() {
    const KILLS: usize = 16;
    let scratch = Scratch::new("sigkill");
    let store = CheckpointStore::new(&scratch.0);
    let mut delays = SplitMix(0x00c0_ffee);
    let mut moments = std::collections::BTreeMap::<Moment, usize>::new();
    let mut leftovers_seen = std::collections::BTreeMap::<&str, usize>::new();
    let mut mid_file_writes = 0;
    let mut restorable = 0;
    let mut newest_so_far = 0;
    let mut previous_pids = Vec::new();

    for kill in 0..KILLS {
        let delay = Duration::from_millis(delays.next() % 400);
        let mut writer = Writer::start(&scratch.0, None);
        let first = writer.wait_ready();
        assert_eq!(
            first,
            newest_so_far + 1,
            "kill {kill}: the writer resumes after the latest checkpoint"
        );
        std::thread::sleep(delay);
        if let Some(status) = writer.child.try_wait().unwrap() {
            panic!(
                "kill {kill}: the writer died by itself ({status}): {}",
                writer.stderr()
            );
        }
        writer.child.kill().unwrap(); // SIGKILL on Unix
        writer.child.wait().unwrap();
        let markers = writer.drain().to_vec();
        let when = moment(&markers);
        *moments.entry(when).or_default() += 1;

        // What a resumed run would find: every listed checkpoint complete, at most one more than
        // the limit (killed between a save and its prune), nothing saved lost. A kill between the
        // two renames of a replacing save leaves that step only under its moved-aside name, which
        // the next clean_stale restores: it must be complete too.
        let listed = store.list().unwrap();
        for (step, folder) in &listed {
            verify_checkpoint(*step, folder);
        }
        assert!(
            listed.len() <= KEEP + 1,
            "kill {kill}: {} checkpoints",
            listed.len()
        );
        let mut newest = listed.last().map_or(0, |(step, _)| *step);
        for name in names(&scratch.0) {
            let Some(step) = name
                .strip_prefix(".checkpoint-")
                .and_then(|rest| rest.split_once(".old-"))
            else {
                continue;
            };
            let step: u64 = step.0.parse().unwrap();
            if !store.checkpoint_path(step).exists() {
                verify_checkpoint(step, &scratch.0.join(&name));
                restorable += 1;
                newest = newest.max(step);
            }
        }
        if let Some(saved) = last_saved(&markers) {
            assert!(
                newest >= saved,
                "kill {kill}: checkpoint {saved} was saved but the newest is {newest}"
            );
        }
        assert!(
            newest >= newest_so_far,
            "kill {kill}: the newest checkpoint went back from {newest_so_far} to {newest}"
        );
        newest_so_far = newest;

        // What the kill left behind, for the report; the next writer's clean_stale removes it,
        // so nothing may carry the pid of an earlier writer.
        for name in names(&scratch.0) {
            let kind = if name.contains(".tmp-") {
                if !scratch.0.join(&name).join(MANIFEST).exists() {
                    mid_file_writes += 1;
                }
                "temporary folder"
            } else if name.contains(".old-") {
                "checkpoint moved aside"
            } else if name.starts_with(".trash-") {
                "trash folder"
            } else {
                continue;
            };
            *leftovers_seen.entry(kind).or_default() += 1;
            for pid in &previous_pids {
                assert!(
                    !name.ends_with(&format!("-{pid}")),
                    "kill {kill}: {name} survived a restart's clean_stale"
                );
            }
        }
        previous_pids.push(writer.child.id());
        println!(
            "kill {kill:2} after {:3} ms: {when:?}, checkpoints {:?}",
            delay.as_millis(),
            listed.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        );
    }

    // A last writer runs to its end: it cleans up, resumes and leaves exactly the newest KEEP.
    let stop_at = newest_so_far + 4;
    let mut writer = Writer::start(&scratch.0, Some(stop_at));
    writer.wait_ready();
    let status = writer.child.wait().unwrap();
    assert!(
        status.success(),
        "the last writer failed ({status}): {}",
        writer.stderr()
    );
    let listed = store.list().unwrap();
    assert_eq!(
        listed.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (stop_at + 1 - KEEP as u64..=stop_at).collect::<Vec<_>>()
    );
    for (step, folder) in &listed {
        verify_checkpoint(*step, folder);
    }
    assert_eq!(
        names(&scratch.0).len(),
        KEEP,
        "only the checkpoints are left: {:?}",
        names(&scratch.0)
    );

    println!("{KILLS} kills by moment: {moments:?}");
    println!(
        "left behind by the kills: {leftovers_seen:?}; temporary folders without their manifest (killed \
         mid-write): {mid_file_writes}; checkpoints only under their moved-aside name: {restorable}"
    );
    let inside_save = [Moment::WritingFiles, Moment::FlushingOrRenaming]
        .map(|m| moments.get(&m).copied().unwrap_or(0));
    assert!(
        inside_save.iter().sum::<usize>() >= 1,
        "no kill landed inside a save, so the test proved little: {moments:?}"
    );
}
