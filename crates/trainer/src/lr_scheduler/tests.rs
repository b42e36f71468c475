//! Unit tests of `lr_scheduler`.

use super::*;

use std::path::PathBuf;

fn fixture() -> PathBuf {
    let root = std::env::var_os("SDXL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"));
    let path = root.join("lr-schedules.safetensors");
    assert!(
        path.exists(),
        "missing fixture {}: regenerate it with `tools/fixtures/regenerate.sh --only lr_schedules`",
        path.display()
    );
    path
}

/// The cases of `LR_SCHEDULE_CASES` in `tools/fixtures/generate.py`, as the header metadata lists them.
fn fixture_cases() -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(fixture()).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let cases = header["__metadata__"]["cases"].as_str().unwrap();
    serde_json::from_str(cases).unwrap()
}

#[test]
fn every_schedule_equals_diffusers_step_by_step() {
    let cases = fixture_cases();
    let expected: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(fixture())
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(cases.len(), 16);
    let mut kinds_seen = std::collections::HashSet::new();
    for (case, config) in &cases {
        let kind: SchedulerKind = config["scheduler"].as_str().unwrap().parse().unwrap();
        kinds_seen.insert(kind);
        let lr = config["learning_rate"].as_f64().unwrap();
        let warmup = config["warmup_steps"].as_u64().unwrap();
        let total = config["total_steps"].as_u64().unwrap();
        let cycles = config.get("num_cycles").and_then(|c| c.as_f64());
        let power = config.get("power").and_then(|p| p.as_f64());
        let schedule = match config["built_by"].as_str().unwrap() {
            // The training scripts' call: the flags' defaults are 1 cycle and power 1.
            "get_scheduler" => LrSchedule::from_script_flags(
                kind,
                lr,
                warmup,
                total,
                cycles.unwrap_or(1.0),
                power.unwrap_or(1.0),
            ),
            "function" => LrSchedule::new(kind, lr, warmup, total)
                .and_then(|s| s.with_cycles(cycles.unwrap())),
            other => panic!("unknown builder {other}"),
        }
        .unwrap();
        let values = Vec::<f64>::try_from(&expected[case]).unwrap();
        assert_eq!(values.len() as u64, total + 6, "{case}");
        for (step, &want) in values.iter().enumerate() {
            let got = schedule.lr_at(step as u64);
            let tolerance = 1e-12 * want.abs().max(f64::MIN_POSITIVE);
            assert!(
                (got - want).abs() <= tolerance,
                "{case} step {step}: {got:e} vs diffusers {want:e}"
            );
        }
    }
    assert_eq!(
        kinds_seen.len(),
        SchedulerKind::ALL.len(),
        "every kind is checked"
    );
}

#[test]
fn names_round_trip_and_unknown_names_list_the_valid_ones() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.to_string().parse::<SchedulerKind>().unwrap(), kind);
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.name()));
        assert_eq!(serde_json::from_str::<SchedulerKind>(&json).unwrap(), kind);
    }
    let err = "cosine_annealing"
        .parse::<SchedulerKind>()
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("--lr_scheduler: unknown schedule \"cosine_annealing\""),
        "{err}"
    );
    for kind in SchedulerKind::ALL {
        assert!(err.contains(kind.name()), "{err}");
    }
    assert!(serde_json::from_str::<SchedulerKind>("\"Cosine\"").is_err());
}

fn flag_of(result: Result<LrSchedule>) -> &'static str {
    match result {
        Err(Error::InvalidOption { option, .. }) => option,
        other => panic!("expected an invalid option, got {other:?}"),
    }
}

#[test]
fn bad_settings_name_their_flag() {
    use SchedulerKind::*;
    for lr in [-1e-4, f64::NAN, f64::INFINITY] {
        assert_eq!(
            flag_of(LrSchedule::new(Constant, lr, 0, 10)),
            "--learning_rate"
        );
    }
    assert_eq!(
        flag_of(LrSchedule::new(Polynomial, 1e-7, 0, 10)),
        "--learning_rate"
    );
    assert_eq!(
        flag_of(LrSchedule::new(Linear, 1e-4, 0, 0)),
        "--max_train_steps"
    );
    assert_eq!(
        flag_of(LrSchedule::new(Constant, 1e-4, 0, 0)),
        "--max_train_steps"
    );
    for kind in [Linear, Cosine, CosineWithRestarts, Polynomial] {
        assert_eq!(
            flag_of(LrSchedule::new(kind, 1e-4, 11, 10)),
            "--lr_warmup_steps",
            "{kind}"
        );
    }
    assert_eq!(
        flag_of(LrSchedule::new(Polynomial, 1e-4, 10, 10)),
        "--lr_warmup_steps"
    );
    // Warm-up longer than the run is odd but well defined where nothing divides by the rest.
    assert!(LrSchedule::new(ConstantWithWarmup, 1e-4, 11, 10).is_ok());
    assert!(LrSchedule::new(Cosine, 1e-4, 10, 10).is_ok());
    let schedule = LrSchedule::new(CosineWithRestarts, 1e-4, 0, 10).unwrap();
    for cycles in [0.0, -1.0, f64::NAN] {
        assert_eq!(
            flag_of(schedule.clone().with_cycles(cycles)),
            "--lr_num_cycles"
        );
    }
    for power in [0.0, -2.0, f64::INFINITY] {
        assert_eq!(flag_of(schedule.clone().with_power(power)), "--lr_power");
    }
    assert_eq!(
        flag_of(LrSchedule::from_script_flags(
            Cosine,
            1e-4,
            0,
            10,
            1.0,
            f64::NAN
        )),
        "--lr_power"
    );
    let err = LrSchedule::new(Linear, 1e-4, 20, 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--lr_warmup_steps") && err.contains("20") && err.contains("10"),
        "{err}"
    );
}

#[test]
fn builders_change_only_the_kinds_that_use_them() {
    let cosine = LrSchedule::new(SchedulerKind::Cosine, 1e-4, 0, 100).unwrap();
    let three = cosine.clone().with_cycles(3.0).unwrap();
    assert_ne!(cosine.lr_at(25), three.lr_at(25));
    let flags =
        LrSchedule::from_script_flags(SchedulerKind::Cosine, 1e-4, 0, 100, 3.0, 2.0).unwrap();
    assert_eq!(
        flags, cosine,
        "get_scheduler does not forward num_cycles to cosine"
    );
    let linear = LrSchedule::new(SchedulerKind::Linear, 1e-4, 0, 100).unwrap();
    let powered = linear
        .clone()
        .with_power(2.0)
        .unwrap()
        .with_cycles(4.0)
        .unwrap();
    assert_eq!(
        (0..120).map(|s| linear.lr_at(s)).collect::<Vec<_>>(),
        (0..120).map(|s| powered.lr_at(s)).collect::<Vec<_>>()
    );
}

/// Another parameter group (the text encoders' `--text_encoder_lr`) follows the same factor, as
/// diffusers' `LambdaLR` multiplies each group's initial rate: at the base rate it is `lr_at` exactly.
#[test]
fn other_groups_follow_the_same_factor() {
    for kind in [
        SchedulerKind::Constant,
        SchedulerKind::ConstantWithWarmup,
        SchedulerKind::Linear,
        SchedulerKind::Cosine,
        SchedulerKind::CosineWithRestarts,
        SchedulerKind::Polynomial,
    ] {
        let schedule = LrSchedule::from_script_flags(kind, 1e-4, 10, 100, 1.0, 1.0).unwrap();
        for step in [0, 3, 10, 57, 99, 100, 130] {
            assert_eq!(
                schedule.lr_from(1e-4, step),
                schedule.lr_at(step),
                "{kind:?} {step}"
            );
            let (group, base) = (schedule.lr_from(5e-6, step), schedule.lr_at(step));
            assert!(
                (group / 5e-6 - base / 1e-4).abs() <= 1e-15 * (base / 1e-4).abs().max(1.0),
                "{kind:?} {step}: {group} vs {base}"
            );
        }
    }
}
