//! Unit tests of `tensorboard`.

use super::*;
use crate::logs::test_dir::TestDir;

#[test]
fn crc32c_matches_the_standard_check_values() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    // RFC 3720 (iSCSI), B.4: 32 bytes of zeros and of 0xff.
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    assert_eq!(
        masked_crc32c(b"123456789"),
        0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
    );
}

#[test]
fn scalars_read_back_as_written() {
    let dir = TestDir::new("tb-roundtrip");
    let log_dir = dir.path().join("logs/run");
    let before = wall_time_now();
    let mut writer = EventWriter::create(&log_dir).unwrap();
    let written = [
        ("train/loss", 0, 0.5f32),
        ("train/lr", 0, 1e-4),
        ("train/loss", 1, 0.25),
        ("train/loss", -3, -7.5),
        ("a/β", i64::MAX, f32::INFINITY),
    ];
    for (tag, step, value) in written {
        writer.add_scalar(tag, step, value).unwrap();
    }
    writer.flush().unwrap();
    let after = wall_time_now();

    let name = writer
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let parts: Vec<&str> = name.split('.').collect();
    assert_eq!(&parts[..3], &["events", "out", "tfevents"], "{name}");
    assert_eq!(parts[3].len(), 10, "{name}");
    assert_eq!(
        parts[parts.len() - 2],
        std::process::id().to_string(),
        "{name}"
    );
    assert_eq!(writer.path().parent(), Some(log_dir.as_path()));

    let scalars = read_scalars(writer.path()).unwrap();
    let read: Vec<(&str, i64, f32)> = scalars
        .iter()
        .map(|s| (s.tag.as_str(), s.step, s.value))
        .collect();
    assert_eq!(read, written);
    assert!(
        scalars
            .iter()
            .all(|s| (before..=after).contains(&s.wall_time))
    );

    // The first record is the file-version event, with no summary.
    let bytes = std::fs::read(writer.path()).unwrap();
    let all = records(writer.path(), &bytes).unwrap();
    assert_eq!(all.len(), written.len() + 1);
    let mut fields = Fields::new(all[0].1);
    let mut version = None;
    while let Some((number, field)) = fields.next_field().unwrap() {
        if let (3, Field::Bytes(raw)) = (number, field) {
            version = Some(String::from_utf8(raw.to_vec()).unwrap());
        }
    }
    assert_eq!(version.as_deref(), Some(FILE_VERSION));

    // A second writer in the same second gets its own file.
    let second = EventWriter::create(&log_dir).unwrap();
    assert_ne!(second.path(), writer.path());
}

#[test]
fn a_truncated_or_damaged_file_names_the_record() {
    let dir = TestDir::new("tb-damage");
    let mut writer = EventWriter::create(dir.path()).unwrap();
    for step in 0..3 {
        writer.add_scalar("loss", step, step as f32).unwrap();
    }
    writer.flush().unwrap();
    let path = writer.path().to_path_buf();
    let bytes = std::fs::read(&path).unwrap();
    let offsets: Vec<u64> = records(&path, &bytes)
        .unwrap()
        .iter()
        .map(|(offset, _)| *offset)
        .collect();
    let last = *offsets.last().unwrap();

    // A writer killed mid-record: every cut inside the last record is reported at its offset.
    for cut in [
        bytes.len() - 1,
        bytes.len() - 4,
        last as usize + 13,
        last as usize + 11,
        last as usize + 1,
    ] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        match read_scalars(&path) {
            Err(Error::CorruptEventFile {
                path: named,
                offset,
                problem,
            }) => {
                assert_eq!(
                    (named.as_path(), offset),
                    (path.as_path(), last),
                    "cut at {cut}"
                );
                assert!(problem.contains("truncated"), "{problem}");
            }
            other => panic!("cut at {cut}: expected a corrupt-file error, got {other:?}"),
        }
    }
    // A flipped bit in the data of the second record, and in its length.
    for (flip, what) in [
        (offsets[1] as usize + 14, "data"),
        (offsets[1] as usize, "length"),
    ] {
        let mut damaged = bytes.clone();
        damaged[flip] ^= 0x10;
        std::fs::write(&path, &damaged).unwrap();
        let err = read_scalars(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("at byte {}", offsets[1])) && err.contains(what),
            "{err}"
        );
    }
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(read_scalars(&path).unwrap().len(), 3);
    assert!(matches!(
        read_scalars(&dir.path().join("missing")),
        Err(Error::LogIo { .. })
    ));
}

#[test]
fn a_resumed_run_appends_a_restart_after_the_checkpoint_to_its_one_file() {
    let dir = TestDir::new("tb-resume");
    let mut first = EventWriter::continue_run(dir.path(), 0).unwrap();
    first.add_scalar("loss", 1, 0.5).unwrap();
    first.add_scalar("loss", 8, 0.75).unwrap();
    first.flush().unwrap();
    let path = first.path().to_path_buf();
    drop(first);
    // Killed in the middle of a record: the cut record goes, the whole ones stay.
    let mut bytes = std::fs::read(&path).unwrap();
    let cut = bytes.len() - 5;
    bytes.truncate(cut);
    std::fs::write(&path, &bytes).unwrap();
    let mut resumed = EventWriter::continue_run(dir.path(), 6).unwrap();
    resumed.add_scalar("loss", 7, 0.25).unwrap();
    resumed.flush().unwrap();
    assert_eq!(resumed.path(), path, "the same file");
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 1);

    let bytes = std::fs::read(&path).unwrap();
    let all = records(&path, &bytes).unwrap();
    assert_eq!(all.len(), 4, "version, loss 1, restart, loss 7");
    let steps_and_fields = |data: &[u8]| {
        let mut fields = Fields::new(data);
        let (mut step, mut numbers, mut session) = (None, Vec::new(), None);
        while let Some((number, field)) = fields.next_field().unwrap() {
            numbers.push(number);
            match (number, field) {
                (2, Field::Varint(raw)) => step = Some(raw as i64),
                (7, Field::Bytes(raw)) => session = Some(raw.to_vec()),
                _ => {}
            }
        }
        (step, numbers, session)
    };
    assert_eq!(
        steps_and_fields(all[0].1).1,
        [1, 2, 3],
        "file version first"
    );
    assert_eq!(
        steps_and_fields(all[2].1),
        (Some(7), vec![1, 2, 7], Some(vec![0x08, SESSION_START]))
    );
    let scalars: Vec<(i64, f32)> = read_scalars(&path)
        .unwrap()
        .iter()
        .map(|s| (s.step, s.value))
        .collect();
    assert_eq!(scalars, [(1, 0.5), (7, 0.25)]);
    // A first run has no restart record; one in an empty folder starting later creates the file
    // with one.
    assert!(steps_and_fields(all[1].1).2.is_none());
    let other = TestDir::new("tb-resume-new");
    let resumed = EventWriter::continue_run(other.path(), 6).unwrap();
    let bytes = std::fs::read(resumed.path()).unwrap();
    let all = records(resumed.path(), &bytes).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(steps_and_fields(all[1].1).0, Some(7));
}

#[test]
fn varints_round_trip_at_their_edges() {
    for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
        let mut bytes = Vec::new();
        encode_varint(&mut bytes, value);
        assert_eq!(Fields::new(&bytes).varint().unwrap(), value);
    }
    let mut bytes = Vec::new();
    encode_varint(&mut bytes, -1i64 as u64);
    assert_eq!(
        bytes.len(),
        10,
        "protobuf writes negative int64 in ten bytes"
    );
}

/// An image summary reads back with its tag, step, size and bytes; hyper-parameter summaries sit
/// beside it without disturbing the scalars; a file that is not a PNG is refused, naming the tag.
#[test]
fn images_and_hparams_read_back() {
    let dir = TestDir::new("tb-images");
    let mut writer = EventWriter::create(dir.path()).unwrap();
    let image = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    writer
        .add_hparams(
            &[
                ("rank".into(), HParam::Number(4.0)),
                ("optimizer".into(), HParam::Text("AdamW8bit".into())),
                ("use_ema".into(), HParam::Bool(false)),
            ],
            &["train/loss"],
        )
        .unwrap();
    writer.add_scalar("train/loss", 1, 0.5).unwrap();
    writer.add_image("validation", 50, &png).unwrap();
    let error = writer.add_image("bad", 51, b"not a png").unwrap_err();
    assert!(error.to_string().contains("`bad`"), "{error}");
    writer.flush().unwrap();

    let images = read_images(writer.path()).unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(
        (images[0].tag.as_str(), images[0].step, images[0].size),
        ("validation", 50, (5, 3))
    );
    assert_eq!(images[0].encoded, png);
    let scalars = read_scalars(writer.path()).unwrap();
    assert_eq!(scalars.len(), 1);
    let bytes = std::fs::read(writer.path()).unwrap();
    for needle in [
        &b"_hparams_/experiment"[..],
        b"_hparams_/session_start_info",
        b"AdamW8bit",
    ] {
        assert!(bytes.windows(needle.len()).any(|w| w == needle));
    }
}
