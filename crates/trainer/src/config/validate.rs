//! Checks of values that parse but have no meaning, each naming its flag.

use super::TrainConfig;
use crate::lr_scheduler::LrSchedule;
use crate::{Error, Result};

/// The largest `--resolution` and `--max_bucket_reso` accepted: 8× SDXL's native 1024 px side, past
/// which one training image's activations no longer fit any current GPU (the error gives the size).
pub const MAX_RESOLUTION: u32 = 8192;

/// Most loader threads `--dataloader_num_workers` may start.
const MAX_WORKERS: u32 = 1024;

/// What one `side`² image costs the UNet at the least, in GiB: the 320-channel activations of its
/// first block at the latent size (side/8)², in bf16, one of the dozens a training step keeps.
fn resolution_cost(side: u32) -> f64 {
    let latent = f64::from(side) / 8.0;
    latent * latent * 320.0 * 2.0 / f64::from(1u32 << 30)
}

/// The error of a value that has no meaning for `option`.
fn fail(option: &'static str, problem: String) -> Result<()> {
    Err(Error::InvalidOption { option, problem })
}

impl TrainConfig {
    /// Checks values that have no meaning, naming the flag.
    ///
    /// # Errors
    /// [`Error::InvalidOption`].
    pub fn validate(&self) -> Result<()> {
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return fail(
                "--resolution",
                format!("{} is not a positive multiple of 8", self.resolution),
            );
        }
        for (option, side) in [
            ("--resolution", self.resolution),
            ("--max_bucket_reso", self.max_bucket_reso),
        ] {
            if side > MAX_RESOLUTION {
                return fail(
                    option,
                    format!(
                        "{side} px is above {MAX_RESOLUTION}: one image's first UNet activation \
                         alone would take {:.1} GiB (SDXL trains at 1024)",
                        resolution_cost(side)
                    ),
                );
            }
        }
        for (option, value) in [
            ("--train_batch_size", u64::from(self.train_batch_size)),
            ("--nproc_per_node", u64::from(self.nproc_per_node)),
            (
                "--gradient_accumulation_steps",
                u64::from(self.gradient_accumulation_steps),
            ),
            ("--max_train_steps", self.max_train_steps),
            ("--rank", u64::from(self.rank)),
            ("--checkpointing_steps", self.checkpointing_steps),
            ("--logging_steps", self.logging_steps),
            ("--validation_steps", self.validation_steps),
            ("--sample_batch_size", u64::from(self.sample_batch_size)),
            (
                "--class_inference_steps",
                u64::from(self.class_inference_steps),
            ),
            (
                "--num_validation_images",
                u64::from(self.num_validation_images),
            ),
            (
                "--validation_inference_steps",
                u64::from(self.validation_inference_steps),
            ),
            ("--bucket_reso_steps", u64::from(self.bucket_reso_steps)),
        ] {
            if value == 0 {
                return fail(option, "must be at least 1".into());
            }
        }
        self.validate_ranges()?;
        self.validate_sampling()?;
        self.validate_text_encoder()?;
        self.ema_config()?;
        self.lora_config()?;
        self.validate_optimizer()?;
        self.validate_combinations()
    }

    /// `--text_encoder_lr` and `--adam_weight_decay_text_encoder`: in range, and only with
    /// `--train_text_encoder` (without it they would silently do nothing).
    fn validate_text_encoder(&self) -> Result<()> {
        let defaults = Self::default();
        for (option, value, default) in [
            (
                "--text_encoder_lr",
                self.text_encoder_lr,
                defaults.text_encoder_lr,
            ),
            (
                "--adam_weight_decay_text_encoder",
                self.adam_weight_decay_text_encoder,
                defaults.adam_weight_decay_text_encoder,
            ),
        ] {
            if !value.is_finite() || value < 0.0 {
                return fail(option, format!("{value} is out of range (a number ≥ 0)"));
            }
            if value != default && !self.train_text_encoder {
                return fail(
                    option,
                    format!("{value} has no effect without --train_text_encoder"),
                );
            }
        }
        Ok(())
    }

    /// Numbers outside their meaningful range.
    fn validate_ranges(&self) -> Result<()> {
        for (option, value, ok) in [
            (
                "--learning_rate",
                self.learning_rate,
                self.learning_rate > 0.0,
            ),
            (
                "--adam_beta1",
                self.adam_beta1,
                (0.0..1.0).contains(&self.adam_beta1),
            ),
            (
                "--adam_weight_decay",
                self.adam_weight_decay,
                self.adam_weight_decay >= 0.0,
            ),
            (
                "--adam_epsilon",
                self.adam_epsilon,
                self.adam_epsilon >= 0.0,
            ),
            (
                "--max_grad_norm",
                self.max_grad_norm,
                self.max_grad_norm > 0.0,
            ),
            ("--ddp_timeout", self.ddp_timeout, self.ddp_timeout > 0.0),
            (
                "--noise_offset",
                self.noise_offset,
                self.noise_offset >= 0.0,
            ),
            (
                "--snr_gamma",
                self.snr_gamma.unwrap_or(1.0),
                self.snr_gamma.is_none_or(|g| g > 0.0),
            ),
            (
                "--prior_loss_weight",
                self.prior_loss_weight,
                self.prior_loss_weight >= 0.0,
            ),
            (
                "--lora_alpha",
                self.lora_alpha.unwrap_or(1.0),
                self.lora_alpha.is_none_or(|a| a > 0.0),
            ),
        ] {
            if !value.is_finite() || !ok {
                return fail(option, format!("{value} is out of range"));
            }
        }
        Ok(())
    }

    /// Probabilities, the validation sampler, the schedule, buckets and loader threads: settings
    /// that would otherwise fail only when first used (a validation at step 200, the first batch).
    fn validate_sampling(&self) -> Result<()> {
        for (option, value) in [
            ("--caption_dropout_rate", self.caption_dropout_rate),
            ("--caption_tag_dropout_rate", self.caption_tag_dropout_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return fail(option, format!("{value} is not a probability in [0, 1]"));
            }
        }
        if !self.validation_guidance_scale.is_finite() {
            return fail(
                "--validation_guidance_scale",
                format!("{} is not a finite number", self.validation_guidance_scale),
            );
        }
        if self.enable_bucket && self.min_bucket_reso > self.max_bucket_reso {
            return fail(
                "--min_bucket_reso",
                format!(
                    "{} is above --max_bucket_reso {}",
                    self.min_bucket_reso, self.max_bucket_reso
                ),
            );
        }
        if self.dataloader_num_workers > MAX_WORKERS {
            return fail(
                "--dataloader_num_workers",
                format!(
                    "{} threads is more than {MAX_WORKERS} (0 means one per core)",
                    self.dataloader_num_workers
                ),
            );
        }
        LrSchedule::from_script_flags(
            self.lr_scheduler,
            self.learning_rate,
            self.lr_warmup_steps,
            self.max_train_steps,
            self.lr_num_cycles,
            self.lr_power,
        )
        .map(drop)
    }

    /// Settings that contradict each other or the run.
    fn validate_combinations(&self) -> Result<()> {
        if self.cache_latents && !self.center_crop {
            return fail(
                "--cache_latents",
                "cached latents are encoded once per image, so random crops (--center_crop false) need --cache_latents false".into(),
            );
        }
        if self.enable_bucket {
            self.bucket_config().verify_bucket_reso_steps(32)?;
        }
        if self.with_prior_preservation && !self.cache_latents {
            return fail(
                "--with_prior_preservation",
                "needs --cache_latents (the class images are encoded once, beside the instance images)".into(),
            );
        }
        if self.with_prior_preservation && self.enable_bucket {
            return fail(
                "--with_prior_preservation",
                "pairs each batch with as many class images of the square resolution; with --enable_bucket use kohya's regularization subsets (is_reg in a --dataset_config file)".into(),
            );
        }
        if self.fp8_compute && !self.fp8_base_weights {
            return fail(
                "--fp8_compute",
                "needs --fp8_base_weights (it multiplies the fp8-stored weights in fp8)".into(),
            );
        }
        if self.fp8_gradients && !self.fp8_compute {
            return fail(
                "--fp8_gradients",
                "needs --fp8_compute (it computes the fp8 products' input gradients in fp8)".into(),
            );
        }
        if self.fp8_compute && self.mixed_precision == super::MixedPrecision::No {
            return fail(
                "--fp8_compute",
                "needs --mixed_precision bf16 or fp16 (fp8 products are written in the training precision)".into(),
            );
        }
        if self.cache_latents_to_disk && !self.cache_latents {
            return fail(
                "--cache_latents_to_disk",
                "needs --cache_latents (it keeps the cached latents on disk)".into(),
            );
        }
        if let Some(kind) = &self.prediction_type
            && kind != "epsilon"
            && kind != "v_prediction"
        {
            return fail(
                "--prediction_type",
                format!("`{kind}` is not epsilon or v_prediction"),
            );
        }
        if self.zero_terminal_snr && self.prediction_type.as_deref() == Some("epsilon") {
            return fail(
                "--zero_terminal_snr",
                "needs --prediction_type v_prediction: the last timestep has ᾱ = 0 (pure noise), where ε-prediction is undefined".into(),
            );
        }
        if let Some(rescale) = self.validation_guidance_rescale
            && !(0.0..=1.0).contains(&rescale)
        {
            return fail(
                "--validation_guidance_rescale",
                format!("{rescale} is not in [0, 1]"),
            );
        }
        if self.with_prior_preservation {
            self.validate_prior_preservation()?;
        }
        if self.checkpoints_total_limit == Some(0) {
            return fail(
                "--checkpoints_total_limit",
                "must be at least 1 (leave it unset for no limit)".into(),
            );
        }
        if let Some(step) = self.profile_step
            && (step == 0 || step >= self.max_train_steps)
        {
            return fail(
                "--profile_step",
                format!(
                    "{step} must be at least 1 and below --max_train_steps ({}): steps N and N+1 are used",
                    self.max_train_steps
                ),
            );
        }
        Ok(())
    }

    /// What `--with_prior_preservation` needs (diffusers' script refuses the same).
    fn validate_prior_preservation(&self) -> Result<()> {
        if self.class_data_dir.is_none() {
            return fail(
                "--class_data_dir",
                "--with_prior_preservation needs a folder of class images (missing ones are generated there)".into(),
            );
        }
        if self.class_prompt.is_none() {
            return fail(
                "--class_prompt",
                "--with_prior_preservation needs the prompt of the class images".into(),
            );
        }
        if self.num_class_images == 0 {
            return fail(
                "--num_class_images",
                "must be at least 1 with --with_prior_preservation".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<TrainConfig> {
        TrainConfig::from_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn prior_preservation_flags() {
        let defaults = TrainConfig::default();
        assert!(!defaults.with_prior_preservation);
        assert_eq!(
            (defaults.num_class_images, defaults.sample_batch_size),
            (100, 4)
        );
        assert_eq!(defaults.prior_loss_weight, 1.0);
        let message = |args: &[&str]| parse(args).unwrap_err().to_string();
        let no_dir = message(&["--with_prior_preservation", "--class_prompt", "a dog"]);
        assert!(no_dir.starts_with("--class_data_dir"), "{no_dir}");
        let no_prompt = message(&["--with_prior_preservation", "--class_data_dir", "dogs"]);
        assert!(no_prompt.starts_with("--class_prompt"), "{no_prompt}");
        let full = [
            "--with_prior_preservation",
            "--class_data_dir",
            "dogs",
            "--class_prompt",
            "a dog",
        ];
        let zero = message(&[&full[..], &["--num_class_images", "0"]].concat());
        assert!(zero.starts_with("--num_class_images"), "{zero}");
        for weight in ["-1", "nan", "inf"] {
            let bad = message(&["--prior_loss_weight", weight]);
            assert!(bad.starts_with("--prior_loss_weight"), "{bad}");
        }
        assert!(message(&["--sample_batch_size", "0"]).starts_with("--sample_batch_size"));
        let config = parse(&[&full[..], &["--prior_loss_weight", "0.5"]].concat()).unwrap();
        assert_eq!(
            config.class_data_dir,
            Some(std::path::PathBuf::from("dogs"))
        );
        assert_eq!(config.class_prompt.as_deref(), Some("a dog"));
        assert_eq!(config.prior_loss_weight, 0.5);
        // Without --with_prior_preservation the class settings are not needed (diffusers warns).
        parse(&["--class_prompt", "a dog"]).unwrap();
    }
}
