//! The fixture of Lion, Prodigy and Adafactor (`extra-optimizers.safetensors`, made by
//! `gen_extra_optimizers` in `tools/fixtures/generate.py`) and the optimizers built from its
//! settings, for `tests/extra_optimizers.rs` and `tests/extra_optimizers_state.rs`.

use std::collections::HashMap;

use optim8bit::{Adafactor, AdafactorConfig, Lion, LionConfig, ParamGroup, Prodigy, ProdigyConfig};
use serde_json::Value;
use tch::Tensor;

pub use super::Reference;
use super::{read_runs, set_grad, temp_path};

pub const FILE: &str = "extra-optimizers.safetensors";

/// Reads the fixture, which must exist.
pub fn reference() -> Reference {
    read_runs(FILE, "extra_optimizers")
}

/// One of the optimizers under test.
pub enum Any {
    Lion(Lion),
    Prodigy(Prodigy),
    Adafactor(Adafactor),
}

impl Any {
    pub fn step(&mut self) {
        match self {
            Any::Lion(o) => o.step(),
            Any::Prodigy(o) => o.step(),
            Any::Adafactor(o) => o.step(),
        }
        .unwrap()
    }

    pub fn save(&self, path: &std::path::Path) {
        match self {
            Any::Lion(o) => o.save(path),
            Any::Prodigy(o) => o.save(path),
            Any::Adafactor(o) => o.save(path),
        }
        .unwrap()
    }

    pub fn load(&mut self, path: &std::path::Path) {
        match self {
            Any::Lion(o) => o.load(path),
            Any::Prodigy(o) => o.load(path),
            Any::Adafactor(o) => o.load(path),
        }
        .unwrap()
    }
}

pub fn f(v: &Value) -> f64 {
    match v.as_str() {
        Some("inf") => f64::INFINITY,
        _ => v.as_f64().unwrap(),
    }
}

/// The optimizer of fixture run `run` over `params`, with the run's settings. `lion8bit` (not a
/// fixture run) is `lion`'s settings with an 8-bit momentum for every parameter (`min_8bit_size`
/// 0: the fixture's parameters are smaller than a block or end in a ragged one).
pub fn build(r: &Reference, run: &str, params: &[Tensor]) -> Any {
    let s = &r.runs[if run == "lion8bit" { "lion" } else { run }];
    let params = params.iter().map(Tensor::shallow_clone).collect();
    let wd = f(&s["weight_decay"]);
    if run.starts_with("lion") {
        let base = if run == "lion8bit" {
            LionConfig::eight_bit().with_min_8bit_size(0)
        } else {
            LionConfig::fp32()
        };
        let config = base
            .with_beta1(f(&s["betas"][0]))
            .with_beta2(f(&s["betas"][1]));
        let group = ParamGroup::new(params, f(&s["lr"]), wd);
        Any::Lion(Lion::new(vec![group], config).unwrap())
    } else if run.starts_with("prodigy") {
        let config = ProdigyConfig::default()
            .with_beta1(f(&s["betas"][0]))
            .with_beta2(f(&s["betas"][1]))
            .with_beta3(s["beta3"].as_f64())
            .with_eps(f(&s["eps"]))
            .with_decouple(s["decouple"].as_bool().unwrap())
            .with_use_bias_correction(s["use_bias_correction"].as_bool().unwrap())
            .with_safeguard_warmup(s["safeguard_warmup"].as_bool().unwrap())
            .with_d0(f(&s["d0"]))
            .with_d_coef(f(&s["d_coef"]))
            .with_growth_rate(f(&s["growth_rate"]));
        let group = ParamGroup::new(params, f(&s["lr"]), wd);
        Any::Prodigy(Prodigy::new(vec![group], config).unwrap())
    } else {
        let config = AdafactorConfig::default()
            .with_eps((f(&s["eps"][0]), f(&s["eps"][1])))
            .with_clip_threshold(f(&s["clip_threshold"]))
            .with_decay_rate(f(&s["decay_rate"]))
            .with_beta1(s["beta1"].as_f64())
            .with_scale_parameter(s["scale_parameter"].as_bool().unwrap())
            .with_relative_step(s["relative_step"].as_bool().unwrap())
            .with_warmup_init(s["warmup_init"].as_bool().unwrap());
        let lr = s["lr"].as_f64().unwrap_or(0.0);
        let group = ParamGroup::new(params, lr, wd);
        Any::Adafactor(Adafactor::new(vec![group], config).unwrap())
    }
}

pub fn initial_params(r: &Reference) -> Vec<Tensor> {
    r.params
        .iter()
        .map(|n| {
            r.tensors[&format!("{n}.initial")]
                .copy()
                .set_requires_grad(true)
        })
        .collect()
}

pub fn set_grads(r: &Reference, params: &[Tensor], step: i64) {
    for (p, n) in params.iter().zip(&r.params) {
        set_grad(p, &r.tensors[&format!("{n}.grads")].get(step));
    }
}

/// Every state tensor of a saved file, by key.
pub fn saved(opt: &Any, name: &str) -> HashMap<String, Tensor> {
    let path = temp_path(name);
    opt.save(&path);
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}
