//! The runner of the bad-input tables: each case gets a fresh folder `{d}` holding the bad input its
//! `setup` writes and an existing output folder `{d}/out` (an earlier run's files); the example runs
//! with the case's arguments, and the case passes when the exit status is the expected one (never
//! 101, a panic), the last line of stderr is `error: …` naming the culprit, nothing on stderr reads
//! as a panic or a backtrace, and `{d}/out` holds the same files with the same bytes as before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The example a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Example {
    /// `train_naruto --preset tiny --output_dir {d}/out --max_train_steps 2` then the case's
    /// arguments (the tiny model and dataset unless the case names others).
    Train,
    /// `generate` with the case's arguments only.
    Generate,
    /// `lora_convert` with the case's arguments only.
    Convert,
}

/// One bad input and what must happen.
pub struct Case {
    /// A short name, unique in the suite.
    pub name: &'static str,
    /// The example that runs.
    pub example: Example,
    /// Its arguments; `{d}` is the case's folder, `{out}` the output folder `{d}/out`, `{tiny}` the
    /// tiny SDXL model of the fixtures, `{fixtures}` the fixtures folder, `{data}` the tiny
    /// dataset.
    pub args: &'static [&'static str],
    /// Writes the case's bad input into `{d}` (run before the example).
    pub setup: fn(&Path),
    /// The exit status: 2 for a usage error, 1 for an error while running.
    pub status: i32,
    /// What the last stderr line must contain (placeholders as in `args`).
    pub culprit: &'static str,
}

/// No setup.
pub fn nothing(_: &Path) {}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn expand(text: &str, dir: &Path) -> String {
    let fixtures = repo().join("tests/fixtures");
    text.replace("{out}", &dir.join("out").display().to_string())
        .replace("{d}", &dir.display().to_string())
        .replace("{tiny}", &fixtures.join("tiny-sdxl").display().to_string())
        .replace("{fixtures}", &fixtures.display().to_string())
        .replace(
            "{data}",
            &repo()
                .join("examples/data/tiny-naruto")
                .display()
                .to_string(),
        )
}

/// Every file under `dir` (relative path) with the SHA-256 of its bytes; folders as `/`-ended names.
pub fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            if path.is_dir() {
                into.insert(format!("{name}/"), String::new());
                walk(root, &path, into);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                into.insert(name, format!("{:x}", Sha256::digest(&bytes)));
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

/// Writes `bytes` to `{dir}/{name}`, creating folders.
pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

/// The path of fixture `name`.
pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// Copies folder `from` to `to` (recursively).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one case; `Err` says what went wrong.
fn run_case(case: &Case, root: &Path) -> Result<(), String> {
    let dir = root.join(case.name);
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    write(&out, "earlier-run.txt", "an earlier run's file\n");
    // A user's files, not a run's (a folder holding a run is refused before anything else looks at
    // the inputs: tests/output_folder.rs).
    write(&out, "notes/earlier.txt", "a user's note\n");
    (case.setup)(&dir);
    let before = snapshot(&out);
    let mut args: Vec<String> = match case.example {
        Example::Train => [
            "--preset",
            "tiny",
            "--output_dir",
            "{out}",
            "--max_train_steps",
            "2",
        ]
        .iter()
        .map(|a| expand(a, &dir))
        .collect(),
        _ => Vec::new(),
    };
    args.extend(case.args.iter().map(|a| expand(a, &dir)));
    let name = match case.example {
        Example::Train => "train_naruto",
        Example::Generate => "generate",
        Example::Convert => "lora_convert",
    };
    let mut child = Command::new(crate::common::example_path(name))
        .args(&args)
        .current_dir(&dir)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name} did not start: {e}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    // A usage error is one line ending with the hint; the culprit is named before it.
    let line = stderr.lines().next_back().unwrap_or_default();
    let culprit = expand(case.culprit, &dir);
    let mut problems = Vec::new();
    if status.code() != Some(case.status) {
        problems.push(format!(
            "exit {:?}, expected {}",
            status.code(),
            case.status
        ));
    }
    if stderr.contains("panicked") || stderr.contains("stack backtrace") {
        problems.push("a panic".into());
    }
    if !line.starts_with("error: ") || !line.contains(&culprit) {
        problems.push(format!("the last line does not name `{culprit}`"));
    }
    let after = snapshot(&out);
    if after != before {
        let changed: Vec<&String> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        problems.push(format!("the output folder changed: {changed:?}"));
    }
    if problems.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    } else {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        Err(format!("{}; stderr ends {tail:?}", problems.join("; ")))
    }
}

/// Runs every case of a table and fails naming each case that did not pass.
pub fn check(table: &str, cases: &[Case]) {
    let root = std::env::temp_dir().join(format!("sdxl-bad-inputs-{}-{table}", std::process::id()));
    let mut failures = Vec::new();
    for case in cases {
        let start = Instant::now();
        let result = run_case(case, &root);
        println!(
            "{table}/{}: {} in {:.2} s",
            case.name,
            if result.is_ok() { "ok" } else { "FAILED" },
            start.elapsed().as_secs_f64()
        );
        if let Err(problem) = result {
            failures.push(format!("{}: {problem}", case.name));
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
