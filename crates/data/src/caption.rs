//! kohya's caption rules: prefix and suffix, caption dropout, tag shuffling with kept leading (or
//! separator-delimited) tags, and tag dropout.
//!
//! [`process_caption`] follows `BaseDataset.process_caption` of kohya-ss/sd-scripts
//! (`library/train_util.py`, commit `48d368fa557731ad0488c07304dfeba8c07910eb`) step by step, with
//! the options that function reads set to their defaults where we do not support them yet
//! (wildcards, `secondary_separator`, token warm-up, textual-inversion replacements,
//! `caption_dropout_every_n_epochs`):
//!
//! 1. `caption_prefix + " " + caption` and `caption + " " + caption_suffix` (an empty prefix or
//!    suffix adds nothing);
//! 2. with `caption_dropout_rate > 0`, one draw: below the rate, the whole caption becomes `""` and
//!    nothing else is drawn;
//! 3. only the first line is kept (`split("\n")[0]`; the suffix of a multi-line caption is lost, as
//!    in kohya);
//! 4. only if `shuffle_caption` or `caption_tag_dropout_rate > 0`: the caption is cut into tags at
//!    `caption_separator` and each tag stripped of white space. With a `keep_tokens_separator`
//!    that occurs in the caption, the text before its first occurrence gives the fixed leading tags,
//!    the text after a second occurrence (if any) fixed trailing tags, and the middle the tags that
//!    move; empty tags are dropped. Otherwise the first `keep_tokens` tags stay in front and empty
//!    tags are kept. The moving tags are shuffled (`shuffle_caption`), then each is kept when a draw
//!    is at least `caption_tag_dropout_rate`, and everything is joined with `", "` whatever the
//!    separator;
//! 5. otherwise the (first line of the) caption is returned as is: `keep_tokens` and the
//!    `keep_tokens_separator` text are then not touched.
//!
//! The draws come from our [`Rng`], not Python's `random`, so which tags move where differs from
//! kohya's; the order of the steps, which tags stay put and the joining text are kohya's
//! (`tests/fixtures/kohya-captions.json` holds kohya's own outputs on cases without randomness).

use crate::rng::Rng;
use crate::{Error, Result};

/// kohya's per-subset caption options (the names are kohya's `--dataset_config` keys).
///
/// The default changes nothing but keeps the first line of the caption (kohya's step 3).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CaptionRules {
    /// Text put before the caption with a space (`caption_prefix`); shuffled like the rest unless
    /// kept by `keep_tokens`.
    pub caption_prefix: Option<String>,
    /// Text put after the caption with a space (`caption_suffix`).
    pub caption_suffix: Option<String>,
    /// Probability of replacing the whole caption with `""` (`caption_dropout_rate`).
    pub caption_dropout_rate: f64,
    /// Shuffle the tags after the kept ones (`shuffle_caption`).
    pub shuffle_caption: bool,
    /// How many leading tags never move or drop (`keep_tokens`); ignored when
    /// `keep_tokens_separator` occurs in the caption.
    pub keep_tokens: usize,
    /// A marker splitting the caption into fixed leading tags, moving tags and (after a second
    /// marker) fixed trailing tags (`keep_tokens_separator`, e.g. `"|||"`); `None` or empty: off.
    pub keep_tokens_separator: Option<String>,
    /// What separates tags (`caption_separator`, default `","`); never empty. Joined tags are always
    /// separated by `", "`.
    pub caption_separator: String,
    /// Probability of dropping each moving tag (`caption_tag_dropout_rate`).
    pub caption_tag_dropout_rate: f64,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl CaptionRules {
    /// Sets [`CaptionRules::caption_prefix`].
    #[must_use]
    pub fn with_caption_prefix(mut self, caption_prefix: Option<String>) -> Self {
        self.caption_prefix = caption_prefix;
        self
    }

    /// Sets [`CaptionRules::caption_suffix`].
    #[must_use]
    pub fn with_caption_suffix(mut self, caption_suffix: Option<String>) -> Self {
        self.caption_suffix = caption_suffix;
        self
    }

    /// Sets [`CaptionRules::caption_dropout_rate`].
    #[must_use]
    pub fn with_caption_dropout_rate(mut self, caption_dropout_rate: f64) -> Self {
        self.caption_dropout_rate = caption_dropout_rate;
        self
    }

    /// Sets [`CaptionRules::shuffle_caption`].
    #[must_use]
    pub fn with_shuffle_caption(mut self, shuffle_caption: bool) -> Self {
        self.shuffle_caption = shuffle_caption;
        self
    }

    /// Sets [`CaptionRules::keep_tokens`].
    #[must_use]
    pub fn with_keep_tokens(mut self, keep_tokens: usize) -> Self {
        self.keep_tokens = keep_tokens;
        self
    }

    /// Sets [`CaptionRules::keep_tokens_separator`].
    #[must_use]
    pub fn with_keep_tokens_separator(mut self, keep_tokens_separator: Option<String>) -> Self {
        self.keep_tokens_separator = keep_tokens_separator;
        self
    }

    /// Sets [`CaptionRules::caption_separator`].
    #[must_use]
    pub fn with_caption_separator(mut self, caption_separator: String) -> Self {
        self.caption_separator = caption_separator;
        self
    }

    /// Sets [`CaptionRules::caption_tag_dropout_rate`].
    #[must_use]
    pub fn with_caption_tag_dropout_rate(mut self, caption_tag_dropout_rate: f64) -> Self {
        self.caption_tag_dropout_rate = caption_tag_dropout_rate;
        self
    }
}

impl Default for CaptionRules {
    fn default() -> Self {
        Self {
            caption_prefix: None,
            caption_suffix: None,
            caption_dropout_rate: 0.0,
            shuffle_caption: false,
            keep_tokens: 0,
            keep_tokens_separator: None,
            caption_separator: ",".into(),
            caption_tag_dropout_rate: 0.0,
        }
    }
}

impl CaptionRules {
    /// Checks that the rates are probabilities and the separator is not empty.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the option.
    pub fn validate(&self) -> Result<()> {
        for (option, rate) in [
            ("caption_dropout_rate", self.caption_dropout_rate),
            ("caption_tag_dropout_rate", self.caption_tag_dropout_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(Error::InvalidOption {
                    option,
                    problem: format!("{rate} is not a probability"),
                });
            }
        }
        if self.caption_separator.is_empty() {
            return Err(Error::InvalidOption {
                option: "caption_separator",
                problem: "must not be empty".into(),
            });
        }
        Ok(())
    }

    /// [`process_caption`] with these rules.
    pub fn apply(&self, caption: &str, rng: &mut Rng) -> String {
        process_caption(caption, self, rng)
    }
}

/// kohya's `process_caption` (see the [module documentation](self) for the steps), drawing from
/// `rng` in kohya's order: caption dropout, shuffle, then one draw per moving tag.
pub fn process_caption(caption: &str, rules: &CaptionRules, rng: &mut Rng) -> String {
    let mut caption = caption.to_owned();
    if let Some(prefix) = rules.caption_prefix.as_deref().filter(|p| !p.is_empty()) {
        caption = format!("{prefix} {caption}");
    }
    if let Some(suffix) = rules.caption_suffix.as_deref().filter(|s| !s.is_empty()) {
        caption = format!("{caption} {suffix}");
    }
    if rules.caption_dropout_rate > 0.0 && rng.chance(rules.caption_dropout_rate) {
        return String::new();
    }
    let caption = caption.split('\n').next().unwrap_or_default();
    if !(rules.shuffle_caption || rules.caption_tag_dropout_rate > 0.0) {
        return caption.to_owned();
    }
    let separator = rules.caption_separator.as_str();
    let tags = |text: &str, keep_empty: bool| -> Vec<String> {
        text.split(separator)
            .map(py_strip)
            .filter(|t| keep_empty || !t.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let marker = rules
        .keep_tokens_separator
        .as_deref()
        .filter(|m| !m.is_empty() && caption.contains(*m));
    let (fixed, mut flex, fixed_suffix) = match marker {
        Some(marker) => {
            let (fixed_part, flex_part) = caption.split_once(marker).unwrap_or((caption, ""));
            let (flex_part, suffix_part) = flex_part.split_once(marker).unwrap_or((flex_part, ""));
            (
                tags(fixed_part, false),
                tags(flex_part, false),
                tags(suffix_part, false),
            )
        }
        None => {
            let mut flex = tags(py_strip(caption), true);
            let fixed = flex
                .drain(..rules.keep_tokens.min(flex.len()))
                .collect::<Vec<_>>();
            (fixed, flex, Vec::new())
        }
    };
    if rules.shuffle_caption {
        // Fisher-Yates from the end, the order of Python's `random.shuffle`.
        rng.shuffle(&mut flex);
    }
    if rules.caption_tag_dropout_rate > 0.0 {
        flex.retain(|_| rng.next_f64() >= rules.caption_tag_dropout_rate);
    }
    let mut all = fixed;
    all.extend(flex);
    all.extend(fixed_suffix);
    all.join(", ")
}

/// Python's `str.strip()`: removes leading and trailing characters for which `str.isspace()` holds,
/// which are Unicode's white space plus the separators U+001C to U+001F.
pub(crate) fn py_strip(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> CaptionRules {
        CaptionRules::default()
    }

    fn run(caption: &str, rules: &CaptionRules) -> String {
        process_caption(caption, rules, &mut Rng::keyed(1, &[]))
    }

    #[test]
    fn defaults_keep_the_first_line_only() {
        assert_eq!(run("a, b,c\nsecond", &rules()), "a, b,c");
        assert_eq!(run("  a ,b  ", &rules()), "  a ,b  ");
    }

    #[test]
    fn prefix_and_suffix_are_joined_with_a_space_before_anything_else() {
        let r = CaptionRules {
            caption_prefix: Some("sks".into()),
            caption_suffix: Some("hd".into()),
            ..rules()
        };
        assert_eq!(run("dog, grass", &r), "sks dog, grass hd");
        // The suffix goes after the second line, which is then cut off.
        assert_eq!(run("dog\nline two", &r), "sks dog");
        let empty = CaptionRules {
            caption_prefix: Some(String::new()),
            ..rules()
        };
        assert_eq!(run("dog", &empty), "dog");
    }

    #[test]
    fn full_rates_drop_everything() {
        let r = CaptionRules {
            caption_dropout_rate: 1.0,
            shuffle_caption: true,
            ..rules()
        };
        assert_eq!(run("a, b, c", &r), "");
        let r = CaptionRules {
            caption_tag_dropout_rate: 1.0,
            keep_tokens: 1,
            ..rules()
        };
        assert_eq!(run("a,b , c", &r), "a");
    }

    #[test]
    fn tag_dropout_alone_rejoins_with_comma_space() {
        let r = CaptionRules {
            caption_tag_dropout_rate: 1e-300,
            ..rules()
        };
        // Empty tags survive in the `keep_tokens` branch, as in kohya.
        assert_eq!(run(" a,b,, c ", &r), "a, b, , c");
        let r = CaptionRules {
            caption_separator: ";".into(),
            ..r
        };
        assert_eq!(run("a;b , c", &r), "a, b , c");
    }

    #[test]
    fn keep_tokens_separator_fixes_both_ends() {
        let r = CaptionRules {
            shuffle_caption: true,
            keep_tokens: 5,
            keep_tokens_separator: Some("|||".into()),
            ..rules()
        };
        for seed in 0..50 {
            let out = process_caption(
                "sks, dog ||| a, b,, c, d ||| best, hd",
                &r,
                &mut Rng::keyed(seed, &[]),
            );
            assert!(out.starts_with("sks, dog, "), "{out}");
            assert!(out.ends_with(", best, hd"), "{out}");
            let mut middle: Vec<&str> = out["sks, dog, ".len()..out.len() - ", best, hd".len()]
                .split(", ")
                .collect();
            middle.sort_unstable();
            assert_eq!(middle, ["a", "b", "c", "d"]);
        }
        // A marker absent from the caption falls back to `keep_tokens`.
        let out = run("a, b, c", &r);
        assert_eq!(out, "a, b, c");
    }

    #[test]
    fn shuffles_move_only_unkept_tags_and_vary_with_the_stream() {
        let r = CaptionRules {
            shuffle_caption: true,
            keep_tokens: 2,
            ..rules()
        };
        let tags: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
        let caption = tags.join(",");
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let out = process_caption(&caption, &r, &mut Rng::keyed(seed, &[]));
            let got: Vec<&str> = out.split(", ").collect();
            assert_eq!(got[..2], ["t0", "t1"]);
            let mut sorted = got.clone();
            sorted.sort_unstable();
            let mut want: Vec<&str> = tags.iter().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(sorted, want);
            seen.insert(out);
        }
        assert!(seen.len() > 30, "{}", seen.len());
    }

    #[test]
    fn validation_names_the_option() {
        let r = CaptionRules {
            caption_tag_dropout_rate: 1.5,
            ..rules()
        };
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("caption_tag_dropout_rate")
        );
        let r = CaptionRules {
            caption_separator: String::new(),
            ..rules()
        };
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("caption_separator")
        );
        assert!(rules().validate().is_ok());
    }

    #[test]
    fn python_strip_includes_the_information_separators() {
        assert_eq!(py_strip("\u{1f} a \u{3000}\t"), "a");
    }
}
