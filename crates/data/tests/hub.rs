//! The hub source against a stand-in hub on 127.0.0.1: `HF_ENDPOINT` points hf-hub at a small HTTP
//! server serving the endpoints hf-hub calls (repo info, ranged `resolve` downloads with etag and
//! commit headers); the dataset is fetched into `HF_HOME`'s hub cache and then reopened offline with
//! the server gone.
//!
//! One test in this binary: it sets process environment variables.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{Scratch, fixture};
use data::{Columns, Dataset, DatasetConfig, HubDataset, Loader, LoaderConfig, Source};
use sha2::{Digest, Sha256};

const REPO: &str = "lambdalabs/naruto-tiny";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const SHARD: &str = "data/train-00000-of-00001.parquet";

/// A minimal HTTP/1.1 server for one dataset repo; records the paths it was asked for.
struct FakeHub {
    address: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    fn start(files: Vec<(String, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &files, &log),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Self {
            address,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

fn serve(stream: TcpStream, files: &[(String, Vec<u8>)], log: &Mutex<Vec<String>>) {
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut range = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = value.trim().strip_prefix("bytes=").map(str::to_owned);
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    log.lock().unwrap().push(format!("{path} range={range:?}"));
    let mut stream = stream;
    let info_path = format!("/api/datasets/{REPO}/revision/main");
    let resolve_prefix = format!("/datasets/{REPO}/resolve/main/");
    if path == info_path {
        let siblings: Vec<String> = files
            .iter()
            .map(|(name, _)| format!("{{\"rfilename\":\"{name}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\":\"{REPO}\",\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    } else if let Some(name) = path.strip_prefix(&resolve_prefix)
        && let Some((_, content)) = files.iter().find(|(n, _)| n == name)
    {
        let etag = format!("\"{:x}\"", Sha256::digest(content));
        let total = content.len();
        let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
            Some((a, b)) => (
                a.parse().unwrap_or(0),
                b.parse().unwrap_or(total - 1).min(total - 1),
            ),
            None => (0, total - 1),
        };
        let headers = [
            ("ETag", etag),
            ("X-Repo-Commit", COMMIT.into()),
            ("Content-Range", format!("bytes {start}-{end}/{total}")),
            ("Accept-Ranges", "bytes".into()),
        ];
        respond(
            &mut stream,
            "206 Partial Content",
            &headers,
            &content[start..=end],
        );
    } else {
        respond(
            &mut stream,
            "404 Not Found",
            &[],
            b"{\"error\":\"not found\"}",
        );
    }
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    stream.flush().unwrap();
}

fn fingerprint(source: &Source) -> Vec<(Vec<String>, f64)> {
    let dataset = Dataset::open(source, DatasetConfig::new(32).unwrap()).unwrap();
    let loader = Loader::new(Arc::new(dataset), LoaderConfig::new(4, 7)).unwrap();
    loader
        .iter(0, 4)
        .map(|b| {
            let b = b.unwrap();
            (
                b.samples.iter().map(|s| s.prompt.clone()).collect(),
                b.pixels.sum(tch::Kind::Double).double_value(&[]),
            )
        })
        .collect()
}

#[test]
fn download_cache_and_reopen_offline() {
    let shard = std::fs::read(fixture(format!("parquet/{SHARD}"))).unwrap();
    let files = vec![
        (
            ".gitattributes".to_owned(),
            b"*.parquet filter=lfs\n".to_vec(),
        ),
        ("README.md".to_owned(), b"# tiny\n".to_vec()),
        (SHARD.to_owned(), shard.clone()),
    ];
    let mut hub = FakeHub::start(files);
    let home = Scratch::new("hf-home");
    // SAFETY: this binary has a single test, so no other thread reads the environment meanwhile.
    unsafe {
        std::env::set_var("HF_ENDPOINT", &hub.address);
        std::env::set_var("HF_HOME", home.path());
        std::env::remove_var("HF_HUB_CACHE");
        std::env::remove_var("HF_HUB_OFFLINE");
    }
    let mut dataset = HubDataset::new(REPO);
    dataset.progress = true;

    // 1. Online: repo info, then the shard through hf-hub's ranged download into the cache.
    let paths = dataset.resolve().unwrap();
    let repo_folder = home.path().join("hub/datasets--lambdalabs--naruto-tiny");
    assert_eq!(
        paths,
        [repo_folder.join("snapshots").join(COMMIT).join(SHARD)]
    );
    assert_eq!(std::fs::read(&paths[0]).unwrap(), shard);
    // The layout huggingface_hub uses: blob named by etag, snapshot symlink, refs/main.
    let blob = repo_folder
        .join("blobs")
        .join(format!("{:x}", Sha256::digest(&shard)));
    assert_eq!(std::fs::read(&blob).unwrap(), shard);
    assert!(
        std::fs::symlink_metadata(&paths[0])
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_to_string(repo_folder.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    let requests = hub.requests();
    assert!(
        requests[0].starts_with(&format!("/api/datasets/{REPO}/revision/main")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains(SHARD) && r.contains("0-0")),
        "{requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("README")),
        "only the shards are fetched: {requests:?}"
    );

    // 2. Online again: the shard is already cached, only the repo info is asked for.
    let before = hub.requests().len();
    assert_eq!(dataset.resolve().unwrap(), paths);
    assert_eq!(hub.requests().len(), before + 1);
    let online = fingerprint(&Source::Hub(dataset.clone()));

    // 3. The hub goes away; offline reopening reads the cache only.
    hub.shut_down();
    let requests_at_shutdown = hub.requests().len();
    let mut offline = dataset.clone();
    offline.offline = true;
    assert_eq!(offline.resolve().unwrap(), paths);
    assert_eq!(fingerprint(&Source::Hub(offline.clone())), online);
    assert_eq!(hub.requests().len(), requests_at_shutdown);
    // ... and equals the local parquet file it came from.
    let local = Source::Parquet {
        files: vec![fixture(format!("parquet/{SHARD}"))],
        columns: Columns::default(),
    };
    assert_eq!(fingerprint(&local), online);

    // 4. Online with the hub gone: the cached revision is used, as huggingface_hub does; a repo
    //    that is not cached gets the hub's error, naming the repo; offline, the cache's.
    assert_eq!(dataset.resolve().unwrap(), paths);
    assert_eq!(hub.requests().len(), requests_at_shutdown);
    let message = HubDataset::new("someone/absent")
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("hub dataset `someone/absent`: "),
        "{message}"
    );
    let mut missing = HubDataset::new("someone/absent");
    missing.offline = true;
    let message = missing.resolve().unwrap_err().to_string();
    assert!(
        message.contains("hub dataset `someone/absent` revision `main` is not in the cache"),
        "{message}"
    );
    // 5. Another revision offline: not cached.
    offline.revision = "v2".into();
    assert!(
        offline
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("revision `v2` is not in the cache")
    );
}
