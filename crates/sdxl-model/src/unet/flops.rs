//! The UNet's floating-point operations at a given shape, counted from its configuration.
//!
//! What is counted is what PyTorch's `torch.utils.flop_counter.FlopCounterMode` counts: the matrix
//! products (linear layers, convolutions, attention's two batched products), two operations per
//! multiply–add; norms, activations and additions are not counted. The backward count is the products
//! autograd runs when only the LoRA adapters train: a frozen layer propagates the gradient to its input
//! only where that input depends on a trained parameter (layers before the first adapter run no
//! backward), an adapted layer also gets its two factors' gradients, and attention's backward is its
//! four batched products (flash attention's). The test compares both counts with `FlopCounterMode` on
//! diffusers' UNet with peft adapters (`tests/fixtures/unet-flops.json`).

use super::config::{DownBlockKind, UNetConfig, UpBlockKind};

/// The shape a count is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlopShape {
    /// Samples in the batch (the UNet call's batch: with classifier-free guidance, twice the images).
    pub batch: i64,
    /// Latent height (pixels / 8).
    pub height: i64,
    /// Latent width (pixels / 8).
    pub width: i64,
    /// Text tokens the cross-attention attends to (77 for SDXL).
    pub text_len: i64,
}

/// Floating-point operations of one UNet call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UNetFlops {
    /// The forward pass.
    pub forward: f64,
    /// The backward pass when only the adapters train (0 without any).
    pub backward: f64,
}

impl UNetFlops {
    /// Forward plus backward: a training step's products for this call.
    pub fn training(&self) -> f64 {
        self.forward + self.backward
    }
}

/// The LoRA rank adapting a layer, by its diffusers path (e.g.
/// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`), `None` for a frozen layer.
pub type AdapterRank<'a> = &'a dyn Fn(&str) -> Option<i64>;

/// A feature map (or token sequence) flowing through the count: its channels, size and whether it
/// depends on a trained parameter (so that autograd carries a gradient back through it).
#[derive(Debug, Clone, Copy)]
struct Map {
    channels: i64,
    height: i64,
    width: i64,
    grad: bool,
}

struct Counter<'a> {
    rank: AdapterRank<'a>,
    batch: i64,
    text_len: i64,
    flops: UNetFlops,
}

impl Counter<'_> {
    /// A product of `rows` rows of width `k` by a `k × n` weight (a linear layer, or a convolution with
    /// `k = in · kh · kw`) at `path`, its input carrying a gradient or not. Returns whether its output
    /// does. A LoRA of rank r adds `rows × k × r` and `rows × r × n` forward; backward the frozen
    /// weight's input gradient (`rows × n × k`, only when the input needs one) and the adapter's four
    /// products (both factors' gradients, the gradient between them, and the input's through the
    /// down factor when the input needs one).
    fn product(&mut self, path: &str, rows: i64, k: i64, n: i64, input_grad: bool) -> bool {
        let mac = |a: i64, b: i64, c: i64| 2.0 * a as f64 * b as f64 * c as f64;
        self.flops.forward += mac(rows, k, n);
        if input_grad {
            self.flops.backward += mac(rows, n, k);
        }
        match (self.rank)(path) {
            Some(r) => {
                self.flops.forward += mac(rows, k, r) + mac(rows, r, n);
                self.flops.backward += 2.0 * mac(rows, n, r) + mac(rows, r, k);
                if input_grad {
                    self.flops.backward += mac(rows, r, k);
                }
                true
            }
            None => input_grad,
        }
    }

    fn conv(&mut self, path: &str, x: Map, out: i64, kernel: i64, stride: i64) -> Map {
        let padding = kernel / 2;
        let size = |s: i64| (s + 2 * padding - kernel) / stride + 1;
        let (height, width) = (size(x.height), size(x.width));
        let rows = self.batch * height * width;
        let grad = self.product(path, rows, x.channels * kernel * kernel, out, x.grad);
        Map {
            channels: out,
            height,
            width,
            grad,
        }
    }

    /// `ResnetBlock2D` into `out` channels; `temb_grad`: whether the time embedding carries a gradient.
    fn resnet(&mut self, path: &str, x: Map, out: i64, temb: (i64, bool)) -> Map {
        let h = self.conv(&format!("{path}.conv1"), x, out, 3, 1);
        let t = self.product(
            &format!("{path}.time_emb_proj"),
            self.batch,
            temb.0,
            out,
            temb.1,
        );
        let h = Map {
            grad: h.grad || t,
            ..h
        };
        let h = self.conv(&format!("{path}.conv2"), h, out, 3, 1);
        let residual = if x.channels != out {
            self.conv(&format!("{path}.conv_shortcut"), x, out, 1, 1)
                .grad
        } else {
            x.grad
        };
        Map {
            grad: h.grad || residual,
            ..h
        }
    }

    /// One `Attention` (self when `context` is `None`), returning whether its output carries a gradient.
    fn attention(
        &mut self,
        path: &str,
        rows: i64,
        c: i64,
        grad: bool,
        context: Option<i64>,
    ) -> bool {
        let tokens = rows / self.batch;
        let q = self.product(&format!("{path}.to_q"), rows, c, c, grad);
        let (kv_rows, kv_width, kv_grad) = match context {
            None => (rows, c, grad),
            Some(width) => (self.batch * self.text_len, width, false),
        };
        let k = self.product(&format!("{path}.to_k"), kv_rows, kv_width, c, kv_grad);
        let v = self.product(&format!("{path}.to_v"), kv_rows, kv_width, c, kv_grad);
        // Q·Kᵀ and P·V: 2 · batch · tokens · keys · channels each (heads × head width = c).
        let sdpa = 2.0
            * 2.0
            * self.batch as f64
            * tokens as f64
            * (kv_rows / self.batch) as f64
            * c as f64;
        self.flops.forward += sdpa;
        let out_grad = q || k || v;
        if out_grad {
            self.flops.backward += 2.0 * sdpa;
        }
        self.product(&format!("{path}.to_out.0"), rows, c, c, out_grad)
    }

    /// `Transformer2DModel` of `depth` `BasicTransformerBlock`s on `x`.
    fn transformer(&mut self, path: &str, x: Map, depth: i64, linear: bool, cross: i64) -> Map {
        let c = x.channels;
        let rows = self.batch * x.height * x.width;
        let project = |this: &mut Self, name: &str, grad: bool| {
            let path = format!("{path}.{name}");
            if linear {
                this.product(&path, rows, c, c, grad)
            } else {
                this.conv(&path, Map { grad, ..x }, c, 1, 1).grad
            }
        };
        let mut grad = project(self, "proj_in", x.grad);
        for block in 0..depth {
            let block = format!("{path}.transformer_blocks.{block}");
            grad |= self.attention(&format!("{block}.attn1"), rows, c, grad, None);
            grad |= self.attention(&format!("{block}.attn2"), rows, c, grad, Some(cross));
            // GEGLU: one projection to twice the inner width (4c), then the inner width back to c.
            let inner = self.product(&format!("{block}.ff.net.0.proj"), rows, c, 8 * c, grad);
            grad |= self.product(&format!("{block}.ff.net.2"), rows, 4 * c, c, inner);
        }
        let out = project(self, "proj_out", grad);
        Map {
            grad: out || x.grad,
            ..x
        }
    }
}

impl UNetConfig {
    /// The operations of one call at `shape`, with the adapters `rank` names (the backward count is 0
    /// when it names none).
    pub fn flops(&self, shape: FlopShape, rank: AdapterRank<'_>) -> UNetFlops {
        let mut n = Counter {
            rank,
            batch: shape.batch,
            text_len: shape.text_len,
            flops: UNetFlops::default(),
        };
        let (b, c0, temb_dim) = (shape.batch, self.levels[0].channels, self.time_embed_dim());
        let mut temb = n.product("time_embedding.linear_1", b, c0, temb_dim, false);
        temb = n.product("time_embedding.linear_2", b, temb_dim, temb_dim, temb);
        if let Some(text_time) = self.text_time {
            let a = n.product(
                "add_embedding.linear_1",
                b,
                text_time.projection_input_dim,
                temb_dim,
                false,
            );
            temb |= n.product("add_embedding.linear_2", b, temb_dim, temb_dim, a);
        }
        let temb = (temb_dim, temb);
        let input = Map {
            channels: self.in_channels,
            height: shape.height,
            width: shape.width,
            grad: false,
        };
        let mut x = n.conv("conv_in", input, c0, 3, 1);
        let mut skips = vec![x];
        let levels = self.levels.len();
        for (i, level) in self.levels.iter().enumerate() {
            for j in 0..self.layers_per_block {
                x = n.resnet(
                    &format!("down_blocks.{i}.resnets.{j}"),
                    x,
                    level.channels,
                    temb,
                );
                if level.down == DownBlockKind::CrossAttn {
                    let path = format!("down_blocks.{i}.attentions.{j}");
                    x = n.transformer(
                        &path,
                        x,
                        level.down_transformer_layers,
                        self.use_linear_projection,
                        self.cross_attention_dim,
                    );
                }
                skips.push(x);
            }
            if i + 1 < levels {
                x = n.conv(
                    &format!("down_blocks.{i}.downsamplers.0.conv"),
                    x,
                    level.channels,
                    3,
                    2,
                );
                skips.push(x);
            }
        }
        let deepest = self.levels[levels - 1].channels;
        x = n.resnet("mid_block.resnets.0", x, deepest, temb);
        x = n.transformer(
            "mid_block.attentions.0",
            x,
            self.mid_transformer_layers,
            self.use_linear_projection,
            self.cross_attention_dim,
        );
        x = n.resnet("mid_block.resnets.1", x, deepest, temb);
        for (i, kind) in self.up_blocks.iter().enumerate() {
            let out = self.levels[levels - 1 - i].channels;
            for j in 0..=self.layers_per_block {
                let Some(skip) = skips.pop() else { break };
                let joined = Map {
                    channels: x.channels + skip.channels,
                    grad: x.grad || skip.grad,
                    ..x
                };
                x = n.resnet(&format!("up_blocks.{i}.resnets.{j}"), joined, out, temb);
                if *kind == UpBlockKind::CrossAttn {
                    let path = format!("up_blocks.{i}.attentions.{j}");
                    x = n.transformer(
                        &path,
                        x,
                        self.up_transformer_layers[i],
                        self.use_linear_projection,
                        self.cross_attention_dim,
                    );
                }
            }
            if i + 1 < levels {
                // Nearest-neighbour upsampling to the next skip's size, then a 3×3 convolution.
                let (height, width) = skips
                    .last()
                    .map_or((x.height * 2, x.width * 2), |s| (s.height, s.width));
                x = n.conv(
                    &format!("up_blocks.{i}.upsamplers.0.conv"),
                    Map { height, width, ..x },
                    out,
                    3,
                    1,
                );
            }
        }
        n.conv("conv_out", x, self.out_channels, 3, 1);
        n.flops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// peft's rule for `target_modules`: the module's name is a target or ends with `.target`.
    fn peft_targets<'a>(targets: &'a [String], rank: i64) -> impl Fn(&str) -> Option<i64> + 'a {
        move |path: &str| {
            targets
                .iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}")))
                .then_some(rank)
        }
    }

    #[test]
    fn counts_equal_pytorchs_flop_counter_on_diffusers_unets_with_peft_adapters() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/unet-flops.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 8);
        for case in cases {
            let config = match case["config"].as_str().unwrap() {
                "tiny_sdxl" => UNetConfig::tiny_sdxl(),
                "tiny_b" => UNetConfig::tiny_b(),
                "sdxl_base" => UNetConfig::sdxl_base(),
                other => panic!("unknown config {other}"),
            };
            let int = |key: &str| case[key].as_i64().unwrap();
            let shape = FlopShape {
                batch: int("batch"),
                height: int("height"),
                width: int("width"),
                text_len: int("text_len"),
            };
            let targets: Vec<String> = serde_json::from_value(case["targets"].clone()).unwrap();
            let rank = peft_targets(&targets, int("rank"));
            let counted = config.flops(shape, &rank);
            // Sums of integer products below 2^53: exact in f64.
            assert_eq!(counted.forward, case["forward"].as_f64().unwrap(), "{case}");
            assert_eq!(
                counted.backward,
                case["backward"].as_f64().unwrap(),
                "{case}"
            );
        }
    }

    #[test]
    fn training_is_forward_plus_backward_and_scales_with_the_batch() {
        let config = UNetConfig::sdxl_base();
        let shape = |batch| FlopShape {
            batch,
            height: 64,
            width: 64,
            text_len: 77,
        };
        let none = |_: &str| None;
        let one = config.flops(shape(1), &none);
        assert_eq!(one.backward, 0.0);
        assert_eq!(config.flops(shape(4), &none).forward, 4.0 * one.forward);
        let attn = |p: &str| p.contains(".attn").then_some(4);
        let trained = config.flops(shape(2), &attn);
        assert_eq!(trained.training(), trained.forward + trained.backward);
        assert!(trained.backward > 0.0 && trained.forward > 2.0 * one.forward);
    }
}
