//! Depths (`test_support::depth`) of the SDXL models' forward passes on given inputs, for the
//! numeric bounds of docs/NUMERICS.md. Shared with the root package's tests (`#[path]`).

#![allow(dead_code)]

use std::path::Path;

use tch::Tensor;

/// The shape `test_support::unet_depth` needs, read from a UNet's config and its inputs
/// (`sample` `[batch, channels, h, w]`, `context` `[batch, tokens, dim]`).
pub fn unet_shape(
    config: &sdxl_model::unet::UNetConfig,
    sample: &Tensor,
    context: &Tensor,
) -> test_support::UNetShape {
    use sdxl_model::unet::DownBlockKind;
    let (size, context) = (sample.size(), context.size());
    test_support::UNetShape {
        in_channels: config.in_channels,
        channels: config.levels.iter().map(|l| l.channels).collect(),
        heads: config.levels.iter().map(|l| l.heads).collect(),
        transformer_layers: config
            .levels
            .iter()
            .map(|l| match l.down {
                DownBlockKind::Plain => 0,
                _ => l.down_transformer_layers,
            })
            .collect(),
        mid_transformer_layers: config.mid_transformer_layers,
        layers_per_block: config.layers_per_block,
        groups: config.norm_num_groups,
        height: size[2],
        width: size[3],
        context_tokens: context[1],
        context_dim: context[2],
    }
}

/// The depth (`test_support::depth`) of the VAE's decoder on `h`×`w` latents: `post_quant_conv`,
/// `conv_in`, the mid block (ResNet, single-head attention, ResNet), each up level's ResNets and
/// upsampler, the output norm, SiLU and `conv_out`.
pub fn vae_decode_depth(config: &sdxl_model::vae::AutoencoderKLConfig, h: i64, w: i64) -> f64 {
    use test_support::depth;
    let (groups, layers) = (config.norm_num_groups, config.layers_per_block);
    let channels: Vec<i64> = config.block_out_channels.iter().rev().copied().collect();
    let (mut h, mut w) = (h, w);
    let mut total = depth::conv(config.latent_channels, 1) + depth::conv(config.latent_channels, 3);
    total += vae_mid_depth(channels[0], groups, h, w);
    let mut previous = channels[0];
    for (level, &c) in channels.iter().enumerate() {
        for i in 0..=layers {
            total += depth::resnet(if i == 0 { previous } else { c }, c, groups, h, w);
        }
        previous = c;
        if level + 1 < channels.len() {
            h *= 2;
            w *= 2;
            total += depth::conv(c, 3);
        }
    }
    total + depth::norm(previous / groups * h * w) + depth::ACTIVATION + depth::conv(previous, 3)
}

/// The depth of the VAE's encoder on an `h`×`w` image: `conv_in`, each down level's ResNets and
/// downsampler, the mid block, the output norm, SiLU, `conv_out` and `quant_conv`.
pub fn vae_encode_depth(config: &sdxl_model::vae::AutoencoderKLConfig, h: i64, w: i64) -> f64 {
    use test_support::depth;
    let (groups, layers) = (config.norm_num_groups, config.layers_per_block);
    let channels = &config.block_out_channels;
    let (mut h, mut w) = (h, w);
    let mut total = depth::conv(config.in_channels, 3);
    let mut previous = channels[0];
    for (level, &c) in channels.iter().enumerate() {
        for i in 0..layers {
            total += depth::resnet(if i == 0 { previous } else { c }, c, groups, h, w);
        }
        previous = c;
        if level + 1 < channels.len() {
            total += depth::conv(c, 3);
            h = (h + 1) / 2;
            w = (w + 1) / 2;
        }
    }
    total += vae_mid_depth(previous, groups, h, w);
    total
        + depth::norm(previous / groups * h * w)
        + depth::ACTIVATION
        + depth::conv(previous, 3)
        + depth::conv(2 * config.latent_channels, 1)
}

/// The VAE's mid block: ResNet, one-head self-attention over every pixel with its group norm and
/// projections, ResNet.
fn vae_mid_depth(c: i64, groups: i64, h: i64, w: i64) -> f64 {
    use test_support::depth;
    2.0 * depth::resnet(c, c, groups, h, w)
        + depth::norm(c / groups * h * w)
        + depth::linear(c)
        + depth::attention(c, h * w)
        + depth::linear(c)
        + 1.0
}

/// The depth of a CLIP text encoder over `tokens` tokens, through its last layer, its final layer
/// norm and the text projection: the embeddings' sum, then per layer a layer norm, self-attention
/// (projections, attention, output projection, residual), a layer norm and the MLP (two linear
/// layers around the activation, residual).
pub fn clip_depth(config: &sdxl_model::clip::ClipTextConfig, tokens: i64) -> f64 {
    use test_support::depth;
    let width = config.hidden_size;
    let layer = depth::norm(width)
        + depth::linear(width)
        + depth::attention(width / config.num_attention_heads, tokens)
        + depth::linear(width)
        + 1.0
        + depth::norm(width)
        + depth::linear(width)
        + depth::ACTIVATION
        + depth::linear(config.intermediate_size)
        + 1.0;
    1.0 + config.num_hidden_layers as f64 * layer + depth::norm(width) + depth::linear(width)
}

/// The deeper of the two text encoders of the pipeline folder `root` (`text_encoder`,
/// `text_encoder_2`) over `tokens` tokens: it bounds both halves of the prompt embeddings.
pub fn text_encoders_depth(root: &Path, tokens: i64) -> f64 {
    ["text_encoder", "text_encoder_2"]
        .iter()
        .map(|name| {
            let path = root.join(name).join("config.json");
            clip_depth(
                &sdxl_model::clip::ClipTextConfig::from_file(path).unwrap(),
                tokens,
            )
        })
        .fold(0.0, f64::max)
}
