//! Whether a pipeline's components fit together, checked once when it is built rather than at the
//! first UNet call: the UNet's cross-attention reads both text encoders' hidden states side by side,
//! its `add_embedding` reads bigG's projected pooled embedding beside six time-id embeddings, and it
//! denoises the VAE's latents (diffusers `StableDiffusionXLPipeline.encode_prompt` and
//! `UNet2DConditionModel.get_aug_embed`).

use crate::prompt::PromptEncoder;
use crate::unet::UNetConfig;
use crate::vae::AutoencoderKLConfig;
use crate::{Error, Result};

/// The micro-conditioning numbers SDXL embeds: original size, crop top-left, target size.
const TIME_IDS: i64 = 6;

fn mismatch(what: &str, expected: i64, actual: impl Into<String>) -> Error {
    Error::Incompatible {
        what: what.to_owned(),
        expected: expected.to_string(),
        actual: actual.into(),
    }
}

/// Checks the widths and channel counts the denoising loop relies on.
///
/// # Errors
/// [`Error::Incompatible`] naming the config keys of the first mismatch.
pub(super) fn check_components(
    prompt_encoder: &PromptEncoder,
    unet: &UNetConfig,
    vae: &AutoencoderKLConfig,
) -> Result<()> {
    let (text_encoder, text_encoder_2) = prompt_encoder.text_encoders();
    let (width_1, width_2) = (
        text_encoder.config().hidden_size,
        text_encoder_2.config().hidden_size,
    );
    if width_1 + width_2 != unet.cross_attention_dim {
        return Err(mismatch(
            "unet `cross_attention_dim` vs text_encoder + text_encoder_2 `hidden_size`",
            unet.cross_attention_dim,
            format!("{width_1} + {width_2} = {}", width_1 + width_2),
        ));
    }
    let Some(text_time) = unet.text_time else {
        return Err(Error::Incompatible {
            what: "unet `addition_embed_type`".into(),
            expected: "\"text_time\" (SDXL's pooled text and time ids)".into(),
            actual: "none".into(),
        });
    };
    let pooled = text_encoder_2.config().projection_dim;
    let needed = pooled + TIME_IDS * text_time.time_embed_dim;
    if needed != text_time.projection_input_dim {
        return Err(mismatch(
            "unet `projection_class_embeddings_input_dim` vs text_encoder_2 `projection_dim` + \
             6 × unet `addition_time_embed_dim`",
            text_time.projection_input_dim,
            format!("{pooled} + 6 × {} = {needed}", text_time.time_embed_dim),
        ));
    }
    for (key, channels) in [
        ("in_channels", unet.in_channels),
        ("out_channels", unet.out_channels),
    ] {
        if channels != vae.latent_channels {
            return Err(mismatch(
                &format!("unet `{key}` vs vae `latent_channels`"),
                channels,
                vae.latent_channels.to_string(),
            ));
        }
    }
    Ok(())
}
