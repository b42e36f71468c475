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
    if !test_support::cuda() {
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

/// A generator of its own draws what `torch.randn(shape, generator=torch.Generator().manual_seed(s))`
/// draws (the fixture of `portable_randn.rs`), and goes on where PyTorch's does, while another
/// thread draws from the default generator all along.
#[test]
fn a_generator_of_its_own_draws_pytorchs_numbers_whatever_the_default_generator_does() {
    use torch_cuda::portable;
    use torch_cuda::rng::Generator;
    let _generator = exclusive();
    if !available(Device::Cpu) {
        assert!(Generator::new(0).is_err());
        println!("no generator shim: skipped");
        return;
    }
    let path = test_support::fixture("torch-randn.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Vec<(i64, Vec<i64>)> =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["cases"]).unwrap();
    let golden: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let draws = std::sync::Arc::new(AtomicU64::new(0));
    let noisy = {
        let (stop, draws) = (std::sync::Arc::clone(&stop), std::sync::Arc::clone(&draws));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                tch::manual_seed(draws.load(Ordering::Relaxed) as i64);
                let _ = Tensor::rand([64], (Kind::Float, Device::Cpu));
                draws.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    while draws.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    for (seed, shape) in cases {
        let mut own = Generator::new(seed as u64).unwrap();
        let drawn = portable::randn_with(&mut own, &shape).unwrap();
        assert!(
            drawn.equal(&golden[&format!("seed{seed}/randn")]),
            "seed {seed}, shape {shape:?}"
        );
        let then = Tensor::from_slice(&own.rand(4).unwrap());
        assert!(
            then.equal(&golden[&format!("seed{seed}/then_rand")]),
            "seed {seed}: the generator is not where PyTorch leaves it"
        );
    }
    stop.store(true, Ordering::Relaxed);
    noisy.join().unwrap();
    // Bad shapes are errors, not panics.
    let mut own = Generator::new(1).unwrap();
    assert!(portable::randn_with(&mut own, &[-1, 4]).is_err());
    assert!(own.randn(&[2, -3]).is_err());
    assert_eq!(own.randn(&[2, 3]).unwrap().size(), [2, 3]);
}

/// Every draw of `Generator` on `device`, next to what libtorch's default generator of `device`
/// draws after `tch::manual_seed` with the same seed, in the same order: `(own, default)`.
fn own_and_default_draws(device: Device, seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
    use torch_cuda::rng::Generator;
    let x = Tensor::ones([3, 1000], (Kind::Float, device)).set_requires_grad(true);
    let own = {
        let g = Generator::on(device, seed).unwrap();
        vec![
            g.randn_on_device(&[4, 33], Kind::Float).unwrap(),
            g.randn_on_device(&[2, 17], Kind::BFloat16).unwrap(),
            g.randint(1000, &[9]).unwrap(),
            g.uniform(&[5, 40], -0.25, 0.25, Kind::Float).unwrap(),
            g.dropout(&x, 0.3).unwrap(),
            g.randn_on_device(&[7], Kind::Float).unwrap(),
        ]
    };
    let default = {
        tch::manual_seed(seed as i64);
        vec![
            Tensor::randn([4, 33], (Kind::Float, device)),
            Tensor::randn([2, 17], (Kind::BFloat16, device)),
            Tensor::randint(1000, [9], (Kind::Int64, device)),
            Tensor::zeros([5, 40], (Kind::Float, device)).uniform_(-0.25, 0.25),
            x.dropout(0.3, true),
            Tensor::randn([7], (Kind::Float, device)),
        ]
    };
    (own, default)
}

fn assert_same_draws(device: Device) {
    for seed in [0, 42, 1 << 40] {
        let (own, default) = own_and_default_draws(device, seed);
        for (i, (a, b)) in own.iter().zip(&default).enumerate() {
            assert_eq!(a.kind(), b.kind(), "draw {i}, seed {seed}");
            assert_eq!(a.device(), device, "draw {i}, seed {seed}");
            assert!(
                a.equal(b),
                "draw {i} differs from the default generator's, seed {seed}"
            );
        }
    }
}

#[test]
fn a_generator_on_the_cpu_draws_what_the_default_generator_draws_after_manual_seed() {
    let _serial = exclusive();
    assert_same_draws(Device::Cpu);
}

#[test]
fn a_generator_on_cuda_draws_what_the_default_generator_draws_after_manual_seed() {
    let _serial = exclusive();
    if !test_support::cuda() {
        return;
    }
    assert_same_draws(Device::Cuda(0));
}

#[test]
fn dropout_from_a_generator_is_differentiable_and_replayable() {
    use torch_cuda::rng::Generator;
    // `x` comes from the default generator, which the snapshot tests set back and replay.
    let _serial = exclusive();
    let devices =
        std::iter::once(Device::Cpu).chain(test_support::cuda().then_some(Device::Cuda(0)));
    for device in devices {
        let g = Generator::on(device, 5).unwrap();
        let x = (Tensor::rand([2, 500], (Kind::Float, device)) + 0.5).set_requires_grad(true);
        let saved = RngState::of(&g).unwrap();
        let y = g.dropout(&x, 0.25).unwrap();
        y.sum(Kind::Float).backward();
        // ∂y/∂x is the scaled mask: 1 / (1 - p) where kept, 0 where dropped.
        let kept = y.ne(0.0).to_kind(Kind::Float);
        assert!(
            x.grad().allclose(&(kept / 0.75), 1e-6, 1e-6, false),
            "{device:?}"
        );
        let dropped = 1000 - i64::try_from(y.ne(0.0).sum(Kind::Int64)).unwrap();
        assert!(
            (150..350).contains(&dropped),
            "{dropped} of 1000 dropped, {device:?}"
        );
        // The snapshot sets the generator back: the same mask again, then the stream goes on.
        let after = RngState::of(&g).unwrap();
        saved.restore().unwrap();
        let again = tch::no_grad(|| g.dropout(&x, 0.25).unwrap());
        assert!(again.equal(&y.detach()), "{device:?}");
        after.restore().unwrap();
        assert!(!tch::no_grad(|| g.dropout(&x, 0.25).unwrap()).equal(&again));
        // p = 0 is the input; p outside [0, 1) and another device are errors naming the problem.
        assert!(g.dropout(&x, 0.0).unwrap().equal(&x));
        assert!(
            g.dropout(&x, 1.0)
                .unwrap_err()
                .to_string()
                .contains("not in [0, 1)")
        );
    }
}

/// Draws from a registered generator of its own inside a CUDA graph: each replay draws from the
/// generator's seed at that time, as eager draws after the same seed, while the default generator
/// is left alone.
#[test]
fn a_registered_generator_draws_inside_a_cuda_graph_as_eagerly() {
    use torch_cuda::rng::Generator;
    let _serial = exclusive();
    if !test_support::cuda() {
        return;
    }
    let device = Device::Cuda(0);
    let g = Generator::on(device, 1).unwrap();
    let out = Tensor::zeros([2, 64], (Kind::Float, device));
    let x = Tensor::ones([256], (Kind::Float, device));
    let record = || {
        let noise = g.randn_on_device(&[64], Kind::Float).unwrap();
        let timesteps = g.randint(1000, &[64]).unwrap().to_kind(Kind::Float);
        let kept = g.dropout(&x, 0.5).unwrap().ne(0.0).sum(Kind::Float);
        out.get(0).copy_(&(noise + kept));
        out.get(1).copy_(&timesteps);
    };
    // A warm-up outside the capture, then the capture.
    record();
    let (graph, ()) = CudaGraph::capture_with(0, None, CaptureMode::Global, &[&g], record).unwrap();
    for seed in [11u64, 12, 11] {
        g.manual_seed(seed).unwrap();
        tch::manual_seed(999);
        graph.replay().unwrap();
        let default_after = Tensor::randn([8], (Kind::Float, device));
        let replayed = out.copy();
        g.manual_seed(seed).unwrap();
        record();
        assert!(
            replayed.equal(&out),
            "seed {seed}: replay differs from the eager draws"
        );
        // The replay drew nothing from the default generator.
        tch::manual_seed(999);
        assert!(Tensor::randn([8], (Kind::Float, device)).equal(&default_after));
    }
    // A generator of another device is refused before anything is captured.
    let cpu = Generator::new(1).unwrap();
    let refused = CudaGraph::capture_with(0, None, CaptureMode::Global, &[&cpu], || ());
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("cannot be registered")
    );
}
