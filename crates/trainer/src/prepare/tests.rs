//! The caching passes shared out by rank against one process: ranks in threads of this process,
//! joined through a real c10d group (TCPStore and Gloo), on the tiny model and dataset.
//!
//! Equality is bitwise. Every rank runs the same encoders on the same inputs in the same batches
//! as the one process does (the prompts in the one-process batches of eight, the images one at a
//! time), on the same CPU, with nothing random drawn (the posterior is kept as mean and standard
//! deviation, never sampled; the CLIP encoders are frozen, without dropout); the gather only
//! copies values (CPU blocks travel in fp32 and the tiny run's kind is fp32). So no rounding differs
//! between the two paths and any difference is a bug in the sharing, not an error to bound.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::*;
use crate::distributed::{SingleProcess, in_ranks};
use crate::plan::Plan;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny run with `--cache_latents`, `--random_flip` and `items` images.
fn tiny_config(items: u64, cache_dir: Option<&Path>) -> TrainConfig {
    let mut config = TrainConfig::tiny_demo(
        &repo().join("tests/fixtures/tiny-sdxl"),
        &repo().join("examples/data/tiny-naruto"),
        Path::new("unused"),
    );
    config.max_train_samples = Some(items);
    config.max_train_steps = 40;
    config.instance_prompt = None;
    config.cache_latents = true;
    config.random_flip = true;
    config.cache_latents_to_disk = cache_dir.is_some();
    config.latents_cache_dir = cache_dir.map(Path::to_owned);
    config
}

/// What one rank prepared.
struct Prepared {
    text: TextConditioning,
    validation: Option<ValidationPrompt>,
    latents: CachedLatents,
}

/// Prepares `config`'s text and latents as rank `group.rank()` of `group`.
fn prepare(config: &TrainConfig, group: &dyn Collective) -> Result<Prepared> {
    let plan = Plan::open(config, None)?;
    let steps = plan.micro_steps(0..config.max_train_steps)?;
    let folder = crate::model_files::resolve_model(config)?;
    let (text, validation) = prepare_text(
        config,
        &folder,
        &steps,
        Device::Cpu,
        Kind::Float,
        group,
        None,
    )?;
    let (latents, _) = prepare_latents(config, &folder, plan.dataset(), Device::Cpu, group, None)?;
    let Latents::Cached(latents) = latents else {
        panic!("--cache_latents keeps the latents cached");
    };
    Ok(Prepared {
        text,
        validation,
        latents,
    })
}

fn assert_same_tensor(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    assert_eq!(actual.kind(), expected.kind(), "{what}: kind");
    assert!(actual.equal(expected), "{what}: values differ");
}

fn assert_same_text(actual: &TextConditioning, expected: &TextConditioning, rank: usize) {
    assert_eq!(actual.prompts, expected.prompts, "rank {rank}: prompts");
    for prompt in &expected.prompts {
        assert_eq!(
            actual.row(prompt),
            expected.row(prompt),
            "rank {rank}: {prompt}"
        );
    }
    match (&actual.table, &expected.table) {
        (
            PromptTable::Embeddings { context, pooled },
            PromptTable::Embeddings {
                context: context_1,
                pooled: pooled_1,
            },
        ) => {
            assert_same_tensor(context, context_1, &format!("rank {rank}: context"));
            assert_same_tensor(pooled, pooled_1, &format!("rank {rank}: pooled"));
        }
        _ => panic!("rank {rank}: the tables hold embeddings"),
    }
}

fn assert_same_latents(actual: &CachedLatents, expected: &CachedLatents, rank: usize) {
    assert_eq!(actual.rows, expected.rows, "rank {rank}: rows");
    let buckets = |c: &CachedLatents| c.buckets.keys().copied().collect::<Vec<_>>();
    assert_eq!(buckets(actual), buckets(expected), "rank {rank}: buckets");
    for (bucket, one) in &expected.buckets {
        let shared = &actual.buckets[bucket];
        let what = |name: &str| format!("rank {rank}, bucket {bucket}: {name}");
        assert_same_tensor(&shared.mean, &one.mean, &what("mean"));
        assert_same_tensor(&shared.std, &one.std, &what("std"));
        assert_same_tensor(&shared.time_ids, &one.time_ids, &what("time ids"));
    }
}

/// Every rank ends with the one-process prompt table and latents; rank 0 alone has the
/// validation prompt's embeddings.
fn check_against_one_process(items: u64, world_size: usize, to_disk: bool) {
    let name = format!("prepare-share-{}-{items}-{world_size}", std::process::id());
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let one_config = tiny_config(items, to_disk.then(|| dir.join("one")).as_deref());
    let one = prepare(&one_config, &SingleProcess).unwrap();
    assert_eq!(
        one.latents.rows.len(),
        2 * items as usize,
        "both mirror images of each item"
    );
    let shared_config = tiny_config(items, to_disk.then(|| dir.join("shared")).as_deref());
    let Some(ranks) = in_ranks(world_size, move |group| prepare(&shared_config, group)) else {
        return;
    };
    for (rank, prepared) in ranks.iter().enumerate() {
        assert_same_text(&prepared.text, &one.text, rank);
        assert_same_latents(&prepared.latents, &one.latents, rank);
        let validation = prepared.validation.as_ref().expect("a validation prompt");
        let expected = one.validation.as_ref().expect("a validation prompt");
        assert_eq!(validation.prompt, expected.prompt);
        match (&validation.embeds, &expected.embeds) {
            (Some((positive, negative)), Some((positive_1, negative_1))) if rank == 0 => {
                assert_same_tensor(&positive.context, &positive_1.context, "validation");
                assert_same_tensor(&positive.pooled, &positive_1.pooled, "validation pooled");
                assert_same_tensor(&negative.context, &negative_1.context, "negative");
            }
            (None, Some(_)) if rank > 0 => {}
            _ => panic!("rank {rank}: validation embeddings on rank 0 only"),
        }
    }
    if to_disk {
        let entries = |folder: &str| std::fs::read_dir(dir.join(folder)).unwrap().count();
        assert_eq!(
            entries("shared"),
            entries("one"),
            "one cache entry per image"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_ranks_prepare_what_one_process_prepares_in_memory() {
    // 7 images: blocks of 4 and 3.
    check_against_one_process(7, 2, false);
}

#[test]
fn three_ranks_prepare_what_one_process_prepares_on_disk() {
    // 7 images: blocks of 3, 3 and 1; the prompts fill two batches, so rank 2 encodes none.
    check_against_one_process(7, 3, true);
}

#[test]
fn three_ranks_prepare_what_one_process_prepares_in_memory() {
    // 16 images: blocks of 6, 6 and 4; the 13 distinct prompts fill two batches, rank 2 none.
    check_against_one_process(16, 3, false);
}

/// 19 prompts make batches of 8, 8 and 3, one per rank: every rank's block is real and the last
/// is padded for the gather.
#[test]
fn prompt_batches_shared_over_three_ranks_make_the_one_process_table() {
    let config = tiny_config(1, None);
    let prompts: Vec<String> = (0..19).map(|i| format!("prompt number {i}")).collect();
    let folder = crate::model_files::resolve_model(&config).unwrap();
    let (encoder, _stores) = folder.prompt_encoder(Device::Cpu, Kind::Float).unwrap();
    let one = encode_prompts(&encoder, &prompts, Device::Cpu, Kind::Float).unwrap();
    let Some(ranks) = in_ranks(3, move |group| {
        let folder = crate::model_files::resolve_model(&config)?;
        let (encoder, _stores) = folder.prompt_encoder(Device::Cpu, Kind::Float)?;
        encode_prompts_shared(&encoder, &prompts, (Device::Cpu, Kind::Float), group)
    }) else {
        return;
    };
    for (rank, text) in ranks.iter().enumerate() {
        assert_same_text(text, &one, rank);
    }
}

/// A rank that plans other prompts is an error on every rank, naming it.
#[test]
fn a_rank_with_another_list_is_named() {
    let Some(ranks) = in_ranks(2, |group| {
        let list: &[&[u8]] = if group.rank() == 0 {
            &[b"a", b"b"]
        } else {
            &[b"a", b"c"]
        };
        Ok(
            share::check_same_list(group, "prompt list", list.iter().copied())
                .map_err(|e| e.to_string()),
        )
    }) else {
        return;
    };
    for (rank, result) in ranks.into_iter().enumerate() {
        let e = result.unwrap_err();
        assert!(
            e.contains(&format!("this is rank {rank}"))
                && e.contains("rank(s) 1 prepare another prompt list"),
            "{e}"
        );
    }
}

/// One process through [`SingleProcess`] prepares as before: no collective, the table in
/// first-use order.
#[test]
fn one_process_prepares_alone() {
    let config = tiny_config(3, None);
    let prepared = prepare(&config, &SingleProcess).unwrap();
    let plan = Plan::open(&config, None).unwrap();
    let steps = plan.micro_steps(0..config.max_train_steps).unwrap();
    let mut first_use: Vec<&String> = Vec::new();
    for prompt in steps.iter().flat_map(|s| s.prompts.iter()) {
        if !first_use.contains(&prompt) {
            first_use.push(prompt);
        }
    }
    let prompts: Vec<&String> = prepared.text.prompts.iter().collect();
    assert_eq!(prompts, first_use);
    assert!(prepared.validation.and_then(|v| v.embeds).is_some());
    assert_eq!(prepared.latents.rows.len(), 6);
}
