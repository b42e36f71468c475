//! Lion, Prodigy and Adafactor against their reference implementations over 20 steps, and their
//! state files.
//!
//! The fixture `extra-optimizers.safetensors` comes from `gen_extra_optimizers` in
//! `tools/fixtures/generate.py`: lion-pytorch's `Lion`, prodigyopt's `Prodigy` (two settings) and
//! transformers' `Adafactor` (two settings), each 20 float32 steps on the CPU over the same four
//! LoRA-like parameters (`[4, 32]`, `[24, 4]`, `[4, 6, 3, 3]`, `[24]`) and seeded gradients; it
//! holds the parameters after every step and Prodigy's `d`. The settings are read from the
//! fixture's metadata, so the two sides cannot drift apart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use std::collections::HashMap;

use optim8bit::{
    Adafactor, AdafactorConfig, Lion, LionConfig, ParamGroup, Prodigy, ProdigyConfig,
};
use serde_json::Value;
use support::{fixture, set_grad, temp_path};
use tch::{Kind, Tensor};
use test_support::{check, f32_bound, max_rel_error};

const FILE: &str = "extra-optimizers.safetensors";

struct Reference {
    tensors: HashMap<String, Tensor>,
    params: Vec<String>,
    runs: HashMap<String, Value>,
    steps: i64,
}

fn reference() -> Reference {
    let path = fixture(
        FILE,
        "regenerate it with `tools/fixtures/regenerate.sh --only extra_optimizers`",
    );
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info: Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["reference"]).unwrap();
    let params = info["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap().to_string())
        .collect();
    let runs = info["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].clone()))
        .collect();
    Reference {
        tensors: Tensor::read_safetensors(&path).unwrap().into_iter().collect(),
        params,
        runs,
        steps: info["steps"].as_i64().unwrap(),
    }
}

/// One of the optimizers under test.
enum Any {
    Lion(Lion),
    Prodigy(Prodigy),
    Adafactor(Adafactor),
}

impl Any {
    fn step(&mut self) {
        match self {
            Any::Lion(o) => o.step(),
            Any::Prodigy(o) => o.step(),
            Any::Adafactor(o) => o.step(),
        }
        .unwrap()
    }

    fn save(&self, path: &std::path::Path) {
        match self {
            Any::Lion(o) => o.save(path),
            Any::Prodigy(o) => o.save(path),
            Any::Adafactor(o) => o.save(path),
        }
        .unwrap()
    }

    fn load(&mut self, path: &std::path::Path) {
        match self {
            Any::Lion(o) => o.load(path),
            Any::Prodigy(o) => o.load(path),
            Any::Adafactor(o) => o.load(path),
        }
        .unwrap()
    }
}

fn f(v: &Value) -> f64 {
    match v.as_str() {
        Some("inf") => f64::INFINITY,
        _ => v.as_f64().unwrap(),
    }
}

/// The optimizer of fixture run `run` over `params`, with the run's settings.
fn build(r: &Reference, run: &str, params: &[Tensor]) -> Any {
    let s = &r.runs[run];
    let params = params.iter().map(Tensor::shallow_clone).collect();
    let wd = f(&s["weight_decay"]);
    if run.starts_with("lion") {
        let config = LionConfig {
            beta1: f(&s["betas"][0]),
            beta2: f(&s["betas"][1]),
        };
        let group = ParamGroup::new(params, f(&s["lr"]), wd);
        Any::Lion(Lion::new(vec![group], config).unwrap())
    } else if run.starts_with("prodigy") {
        let config = ProdigyConfig {
            beta1: f(&s["betas"][0]),
            beta2: f(&s["betas"][1]),
            beta3: s["beta3"].as_f64(),
            eps: f(&s["eps"]),
            decouple: s["decouple"].as_bool().unwrap(),
            use_bias_correction: s["use_bias_correction"].as_bool().unwrap(),
            safeguard_warmup: s["safeguard_warmup"].as_bool().unwrap(),
            d0: f(&s["d0"]),
            d_coef: f(&s["d_coef"]),
            growth_rate: f(&s["growth_rate"]),
        };
        let group = ParamGroup::new(params, f(&s["lr"]), wd);
        Any::Prodigy(Prodigy::new(vec![group], config).unwrap())
    } else {
        let config = AdafactorConfig {
            eps: (f(&s["eps"][0]), f(&s["eps"][1])),
            clip_threshold: f(&s["clip_threshold"]),
            decay_rate: f(&s["decay_rate"]),
            beta1: s["beta1"].as_f64(),
            scale_parameter: s["scale_parameter"].as_bool().unwrap(),
            relative_step: s["relative_step"].as_bool().unwrap(),
            warmup_init: s["warmup_init"].as_bool().unwrap(),
        };
        let lr = s["lr"].as_f64().unwrap_or(0.0);
        let group = ParamGroup::new(params, lr, wd);
        Any::Adafactor(Adafactor::new(vec![group], config).unwrap())
    }
}

fn initial_params(r: &Reference) -> Vec<Tensor> {
    r.params
        .iter()
        .map(|n| r.tensors[&format!("{n}.initial")].copy().set_requires_grad(true))
        .collect()
}

fn set_grads(r: &Reference, params: &[Tensor], step: i64) {
    for (p, n) in params.iter().zip(&r.params) {
        set_grad(p, &r.tensors[&format!("{n}.grads")].get(step));
    }
}

/// Runs `run` for all steps and returns, per step, the largest relative error over the
/// parameters (and for Prodigy the relative error of `d`).
fn errors(r: &Reference, run: &str) -> Vec<(f64, f64)> {
    let params = initial_params(r);
    let mut opt = build(r, run, &params);
    let mut out = Vec::new();
    for step in 0..r.steps {
        set_grads(r, &params, step);
        opt.step();
        let p_err = params
            .iter()
            .zip(&r.params)
            .map(|(p, n)| max_rel_error(p, &r.tensors[&format!("{run}.{n}")].get(step)))
            .fold(0.0, f64::max);
        let d_err = match &opt {
            Any::Prodigy(o) => max_rel_error(o.d(), &r.tensors[&format!("{run}.d")].get(step)),
            _ => 0.0,
        };
        out.push((p_err, d_err));
    }
    out
}

#[test]
fn print_errors() {
    let r = reference();
    for run in ["lion", "prodigy", "prodigy_plain", "adafactor_relative", "adafactor_fixed"] {
        let e = errors(&r, run);
        println!("{run}: {:?}", e.iter().map(|x| format!("{:.2e}/{:.2e}", x.0, x.1)).collect::<Vec<_>>());
    }
}
