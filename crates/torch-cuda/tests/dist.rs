//! c10d process groups (`torch_cuda::dist`) with real processes: Gloo on the CPU, and NCCL on CUDA
//! where there is a GPU. Each rank is this test binary re-run on the ignored test `dist_child`, with
//! torchrun's variables set, so the rendezvous, the collectives and a peer's failure are real.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use torch_cuda::dist::{GroupConfig, ProcessGroup, ReduceOp};
use torch_cuda::{CaptureMode, CudaGraph};

const SCENARIO: &str = "TORCH_CUDA_DIST_SCENARIO";
const MARKER: &str = "TORCH_CUDA_DIST_MARKER";
/// The collectives' timeout in the failure scenarios.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The timeout, the 2 s the shim takes to collect the silent ranks' names, and slack for a loaded
/// machine.
const FAIL_WITHIN: Duration = Duration::from_secs(5 + 2 + 8);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn spawn_rank(scenario: &str, rank: usize, port: u16, marker: &Path) -> Child {
    spawn_rank_of(scenario, rank, 2, port, marker)
}

fn spawn_rank_of(scenario: &str, rank: usize, world: usize, port: u16, marker: &Path) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if scenario != "nccl" {
        // Gloo only, also on a machine with GPUs (ProcessGroup::new adds NCCL where CUDA is).
        command.env("CUDA_VISIBLE_DEVICES", "");
    }
    command
        .args([
            "--ignored",
            "--exact",
            "dist_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO, scenario)
        .env(MARKER, marker)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn marker(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("torch-cuda-dist-{}-{name}", std::process::id()))
}

/// Waits for `child` and returns its success and its output (stdout then stderr).
fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Reads `child`'s stdout until a line containing `line` (the child printed it).
fn wait_for_line(child: &mut Child, line: &str) {
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut buffer = String::new();
    while reader.read_line(&mut buffer).unwrap() > 0 {
        if buffer.contains(line) {
            return;
        }
        buffer.clear();
    }
    panic!("the child exited before printing {line:?}");
}

#[test]
#[ignore = "a rank of the tests below; it runs only when they start it"]
fn dist_child() {
    let scenario = std::env::var(SCENARIO).expect("started by a test of this file");
    let marker = PathBuf::from(std::env::var(MARKER).unwrap());
    match scenario.as_str() {
        "collectives" => collectives(),
        "peer_dies" | "peer_hangs" | "host_dies" => peer_fails(&scenario, &marker),
        "nccl" => nccl(),
        other => panic!("unknown scenario {other}"),
    }
}

fn collectives() {
    let group = ProcessGroup::from_env(Duration::from_secs(60)).unwrap();
    let rank = group.rank() as f32;
    // Values whose sums are exact in f32 and one whose sum rounds (0.1 + 0.2): the two-rank sum
    // is one IEEE addition, so it must equal the sum computed here bit for bit.
    let mine = [
        1.5 + rank,
        -2.0 * rank,
        0.1 + 0.1 * rank,
        1e30 * (1.0 - rank),
    ];
    let other = [
        1.5 + (1.0 - rank),
        -2.0 * (1.0 - rank),
        0.1 + 0.1 * (1.0 - rank),
        1e30 * rank,
    ];
    let sum: Vec<f32> = mine.iter().zip(&other).map(|(a, b)| a + b).collect();
    let tensor = Tensor::from_slice(&mine);
    group.all_reduce_sum(&tensor).unwrap();
    assert_eq!(Vec::<f32>::try_from(&tensor).unwrap(), sum);

    let tensor = Tensor::from_slice(&mine);
    group.all_reduce_mean(&tensor).unwrap();
    let mean: Vec<f32> = sum.iter().map(|s| s / 2.0).collect();
    assert_eq!(Vec::<f32>::try_from(&tensor).unwrap(), mean);

    // A 0-dim loss, and a 0-dim non-finite flag set on rank 1 only.
    let loss = Tensor::from(0.25f32 + rank);
    group.all_reduce_mean(&loss).unwrap();
    assert_eq!(loss.dim(), 0);
    assert_eq!(f32::try_from(&loss).unwrap(), 0.75);
    let flag = Tensor::from(rank);
    group.all_reduce(&flag, ReduceOp::Max).unwrap();
    assert_eq!(f32::try_from(&flag).unwrap(), 1.0);
    let flag = Tensor::from(rank);
    group.all_reduce(&flag, ReduceOp::Min).unwrap();
    assert_eq!(f32::try_from(&flag).unwrap(), 0.0);

    let weights = Tensor::arange(6, (Kind::Float, Device::Cpu)) * (1.0 + f64::from(rank));
    group.broadcast(&weights, 0).unwrap();
    assert_eq!(
        Vec::<f32>::try_from(&weights).unwrap(),
        vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
    let rows = group
        .all_gather(&Tensor::from_slice(&[rank, 10.0 + rank]))
        .unwrap();
    assert_eq!(
        Vec::<f32>::try_from(&rows).unwrap(),
        vec![0.0, 10.0, 1.0, 11.0]
    );
    let scalars = group.all_gather(&Tensor::from(rank)).unwrap();
    assert_eq!(Vec::<f32>::try_from(&scalars).unwrap(), vec![0.0, 1.0]);
    group.barrier().unwrap();
    println!("rank {} done", group.rank());
}

/// NCCL on CUDA device LOCAL_RANK: exact sums, a 0-dim MAX, a broadcast, then an all-reduce
/// captured in a CUDA graph and replayed on new values.
fn nccl() {
    let group = ProcessGroup::from_env(Duration::from_secs(60)).unwrap();
    assert!(
        group.has_nccl(),
        "a CUDA machine, but the group has no NCCL backend"
    );
    let (rank, world) = (group.rank(), group.world_size());
    let device = Device::Cuda(rank);
    let share = |r: usize| Tensor::from_slice(&[1.5f32, -2.0, 0.1, 3.0]) * (r as f64 + 1.0);
    // At most two ranks: each element is one f32 addition, commutative, so exactly this sum.
    let expected = (0..world).map(share).reduce(|a, b| a + b).unwrap();
    let tensor = share(rank).to(device);
    group.all_reduce_sum(&tensor).unwrap();
    let got = tensor.to(Device::Cpu);
    assert!(got.equal(&expected), "{got} vs {expected}");
    let flag = Tensor::from(rank as f32).to(device);
    group.all_reduce(&flag, ReduceOp::Max).unwrap();
    assert_eq!(
        f32::try_from(&flag.to(Device::Cpu)).unwrap(),
        (world - 1) as f32
    );
    let weights = (Tensor::arange(6, (Kind::Float, device)) + rank as f64).contiguous();
    group.broadcast(&weights, 0).unwrap();
    assert!(
        weights
            .to(Device::Cpu)
            .equal(&Tensor::arange(6, (Kind::Float, Device::Cpu)))
    );
    let rows = group
        .all_gather(&Tensor::from_slice(&[rank as f32]).to(device))
        .unwrap();
    let ranks = Tensor::arange(world as i64, (Kind::Float, Device::Cpu));
    assert!(rows.to(Device::Cpu).equal(&ranks));

    let mut buffer = Tensor::zeros([1024], (Kind::Float, device));
    let (graph, captured) = CudaGraph::capture(rank, None, CaptureMode::ThreadLocal, || {
        group.all_reduce_sum(&buffer)
    })
    .unwrap();
    captured.unwrap();
    let _ = buffer.fill_(rank as f64 + 1.0);
    graph.replay().unwrap();
    assert!(torch_cuda::graph::synchronize(rank));
    let sum = (1..=world).sum::<usize>() as f64;
    assert!(
        buffer
            .to(Device::Cpu)
            .equal(&Tensor::full([1024], sum, (Kind::Float, Device::Cpu)))
    );
    group.barrier().unwrap();
    println!("rank {rank} done");
}

/// The victim rank (1, or 0 for "host_dies": the store's host) joins, says so, then either is
/// killed by the test or sleeps past the timeout; the survivor waits for the test's marker file,
/// then its collective must fail in time naming the victim, and dropping the group must not hang.
fn peer_fails(scenario: &str, marker: &Path) {
    let victim = if scenario == "host_dies" { 0 } else { 1 };
    let group = ProcessGroup::from_env(TIMEOUT).unwrap();
    group.barrier().unwrap();
    if group.rank() == victim {
        println!("rank {victim} joined");
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
    while scenario != "peer_hangs" && !marker.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let tensor = Tensor::ones([4], (Kind::Float, Device::Cpu));
    // The store's host dies before a barrier, the other cases before an all-reduce.
    let error = if scenario == "host_dies" {
        group.barrier().unwrap_err()
    } else {
        group.all_reduce_sum(&tensor).unwrap_err()
    };
    println!("elapsed {:?}", start.elapsed());
    eprintln!("rank {}: {error}", group.rank());
    drop(group);
    std::process::exit(3);
}

#[test]
fn two_ranks_reduce_broadcast_and_meet_at_the_barrier() {
    let port = free_port();
    let marker = marker("collectives");
    let ranks = [0, 1].map(|rank| spawn_rank("collectives", rank, port, &marker));
    for (rank, child) in ranks.into_iter().enumerate() {
        let (ok, output) = finish(child);
        assert!(ok, "rank {rank} failed:\n{output}");
        assert!(output.contains(&format!("rank {rank} done")), "{output}");
    }
}

/// Runs `scenario` with rank `victim` killed (or hung) and returns how long the survivor took to
/// exit after that and its output.
fn failing_peer(scenario: &str, victim: usize) -> (Duration, String) {
    let port = free_port();
    let marker = marker(scenario);
    let _ = std::fs::remove_file(&marker);
    let mut ranks = [0, 1].map(|rank| Some(spawn_rank(scenario, rank, port, &marker)));
    let mut bad = ranks[victim].take().unwrap();
    let survivor = ranks[1 - victim].take().unwrap();
    wait_for_line(&mut bad, &format!("rank {victim} joined"));
    let start = Instant::now();
    if scenario != "peer_hangs" {
        bad.kill().unwrap(); // SIGKILL
        bad.wait().unwrap();
        std::fs::write(&marker, b"").unwrap();
    }
    let out = survivor.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    let _ = bad.kill();
    let _ = bad.wait();
    let _ = std::fs::remove_file(&marker);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the survivor did not report a failed collective:\n{text}"
    );
    println!("{scenario}: the survivor exited after {elapsed:?}:\n{text}");
    (elapsed, text)
}

/// NCCL with one rank per GPU (at most two); without CUDA it is skipped, unless
/// `SDXL_REQUIRE_CUDA=1` (the GPU machine's harness) makes that a failure.
#[test]
fn nccl_reduces_cuda_tensors_also_inside_a_cuda_graph() {
    let gpus = tch::Cuda::device_count() as usize;
    if gpus == 0 || !torch_cuda::dist::nccl_available() {
        let required = std::env::var("SDXL_REQUIRE_CUDA").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "SDXL_REQUIRE_CUDA=1 but no CUDA device or no NCCL backend in this build"
        );
        println!("skipped: no CUDA device or no NCCL backend in this build");
        return;
    }
    let world = gpus.min(2);
    let port = free_port();
    let marker = marker("nccl");
    let ranks: Vec<Child> = (0..world)
        .map(|rank| spawn_rank_of("nccl", rank, world, port, &marker))
        .collect();
    for (rank, child) in ranks.into_iter().enumerate() {
        let (ok, output) = finish(child);
        assert!(ok, "rank {rank} failed:\n{output}");
        assert!(output.contains(&format!("rank {rank} done")), "{output}");
    }
}

#[test]
fn a_killed_rank_fails_the_others_collective_naming_it() {
    let (elapsed, output) = failing_peer("peer_dies", 1);
    assert!(elapsed < FAIL_WITHIN, "took {elapsed:?}:\n{output}");
    assert!(output.contains("rank 1 did not answer"), "{output}");
    assert!(
        output.contains("all_reduce on rank 0 of 2 failed"),
        "{output}"
    );
}

#[test]
fn a_hung_rank_fails_the_others_collective_within_the_timeout_naming_it() {
    let (elapsed, output) = failing_peer("peer_hangs", 1);
    assert!(
        elapsed >= TIMEOUT,
        "failed before the timeout ({elapsed:?}):\n{output}"
    );
    assert!(elapsed < FAIL_WITHIN, "took {elapsed:?}:\n{output}");
    assert!(output.contains("rank 1 did not answer"), "{output}");
}

#[test]
fn a_killed_store_host_fails_the_others_barrier_naming_it() {
    let (elapsed, output) = failing_peer("host_dies", 0);
    assert!(elapsed < FAIL_WITHIN, "took {elapsed:?}:\n{output}");
    assert!(output.contains("barrier on rank 1 of 2 failed"), "{output}");
    assert!(
        output.contains("rank 0 (the store's host, 127.0.0.1:"),
        "{output}"
    );
}

#[test]
fn a_rank_that_never_joins_fails_the_rendezvous_in_time() {
    let config = GroupConfig {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    let start = Instant::now();
    let error = ProcessGroup::new(config, Duration::from_secs(2))
        .unwrap_err()
        .to_string();
    assert!(
        start.elapsed() < Duration::from_secs(2 + 8),
        "{:?}",
        start.elapsed()
    );
    println!("after {:?}: {error}", start.elapsed());
    assert!(error.contains("rendezvous at 127.0.0.1:"), "{error}");
    assert!(error.contains("not every rank connected"), "{error}");
}

#[test]
fn a_rank_whose_store_host_never_starts_fails_the_rendezvous_in_time() {
    let config = GroupConfig {
        rank: 1,
        world_size: 2,
        local_rank: 1,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    let start = Instant::now();
    let error = ProcessGroup::with_backends(config, Duration::from_secs(2), false)
        .unwrap_err()
        .to_string();
    assert!(
        start.elapsed() < Duration::from_secs(2 + 8),
        "{:?}",
        start.elapsed()
    );
    println!("after {:?}: {error}", start.elapsed());
    assert!(error.contains("rank 0's store did not answer"), "{error}");
}

fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

#[test]
fn bad_environment_is_named() {
    let good = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];
    let config = GroupConfig::from_lookup(lookup(&good)).unwrap();
    assert_eq!(
        (config.rank, config.world_size, config.master_port),
        (1, 2, 29500)
    );
    let error = |vars: &[(&str, &str)]| {
        GroupConfig::from_lookup(lookup(vars))
            .unwrap_err()
            .to_string()
    };
    assert!(error(&good[1..]).contains("RANK is not set"));
    let mut bad = good;
    bad[0] = ("RANK", "2");
    assert!(error(&bad).contains("RANK=2 is not below WORLD_SIZE=2"));
    bad[0] = ("RANK", "one");
    assert!(error(&bad).contains("RANK=\"one\" is not a non-negative integer"));
    let mut bad = good;
    bad[4] = ("MASTER_PORT", "70000");
    assert!(error(&bad).contains("MASTER_PORT is not a port"));
    let mut bad = good;
    bad[1] = ("WORLD_SIZE", "0");
    assert!(error(&bad).contains("WORLD_SIZE=0 must be at least 1"));
    let mut bad = good;
    bad[3] = ("MASTER_ADDR", " ");
    assert!(error(&bad).contains("MASTER_ADDR"));
}
