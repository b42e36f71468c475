//! `model_files::resolve` against a stand-in hub on 127.0.0.1: `HF_ENDPOINT` points hf-hub at a
//! small HTTP server that serves two SDXL model repositories built from `tests/fixtures/tiny-sdxl`
//! (one with `fp16` variant weight files, real fp16 conversions, and one without), answering the
//! endpoints hf-hub's sync API calls: repo info (`/api/models/{repo}/revision/{rev}`) and
//! `/{repo}/resolve/{rev}/{file}`, the weights redirected to a stand-in LFS store as the hub does.
//!
//! The test checks which files are fetched (only those training reads), that the snapshot folder
//! loads with the real loaders and holds the chosen variant, that a second resolve reads the cache,
//! that a new commit on `main` is fetched into its own snapshot, that with the server gone the
//! cached folders are found (online, as huggingface_hub falls back, and with `HF_HUB_OFFLINE=1`),
//! that unknown repositories give [`trainer::Error::Hub`] naming them, and that the models'
//! `from_pretrained` given a repository id fetch only their own files.
//!
//! One test in this binary: it sets process environment variables.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sdxl_model::clip::ClipTextModel;
use sdxl_model::pipeline::Pipeline;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::prompt::PromptEncoder;
use sdxl_model::unet::UNet2DConditionModel;
use sdxl_model::vae::{AutoencoderKL, Upcast};
use tch::{Device, Kind, Tensor};
use trainer::model_files::{ModelFolder, SingleFileModel, resolve, resolve_model};
use trainer::{Error, TrainConfig};

const VARIANT_REPO: &str = "stand-in/tiny-sdxl-fp16";
const VARIANT_COMMIT: &str = "1111111111111111111111111111111111111111";
const PLAIN_REPO: &str = "stand-in/tiny-sdxl";
const PLAIN_COMMIT: &str = "2222222222222222222222222222222222222222";
/// The plain repo's `main` after a new commit that changes the scheduler config.
const PLAIN_COMMIT_2: &str = "3333333333333333333333333333333333333333";
const ABSENT_REPO: &str = "stand-in/absent";
/// A repository holding a single-file checkpoint (the fixture `tiny-sdxl-single-file.safetensors`).
const SINGLE_REPO: &str = "stand-in/tiny-sdxl-single-file";
const SINGLE_COMMIT: &str = "4444444444444444444444444444444444444444";
const SINGLE_FILE: &str = "checkpoints/tiny.safetensors";
/// A diffusers repository read for its configs only (`--single_file_config`).
const CONFIG_REPO: &str = "stand-in/tiny-sdxl-configs";
const CONFIG_COMMIT: &str = "5555555555555555555555555555555555555555";
/// A diffusers SDXL repository (with `fp16` files) whose models are loaded one at a time by id.
const COMPONENT_REPO: &str = "stand-in/tiny-sdxl-components";
const COMPONENT_COMMIT: &str = "6666666666666666666666666666666666666666";

/// The components of the fixture and their plain weight file names.
const COMPONENTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("vae", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
    ("text_encoder_2", "model.safetensors"),
];

/// A file of the fixture folder `tests/fixtures/tiny-sdxl`, which must exist: a missing one fails the
/// test naming it.
fn fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-sdxl")
        .join(name);
    assert!(
        path.exists(),
        "missing fixture {}: regenerate it with `tools/fixtures/regenerate.sh --only tiny_sdxl`",
        path.display()
    );
    path
}

/// A fresh, empty folder under the system's temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("trainer-hub-model-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One model repository: its id, the commit its `main` points to, and its files.
struct HubRepo {
    id: &'static str,
    commit: &'static str,
    files: Vec<(String, Vec<u8>)>,
}

impl HubRepo {
    fn file(&self, name: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, content)| content.as_slice())
    }
}

/// A stand-in etag: the hub uses the blob's git or LFS hash; any content hash will do here.
fn etag(content: &[u8]) -> String {
    let mut hasher = DefaultHasher::new();
    hasher.write(content);
    format!("{:016x}{:08x}", hasher.finish(), content.len())
}

/// A minimal HTTP/1.1 server for model repositories; records the paths it was asked for.
struct FakeHub {
    address: String,
    requests: Arc<Mutex<Vec<String>>>,
    repos: Arc<Mutex<Vec<HubRepo>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    fn start(repos: Vec<HubRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let repos = Arc::new(Mutex::new(repos));
        let (log, halt, own_address, served) = (
            requests.clone(),
            stop.clone(),
            address.clone(),
            repos.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &own_address, &served.lock().unwrap(), &log),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Self {
            address,
            requests,
            repos,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// A new commit of a repository: it replaces the one with the same id.
    fn publish(&self, repo: HubRepo) {
        let mut repos = self.repos.lock().unwrap();
        repos.retain(|r| r.id != repo.id);
        repos.push(repo);
    }

    /// The files of `repo` asked for through `/resolve/` (metadata and download alike) since the
    /// `since`-th request.
    fn resolved_files(&self, repo: &str, since: usize) -> BTreeSet<String> {
        let prefix = format!("/{repo}/resolve/");
        self.requests()[since..]
            .iter()
            .filter_map(|path| path.strip_prefix(&prefix))
            .filter_map(|rest| {
                rest.split_once('/')
                    .map(|(_revision, file)| file.to_owned())
            })
            .collect()
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn serve(stream: TcpStream, address: &str, repos: &[HubRepo], log: &Mutex<Vec<String>>) {
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
    log.lock().unwrap().push(path.clone());
    let mut stream = stream;
    // A revision is `main` or the commit itself.
    let revision_of = |repo: &HubRepo, rest: &str| -> Option<usize> {
        ["main", repo.commit]
            .iter()
            .find(|r| rest.starts_with(&format!("{r}/")) || rest == **r)
            .map(|r| r.len())
    };
    for repo in repos {
        if let Some(rest) = path.strip_prefix(&format!("/api/models/{}/revision/", repo.id))
            && revision_of(repo, rest) == Some(rest.len())
        {
            let siblings: Vec<String> = repo
                .files
                .iter()
                .map(|(name, _)| format!("{{\"rfilename\":\"{name}\"}}"))
                .collect();
            let body = format!(
                "{{\"id\":\"{}\",\"sha\":\"{}\",\"siblings\":[{}]}}",
                repo.id,
                repo.commit,
                siblings.join(",")
            );
            return respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                body.as_bytes(),
            );
        }
        if let Some(rest) = path.strip_prefix(&format!("/{}/resolve/", repo.id))
            && let Some(length) = revision_of(repo, rest)
            && let Some(content) = repo.file(&rest[(length + 1).min(rest.len())..])
        {
            let tag = etag(content);
            if path.ends_with(".safetensors") {
                // Large files live in LFS: the hub answers with a redirect that carries the commit
                // and the LFS etag, and the store sends the bytes.
                let headers = [
                    ("X-Linked-Etag", format!("\"{tag}\"")),
                    ("X-Linked-Size", content.len().to_string()),
                    ("X-Repo-Commit", repo.commit.into()),
                    ("Location", format!("{address}/lfs/{tag}")),
                ];
                return respond(&mut stream, "302 Found", &headers, b"");
            }
            return send_range(
                &mut stream,
                content,
                range.as_deref(),
                &[
                    ("ETag", format!("\"{tag}\"")),
                    ("X-Repo-Commit", repo.commit.into()),
                ],
            );
        }
        if let Some(tag) = path.strip_prefix("/lfs/")
            && let Some((_, content)) = repo.files.iter().find(|(_, content)| etag(content) == tag)
        {
            return send_range(&mut stream, content, range.as_deref(), &[]);
        }
    }
    respond(
        &mut stream,
        "404 Not Found",
        &[("X-Error-Code", "RepoNotFound".into())],
        b"{\"error\":\"Repository not found\"}",
    );
}

/// Answers a (possibly ranged) download with `206 Partial Content`.
fn send_range(
    stream: &mut TcpStream,
    content: &[u8],
    range: Option<&str>,
    extra: &[(&str, String)],
) {
    let total = content.len();
    let (start, end) = match range.and_then(|r| r.split_once('-')) {
        Some((a, b)) => (
            a.parse().unwrap_or(0),
            b.parse().unwrap_or(total - 1).min(total - 1),
        ),
        None => (0, total - 1),
    };
    let mut headers = extra.to_vec();
    headers.push(("Content-Range", format!("bytes {start}-{end}/{total}")));
    headers.push(("Accept-Ranges", "bytes".into()));
    respond(
        stream,
        "206 Partial Content",
        &headers,
        &content[start..=end],
    );
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
    // The client may hang up early (hf-hub reads only the headers of its metadata requests).
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.flush());
}

/// `path`'s tensors converted to fp16 and written as safetensors bytes (through `scratch`).
fn fp16_copy(path: &Path, scratch: &Path) -> Vec<u8> {
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.to_kind(Kind::Half)))
        .collect();
    let out = scratch.join("fp16.safetensors");
    Tensor::write_safetensors(&tensors, &out).unwrap();
    std::fs::read(&out).unwrap()
}

/// The files of a diffusers SDXL repository as the hub lists them: the fixture's components, a
/// scheduler whose `timestep_spacing` is not SDXL's default (so reading it shows), the `fp16`
/// weights when `with_fp16`, and files training never needs.
fn sdxl_repo_files(with_fp16: bool, scratch: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        (".gitattributes".to_owned(), b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n".to_vec()),
        ("README.md".to_owned(), b"# tiny SDXL\n".to_vec()),
        (
            "model_index.json".to_owned(),
            br#"{"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
  "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]}"#
                .to_vec(),
        ),
        (
            "scheduler/scheduler_config.json".to_owned(),
            br#"{"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
  "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "trailing", "use_karras_sigmas": false}"#
                .to_vec(),
        ),
        ("tokenizer/vocab.json".to_owned(), b"{}".to_vec()),
        ("sd_xl_base_1.0.safetensors".to_owned(), b"a single-file checkpoint nobody asked for".to_vec()),
        ("unet/diffusion_pytorch_model.onnx".to_owned(), b"an export nobody asked for".to_vec()),
    ];
    for (component, weights) in COMPONENTS {
        files.push((
            format!("{component}/config.json"),
            std::fs::read(fixture(&format!("{component}/config.json"))).unwrap(),
        ));
        let weights_file = fixture(&format!("{component}/{weights}"));
        files.push((
            format!("{component}/{weights}"),
            std::fs::read(&weights_file).unwrap(),
        ));
        if with_fp16 {
            let fp16_name = weights.replace(".safetensors", ".fp16.safetensors");
            files.push((
                format!("{component}/{fp16_name}"),
                fp16_copy(&weights_file, scratch),
            ));
        }
    }
    files
}

/// The files `resolve` should fetch: configs, one weight file per component, the scheduler and the
/// model index.
fn needed_files(variant: Option<&str>) -> BTreeSet<String> {
    let mut needed: BTreeSet<String> = ["model_index.json", "scheduler/scheduler_config.json"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    for (component, weights) in COMPONENTS {
        needed.insert(format!("{component}/config.json"));
        let weights = match variant {
            Some(v) => weights.replace(".safetensors", &format!(".{v}.safetensors")),
            None => weights.to_owned(),
        };
        needed.insert(format!("{component}/{weights}"));
    }
    needed
}

/// Every variable of `vs` holds the fixture's value rounded to fp16 (the variant file was read),
/// and, where the fixture is fp32, some differ from its values (it was not the plain file; the
/// fixture's text encoders are stored in fp16 already, and their plain files are not in the
/// snapshot at all).
fn assert_holds_fp16_of(vs: &tch::nn::VarStore, plain_file: &Path) {
    let fixture: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(plain_file)
        .unwrap()
        .into_iter()
        .collect();
    let mut rounded_away = 0;
    let mut fp32_in_fixture = false;
    let variables = vs.variables();
    assert!(!variables.is_empty());
    for (name, value) in variables {
        let original = fixture
            .get(&name)
            .or_else(|| {
                name.strip_prefix("text_model.")
                    .and_then(|n| fixture.get(n))
            })
            .unwrap_or_else(|| panic!("{name} is not in {}", plain_file.display()));
        fp32_in_fixture |= original.kind() == Kind::Float;
        let value = value.to_kind(Kind::Float);
        let expected = original.to_kind(Kind::Half).to_kind(Kind::Float);
        assert!(
            value.equal(&expected),
            "{name} of {} is not the fp16 value",
            plain_file.display()
        );
        if !value.equal(&original.to_kind(Kind::Float)) {
            rounded_away += 1;
        }
    }
    assert!(
        !fp32_in_fixture || rounded_away > 0,
        "{}: the loaded weights equal the fp32 file",
        plain_file.display()
    );
}

/// Loads the variant folder with the training loaders and checks each component holds the fp16 weights.
fn load_variant_folder(folder: &ModelFolder) {
    let mut options = LoadOptions::default().vae_upcast(Upcast::Never);
    if let Some(variant) = &folder.variant {
        options = options.variant(variant);
    }
    let [vs_1, vs_2] = PromptEncoder::from_pretrained(&folder.root, &options)
        .unwrap()
        .store;
    assert_holds_fp16_of(&vs_1, &fixture("text_encoder/model.safetensors"));
    assert_holds_fp16_of(&vs_2, &fixture("text_encoder_2/model.safetensors"));
    let vs_vae = AutoencoderKL::from_pretrained(&folder.root, &options)
        .unwrap()
        .store;
    assert_holds_fp16_of(&vs_vae, &fixture("vae/diffusion_pytorch_model.safetensors"));
    let vs_unet = UNet2DConditionModel::from_pretrained(&folder.root, &options)
        .unwrap()
        .store;
    assert_holds_fp16_of(
        &vs_unet,
        &fixture("unet/diffusion_pytorch_model.safetensors"),
    );
}

fn expect_hub_error(result: trainer::Result<ModelFolder>, repo: &str) -> String {
    let error = result.expect_err(repo);
    let message = error.to_string();
    let Error::Hub { repo: named, .. } = &error else {
        panic!("expected a hub error for {repo}, got {message}")
    };
    assert_eq!(named, repo);
    assert!(message.contains(repo), "{message}");
    message
}

#[test]
fn download_load_cache_and_resolve_offline() {
    let scratch = Scratch::new("files");
    let repos = vec![
        HubRepo {
            id: VARIANT_REPO,
            commit: VARIANT_COMMIT,
            files: sdxl_repo_files(true, &scratch.0),
        },
        HubRepo {
            id: PLAIN_REPO,
            commit: PLAIN_COMMIT,
            files: sdxl_repo_files(false, &scratch.0),
        },
    ];
    let plain_unet = repos[1]
        .file("unet/diffusion_pytorch_model.safetensors")
        .unwrap()
        .to_vec();
    let mut hub = FakeHub::start(repos);
    let home = Scratch::new("hf-home");
    // SAFETY: this binary has a single test, so no other thread reads the environment meanwhile.
    unsafe {
        std::env::set_var("HF_ENDPOINT", &hub.address);
        std::env::set_var("HF_HOME", &home.0);
        std::env::remove_var("HF_HUB_CACHE");
        std::env::remove_var("HF_HUB_OFFLINE");
        std::env::remove_var("HF_TOKEN");
    }
    let snapshot = |repo: &str, commit: &str| {
        home.0
            .join("hub")
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(commit)
    };

    // 1. A repo with fp16 files: the variant is chosen and only the needed files are fetched.
    let variant = resolve(VARIANT_REPO, "main", Some("fp16")).unwrap();
    assert_eq!(
        variant,
        ModelFolder {
            root: snapshot(VARIANT_REPO, VARIANT_COMMIT),
            variant: Some("fp16".into()),
            single_file: None,
        }
    );
    assert_eq!(
        hub.resolved_files(VARIANT_REPO, 0),
        needed_files(Some("fp16")),
        "{:?}",
        hub.requests()
    );
    assert_eq!(
        hub.requests()[0],
        format!("/api/models/{VARIANT_REPO}/revision/main")
    );
    for (component, weights) in COMPONENTS {
        assert!(
            !variant.root.join(component).join(weights).exists(),
            "{component}/{weights} was fetched"
        );
    }
    load_variant_folder(&variant);

    // 2. A repo without them: the plain names, and the folder is a whole pipeline.
    let plain = resolve(PLAIN_REPO, "main", Some("fp16")).unwrap();
    assert_eq!(
        plain,
        ModelFolder {
            root: snapshot(PLAIN_REPO, PLAIN_COMMIT),
            variant: None,
            single_file: None,
        }
    );
    assert_eq!(
        hub.resolved_files(PLAIN_REPO, 0),
        needed_files(None),
        "{:?}",
        hub.requests()
    );
    assert_eq!(
        std::fs::read(plain.root.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        plain_unet
    );
    let pipeline = Pipeline::from_pretrained(&plain.root, &LoadOptions::default())
        .unwrap()
        .model;
    assert_eq!(
        pipeline.scheduler_config.timestep_spacing.as_deref(),
        Some("trailing")
    );

    // 3. Again online: everything is cached, only the repo info is asked for.
    let before = hub.requests().len();
    assert_eq!(
        resolve(VARIANT_REPO, "main", Some("fp16")).unwrap(),
        variant
    );
    assert_eq!(resolve(PLAIN_REPO, "main", Some("fp16")).unwrap(), plain);
    assert_eq!(
        hub.requests().len(),
        before + 2,
        "{:?}",
        &hub.requests()[before..]
    );

    // 4. `main` moves to a new commit: its snapshot is filled (not the cached older one reused)
    //    and the cache's ref follows.
    let mut files = sdxl_repo_files(false, &scratch.0);
    for (name, content) in &mut files {
        if name == "scheduler/scheduler_config.json" {
            *content = String::from_utf8(content.clone())
                .unwrap()
                .replace("trailing", "leading")
                .into_bytes();
        }
    }
    hub.publish(HubRepo {
        id: PLAIN_REPO,
        commit: PLAIN_COMMIT_2,
        files,
    });
    let before = hub.requests().len();
    let moved = resolve(PLAIN_REPO, "main", Some("fp16")).unwrap();
    assert_eq!(
        moved,
        ModelFolder {
            root: snapshot(PLAIN_REPO, PLAIN_COMMIT_2),
            variant: None,
            single_file: None,
        }
    );
    assert_eq!(hub.resolved_files(PLAIN_REPO, before), needed_files(None));
    let pipeline = Pipeline::from_pretrained(&moved.root, &LoadOptions::default())
        .unwrap()
        .model;
    assert_eq!(
        pipeline.scheduler_config.timestep_spacing.as_deref(),
        Some("leading")
    );
    let refs_main = home.0.join("hub/models--stand-in--tiny-sdxl/refs/main");
    assert_eq!(std::fs::read_to_string(&refs_main).unwrap(), PLAIN_COMMIT_2);
    let plain = moved;

    // 4b. A single file named by its hub URL, its configs from a repository read for them alone.
    let single = single_file_from_the_hub(&hub, &scratch.0, &snapshot);

    // 4c. One model by its repository id, as the models' `from_pretrained` take it.
    components_by_repository_id(&hub, &scratch.0, &snapshot);

    // 5. A repo the hub does not know.
    expect_hub_error(resolve(ABSENT_REPO, "main", Some("fp16")), ABSENT_REPO);

    // 6. The hub goes away. Online, the cached revisions are used, as huggingface_hub does; a
    //    repo that is not cached gets the connection's error.
    hub.shut_down();
    let requests_at_shutdown = hub.requests().len();
    assert_eq!(
        resolve(VARIANT_REPO, "main", Some("fp16")).unwrap(),
        variant
    );
    assert_eq!(resolve(PLAIN_REPO, "main", Some("fp16")).unwrap(), plain);
    let message = expect_hub_error(resolve(ABSENT_REPO, "main", None), ABSENT_REPO);
    assert!(!message.contains("not in the cache"), "{message}");

    // 7. Offline, the cache alone gives the same folders.
    // SAFETY: as above.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    assert_eq!(
        resolve(VARIANT_REPO, "main", Some("fp16")).unwrap(),
        variant
    );
    assert_eq!(resolve(PLAIN_REPO, "main", Some("fp16")).unwrap(), plain);
    assert_eq!(resolve(PLAIN_REPO, "main", None).unwrap(), plain);
    // The plain weights of the variant repo were never fetched.
    let message = expect_hub_error(resolve(VARIANT_REPO, "main", None), VARIANT_REPO);
    assert!(message.contains("not in the cache"), "{message}");
    let message = expect_hub_error(resolve(ABSENT_REPO, "main", None), ABSENT_REPO);
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
    assert_eq!(resolve_model(&single_file_config()).unwrap(), single);
    assert_eq!(hub.requests().len(), requests_at_shutdown);
    load_variant_folder(&resolve(VARIANT_REPO, "main", Some("fp16")).unwrap());
}

/// Publishes an SDXL repository with `fp16` files and loads its models by id with
/// `from_pretrained`: each fetches only its own `config.json` and weights (of the variant asked
/// for), into the commit's snapshot; a variant the repository lacks, a text encoder without its
/// subfolder and a local-looking path that does not exist are errors naming what is missing.
fn components_by_repository_id(
    hub: &FakeHub,
    scratch: &Path,
    snapshot: &dyn Fn(&str, &str) -> PathBuf,
) {
    let mut files = sdxl_repo_files(true, scratch);
    // The repository's UNet has the fp16 weights only: the plain ones must not be needed.
    files.retain(|(name, _)| name != "unet/diffusion_pytorch_model.safetensors");
    hub.publish(HubRepo {
        id: COMPONENT_REPO,
        commit: COMPONENT_COMMIT,
        files,
    });
    let fp16 = LoadOptions::default()
        .variant("fp16")
        .vae_upcast(Upcast::Never);
    let fetched = |since| hub.resolved_files(COMPONENT_REPO, since);
    let names = |names: &[&str]| {
        names
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<BTreeSet<_>>()
    };

    let before = hub.requests().len();
    let vae = AutoencoderKL::from_pretrained(COMPONENT_REPO, &fp16).unwrap();
    assert!(vae.report.is_complete(), "{}", vae.report);
    assert_holds_fp16_of(
        &vae.store,
        &fixture("vae/diffusion_pytorch_model.safetensors"),
    );
    assert_eq!(
        fetched(before),
        names(&[
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors"
        ])
    );
    let root = snapshot(COMPONENT_REPO, COMPONENT_COMMIT);
    assert!(!root.join("unet").exists() && !root.join("text_encoder").exists());

    let before = hub.requests().len();
    let unet = UNet2DConditionModel::from_pretrained(COMPONENT_REPO, &fp16).unwrap();
    assert_holds_fp16_of(
        &unet.store,
        &fixture("unet/diffusion_pytorch_model.safetensors"),
    );
    assert_eq!(
        fetched(before),
        names(&[
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors"
        ])
    );

    let before = hub.requests().len();
    let encoder =
        ClipTextModel::from_pretrained(COMPONENT_REPO, &fp16.clone().subfolder("text_encoder_2"))
            .unwrap();
    assert!(encoder.model.has_projection());
    assert_holds_fp16_of(&encoder.store, &fixture("text_encoder_2/model.safetensors"));
    assert_eq!(
        fetched(before),
        names(&[
            "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors"
        ])
    );

    // The UNet has no plain weights; a text encoder needs its subfolder named.
    let message = UNet2DConditionModel::from_pretrained(COMPONENT_REPO, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(COMPONENT_REPO)
            && message.contains("unet/diffusion_pytorch_model.safetensors"),
        "{message}"
    );
    let message = ClipTextModel::from_pretrained(COMPONENT_REPO, &fp16)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(COMPONENT_REPO) && message.contains("config.json"),
        "{message}"
    );
    // A path that cannot be a repository id is not asked for.
    let before = hub.requests().len();
    let missing = scratch.join("no-such-model");
    let message = AutoencoderKL::from_pretrained(&missing, &fp16)
        .unwrap_err()
        .to_string();
    assert_eq!(message, format!("no such folder: {}", missing.display()));
    assert_eq!(hub.requests().len(), before);
}

/// `--pretrained_model_name_or_path` as a hub file URL and `--single_file_config` as a repository.
fn single_file_config() -> TrainConfig {
    TrainConfig::default()
        .with_pretrained_model_name_or_path(format!(
            "https://huggingface.co/{SINGLE_REPO}/blob/main/{SINGLE_FILE}"
        ))
        .with_single_file_config(Some(CONFIG_REPO.into()))
}

/// Publishes a single-file repository and a configs repository, resolves the URL form (only the
/// file, and only the configs, are fetched), loads the UNet from the file, and checks the
/// `<owner>/<repo>/<file>` form and a file the repository lacks.
fn single_file_from_the_hub(
    hub: &FakeHub,
    scratch: &Path,
    snapshot: &dyn Fn(&str, &str) -> PathBuf,
) -> ModelFolder {
    let checkpoint = std::fs::read(fixture("../tiny-sdxl-single-file.safetensors")).unwrap();
    hub.publish(HubRepo {
        id: SINGLE_REPO,
        commit: SINGLE_COMMIT,
        files: vec![
            ("README.md".into(), b"a single-file checkpoint".to_vec()),
            (SINGLE_FILE.into(), checkpoint.clone()),
        ],
    });
    hub.publish(HubRepo {
        id: CONFIG_REPO,
        commit: CONFIG_COMMIT,
        files: sdxl_repo_files(false, scratch),
    });
    let before = hub.requests().len();
    let single = resolve_model(&single_file_config()).unwrap();
    let path = snapshot(SINGLE_REPO, SINGLE_COMMIT).join(SINGLE_FILE);
    assert_eq!(
        single.single_file,
        Some(SingleFileModel {
            path: path.clone(),
            config_folder: Some(snapshot(CONFIG_REPO, CONFIG_COMMIT)),
        })
    );
    assert_eq!(std::fs::read(&path).unwrap(), checkpoint);
    assert_eq!(
        hub.resolved_files(SINGLE_REPO, before),
        BTreeSet::from([SINGLE_FILE.to_owned()])
    );
    let configs: BTreeSet<String> = COMPONENTS
        .iter()
        .map(|(component, _)| format!("{component}/config.json"))
        .chain(["scheduler/scheduler_config.json".to_owned()])
        .collect();
    assert_eq!(hub.resolved_files(CONFIG_REPO, before), configs);
    single.load_unet(Device::Cpu, Kind::Float).unwrap();
    assert_eq!(
        single
            .scheduler_config()
            .unwrap()
            .timestep_spacing
            .as_deref(),
        Some("trailing")
    );
    // The short form at --revision gives the same file; a file the repository lacks is named.
    let short = single_file_config()
        .with_pretrained_model_name_or_path(format!("{SINGLE_REPO}/{SINGLE_FILE}"));
    assert_eq!(resolve_model(&short).unwrap(), single);
    let absent = single_file_config()
        .with_pretrained_model_name_or_path(format!("{SINGLE_REPO}/absent.safetensors"));
    let message = expect_hub_error(resolve_model(&absent), SINGLE_REPO);
    assert!(message.contains("absent.safetensors"), "{message}");
    single
}
