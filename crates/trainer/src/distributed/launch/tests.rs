//! The launcher re-executes this test binary: the ignored test [`child`] is the child process,
//! and what it does comes from an extra filter argument (`mode_ok`, `mode_fail_rank1`).

use std::sync::Mutex;
use std::time::Instant;

use super::*;
use crate::distributed::World;

const CHILD: &str = "distributed::launch::tests::child";

fn run_children(mode: &str, nproc: usize) -> (Result<()>, Vec<(usize, Stream, String)>) {
    let exe = std::env::current_exe().unwrap();
    let args: Vec<String> = [CHILD, mode, "--exact", "--ignored", "--nocapture"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let lines = Mutex::new(Vec::new());
    let forward = |rank: usize, stream: Stream, line: &str| {
        lines.lock().unwrap().push((rank, stream, line.to_owned()));
    };
    let outcome = launch(&exe, &args, nproc, &forward);
    (outcome, lines.into_inner().unwrap())
}

/// The child process: prints its world; in `mode_fail_rank1`, rank 1 fails at once and the other
/// ranks wait long enough that only the launcher can end them early.
#[test]
#[ignore = "a child process of the launcher tests"]
fn child() {
    let Ok(world) = World::from_env() else {
        std::process::exit(5);
    };
    if world == World::SINGLE {
        return; // run directly, not by the launcher
    }
    let master = std::env::var("MASTER_ADDR").unwrap_or_default();
    println!(
        "hello from rank {} of {} (local {}) at {master}",
        world.rank, world.world_size, world.local_rank
    );
    if std::env::args().any(|a| a == "mode_fail_rank1") {
        if world.rank == 1 {
            std::process::exit(3);
        }
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[test]
fn children_get_torchrun_variables_and_their_output_is_prefixed() {
    let (outcome, lines) = run_children("mode_ok", 3);
    outcome.unwrap();
    for rank in 0..3 {
        let hello = format!("hello from rank {rank} of 3 (local {rank}) at 127.0.0.1");
        assert!(
            lines
                .iter()
                .any(|(r, s, l)| *r == rank && *s == Stream::Stdout && *l == hello),
            "rank {rank}: {lines:?}"
        );
    }
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named() {
    let start = Instant::now();
    let (outcome, _) = run_children("mode_fail_rank1", 3);
    let e = outcome.unwrap_err().to_string();
    assert_eq!(
        e,
        "--nproc_per_node: rank 1 exited with status 3; stopped the other ranks"
    );
    // The other ranks sleep 60 s: the launcher killed them.
    assert!(start.elapsed().as_secs() < 30, "{:?}", start.elapsed());
}

#[test]
fn children_get_the_arguments_without_the_flag() {
    let args: Vec<String> = [
        "--preset",
        "tiny",
        "--nproc_per_node",
        "2",
        "--seed",
        "3",
        "--nproc_per_node=4",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(child_args(&args), ["--preset", "tiny", "--seed", "3"]);
}

#[test]
fn a_free_port_can_be_bound() {
    let port = free_port().unwrap();
    assert!(port > 0);
    TcpListener::bind(("127.0.0.1", port)).unwrap();
}
