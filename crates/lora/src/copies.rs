//! Compute copies of the LoRA matrices for mixed-precision training.
//!
//! Under autocast (diffusers' scripts with `--mixed_precision bf16`) peft keeps `A` and `B` in fp32
//! and casts them to bf16 in every forward; autograd casts their bf16 gradients back in every
//! backward. For the SDXL UNet's 1,120 LoRA tensors that, with the concatenations the fused
//! projections ([`crate::packing::fused_forward`]) need, came to thousands of small kernels per micro-step
//! (kernel counts of a captured seed-recipe step before and after the change that brought the
//! copies: docs/BENCHMARKS.md, "GPU runs of 2026-12-01, third session", calls O and P). [`ComputeCopies`] keeps one
//! bf16 copy of all of them instead, in one buffer laid out so that the adapters of a fused group
//! sit side by side: their stacked `A`s are one `[Σ r, in]` block and their `B`s one `[g, out, r]`
//! block, each an autograd leaf. The forward multiplies by these leaves directly; after a
//! micro-step's backward [`ComputeCopies::collect_grads`] gathers their gradients into the fp32
//! masters' gradients in one concatenation and one addition, and after the optimizer has updated the
//! masters [`ComputeCopies::refresh`] casts them into the copies in one pass.
//!
//! The values are the same as peft's under autocast: the copies hold what the per-use casts made
//! (`B` with its scale folded in, as [`crate::Linear`]'s autocast path does), the products are the
//! same bf16 products, and each master gradient is the bf16 gradient widened to fp32 (times the
//! scale, for `B`) and accumulated over micro-steps in fp32.

use tch::{Device, Kind, Tensor};

use crate::linear::{HasLinears, PackMark};
use crate::{Error, Result};

/// Where an adapter's compute copies live: the leaves of its group and its place in them.
#[derive(Debug)]
pub(crate) struct AdapterCopy {
    /// The group's stacked `A`s, `[members · r, in]` (a leaf of the copies' buffer).
    pub(crate) down: Tensor,
    /// The group's scaled `B`s: `[members, out, r]`, or `[out, r]` for a group of one.
    pub(crate) up: Tensor,
    /// This adapter's index in its group.
    pub(crate) member: i64,
    /// How many adapters the group has.
    pub(crate) members: i64,
}

impl AdapterCopy {
    /// This adapter's own `A` and scaled `B` (views of the group's leaves, for the layer-by-layer path).
    pub(crate) fn own(&self) -> (Tensor, Tensor) {
        if self.members == 1 {
            return (self.down.shallow_clone(), self.up.shallow_clone());
        }
        let rank = self.down.size()[0] / self.members;
        (
            self.down.narrow(0, self.member * rank, rank),
            self.up.select(0, self.member),
        )
    }
}

/// One group of adapters whose copies form a pair of leaves.
#[derive(Debug)]
struct Group {
    /// Offset of the stacked `A`s in the flat buffers, and their element count.
    down: (i64, i64),
    /// Offset of the stacked `B`s, and their element count.
    up: (i64, i64),
}

/// bf16 (or fp16) copies of one adapter's matrices across a model, with the fp32 masters and their
/// gradients in flat buffers of the same layout. See the module documentation.
#[derive(Debug)]
pub struct ComputeCopies {
    kind: Kind,
    scale: f64,
    /// Elements of the `A` region (the `B` region follows it).
    downs: i64,
    masters: Tensor,
    master_grads: Tensor,
    copies: Tensor,
    /// The copies' leaves in layout order: each group's `A`s, then (after all `A`s) each group's `B`s.
    leaves: Vec<Tensor>,
    /// Gradients of the leaves gathered in layout order (bf16), reused every micro-step.
    gathered: Tensor,
    groups: usize,
}

/// What the first pass learns about one linear layer.
struct Layer {
    /// Rank, input and output width of its adapter, or `None` when it has none that qualifies.
    adapter: Option<(i64, i64, i64)>,
    /// Start of its base weight and where it ends, for finding packed neighbours.
    weight_span: Option<(usize, usize)>,
    /// Its place among layers packed together.
    pack: Option<PackMark>,
}

impl ComputeCopies {
    /// Builds the copies of adapter `name` in every layer of `model` that has it. Every such adapter
    /// must be a plain LoRA with a [`compute_kind`](crate::Adapter::compute_kind) narrower than its own
    /// type, all with one scale, type and device; layers whose base weights
    /// [`crate::packing::pack_weights`] laid out together (and whose adapters share rank and output width)
    /// form one group. The adapters' `A` and `B` become views of one flat master buffer (values
    /// unchanged, so a variable store and the optimizer see them), and their gradients views of
    /// one flat gradient buffer, defined from here on.
    ///
    /// Returns `None`, touching nothing, when the adapters do not qualify (DoRA, no compute type, or
    /// differing scales, types or devices): the layers then cast per use as before.
    ///
    /// Only adapters enabled and unmerged now get copies. One enabled or unmerged later computes from
    /// its masters, and [`collect_grads`](Self::collect_grads) would overwrite the gradients that
    /// reach them: build the copies after settling which adapters train.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when no layer has the adapter; libtorch errors.
    pub fn new(model: &mut dyn HasLinears, name: &str) -> Result<Option<Self>> {
        // 1. What each layer has, and whether everything qualifies.
        let mut layers: Vec<Layer> = Vec::new();
        let mut common: Option<(Kind, Kind, Device, f64)> = None;
        let (mut qualifies, mut found) = (true, false);
        model.for_each_linear(&mut |_, linear| {
            let adapter = linear.adapter(name).filter(|a| a.enabled && !a.merged);
            let span = linear.weight_span();
            let pack = linear.pack_mark();
            let Some(adapter) = adapter else {
                layers.push(Layer {
                    adapter: None,
                    weight_span: span,
                    pack,
                });
                return;
            };
            found = true;
            let this = adapter
                .compute_kind
                .map(|k| (k, adapter.kind(), adapter.down.device(), adapter.scale()));
            match (this, common) {
                (Some((compute, own, ..)), _) if compute == own || adapter.magnitude.is_some() => {
                    qualifies = false
                }
                (None, _) => qualifies = false,
                (Some(this), None) => common = Some(this),
                (Some(this), Some(first)) if this != first => qualifies = false,
                _ => {}
            }
            let size = adapter.up.size();
            layers.push(Layer {
                adapter: Some((adapter.rank(), adapter.down.size()[1], size[0])),
                weight_span: span,
                pack,
            });
        });
        if !found {
            return Err(Error::UnknownAdapter {
                module: String::new(),
                adapter: name.to_owned(),
            });
        }
        let (Some((kind, master_kind, device, scale)), true) = (common, qualifies) else {
            return Ok(None);
        };

        // 2. Groups: runs of adapted layers that `pack_weights` laid out together (and whose weights
        //    still follow one another), with one rank and output width.
        let mut group_of: Vec<Option<(usize, i64)>> = vec![None; layers.len()];
        let mut group_sizes: Vec<Vec<usize>> = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let Some((rank, width, out)) = layer.adapter else {
                continue;
            };
            let joins = i > 0
                && group_of[i - 1].is_some()
                && layers[i - 1]
                    .adapter
                    .is_some_and(|(r, w, o)| (r, w, o) == (rank, width, out))
                && matches!((layers[i - 1].pack, layer.pack), (Some(a), Some(b)) if a.buffer == b.buffer && b.member == a.member + 1)
                && matches!((layers[i - 1].weight_span, layer.weight_span), (Some((_, end)), Some((start, _))) if end == start);
            if joins {
                let group = group_sizes.len() - 1;
                group_of[i] = Some((group, group_sizes[group].len() as i64));
                group_sizes[group].push(i);
            } else {
                group_of[i] = Some((group_sizes.len(), 0));
                group_sizes.push(vec![i]);
            }
        }

        // 3. Layout: every group's `A`s, then every group's `B`s.
        let mut groups = Vec::with_capacity(group_sizes.len());
        let mut offset = 0;
        for members in &group_sizes {
            let len: i64 = members
                .iter()
                .map(|&i| layers[i].adapter.map_or(0, |(r, w, _)| r * w))
                .sum();
            groups.push(Group {
                down: (offset, len),
                up: (0, 0),
            });
            offset += len;
        }
        let downs = offset;
        for (group, members) in groups.iter_mut().zip(&group_sizes) {
            let len: i64 = members
                .iter()
                .map(|&i| layers[i].adapter.map_or(0, |(r, _, o)| r * o))
                .sum();
            group.up = (offset, len);
            offset += len;
        }
        let total = offset;
        let masters = Tensor::f_zeros([total], (master_kind, device))?;
        let master_grads = Tensor::f_zeros([total], (master_kind, device))?;
        let copies = Tensor::f_zeros([total], (kind, device))?;
        let mut down_leaves = Vec::with_capacity(groups.len());
        let mut up_leaves = Vec::with_capacity(groups.len());
        for (group, members) in groups.iter().zip(&group_sizes) {
            let (rank, width, out) = layers[members[0]].adapter.unwrap_or((0, 0, 0));
            let g = members.len() as i64;
            let leaf = |region: (i64, i64), shape: &[i64]| -> Result<Tensor> {
                Ok(copies
                    .f_narrow(0, region.0, region.1)?
                    .f_view(shape)?
                    .f_detach()?
                    .f_set_requires_grad(true)?)
            };
            down_leaves.push(leaf(group.down, &[g * rank, width])?);
            up_leaves.push(if g == 1 {
                leaf(group.up, &[out, rank])?
            } else {
                leaf(group.up, &[g, out, rank])?
            });
        }

        // 4. Masters into the flat buffer (values copied, then each tensor made a view of it), the
        //    copies' handles into the adapters.
        let mut index = 0;
        let mut failure: Option<Error> = None;
        let mut params: Vec<(Tensor, Tensor)> = Vec::new();
        let mut down_cursor = vec![0i64; groups.len()];
        let mut up_cursor = vec![0i64; groups.len()];
        model.for_each_linear(&mut |_, linear| {
            let slot = group_of.get(index).copied().flatten();
            index += 1;
            let (Some((group, member)), None) = (slot, failure.as_ref()) else {
                return;
            };
            let Some(adapter) = linear.adapter_mut(name) else {
                return;
            };
            let place =
                |tensor: &mut Tensor, region_start: i64, cursor: &mut i64| -> Result<Tensor> {
                    let numel = tensor.numel() as i64;
                    let view = masters
                        .f_narrow(0, region_start + *cursor, numel)?
                        .f_view(tensor.size().as_slice())?;
                    let grad = master_grads
                        .f_narrow(0, region_start + *cursor, numel)?
                        .f_view(tensor.size().as_slice())?;
                    tch::no_grad(|| view.shallow_clone().f_copy_(tensor))?;
                    tensor.f_set_data(&view)?;
                    *cursor += numel;
                    Ok(grad)
                };
            let result = (|| -> Result<()> {
                let down_grad = place(
                    &mut adapter.down,
                    groups[group].down.0,
                    &mut down_cursor[group],
                )?;
                let up_grad = place(&mut adapter.up, groups[group].up.0, &mut up_cursor[group])?;
                params.push((adapter.down.shallow_clone(), down_grad));
                params.push((adapter.up.shallow_clone(), up_grad));
                adapter.copy = Some(AdapterCopy {
                    down: down_leaves[group].shallow_clone(),
                    up: up_leaves[group].shallow_clone(),
                    member,
                    members: group_sizes[group].len() as i64,
                });
                Ok(())
            })();
            if let Err(error) = result {
                failure = Some(error);
            }
        });
        if let Some(error) = failure {
            return Err(error);
        }
        // 5. Gradients: defined once (a zero backward), then made views of the flat buffer, so the
        //    optimizer and clipping read what `collect_grads` writes.
        let zero = params.iter().try_fold(
            Tensor::f_zeros([0i64; 0], (master_kind, device))?,
            |sum, (p, _)| -> Result<Tensor> {
                Ok(sum.f_add(&p.f_sum(master_kind)?.f_mul_scalar(0.0)?)?)
            },
        )?;
        zero.f_backward()?;
        for (param, grad_view) in &params {
            param.grad().f_set_data(grad_view)?;
        }
        let leaves: Vec<Tensor> = down_leaves.into_iter().chain(up_leaves).collect();
        let gathered = Tensor::f_zeros([total], (kind, device))?;
        let this = Self {
            kind,
            scale,
            downs,
            masters,
            master_grads,
            copies,
            leaves,
            gathered,
            groups: groups.len(),
        };
        this.refresh()?;
        Ok(Some(this))
    }

    /// The fp32 masters' flat buffer: every adapter's `A` and `B` this set covers is a view of it.
    pub fn masters(&self) -> &Tensor {
        &self.masters
    }

    /// The masters' flat gradient buffer (each master's gradient is a view of it): what
    /// data-parallel training averages over processes in one all-reduce.
    pub fn master_grads(&self) -> &Tensor {
        &self.master_grads
    }

    /// The type the copies compute in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// How many groups (pairs of leaves) there are; layers packed together share one.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The copies' autograd leaves (their gradients are what a backward writes; drop or zero them
    /// after [`collect_grads`](Self::collect_grads)).
    pub fn leaves(&self) -> &[Tensor] {
        &self.leaves
    }

    /// Casts the masters into the copies (`B` times its scale): after every change to the masters
    /// (an optimizer step, loading weights). One or two kernels; graph-capturable.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn refresh(&self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let total = self.masters.size()[0];
            if self.scale == 1.0 {
                self.copies.shallow_clone().f_copy_(&self.masters)?;
            } else {
                self.copies
                    .f_narrow(0, 0, self.downs)?
                    .f_copy_(&self.masters.f_narrow(0, 0, self.downs)?)?;
                let ups = self
                    .masters
                    .f_narrow(0, self.downs, total - self.downs)?
                    .f_mul_scalar(self.scale)?;
                self.copies
                    .f_narrow(0, self.downs, total - self.downs)?
                    .f_copy_(&ups)?;
            }
            Ok(())
        })
    }

    /// Writes (`accumulate` false) or adds the leaves' gradients into the masters' gradients, widened
    /// to the masters' type (`B`'s times the scale): one concatenation and one or two element-wise
    /// kernels. A leaf without a gradient counts as zero. The leaves' gradients are left as they
    /// are; the caller drops them (or zeroes them) before the next backward.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn collect_grads(&self, accumulate: bool) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let flat: Vec<Tensor> = self
                .leaves
                .iter()
                .map(|leaf| {
                    let grad = leaf.grad();
                    Ok(if grad.defined() {
                        grad.f_reshape([-1])?
                    } else {
                        Tensor::f_zeros([leaf.numel() as i64], (self.kind, leaf.device()))?
                    })
                })
                .collect::<Result<_>>()?;
            let _ = Tensor::f_cat_out(&self.gathered, &flat, 0)?;
            let total = self.masters.size()[0];
            let write = |target: &Tensor, source: &Tensor| -> Result<()> {
                if accumulate {
                    let _ = target.shallow_clone().f_add_(source)?;
                } else {
                    target.shallow_clone().f_copy_(source)?;
                }
                Ok(())
            };
            if self.scale == 1.0 {
                write(&self.master_grads, &self.gathered)?;
            } else {
                let region = |t: &Tensor, start: i64, len: i64| t.f_narrow(0, start, len);
                write(
                    &region(&self.master_grads, 0, self.downs)?,
                    &region(&self.gathered, 0, self.downs)?,
                )?;
                let ups = region(&self.gathered, self.downs, total - self.downs)?
                    .f_to_kind(self.masters.kind())?
                    .f_mul_scalar(self.scale)?;
                write(
                    &region(&self.master_grads, self.downs, total - self.downs)?,
                    &ups,
                )?;
            }
            Ok(())
        })
    }

    /// Zeroes the leaves' gradients in place (one kernel each): for callers that cannot drop them.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn zero_leaf_grads(&self) -> Result<()> {
        for leaf in &self.leaves {
            let mut grad = leaf.grad();
            if grad.defined() {
                let _ = grad.f_zero_()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packing::{fused_forward, pack_weights};
    use crate::{Linear, LoraConfig};
    use tch::nn::{Module, VarStore};

    /// A self-attention's projections: `to_q`, `to_k`, `to_v` packed, `to_out.0` alone.
    struct Attn {
        q: Linear,
        k: Linear,
        v: Linear,
        out: Linear,
    }

    impl HasLinears for Attn {
        fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
            f("attn.to_q", &mut self.q);
            f("attn.to_k", &mut self.k);
            f("attn.to_v", &mut self.v);
            f("attn.to_out.0", &mut self.out);
        }
    }

    impl Attn {
        fn new(width: i64, alpha: f64, adapters: &VarStore) -> Self {
            let linear = || {
                Linear::from_tensors(
                    Tensor::randn([width, width], (Kind::BFloat16, Device::Cpu)) * 0.2,
                    None,
                )
            };
            let mut attn = Attn {
                q: linear(),
                k: linear(),
                v: linear(),
                out: linear(),
            };
            assert!(pack_weights(&mut [&mut attn.q, &mut attn.k, &mut attn.v]));
            let mut config = LoraConfig::unet_attention(4);
            config.alpha = alpha;
            crate::inject(&mut attn, &adapters.root(), "default", &config).unwrap();
            crate::set_compute_kind(&mut attn, "default", Some(Kind::BFloat16)).unwrap();
            // B starts at zero; make it count.
            tch::no_grad(|| {
                for (_, variable) in crate::trainable_variables(&mut attn) {
                    variable
                        .shallow_clone()
                        .copy_(&(Tensor::randn_like(&variable) * 0.3));
                }
            });
            attn
        }

        /// The outputs of one forward (fused q/k/v, then `to_out.0` on their sum).
        fn forward(&self, x: &Tensor) -> Vec<Tensor> {
            let mut qkv = fused_forward(&[&self.q, &self.k, &self.v], x).expect("q/k/v fuse");
            let sum = &qkv[0] + &qkv[1] + &qkv[2];
            qkv.push(self.out.forward(&sum));
            qkv
        }
    }

    fn loss(outputs: &[Tensor], weights: &Tensor) -> Tensor {
        outputs
            .iter()
            .map(|o| (o.to_kind(Kind::Float) * weights).sum(Kind::Float))
            .fold(Tensor::from(0f32), |a, b| a + b)
    }

    fn grads(attn: &mut Attn) -> Vec<(String, Tensor)> {
        let grad = |p: &Tensor| {
            if p.grad().defined() {
                p.grad().copy()
            } else {
                p.zeros_like()
            }
        };
        crate::trainable_variables(attn)
            .into_iter()
            .map(|(name, p)| (name, grad(&p)))
            .collect()
    }

    fn zero_grads(attn: &mut Attn) {
        for (_, p) in crate::trainable_variables(attn) {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// With and without copies: the same outputs and, after one and after two backward passes, the
    /// same master gradients, bit for bit; after the masters change, a refresh brings the copies along.
    fn copies_equal_the_per_use_casts(alpha: f64) {
        tch::manual_seed(7);
        let adapters = VarStore::new(Device::Cpu);
        let mut attn = Attn::new(16, alpha, &adapters);
        let x = Tensor::randn([2, 5, 16], (Kind::BFloat16, Device::Cpu));
        let w = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        // Reference: the casts in every use.
        let reference = attn.forward(&x);
        loss(&reference, &w).backward();
        let once = grads(&mut attn);
        loss(&attn.forward(&x), &(&w * 0.5)).backward();
        let twice = grads(&mut attn);
        zero_grads(&mut attn);

        let copies = ComputeCopies::new(&mut attn, "default")
            .unwrap()
            .expect("plain bf16 LoRA qualifies");
        assert_eq!(copies.groups(), 2, "q/k/v one group, to_out.0 another");
        assert_eq!(copies.leaves().len(), 4);
        let outputs = attn.forward(&x);
        for (a, b) in outputs.iter().zip(&reference) {
            assert!(a.equal(b), "outputs differ with copies");
        }
        loss(&outputs, &w).backward();
        copies.collect_grads(false).unwrap();
        for ((name, expected), (_, got)) in once.iter().zip(grads(&mut attn)) {
            assert!(
                got.equal(expected),
                "{name}: gradient differs after one backward"
            );
        }
        copies.zero_leaf_grads().unwrap();
        loss(&attn.forward(&x), &(&w * 0.5)).backward();
        copies.collect_grads(true).unwrap();
        for ((name, expected), (_, got)) in twice.iter().zip(grads(&mut attn)) {
            assert!(
                got.equal(expected),
                "{name}: gradient differs after accumulating"
            );
        }
        // A first collect overwrites what was there.
        copies.collect_grads(false).unwrap();
        assert!(!grads(&mut attn)[0].1.equal(&twice[0].1));

        // The masters are views of one buffer: an in-place update (as the optimizer's) and a
        // refresh reach the forward.
        tch::no_grad(|| {
            for (_, p) in crate::trainable_variables(&mut attn) {
                let _ = p.shallow_clone().g_add_scalar_(0.125);
            }
        });
        let stale = attn.forward(&x);
        assert!(
            stale[0].equal(&outputs[0]),
            "the copies changed before the refresh"
        );
        copies.refresh().unwrap();
        let fresh = attn.forward(&x);
        assert!(!fresh[0].equal(&outputs[0]));
        // Against the per-use casts of the updated masters: a second model with the same values.
        let adapters2 = VarStore::new(Device::Cpu);
        let mut plain = Attn::new(16, alpha, &adapters2);
        for (layer, other) in [
            (&plain.q, &attn.q),
            (&plain.k, &attn.k),
            (&plain.v, &attn.v),
            (&plain.out, &attn.out),
        ] {
            tch::no_grad(|| layer.weight.shallow_clone().copy_(&other.weight));
        }
        let source = crate::trainable_variables(&mut attn);
        tch::no_grad(|| {
            for (name, p) in crate::trainable_variables(&mut plain) {
                p.shallow_clone().copy_(&source[&name]);
            }
        });
        for (a, b) in fresh.iter().zip(plain.forward(&x)) {
            assert!(a.equal(&b), "refreshed copies differ from the casts");
        }
    }

    #[test]
    fn copies_equal_the_per_use_casts_with_scale_one() {
        copies_equal_the_per_use_casts(4.0);
    }

    #[test]
    fn copies_equal_the_per_use_casts_with_another_scale() {
        copies_equal_the_per_use_casts(8.0);
    }

    #[test]
    fn a_part_of_a_group_takes_views_of_the_copies_and_its_gradients_reach_them() {
        tch::manual_seed(3);
        let adapters = VarStore::new(Device::Cpu);
        let mut attn = Attn::new(16, 8.0, &adapters);
        let x = Tensor::randn([3, 16], (Kind::BFloat16, Device::Cpu));
        let w = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
        let run = |attn: &Attn| {
            let kv = fused_forward(&[&attn.k, &attn.v], &x)
                .expect("k and v are packed next to each other");
            loss(&kv, &w).backward();
            kv
        };
        let reference = run(&attn);
        let expected = grads(&mut attn);
        zero_grads(&mut attn);
        let copies = ComputeCopies::new(&mut attn, "default").unwrap().unwrap();
        let outputs = run(&attn);
        copies.collect_grads(false).unwrap();
        for (a, b) in outputs.iter().zip(&reference) {
            assert!(a.equal(b));
        }
        for ((name, e), (_, g)) in expected.iter().zip(grads(&mut attn)) {
            assert!(g.equal(e), "{name}: gradient differs");
        }
    }

    #[test]
    fn copies_decline_without_a_compute_type_or_with_dora_and_name_a_missing_adapter() {
        let adapters = VarStore::new(Device::Cpu);
        let mut attn = Attn::new(8, 4.0, &adapters);
        crate::set_compute_kind(&mut attn, "default", None).unwrap();
        assert!(ComputeCopies::new(&mut attn, "default").unwrap().is_none());
        assert!(matches!(
            ComputeCopies::new(&mut attn, "missing"),
            Err(Error::UnknownAdapter { .. })
        ));

        let adapters = VarStore::new(Device::Cpu);
        let linear =
            || Linear::from_tensors(Tensor::randn([8, 8], (Kind::BFloat16, Device::Cpu)), None);
        let mut dora = Attn {
            q: linear(),
            k: linear(),
            v: linear(),
            out: linear(),
        };
        let mut config = LoraConfig::unet_attention(2);
        config.use_dora = true;
        crate::inject(&mut dora, &adapters.root(), "default", &config).unwrap();
        crate::set_compute_kind(&mut dora, "default", Some(Kind::BFloat16)).unwrap();
        assert!(ComputeCopies::new(&mut dora, "default").unwrap().is_none());
    }
}
