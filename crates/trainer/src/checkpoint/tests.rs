//! Unit tests of `checkpoint`.

use super::*;

#[test]
fn checkpoint_names_are_canonical() {
    assert_eq!(parse_checkpoint_name("checkpoint-0"), Some(0));
    assert_eq!(parse_checkpoint_name("checkpoint-1500"), Some(1500));
    assert_eq!(
        parse_checkpoint_name("checkpoint-18446744073709551615"),
        Some(u64::MAX)
    );
    for name in [
        "checkpoint-",
        "checkpoint-abc",
        "checkpoint-007",
        "checkpoint-+7",
        "checkpoint--7",
        "checkpoint-7 ",
        "checkpoint-5.tmp-1",
        "checkpoint-18446744073709551616",
        "Checkpoint-5",
        "xcheckpoint-5",
    ] {
        assert_eq!(parse_checkpoint_name(name), None, "{name}");
    }
}

#[test]
fn leftover_names_are_recognised_and_nothing_else() {
    assert_eq!(
        parse_leftover(".checkpoint-5.tmp-123"),
        Some(Leftover::Temporary)
    );
    assert_eq!(
        parse_leftover(".pytorch_lora_weights.safetensors.tmp-9"),
        Some(Leftover::Temporary)
    );
    assert_eq!(
        parse_leftover(".trash-checkpoint-5-123"),
        Some(Leftover::Trash)
    );
    assert_eq!(
        parse_leftover(".checkpoint-5.old-123"),
        Some(Leftover::Displaced { step: 5 })
    );
    for name in [
        "checkpoint-5",
        "checkpoint-5.tmp-1",
        ".checkpoint-5.tmp-",
        ".checkpoint-5.tmp-x",
        "..tmp-1",
        ".trash-checkpoint-5",
        ".trash-checkpoint-x-1",
        ".trash-something",
        ".checkpoint-05.old-1",
        ".checkpoint-5.old-",
        ".gitignore",
        "logs",
    ] {
        assert_eq!(parse_leftover(name), None, "{name}");
    }
}
