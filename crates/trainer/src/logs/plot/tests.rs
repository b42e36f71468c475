//! Unit tests of `plot`.

use super::*;
use crate::logs::test_dir::TestDir;

fn columns_with(image: &RgbImage, color: Rgb<u8>) -> Vec<(u32, Vec<u32>)> {
    (0..image.width())
        .filter_map(|x| {
            let rows: Vec<u32> = (0..image.height())
                .filter(|&y| *image.get_pixel(x, y) == color)
                .collect();
            (!rows.is_empty()).then_some((x, rows))
        })
        .collect()
}

fn mean(rows: &[u32]) -> f64 {
    rows.iter().map(|&r| r as f64).sum::<f64>() / rows.len() as f64
}

#[test]
fn a_falling_loss_is_drawn_falling() {
    let dir = TestDir::new("plot-falling");
    let path = dir.path().join("loss.png");
    // A decaying loss with deterministic noise, a NaN and an infinity that must be skipped.
    let mut points: Vec<(u64, f64)> = (0..400u64)
        .map(|s| {
            (
                s,
                0.05 + 0.2 * (-(s as f64) / 120.0).exp()
                    + 0.03 * ((s * 7919 % 13) as f64 / 13.0 - 0.5),
            )
        })
        .collect();
    points[17].1 = f64::NAN;
    points[300].1 = f64::INFINITY;
    loss_curve_png(&path, &points, "naruto lora: loss").unwrap();

    let image = image::open(&path).unwrap();
    assert_eq!((image.width(), image.height()), (WIDTH, HEIGHT));
    assert_eq!(image.color(), image::ColorType::Rgb8);
    let image = image.to_rgb8();
    let raw = columns_with(&image, RAW_COLOR);
    let ema = columns_with(&image, EMA_COLOR);
    // Both curves span the plot area, and stay inside it.
    for curve in [&raw, &ema] {
        assert!(
            curve.len() as i64 > (PLOT_RIGHT - PLOT_LEFT) * 9 / 10,
            "{} columns",
            curve.len()
        );
        assert!(curve.iter().all(|(x, rows)| {
            (PLOT_LEFT - 2..=PLOT_RIGHT + 2).contains(&(*x as i64))
                && rows
                    .iter()
                    .all(|&y| (PLOT_TOP - 2..=PLOT_BOTTOM + 2).contains(&(y as i64)))
        }));
    }
    // Falling: the average's left end is higher up (smaller y) than its right end.
    let (left, right) = (&ema[0].1, &ema[ema.len() - 1].1);
    assert!(
        mean(left) + 100.0 < mean(right),
        "left end at y {}, right end at y {}",
        mean(left),
        mean(right)
    );
    // Text was drawn: the title row and the tick labels left of the axis.
    assert!((0..WIDTH).any(|x| (10..24).any(|y| *image.get_pixel(x, y) == TEXT)));
    assert!((0..PLOT_LEFT as u32 - 8).any(|x| {
        (PLOT_TOP as u32..PLOT_BOTTOM as u32).any(|y| *image.get_pixel(x, y) == TEXT)
    }));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left behind"
    );
}

#[test]
fn a_rising_loss_is_drawn_rising_and_one_point_is_drawn() {
    let dir = TestDir::new("plot-rising");
    let path = dir.path().join("loss.png");
    let points: Vec<(u64, f64)> = (0..50u64)
        .map(|s| (s * 10, 1e-4 * (1.0 + s as f64)))
        .collect();
    loss_curve_png(&path, &points, "rising").unwrap();
    let ema = columns_with(&image::open(&path).unwrap().to_rgb8(), EMA_COLOR);
    assert!(mean(&ema[0].1) > mean(&ema[ema.len() - 1].1) + 100.0);

    loss_curve_png(&path, &[(5, 0.3)], "one step").unwrap();
    assert!(!columns_with(&image::open(&path).unwrap().to_rgb8(), EMA_COLOR).is_empty());
}

#[test]
fn nothing_finite_to_draw_is_an_error_naming_the_file() {
    let path = Path::new("/nonexistent-folder/loss.png");
    for points in [&[][..], &[(1, f64::NAN), (2, f64::NEG_INFINITY)][..]] {
        match loss_curve_png(path, points, "t") {
            Err(Error::Plot {
                path: named,
                problem,
            }) => {
                assert_eq!(named, path);
                assert!(problem.contains("no finite loss"), "{problem}");
            }
            other => panic!("expected a plot error, got {other:?}"),
        }
    }
    assert!(matches!(
        loss_curve_png(path, &[(1, 0.5)], "t"),
        Err(Error::LogIo { .. })
    ));
}

#[test]
fn ticks_are_round_numbers_inside_the_range() {
    assert_eq!(
        nice_ticks(0.0, 1.0),
        [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
    );
    assert_eq!(nice_ticks(0.0, 400.0), [0.0, 100.0, 200.0, 300.0, 400.0]);
    for (low, high) in [(0.031, 0.26), (1e-5, 3e-4), (-2.0, 7.5), (99.0, 101.0)] {
        let ticks = nice_ticks(low, high);
        assert!((3..=12).contains(&ticks.len()), "{low}..{high}: {ticks:?}");
        assert!(ticks.iter().all(|t| (low..=high).contains(t)), "{ticks:?}");
    }
    assert_eq!(format_tick(0.2, 0.05), "0.20");
    assert_eq!(format_tick(150.0, 50.0), "150");
    assert_eq!(format_tick(1e-4, 5e-5), "1e-4");
    assert_eq!(format_tick(1.5e-4, 5e-5), "1.5e-4");
    assert_eq!(format_tick(0.0, 0.1), "0");
    for label in ["0.20", "1.5e-4", "-3"] {
        assert!(
            label.chars().all(|c| glyph(c) != glyph('\u{1}')),
            "{label} has a glyph for every character"
        );
    }
}

#[test]
fn each_curve_of_a_sweep_has_its_colour_and_the_lower_loss_is_drawn_lower() {
    let dir = TestDir::new("plot-curves");
    let path = dir.path().join("sweep_loss.png");
    let high: Vec<(u64, f64)> = (0..50u64).map(|s| (s, 1.0)).collect();
    let low: Vec<(u64, f64)> = (0..50u64).map(|s| (s, 0.5)).collect();
    let none = vec![(0, f64::NAN)];
    let curves = vec![
        ("high".to_owned(), high),
        ("low".to_owned(), low),
        ("diverged".to_owned(), none),
    ];
    loss_curves_png(&path, &curves, "sweep").unwrap();
    let image = image::open(&path).unwrap().to_rgb8();
    let inside = |(x, _): &(u32, Vec<u32>)| {
        i64::from(*x) > PLOT_LEFT + 20 && i64::from(*x) < PLOT_RIGHT - 200
    };
    let high_rows: Vec<u32> = columns_with(&image, PALETTE[0])
        .into_iter()
        .filter(inside)
        .flat_map(|(_, rows)| rows)
        .collect();
    let low_rows: Vec<u32> = columns_with(&image, PALETTE[1])
        .into_iter()
        .filter(inside)
        .flat_map(|(_, rows)| rows)
        .collect();
    assert!(!high_rows.is_empty() && !low_rows.is_empty());
    // Image rows grow downwards: the lower loss sits below.
    assert!(mean(&low_rows) > mean(&high_rows) + 50.0);
    // Nothing finite at all is an error naming the file.
    let error = loss_curves_png(&path, &curves[2..], "sweep").unwrap_err();
    assert!(error.to_string().contains("sweep_loss.png"), "{error}");
}
