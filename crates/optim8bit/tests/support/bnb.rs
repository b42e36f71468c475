//! The bitsandbytes fixtures (`bnb-adamw8bit-*.safetensors`, `bnb-lion8bit-*.safetensors`, made by
//! `gen_bnb_adamw8bit*` and `gen_bnb_lion8bit*` in `tools/fixtures/generate.py`): three parameters in
//! two groups, 20 steps of gradients, and parameters and states after the recorded steps.

use std::collections::HashMap;

use optim8bit::ParamGroup;
use tch::{Device, Kind, Tensor};

use super::{fixture, set_grad};

/// A bitsandbytes fixture.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    /// (name, group) in the order of the fixture's parameter list.
    pub params: Vec<(String, usize)>,
    /// (lr, weight_decay) per group.
    pub groups: Vec<(f64, f64)>,
    pub recorded_steps: Vec<i64>,
    pub device: String,
    /// The whole metadata entry, for settings only some fixtures have (Lion's `betas`).
    pub info: serde_json::Value,
}

/// The reference in `file`, which must exist; `how` tells how to regenerate it.
pub fn read_reference(file: &str, how: &str) -> Reference {
    let path = fixture(file, how);
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["reference"]).unwrap();
    let params = info["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[2].as_u64().unwrap() as usize,
            )
        })
        .collect();
    let groups = info["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["lr"].as_f64().unwrap(),
                g["weight_decay"].as_f64().unwrap(),
            )
        })
        .collect();
    let recorded_steps = info["recorded_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_i64().unwrap())
        .collect();
    let tensors = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    Reference {
        tensors,
        params,
        groups,
        recorded_steps,
        device: info["device"].as_str().unwrap().into(),
        info,
    }
}

impl Reference {
    /// Fresh copies of the initial parameters on `device`, requiring gradients.
    pub fn initial_params(&self, device: Device) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(name, _)| {
                self.tensors[&format!("{name}.initial")]
                    .copy()
                    .to_device(device)
                    .set_requires_grad(true)
            })
            .collect()
    }

    /// The fixture's parameter groups over `params` (from [`Reference::initial_params`]).
    pub fn param_groups(&self, params: &[Tensor]) -> Vec<ParamGroup> {
        self.groups
            .iter()
            .enumerate()
            .map(|(g, &(lr, wd))| {
                let members = self
                    .params
                    .iter()
                    .zip(params)
                    .filter(|((_, pg), _)| *pg == g);
                ParamGroup::new(members.map(|(_, p)| p.shallow_clone()).collect(), lr, wd)
            })
            .collect()
    }

    /// Where each parameter sits in its group, (group, index), for the state keys `state.{g}.{i}.*`.
    pub fn slots(&self) -> Vec<(usize, usize)> {
        let mut position = vec![0usize; self.groups.len()];
        self.params
            .iter()
            .map(|(_, g)| {
                position[*g] += 1;
                (*g, position[*g] - 1)
            })
            .collect()
    }

    /// The gradient of step `step` (1-based) of parameter `name`: `grads[step − 1] · grad_scale`.
    pub fn grad(&self, name: &str, step: i64) -> Tensor {
        self.tensors[&format!("{name}.grads")]
            .get(step - 1)
            .to_kind(Kind::Float)
            * &self.tensors[&format!("{name}.grad_scale")]
    }

    /// Sets the gradients of step `step` (1-based).
    pub fn set_grads(&self, params: &[Tensor], step: i64) {
        for ((name, _), param) in self.params.iter().zip(params) {
            set_grad(param, &self.grad(name, step));
        }
    }
}

/// Code differences over a run. A code may differ by one where its value lies on a midpoint
/// between two codes (a one-ulp difference of `m / absmax` decides it); such ties are rare by
/// construction of the fixtures' gradients.
#[derive(Default)]
pub struct CodeTally {
    differing: i64,
    codes: i64,
}

impl CodeTally {
    /// Compares our codes with theirs, failing (naming `what`) when one is off by more than one
    /// code; returns how many differ.
    pub fn add(&mut self, ours: &Tensor, theirs: &Tensor, what: &str) -> i64 {
        let diff = (ours.to_kind(Kind::Int64) - theirs.to_kind(Kind::Int64)).abs();
        let count = diff.gt(0).sum(Kind::Int64).int64_value(&[]);
        assert!(
            diff.max().int64_value(&[]) <= 1,
            "{what}: a code is off by more than one"
        );
        self.differing += count;
        self.codes += theirs.numel() as i64;
        count
    }

    /// Prints the tally and fails when more than one code in a thousand differs.
    pub fn finish(&self) {
        println!(
            "one-code differences (values on a midpoint): {} of {} recorded codes",
            self.differing, self.codes
        );
        assert!(
            self.differing * 1000 <= self.codes,
            "too many code differences for midpoint ties"
        );
    }
}
