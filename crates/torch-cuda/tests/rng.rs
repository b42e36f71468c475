//! Random-state snapshots on the CPU (the only test of its binary: the generator is global, so no
//! other test may draw in between).

#![allow(clippy::unwrap_used)]

use tch::{Device, Kind, Tensor};
use torch_cuda::rng::{RngState, available};

#[test]
fn cpu_snapshots_replay_dropout_masks_and_uniform_draws() {
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
