//! The VAE against diffusers' golden outputs on the tiny fixture (fp32, CPU).

// Helpers outside #[test] functions unwrap too: a fixture that fails to load should fail the test.
#![allow(clippy::unwrap_used)]

mod common;

use common::depth::{vae_decode_depth, vae_encode_depth};
use common::{fixture, get, golden, rel};
use test_support::{F32_UNIT_ROUNDOFF, check, f32_bound};

use sdxl_model::Error;
use sdxl_model::pretrained::LoadOptions;
use sdxl_model::vae::{AutoencoderKL, AutoencoderKLConfig, Upcast, VaeTiling};
use tch::{Device, Kind, Tensor};

fn tiny_vae() -> AutoencoderKL {
    let options = LoadOptions::default().vae_upcast(Upcast::Never);
    AutoencoderKL::from_pretrained(fixture("tiny-sdxl/vae"), &options)
        .unwrap()
        .model
}

#[test]
fn encode_and_decode_match_diffusers() {
    let io = golden("tiny-sdxl-vae-io.safetensors");
    let vae = tiny_vae();
    assert_eq!(vae.config(), &AutoencoderKLConfig::tiny());
    let posterior = tch::no_grad(|| vae.encode(&get(&io, "image"))).unwrap();
    let mean_err = rel(&posterior.mean, &get(&io, "mean"));
    let logvar_err = rel(&posterior.logvar, &get(&io, "logvar"));
    let decoded = tch::no_grad(|| vae.decode(&get(&io, "latents"))).unwrap();
    let decode_err = rel(&decoded, &get(&io, "decoded"));
    // float32 roundings along the encoder's and decoder's longest paths (docs/NUMERICS.md).
    let config = vae.config();
    let encode_bound = f32_bound(vae_encode_depth(config, 32, 32));
    check("VAE encode mean vs diffusers", mean_err, encode_bound);
    check("VAE encode logvar vs diffusers", logvar_err, encode_bound);
    check(
        "VAE decode vs diffusers",
        decode_err,
        f32_bound(vae_decode_depth(config, 8, 8)),
    );
}

#[test]
fn tiled_decode_matches_diffusers_tiling_and_stays_within_its_seam_error() {
    let io = golden("tiny-sdxl-vae-tiling-io.safetensors");
    let mut vae = tiny_vae();
    let latents = get(&io, "latents");
    let untiled = tch::no_grad(|| vae.decode(&latents)).unwrap();
    vae.set_tiling(Some(VaeTiling::default())).unwrap();
    let tiled = tch::no_grad(|| vae.decode(&latents)).unwrap();
    // Each tile is a decode of at most the whole latent, plus the blend (two operations).
    let bound = f32_bound(vae_decode_depth(vae.config(), 20, 14) + 2.0);
    check(
        "VAE decode (20x14 latents) vs diffusers",
        rel(&untiled, &get(&io, "untiled_decoded")),
        bound,
    );
    let vs_diffusers_tiled = rel(&tiled, &get(&io, "tiled_decoded"));
    let seam_error = rel(&tiled, &untiled);
    let diffusers_seam_error = get(&io, "decode_rel_diff").double_value(&[0]);
    println!(
        "tiled decode: vs diffusers tiled {vs_diffusers_tiled:.2e}; vs untiled {seam_error:.4e} (diffusers {diffusers_seam_error:.4e})"
    );
    check(
        "VAE tiled decode vs diffusers' tiled",
        vs_diffusers_tiled,
        bound,
    );
    // Tiling must actually change something, and no more than diffusers' own tiling does (up to
    // the rounding of both of our decodes).
    assert!(seam_error > 1e-4);
    check(
        "VAE tiled decode's seam error beyond diffusers'",
        seam_error - diffusers_seam_error,
        2.0 * bound,
    );
}

#[test]
fn tiled_encode_matches_diffusers_tiling_and_stays_within_its_seam_error() {
    let io = golden("tiny-sdxl-vae-tiling-io.safetensors");
    let mut vae = tiny_vae();
    let image = get(&io, "image");
    let untiled = tch::no_grad(|| vae.encode(&image)).unwrap().mean;
    vae.set_tiling(Some(VaeTiling::default())).unwrap();
    let tiled = tch::no_grad(|| vae.encode(&image)).unwrap().mean;
    let bound = f32_bound(vae_encode_depth(vae.config(), 80, 56) + 2.0);
    check(
        "VAE encode (80x56 image) vs diffusers",
        rel(&untiled, &get(&io, "untiled_mean")),
        bound,
    );
    let vs_diffusers_tiled = rel(&tiled, &get(&io, "tiled_mean"));
    let seam_error = rel(&tiled, &untiled);
    let diffusers_seam_error = get(&io, "encode_rel_diff").double_value(&[0]);
    println!(
        "tiled encode: vs diffusers tiled {vs_diffusers_tiled:.2e}; vs untiled {seam_error:.4e} (diffusers {diffusers_seam_error:.4e})"
    );
    check(
        "VAE tiled encode vs diffusers' tiled",
        vs_diffusers_tiled,
        bound,
    );
    assert!(seam_error > 1e-4);
    check(
        "VAE tiled encode's seam error beyond diffusers'",
        seam_error - diffusers_seam_error,
        2.0 * bound,
    );
}

#[test]
fn slicing_gives_the_batched_result() {
    let io = golden("tiny-sdxl-vae-io.safetensors");
    let mut vae = tiny_vae();
    let images = get(&io, "image");
    let latents = Tensor::cat(&[get(&io, "latents"), get(&io, "latents") * 0.5], 0);
    let (mean, decoded) = tch::no_grad(|| {
        (
            vae.encode(&images).unwrap().mean,
            vae.decode(&latents).unwrap(),
        )
    });
    vae.set_slicing(true);
    let (mean_sliced, decoded_sliced) = tch::no_grad(|| {
        (
            vae.encode(&images).unwrap().mean,
            vae.decode(&latents).unwrap(),
        )
    });
    // Only rounding differs (libtorch picks per-batch-size kernels); the two samples are not mixed up.
    check(
        "VAE sliced encode vs batched",
        rel(&mean_sliced, &mean),
        f32_bound(vae_encode_depth(vae.config(), 32, 32)),
    );
    check(
        "VAE sliced decode vs batched",
        rel(&decoded_sliced, &decoded),
        f32_bound(vae_decode_depth(vae.config(), 8, 8)),
    );
    assert!(rel(&decoded_sliced.get(1), &decoded.get(0)) > 1e-2);
}

#[test]
fn upcast_keeps_fp32_weights_and_returns_the_callers_type() {
    let io = golden("tiny-sdxl-vae-io.safetensors");
    let dir = fixture("tiny-sdxl/vae");
    let half = LoadOptions::default()
        .kind(Kind::Half)
        .vae_upcast(Upcast::FromConfig);
    let vae = AutoencoderKL::from_pretrained(&dir, &half).unwrap().model;
    assert_eq!(vae.weight_kind(), Kind::Float);
    let decoded = tch::no_grad(|| vae.decode(&get(&io, "latents").to_kind(Kind::Half))).unwrap();
    assert_eq!(decoded.kind(), Kind::Half);
    // fp16 rounds the input latents and the output by up to 2⁻¹¹ each; the decoder in fp32 may
    // amplify the input's rounding by its gain (below 10 for these weights): 20 · 2⁻¹¹.
    check(
        "VAE fp16 upcast decode vs diffusers' fp32",
        rel(&decoded, &get(&io, "decoded")),
        20.0 * 2f64.powi(-11),
    );
    let plain = AutoencoderKL::from_pretrained(&dir, &half.kind(Kind::BFloat16))
        .unwrap()
        .model;
    assert_eq!(plain.weight_kind(), Kind::BFloat16);
}

#[test]
fn posterior_sample_uses_the_given_noise_and_latents_scale() {
    let io = golden("tiny-sdxl-vae-io.safetensors");
    let vae = tiny_vae();
    let posterior = tch::no_grad(|| vae.encode(&get(&io, "image"))).unwrap();
    let noise = posterior.mean.randn_like();
    let sample = posterior.sample_with(&noise).unwrap();
    let expected = get(&io, "mean") + (get(&io, "logvar") * 0.5).exp() * &noise;
    // The encoder, then std = exp(logvar / 2), its product with the noise and the sum.
    check(
        "VAE posterior sample vs diffusers' mean and logvar",
        rel(&sample, &expected),
        f32_bound(vae_encode_depth(vae.config(), 32, 32) + 4.0 + test_support::depth::ACTIVATION),
    );
    assert!(posterior.sample_with(&noise.narrow(0, 0, 1)).is_err());
    let scaled = vae.scale_latents(&sample);
    // Scaling is one multiplication; scaling and unscaling (a division, or a multiplication by a
    // rounded reciprocal) at most three roundings.
    assert!(rel(&scaled, &(&sample * 0.13025)) <= F32_UNIT_ROUNDOFF);
    assert!(rel(&vae.unscale_latents(&scaled), &sample) <= 3.0 * F32_UNIT_ROUNDOFF * (1.0 + 1e-6));
}

#[test]
fn bad_inputs_and_configs_are_errors_not_panics() {
    let vae = tiny_vae();
    let wrong_channels = Tensor::zeros([1, 5, 8, 8], (Kind::Float, Device::Cpu));
    let msg = vae
        .decode(&wrong_channels)
        .err()
        .map(|e| e.to_string())
        .unwrap();
    assert!(
        msg.contains("VAE decode input") && msg.contains("[1, 5, 8, 8]"),
        "{msg}"
    );
    assert!(matches!(
        vae.encode(&Tensor::zeros([3, 8, 8], (Kind::Float, Device::Cpu))),
        Err(Error::Shape { .. })
    ));

    let mut tiled = tiny_vae();
    for bad in [
        VaeTiling::default().with_sample_tile(30).with_overlap(0.25),
        VaeTiling::default().with_overlap(1.0),
    ] {
        assert!(
            matches!(
                tiled.set_tiling(Some(bad)),
                Err(Error::InvalidSetting { .. })
            ),
            "{bad:?}"
        );
    }

    let mut config = AutoencoderKLConfig::tiny();
    config.block_out_channels = vec![16, 30, 32];
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let err = AutoencoderKL::new(&vs.root(), &config)
        .err()
        .map(|e| e.to_string())
        .unwrap();
    assert!(
        err.contains("block_out_channels") && err.contains("30"),
        "{err}"
    );
    config = AutoencoderKLConfig::tiny();
    config.up_block_types[1] = "AttnUpDecoderBlock2D".into();
    assert!(matches!(
        AutoencoderKL::new(&vs.root(), &config),
        Err(Error::InvalidConfig {
            field: "up_block_types",
            ..
        })
    ));
}

#[test]
fn ldm_single_file_layout_gives_the_same_outputs() {
    use sdxl_model::vae::single_file::load_vae_file;
    let io = golden("tiny-sdxl-vae-io.safetensors");
    let path = fixture("tiny-sdxl-vae-single-file.safetensors");
    let config = AutoencoderKLConfig::tiny();
    let (single, _vs) =
        load_vae_file(&path, &config, Device::Cpu, Kind::Float, Upcast::Never).unwrap();
    let folder = tiny_vae();
    tch::no_grad(|| {
        let latents = get(&io, "latents");
        assert!(
            single
                .decode(&latents)
                .unwrap()
                .equal(&folder.decode(&latents).unwrap())
        );
        let image = get(&io, "image");
        assert!(
            single
                .encode(&image)
                .unwrap()
                .mean
                .equal(&folder.encode(&image).unwrap().mean)
        );
    });

    // A config that does not fit names the mis-shaped LDM key.
    let mut wider = AutoencoderKLConfig::tiny();
    wider.block_out_channels = vec![16, 32, 64];
    let msg = load_vae_file(&path, &wider, Device::Cpu, Kind::Float, Upcast::Never)
        .err()
        .unwrap()
        .to_string();
    for needle in [
        "`first_stage_model.decoder.conv_in.weight` (model [64, 4, 3, 3], file [32, 4, 3, 3])",
        "missing: `first_stage_model.decoder.up.1.block.0.nin_shortcut.bias`",
    ] {
        assert!(msg.contains(needle), "{needle} not in {msg}");
    }
}

#[test]
fn mid_block_attention_linears_are_visible_by_diffusers_path() {
    use lora::HasLinears;
    let mut vae = tiny_vae();
    let mut paths = Vec::new();
    vae.for_each_linear(&mut |path, linear| paths.push((path.to_owned(), linear.in_features())));
    let expected: Vec<(String, i64)> = ["encoder", "decoder"]
        .iter()
        .flat_map(|coder| {
            ["to_q", "to_k", "to_v", "to_out.0"]
                .map(|l| (format!("{coder}.mid_block.attentions.0.{l}"), 32))
        })
        .collect();
    assert_eq!(paths, expected);
}
