//! The training objective of a micro-step: its random draws (ε, offset noise, timesteps) and the
//! loss against ε or v, min-SNR-γ weighted if asked.

use tch::{Kind, Tensor};

use sdxl_model::schedulers::DdpmSchedule;

use super::StepSettings;
use crate::Result;

/// A micro-step's random draws, as diffusers' script draws them.
#[derive(Debug)]
pub struct Draws {
    /// ε, like the clean latents (`torch.randn_like`).
    pub noise: Tensor,
    /// One draw per sample and channel, `[batch, channels, 1, 1]` (`--noise_offset` only).
    pub offset_noise: Option<Tensor>,
    /// Training timesteps, uniform in `[0, num_train_timesteps)`, `[batch]` int64.
    pub timesteps: Tensor,
}

impl Draws {
    /// Draws from libtorch's generator on the device of `clean` (`[batch, channels, h, w]`), in
    /// the order of the script: ε, the offset noise, the timesteps.
    pub fn sample(clean: &Tensor, settings: &StepSettings, num_train_timesteps: usize) -> Self {
        let size = clean.size();
        let noise = clean.randn_like();
        let offset_noise = (settings.noise_offset > 0.0)
            .then(|| Tensor::randn([size[0], size[1], 1, 1], (settings.kind, clean.device())));
        let timesteps = Tensor::randint(
            num_train_timesteps as i64,
            [size[0]],
            (Kind::Int64, clean.device()),
        );
        Self {
            noise,
            offset_noise,
            timesteps,
        }
    }
}

/// The training objective of one micro-step, as `train_text_to_image_lora_sdxl.py` computes it
/// (the diffusers SDXL LoRA script with `--noise_offset`, `--prediction_type` and `--snr_gamma`):
/// the latents noised with `ε + noise_offset · offset`, the target (that noise for ε-prediction,
/// the velocity for v-prediction) and, with min-SNR-γ, per-sample loss weights.
#[derive(Debug)]
pub struct Objective {
    /// The noised latents, the UNet's input.
    pub noisy: Tensor,
    /// What the UNet should predict, fp32.
    target: Tensor,
    /// Min-SNR-γ weights `[batch]`, fp32, if asked for.
    weights: Option<Tensor>,
}

impl Objective {
    /// The objective for `clean` latents (scaled, in the UNet's element type) and `draws`.
    ///
    /// # Errors
    /// Schedule errors (shapes of the draws).
    pub fn new(
        schedule: &DdpmSchedule,
        clean: &Tensor,
        draws: &Draws,
        settings: &StepSettings,
    ) -> Result<Self> {
        let noise = match &draws.offset_noise {
            Some(offset) => &draws.noise + offset * settings.noise_offset,
            None => draws.noise.shallow_clone(),
        };
        let noisy = schedule.add_noise(clean, &noise, &draws.timesteps)?;
        let target = schedule
            .target(clean, &noise, &draws.timesteps)?
            .to_kind(Kind::Float);
        let weights = match settings.snr_gamma {
            Some(gamma) => Some(schedule.min_snr_weights(&draws.timesteps, gamma)?),
            None => None,
        };
        Ok(Self {
            noisy,
            target,
            weights,
        })
    }

    /// The loss of `prediction` (`[batch, channels, h, w]`): the mean squared error in fp32, or
    /// with min-SNR-γ the mean over samples of each sample's mean squared error times its weight.
    ///
    /// # Errors
    /// libtorch errors (a prediction of another shape).
    pub fn loss(&self, prediction: &Tensor) -> Result<Tensor> {
        let squared = prediction
            .to_kind(Kind::Float)
            .f_sub(&self.target)?
            .square();
        Ok(match &self.weights {
            None => squared.mean(Kind::Float),
            Some(weights) => squared
                .f_mean_dim(&[1i64, 2, 3][..], false, Kind::Float)?
                .f_mul(weights)?
                .mean(Kind::Float),
        })
    }
}
