//! The training objective of a micro-step: its random draws (ε, offset noise, timesteps) and the
//! loss against ε or v, min-SNR-γ weighted if asked; with prior preservation (regularization
//! images in the batch), per-sample loss weights ([`LossWeights`], [`Objective::weighted_loss`]).

use tch::{Device, Kind, Tensor};

use sdxl_model::schedulers::DdpmSchedule;

use super::StepSettings;
use crate::Result;
use crate::rng::RunRng;

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
    /// Draws from the run's generator (on the device of `clean`, `[batch, channels, h, w]`), in
    /// the order of the script: ε, the offset noise, the timesteps.
    ///
    /// # Errors
    /// The generator's errors.
    pub(crate) fn sample(
        clean: &Tensor,
        settings: &StepSettings,
        num_train_timesteps: usize,
        rng: &RunRng,
    ) -> Result<Self> {
        let size = clean.size();
        let noise = rng.randn_like(clean)?;
        let offset_noise = if settings.noise_offset > 0.0 {
            Some(rng.randn(&[size[0], size[1], 1, 1], settings.kind)?)
        } else {
            None
        };
        let timesteps = rng.randint(num_train_timesteps as i64, &[size[0]])?;
        Ok(Self {
            noise,
            offset_noise,
            timesteps,
        })
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

    /// The loss of `prediction` (`[batch, channels, h, w]`) with per-sample weights:
    /// `Σ_i c_i · m_i · s_i`, where `m_i` is sample `i`'s mean squared error in fp32, `c_i` its
    /// coefficient and `s_i` its min-SNR-γ factor — `snr_mask_i · (w_i − 1) + 1` with `--snr_gamma`
    /// (`w_i` the weight [`Self::loss`] uses), else 1. `coefficients` and `snr_mask` are `[batch]`
    /// fp32 tensors on the prediction's device, e.g. from [`LossWeights::tensors`]; with
    /// [`LossWeights::mean`] this is [`Self::loss`] up to rounding.
    ///
    /// Reads nothing on the host and keeps every shape fixed, so it can be captured in a CUDA graph.
    ///
    /// # Errors
    /// [`sdxl_model::Error::Shape`] when the vectors are not `[batch]`; libtorch errors (a
    /// prediction of another shape).
    pub fn weighted_loss(
        &self,
        prediction: &Tensor,
        coefficients: &Tensor,
        snr_mask: &Tensor,
    ) -> Result<Tensor> {
        let batch = self.target.size().first().copied().unwrap_or(0);
        for (what, vector) in [
            ("loss coefficients", coefficients),
            ("min-SNR mask", snr_mask),
        ] {
            if vector.size() != [batch] {
                return Err(sdxl_model::Error::Shape {
                    what: what.into(),
                    expected: format!("[{batch}]"),
                    actual: format!("{:?}", vector.size()),
                }
                .into());
            }
        }
        let per_sample = prediction
            .to_kind(Kind::Float)
            .f_sub(&self.target)?
            .square()
            .f_mean_dim(&[1i64, 2, 3][..], false, Kind::Float)?;
        let factors = match &self.weights {
            None => coefficients.shallow_clone(),
            Some(weights) => {
                coefficients.f_mul(&snr_mask.f_mul(&(weights - 1.0))?.f_add_scalar(1.0)?)?
            }
        };
        Ok(per_sample.f_mul(&factors)?.sum(Kind::Float))
    }
}

/// Per-sample coefficients of a micro-step's loss, for [`Objective::weighted_loss`]: sample `i`'s
/// mean squared error (min-SNR weighted where `snr_mask[i]` is 1) is multiplied by
/// `coefficients[i]` and the products are summed. Host vectors, uploaded once per batch layout
/// ([`Self::tensors`]) into tensors a captured step can keep.
#[derive(Debug, Clone, PartialEq)]
pub struct LossWeights {
    /// `c_i`: what sample `i`'s loss is multiplied by before the sum over the batch.
    pub coefficients: Vec<f32>,
    /// 1 where the min-SNR-γ weight applies to sample `i` (with `--snr_gamma`), 0 where it does not.
    pub snr_mask: Vec<f32>,
}

impl LossWeights {
    /// The plain mean over `batch` samples, every one min-SNR weighted: `c_i = 1/B` — what
    /// [`Objective::loss`] computes.
    pub fn mean(batch: usize) -> Self {
        Self {
            coefficients: vec![(1.0 / batch as f64) as f32; batch],
            snr_mask: vec![1.0; batch],
        }
    }

    /// diffusers' DreamBooth with `--with_prior_preservation` (`train_dreambooth_lora_sdxl.py`): a
    /// batch of `instances` instance samples followed by as many class samples. The script splits
    /// the prediction in two halves and adds the class half's plain MSE times `prior_loss_weight`
    /// to the instance half's loss (plain, or min-SNR weighted): `c = [1/n]·n ++ [w/n]·n`,
    /// `snr_mask = [1]·n ++ [0]·n` (docs/TRAINING.md, "Prior preservation").
    pub fn dreambooth_prior(instances: usize, prior_loss_weight: f64) -> Self {
        let n = instances as f64;
        let mut coefficients = vec![(1.0 / n) as f32; instances];
        coefficients.extend(vec![(prior_loss_weight / n) as f32; instances]);
        let mut snr_mask = vec![1.0; instances];
        snr_mask.extend(vec![0.0; instances]);
        Self {
            coefficients,
            snr_mask,
        }
    }

    /// kohya's sd-scripts (`train_network.py`): each sample's loss is multiplied by its
    /// `loss_weights` entry — `prior_loss_weight` for a regularization (`is_reg`) image, 1
    /// otherwise — then by its min-SNR weight, and the batch is averaged: `c_i = weight_i / B`,
    /// `snr_mask = 1`.
    pub fn kohya(is_reg: &[bool], prior_loss_weight: f64) -> Self {
        let batch = is_reg.len() as f64;
        let coefficients = is_reg
            .iter()
            .map(|&reg| (if reg { prior_loss_weight } else { 1.0 } / batch) as f32)
            .collect();
        Self {
            coefficients,
            snr_mask: vec![1.0; is_reg.len()],
        }
    }

    /// The batch size these weights are for.
    pub fn len(&self) -> usize {
        self.coefficients.len()
    }

    /// Whether these are weights of an empty batch.
    pub fn is_empty(&self) -> bool {
        self.coefficients.is_empty()
    }

    /// `(coefficients, snr_mask)` as `[batch]` fp32 tensors on `device`.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn tensors(&self, device: Device) -> Result<(Tensor, Tensor)> {
        let upload = |values: &[f32]| Tensor::f_from_slice(values)?.f_to_device(device);
        Ok((upload(&self.coefficients)?, upload(&self.snr_mask)?))
    }
}
