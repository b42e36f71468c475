//! Random-state snapshots on the CPU and, where there is a GPU, on CUDA eagerly and inside a CUDA
//! graph capture (the tests run one at a time: the generators are global, so no other test may
//! draw in between).

#![allow(clippy::unwrap_used)]

use std::sync::{Mutex, MutexGuard};

use tch::{Device, Kind, Tensor};
use torch_cuda::rng::{RngState, available};
use torch_cuda::{CaptureMode, CudaGraph};

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    GLOBAL_GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a CUDA device is there; without one the CUDA tests pass, unless `SDXL_REQUIRE_CUDA=1`
/// (the GPU machine's harness) makes that a failure.
fn cuda() -> bool {
    let required = std::env::var("SDXL_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let present = tch::Cuda::is_available();
    assert!(
        present || !required,
        "SDXL_REQUIRE_CUDA=1 but tch sees no CUDA device"
    );
    if !present {
        println!("no CUDA device: skipped");
    }
    present
}

/// Draws a dropout mask `first`, then the same draw again with the generator set back (`replayed`),
/// then puts the generator where it had got to and draws `next`: what the checkpoint tape does.
fn draw_replay_and_continue(device: Device) -> [Tensor; 3] {
    let x = Tensor::ones([4096], (Kind::Float, device));
    let saved = RngState::save(device).unwrap().unwrap();
    let first = x.dropout(0.5, true);
    let current = RngState::save(device).unwrap().unwrap();
    saved.restore().unwrap();
    let replayed = x.dropout(0.5, true);
    current.restore().unwrap();
    let next = x.dropout(0.5, true);
    [first, replayed, next]
}

#[test]
fn cpu_snapshots_replay_dropout_masks_and_uniform_draws() {
    let _serial = exclusive();
    assert!(available(Device::Cpu), "built without torch's headers");
    tch::manual_seed(3);
    let x = Tensor::ones([64], (Kind::Float, Device::Cpu));
    let saved = RngState::save(Device::Cpu).unwrap().unwrap();
    let first = (
        x.dropout(0.5, true),
        Tensor::rand([5], (Kind::Float, Device::Cpu)),
    );
    let after = RngState::save(Device::Cpu).unwrap().unwrap();
    let other = x.dropout(0.5, true);
    assert!(!other.equal(&first.0), "two draws gave the same mask");
    saved.restore().unwrap();
    assert!(x.dropout(0.5, true).equal(&first.0));
    assert!(Tensor::rand([5], (Kind::Float, Device::Cpu)).equal(&first.1));
    // And back to where the generator had got to.
    after.restore().unwrap();
    assert!(x.dropout(0.5, true).equal(&other));
    assert_eq!(saved.device(), Device::Cpu);
}

#[test]
fn cuda_snapshots_replay_draws_eagerly_and_inside_a_graph_capture() {
    let _serial = exclusive();
    if !cuda() {
        return;
    }
    let device = Device::Cuda(0);
    assert!(available(device), "built without CUDA's headers");
    tch::manual_seed(5);
    let [first, replayed, next] = draw_replay_and_continue(device);
    assert!(first.equal(&replayed), "eager: the replayed mask differs");
    assert!(!next.equal(&first), "eager: the generator did not move on");

    // Captured: every replay of the graph draws a fresh mask, and the restored draw equals it.
    let (graph, masks) = CudaGraph::capture(0, None, CaptureMode::Global, || {
        draw_replay_and_continue(device)
    })
    .unwrap();
    let mut seen = Vec::new();
    for replay in 0..3 {
        graph.replay().unwrap();
        tch::Cuda::synchronize(0);
        let [first, replayed, next] = masks.each_ref().map(Tensor::copy);
        assert!(
            first.equal(&replayed),
            "replay {replay}: the replayed mask differs"
        );
        assert!(
            !next.equal(&first),
            "replay {replay}: the generator did not move on"
        );
        assert!(
            seen.iter().all(|earlier: &Tensor| !earlier.equal(&first)),
            "replay {replay} drew an earlier replay's mask"
        );
        seen.push(first);
    }
    // Outside the capture the generator works as before, and a snapshot taken inside it cannot be
    // restored outside.
    let inside = CudaGraph::capture(0, None, CaptureMode::Global, || RngState::save(device))
        .unwrap()
        .1
        .unwrap()
        .unwrap();
    assert!(inside.restore().is_err());
    let [first, replayed, _] = draw_replay_and_continue(device);
    assert!(first.equal(&replayed));
}
