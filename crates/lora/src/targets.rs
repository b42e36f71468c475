//! Named target sets: the module-path suffixes that the reference trainers adapt, in diffusers' and
//! transformers' module names (docs/LORA.md gives each with its upstream source).

/// The UNet attention projections targeted by diffusers' SDXL LoRA scripts.
pub const UNET_ATTENTION_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
/// The feed-forward layers of a diffusers transformer block (kohya targets them too).
pub const UNET_FEED_FORWARD_TARGETS: [&str; 2] = ["ff.net.0.proj", "ff.net.2"];
/// kohya's default UNet targets: every linear layer inside a `Transformer2DModel` (its
/// `UNET_TARGET_REPLACE_MODULE` in sd-scripts' `networks/lora.py`): the attention projections, the
/// feed-forward layers and the `proj_in` / `proj_out` projections.
pub const UNET_TRANSFORMER_TARGETS: [&str; 8] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
];
/// What kohya adds when `conv_dim` is set (`UNET_TARGET_REPLACE_MODULE_CONV2D_3X3`: the layers of
/// `ResnetBlock2D`, `Downsample2D` and `Upsample2D`): the ResNet blocks' 3×3 `conv1` / `conv2` and the
/// samplers' `conv` at the conv rank, the blocks' 1×1 `conv_shortcut` and linear `time_emb_proj` at
/// the linear rank. The UNet's own `conv_in` / `conv_out` are not among them.
pub const UNET_RESNET_TARGETS: [&str; 6] = [
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
];
/// The CLIP text-encoder attention projections targeted by diffusers' scripts.
pub const TEXT_ENCODER_ATTENTION_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];
/// The CLIP text-encoder MLP layers (kohya targets them too).
pub const TEXT_ENCODER_MLP_TARGETS: [&str; 2] = ["mlp.fc1", "mlp.fc2"];
