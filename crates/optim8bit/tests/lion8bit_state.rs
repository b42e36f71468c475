//! `Lion` with an 8-bit momentum: which parameters get 8-bit states and what they cost,
//! `step_if`, resume from a state file, and state files it must refuse. Uses the parameters,
//! groups and gradients of the bitsandbytes `Lion8bit` fixture (`tests/bnb_lion8bit.rs`): a ragged
//! 4400-element and a 4096-element parameter with 8-bit momenta, a 2560-element one with fp32.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use std::collections::HashMap;

use optim8bit::{Error, Lion, LionConfig, clip_grad_norm};
use support::bnb::{Reference, read_reference};
use support::temp_path;
use tch::{Device, Kind, Tensor};
use test_support::cuda;

fn reference() -> Reference {
    read_reference(
        "bnb-lion8bit-cpu.safetensors",
        "regenerate it with `tools/fixtures/regenerate.sh --only bnb_lion8bit`",
    )
}

fn lion(r: &Reference, params: &[Tensor], config: LionConfig) -> Lion {
    Lion::new(r.param_groups(params), config).unwrap()
}

/// The CPU, and CUDA when there is one.
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if cuda() {
        devices.push(Device::Cuda(0));
    }
    devices
}

/// Every tensor of the optimizer's state file, by key.
fn saved(opt: &Lion, name: &str) -> HashMap<String, Tensor> {
    let path = temp_path(name);
    opt.save(&path).unwrap();
    let tensors = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    std::fs::remove_file(&path).unwrap();
    tensors
}

/// Bit patterns, so that a comparison also tells −0.0 from 0.0 and NaN payloads apart.
fn bits(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Float => t.to_device(Device::Cpu).contiguous().view_dtype(Kind::Int),
        Kind::Double => t
            .to_device(Device::Cpu)
            .contiguous()
            .view_dtype(Kind::Int64),
        _ => t.to_device(Device::Cpu),
    }
}

fn assert_same_state(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: different keys");
    for (key, t) in a {
        assert!(bits(t).equal(&bits(&b[key])), "{what}: {key} differs");
    }
}

fn assert_same_params(a: &[Tensor], b: &[Tensor], what: &str) {
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        assert!(bits(a).equal(&bits(b)), "{what}: parameter {i} differs");
    }
}

#[test]
fn min_8bit_size_decides_the_momentum_and_state_bytes_counts_it() {
    let r = reference();
    let params = r.initial_params(Device::Cpu);
    let eight = lion(&r, &params, LionConfig::eight_bit());
    // ragged (4400) and exact (4096): 1 byte per element and an fp32 absmax per block of 256
    // (18 and 16 blocks); small (2560 < 4096): 4 bytes per element.
    assert_eq!(
        eight.state_bytes(),
        4400 + 18 * 4 + 4096 + 16 * 4 + 2560 * 4
    );
    let file = saved(&eight, "lion8bit-layout.safetensors");
    // Slots: ragged is group 0 index 0, exact group 1 index 0, small group 0 index 1.
    assert_eq!(file["state.0.0.state1"].kind(), Kind::Uint8);
    assert_eq!(file["state.0.0.state1"].size(), vec![4, 1100]);
    assert_eq!(file["state.0.0.absmax1"].size(), vec![18]);
    assert_eq!(file["state.1.0.absmax1"].size(), vec![16]);
    assert_eq!(file["state.0.1.exp_avg"].kind(), Kind::Float);
    assert!(!file.contains_key("state.0.1.state1"));
    let fp32 = lion(&r, &params, LionConfig::fp32());
    assert_eq!(fp32.state_bytes(), (4400 + 4096 + 2560) * 4);
    let all = lion(&r, &params, LionConfig::eight_bit().with_min_8bit_size(0));
    assert_eq!(all.state_bytes(), 4400 + 4096 + 2560 + (18 + 16 + 10) * 4);
    let message = Lion::new(
        r.param_groups(&params),
        LionConfig::eight_bit().with_min_8bit_size(-1),
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("min_8bit_size"), "{message}");
}

/// `step_if(false)` (a bool and a 0.0 condition) leaves parameters, codes, absmax, fp32 momentum
/// and step count bit-identical, also when the gradients it is given are NaN; `step_if(true)`
/// equals `step` bit for bit; a NaN gradient gated by the clipped gradient norm changes nothing.
#[test]
fn step_if_skips_exactly_and_applies_exactly() {
    let r = reference();
    for device in devices() {
        let params = r.initial_params(device);
        let mut opt = lion(&r, &params, LionConfig::eight_bit());
        let twin = r.initial_params(device);
        let mut plain = lion(&r, &twin, LionConfig::eight_bit());
        for step in 1..=6 {
            if step % 2 == 0 {
                let before = saved(&opt, "lion8bit-before.safetensors");
                let kept: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
                r.set_grads(&params, step + 10);
                let _ = params[0].grad().get(1).get(17).fill_(f64::NAN);
                let skip = if step == 2 {
                    Tensor::from(false)
                } else {
                    Tensor::from(0.0f32)
                };
                opt.step_if(&skip.to_device(device)).unwrap();
                let norm = clip_grad_norm(&params, 1.0).unwrap();
                opt.step_if(&norm.isfinite()).unwrap();
                let what = format!("{device:?} skip before step {step}");
                assert_same_params(&kept, &params, &what);
                assert_same_state(&before, &saved(&opt, "lion8bit-after.safetensors"), &what);
            }
            r.set_grads(&params, step);
            opt.step_if(&Tensor::from(true).to_device(device)).unwrap();
            r.set_grads(&twin, step);
            plain.step().unwrap();
            let what = format!("{device:?} step {step}");
            assert_same_params(&params, &twin, &what);
            assert_same_state(
                &saved(&opt, "lion8bit-gated.safetensors"),
                &saved(&plain, "lion8bit-plain.safetensors"),
                &what,
            );
        }
        assert_eq!(opt.step_count().double_value(&[]), 6.0);
    }
}

/// Saving after 10 steps and loading into a fresh optimizer over copies of the parameters, the
/// other 10 steps give bit-identical parameters and states to 20 uninterrupted steps.
#[test]
fn resume_from_a_state_file_equals_an_uninterrupted_run() {
    let r = reference();
    for device in devices() {
        let straight = r.initial_params(device);
        let mut opt = lion(&r, &straight, LionConfig::eight_bit());
        let first = r.initial_params(device);
        let mut interrupted = lion(&r, &first, LionConfig::eight_bit());
        for step in 1..=10 {
            r.set_grads(&straight, step);
            opt.step().unwrap();
            r.set_grads(&first, step);
            interrupted.step().unwrap();
        }
        let path = temp_path("lion8bit-resume.safetensors");
        interrupted.save(&path).unwrap();
        let resumed: Vec<Tensor> = first
            .iter()
            .map(|p| p.detach().copy().set_requires_grad(true))
            .collect();
        let mut opt2 = lion(&r, &resumed, LionConfig::eight_bit());
        opt2.load(&path).unwrap();
        assert_eq!(opt2.step_count().double_value(&[]), 10.0);
        for step in 11..=20 {
            r.set_grads(&straight, step);
            opt.step().unwrap();
            r.set_grads(&resumed, step);
            opt2.step().unwrap();
        }
        let what = format!("{device:?} resumed");
        assert_same_params(&straight, &resumed, &what);
        assert_same_state(
            &saved(&opt, "lion8bit-straight.safetensors"),
            &saved(&opt2, "lion8bit-resumed.safetensors"),
            &what,
        );
    }
}

/// Writes `tensors` with `key` replaced by `value` (or removed) to a new file.
fn altered(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    value: Option<Tensor>,
) -> std::path::PathBuf {
    let mut named: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| k.as_str() != key)
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    if let Some(value) = value {
        named.push((key.to_string(), value));
    }
    let path = temp_path(&format!(
        "lion8bit-altered-{}.safetensors",
        key.replace('.', "-")
    ));
    Tensor::write_safetensors(&named, &path).unwrap();
    path
}

/// A state file of another precision, another `min_8bit_size`, with a state of the wrong shape
/// or a foreign code table, or no safetensors at all, is refused naming the file and the key, and
/// the optimizer keeps its state.
#[test]
fn load_refuses_a_mismatched_state_file() {
    let r = reference();
    let params = r.initial_params(Device::Cpu);
    let mut opt = lion(&r, &params, LionConfig::eight_bit());
    r.set_grads(&params, 1);
    opt.step().unwrap();
    let before = saved(&opt, "lion8bit-refuse-before.safetensors");

    let expect = |opt: &mut Lion, path: &std::path::Path, key: &str, reason: &str| {
        let err = opt.load(path).unwrap_err();
        let message = err.to_string();
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(
            message.contains(file) && message.contains(key) && message.contains(reason),
            "{message}"
        );
        err
    };
    let fp32_path = temp_path("lion-fp32.safetensors");
    lion(&r, &params, LionConfig::fp32())
        .save(&fp32_path)
        .unwrap();
    let err = expect(
        &mut opt,
        &fp32_path,
        "`precision`",
        "32, this optimizer has 8",
    );
    assert!(matches!(err, Error::StateMismatch { .. }));

    let all_path = temp_path("lion8bit-all.safetensors");
    let all = LionConfig::eight_bit().with_min_8bit_size(0);
    lion(&r, &params, all).save(&all_path).unwrap();
    expect(
        &mut opt,
        &all_path,
        "`min_8bit_size`",
        "0, this optimizer has 4096",
    );

    let path = altered(
        &before,
        "state.0.0.absmax1",
        Some(Tensor::zeros([17], (Kind::Float, Device::Cpu))),
    );
    expect(
        &mut opt,
        &path,
        "`state.0.0.absmax1`",
        "shape [17], expected Float of shape [18]",
    );
    let path = altered(
        &before,
        "state.1.0.state1",
        Some(Tensor::zeros([4096], (Kind::Float, Device::Cpu))),
    );
    expect(&mut opt, &path, "`state.1.0.state1`", "expected Uint8");
    let path = altered(&before, "qmap1", Some(before["qmap1"].flip([0])));
    expect(&mut opt, &path, "`qmap1`", "differs");
    let path = altered(&before, "state.0.1.exp_avg", None);
    expect(&mut opt, &path, "`state.0.1.exp_avg`", "missing");

    let garbage = temp_path("lion8bit-garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let err = opt.load(&garbage).unwrap_err();
    assert!(matches!(err, Error::UnreadableStateFile { .. }), "{err}");
    assert!(
        err.to_string().contains("lion8bit-garbage.safetensors"),
        "{err}"
    );

    assert_same_state(
        &before,
        &saved(&opt, "lion8bit-refuse-after.safetensors"),
        "refused loads",
    );
}
