//! kohya's caption rules: kohya's own outputs on cases without randomness
//! (`tests/fixtures/kohya-captions.json`, written by `tools/fixtures/generate.py --only
//! kohya_captions` from sd-scripts' `BaseDataset.process_caption`), and the properties of the
//! random cases, whose draws cannot match Python's `random`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use data::Rng;
use data::caption::process_caption;
use data::{CaptionRules, CaptionSource, Dataset, DatasetConfig, SampleKey, Selection, Source};
use serde_json::Value;

/// `CaptionRules` from a case's kohya options (only the keys we support may appear).
fn rules_of(options: &serde_json::Map<String, Value>) -> CaptionRules {
    let mut rules = CaptionRules::default();
    for (key, value) in options {
        let text = || value.as_str().map(str::to_owned);
        match key.as_str() {
            "caption_prefix" => rules.caption_prefix = text(),
            "caption_suffix" => rules.caption_suffix = text(),
            "caption_dropout_rate" => rules.caption_dropout_rate = value.as_f64().unwrap(),
            "shuffle_caption" => rules.shuffle_caption = value.as_bool().unwrap(),
            "keep_tokens" => rules.keep_tokens = value.as_u64().unwrap() as usize,
            "keep_tokens_separator" => rules.keep_tokens_separator = text(),
            "caption_separator" => rules.caption_separator = text().unwrap(),
            "caption_tag_dropout_rate" => {
                rules.caption_tag_dropout_rate = value.as_f64().unwrap();
            }
            other => panic!("the fixture uses `{other}`, which CaptionRules lacks"),
        }
    }
    rules.validate().unwrap();
    rules
}

fn golden() -> Value {
    let path = test_support::fixture("kohya-captions.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn kohya_process_caption_outputs_are_reproduced() {
    let golden = golden();
    assert_eq!(
        golden["upstream"]["commit"],
        "48d368fa557731ad0488c07304dfeba8c07910eb"
    );
    // The defaults the cases start from are ours.
    let defaults = &golden["defaults"];
    let ours = CaptionRules::default();
    assert_eq!(
        defaults["caption_separator"],
        ours.caption_separator.as_str()
    );
    assert_eq!(defaults["keep_tokens"], 0);
    assert_eq!(defaults["keep_tokens_separator"], "");
    assert_eq!(ours.keep_tokens_separator, None);
    assert!(!defaults["shuffle_caption"].as_bool().unwrap() && !ours.shuffle_caption);
    for key in ["caption_prefix", "caption_suffix", "secondary_separator"] {
        assert!(defaults[key].is_null(), "{key}");
    }
    for key in ["caption_dropout_rate", "caption_tag_dropout_rate"] {
        assert_eq!(defaults[key].as_f64(), Some(0.0), "{key}");
    }
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 25);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let rules = rules_of(case["rules"].as_object().unwrap());
        let caption = case["caption"].as_str().unwrap();
        let expected = case["expected"].as_str().unwrap();
        for seed in 0..5 {
            let got = process_caption(caption, &rules, &mut Rng::keyed(seed, &[7]));
            assert_eq!(got, expected, "case {name} (seed {seed})");
        }
    }
}

fn tags(text: &str) -> Vec<&str> {
    text.split(", ").collect()
}

fn sorted(mut v: Vec<&str>) -> Vec<&str> {
    v.sort_unstable();
    v
}

#[test]
fn shuffles_keep_the_kept_tags_and_the_multiset() {
    let caption = "sks, dog, red collar, grass, sky, tree, smile, (best:1.2), 4k";
    let rules = CaptionRules::default()
        .with_shuffle_caption(true)
        .with_keep_tokens(2);
    let mut orders = BTreeMap::new();
    for seed in 0..500 {
        let out = process_caption(caption, &rules, &mut Rng::keyed(seed, &[]));
        let got = tags(&out);
        assert_eq!(got[..2], ["sks", "dog"], "{out}");
        assert_eq!(sorted(got.clone()), sorted(tags(caption)));
        *orders.entry(got[2].to_owned()).or_insert(0) += 1;
    }
    // Each of the 7 moving tags comes third about 1/7 of the time.
    assert_eq!(orders.len(), 7);
    assert!(
        orders.values().all(|&n| (40..110).contains(&n)),
        "{orders:?}"
    );

    let rules = CaptionRules::default()
        .with_shuffle_caption(true)
        .with_keep_tokens(9)
        .with_keep_tokens_separator(Some("|||".into()));
    let caption = "sks, dog ||| a, b, c, d, e ||| masterpiece, 4k";
    for seed in 0..100 {
        let out = process_caption(caption, &rules, &mut Rng::keyed(seed, &[]));
        let got = tags(&out);
        assert_eq!(got[..2], ["sks", "dog"], "{out}");
        assert_eq!(got[7..], ["masterpiece", "4k"], "{out}");
        assert_eq!(sorted(got[2..7].to_vec()), ["a", "b", "c", "d", "e"]);
    }
}

#[test]
fn tag_and_caption_dropout_follow_their_rates() {
    let caption = (0..10)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rules = CaptionRules::default()
        .with_caption_tag_dropout_rate(0.25)
        .with_keep_tokens(1);
    let mut kept = 0;
    for seed in 0..1000 {
        let out = process_caption(&caption, &rules, &mut Rng::keyed(seed, &[]));
        let got = tags(&out);
        assert_eq!(got[0], "t0");
        // Tag dropout alone keeps the order of the survivors.
        let all = tags(&caption);
        let mut rest = all.iter();
        assert!(got.iter().all(|t| rest.any(|a| a == t)), "{out}");
        kept += got.len() - 1;
    }
    assert!(
        (6400..7100).contains(&kept),
        "{kept} of 9000 tags kept at 0.25"
    );

    let rules = CaptionRules::default()
        .with_caption_dropout_rate(0.1)
        .with_shuffle_caption(true);
    let dropped = (0..2000)
        .filter(|&seed| process_caption(&caption, &rules, &mut Rng::keyed(seed, &[])).is_empty())
        .count();
    assert!((150..250).contains(&dropped), "{dropped} of 2000 at 0.1");
}

#[test]
fn the_dataset_applies_the_rules_per_step_after_the_template() {
    let source = Source::ImageFolder {
        root: common::fixture("imagefolder"),
        caption_column: None,
    };
    let mut config = DatasetConfig::new(32).unwrap();
    config.selection = Selection::First(2);
    config.captions.source = CaptionSource::Instance("a fox, grass, sky, tree, smile".into());
    config.captions.template = Some("sks, {}".into());
    config.captions.kohya = Some(
        CaptionRules::default()
            .with_shuffle_caption(true)
            .with_keep_tokens(1)
            .with_caption_suffix(Some(", hd".into())),
    );
    let dataset = Dataset::open(&source, config.clone()).unwrap();
    let key = |step| SampleKey {
        seed: 3,
        step,
        slot: 0,
        item: 1,
    };
    let prompts: Vec<String> = (0..20).map(|s| dataset.prompt(&key(s)).unwrap()).collect();
    for prompt in &prompts {
        assert!(prompt.starts_with("sks, "), "{prompt}");
        assert_eq!(
            sorted(tags(prompt)),
            ["a fox", "grass", "hd", "sks", "sky", "smile", "tree"]
        );
    }
    assert!(
        prompts
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 10
    );
    // A pure function of the key.
    assert_eq!(dataset.prompt(&key(5)).unwrap(), prompts[5]);

    config.captions.kohya = Some(CaptionRules::default().with_caption_tag_dropout_rate(2.0));
    let message = Dataset::open(&source, config).unwrap_err().to_string();
    assert!(message.contains("caption_tag_dropout_rate"), "{message}");
}
