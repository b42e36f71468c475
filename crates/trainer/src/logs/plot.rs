//! The loss curve as a PNG: the raw loss of every logged step (light) under its exponential moving
//! average (dark), with step and loss axes, grid and tick labels.
//!
//! Drawn pixel by pixel on an [`image::RgbImage`] with a built-in 5×7 bitmap font, so a training run
//! needs no font files and no plotting library. The smoothing is TensorBoard's: a debiased EMA.

use image::{Rgb, RgbImage};

use super::write_atomic;
use crate::{Error, Result};
use std::path::Path;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 450;
/// The plot area inside the image: room on the left for loss labels, on top for the title and
/// below for step labels.
const PLOT_LEFT: i64 = 90;
const PLOT_RIGHT: i64 = WIDTH as i64 - 24;
const PLOT_TOP: i64 = 44;
const PLOT_BOTTOM: i64 = HEIGHT as i64 - 56;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const TEXT: Rgb<u8> = Rgb([30, 30, 30]);
/// The raw loss: light, so the average stands out over its noise.
pub const RAW_COLOR: Rgb<u8> = Rgb([160, 196, 236]);
/// The moving average.
pub const EMA_COLOR: Rgb<u8> = Rgb([16, 64, 150]);

/// Glyph pixels are drawn as `GLYPH_SCALE`×`GLYPH_SCALE` squares.
const GLYPH_SCALE: i64 = 2;
/// Horizontal advance per character: a 5-pixel glyph and one pixel of space, scaled.
const CHAR_ADVANCE: i64 = 6 * GLYPH_SCALE;
const GLYPH_HEIGHT: i64 = 7 * GLYPH_SCALE;

/// Draws the loss curve of `points` (`(step, loss)`, in the order logged) with `title` on top, and
/// writes it to `path` as an 800×450 RGB PNG, atomically.
///
/// Points with a non-finite loss are skipped. The moving average spans about a twentieth of the
/// points (at least one), so it smooths long and short runs alike.
///
/// # Errors
/// [`Error::Plot`] naming `path` when no point has a finite loss or the PNG cannot be encoded;
/// [`Error::LogIo`] when it cannot be written.
pub fn loss_curve_png(path: &Path, points: &[(u64, f64)], title: &str) -> Result<()> {
    let plot_error = |problem: String| Error::Plot {
        path: path.to_path_buf(),
        problem,
    };
    let finite: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, loss)| loss.is_finite())
        .map(|&(step, loss)| (step as f64, loss))
        .collect();
    if finite.is_empty() {
        return Err(plot_error(format!(
            "no finite loss to plot among {} points",
            points.len()
        )));
    }
    let smoothed = moving_average(&finite);

    let (step_min, step_max) = padded_range(finite.iter().map(|p| p.0), 0.0);
    let (loss_min, loss_max) = padded_range(finite.iter().map(|p| p.1), 0.05);
    let canvas = Canvas {
        step_min,
        step_max,
        loss_min,
        loss_max,
    };
    let mut image = RgbImage::from_pixel(WIDTH, HEIGHT, BACKGROUND);

    draw_ticks(&mut image, &canvas);
    draw_frame(&mut image, title);
    draw_series(
        &mut image,
        &canvas,
        &[(&finite[..], RAW_COLOR, 1), (&smoothed[..], EMA_COLOR, 2)],
    );

    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| plot_error(format!("encoding the PNG: {e}")))?;
    write_atomic(path, png.get_ref())
}

/// Colours of the curves of [`loss_curves_png`], in turn.
const PALETTE: [Rgb<u8>; 8] = [
    Rgb([16, 64, 150]),
    Rgb([200, 60, 30]),
    Rgb([30, 140, 60]),
    Rgb([140, 50, 160]),
    Rgb([220, 140, 0]),
    Rgb([0, 150, 160]),
    Rgb([120, 90, 40]),
    Rgb([90, 90, 90]),
];

/// Draws several loss curves on one canvas (a sweep's variants: each `(name, points)`'s moving
/// average in a colour of its own, the names as a legend in the same colours), with `title` on
/// top, written to `path` as an 800×450 RGB PNG, atomically. Non-finite points are skipped; a
/// curve with none left is named in the legend and not drawn.
///
/// # Errors
/// As [`loss_curve_png`]: [`Error::Plot`] when no curve has a finite loss.
pub fn loss_curves_png(
    path: &Path,
    curves: &[(String, Vec<(u64, f64)>)],
    title: &str,
) -> Result<()> {
    let plot_error = |problem: String| Error::Plot {
        path: path.to_path_buf(),
        problem,
    };
    let finite: Vec<Vec<(f64, f64)>> = curves
        .iter()
        .map(|(_, points)| {
            points
                .iter()
                .filter(|(_, loss)| loss.is_finite())
                .map(|&(step, loss)| (step as f64, loss))
                .collect()
        })
        .collect();
    let all = || finite.iter().flatten();
    if all().next().is_none() {
        return Err(plot_error(format!(
            "no finite loss to plot in {} curves",
            curves.len()
        )));
    }
    let (step_min, step_max) = padded_range(all().map(|p| p.0), 0.0);
    let (loss_min, loss_max) = padded_range(all().map(|p| p.1), 0.05);
    let canvas = Canvas {
        step_min,
        step_max,
        loss_min,
        loss_max,
    };
    let mut image = RgbImage::from_pixel(WIDTH, HEIGHT, BACKGROUND);
    draw_ticks(&mut image, &canvas);
    draw_frame(&mut image, title);
    let smoothed: Vec<Vec<(f64, f64)>> = finite.iter().map(|p| moving_average(p)).collect();
    let lines: Vec<Series<'_>> = smoothed
        .iter()
        .enumerate()
        .map(|(i, points)| (&points[..], PALETTE[i % PALETTE.len()], 2))
        .collect();
    draw_series(&mut image, &canvas, &lines);
    // The legend, top right inside the plot, in the font's capitals.
    for (i, (name, _)) in curves.iter().enumerate() {
        let name = name.to_ascii_uppercase();
        let top = PLOT_TOP + 6 + i as i64 * (GLYPH_HEIGHT + 6);
        let left = PLOT_RIGHT - 8 - text_width(&name);
        draw_text(&mut image, &name, left, top, PALETTE[i % PALETTE.len()]);
    }
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| plot_error(format!("encoding the PNG: {e}")))?;
    write_atomic(path, png.get_ref())
}

/// The grid lines and tick labels of both axes.
fn draw_ticks(image: &mut RgbImage, canvas: &Canvas) {
    for tick in nice_ticks(canvas.loss_min, canvas.loss_max) {
        let y = canvas.y(tick);
        draw_line(image, (PLOT_LEFT, y), (PLOT_RIGHT, y), GRID, 1);
        draw_line(image, (PLOT_LEFT - 5, y), (PLOT_LEFT, y), AXIS, 1);
        let label = format_tick(tick, nice_spacing(canvas.loss_min, canvas.loss_max));
        draw_text(
            image,
            &label,
            PLOT_LEFT - 8 - text_width(&label),
            y - GLYPH_HEIGHT / 2,
            TEXT,
        );
    }
    for tick in nice_ticks(canvas.step_min, canvas.step_max)
        .into_iter()
        .filter(|t| t.fract() == 0.0)
    {
        let x = canvas.x(tick);
        draw_line(image, (x, PLOT_TOP), (x, PLOT_BOTTOM), GRID, 1);
        draw_line(image, (x, PLOT_BOTTOM), (x, PLOT_BOTTOM + 5), AXIS, 1);
        let label = format!("{tick:.0}");
        draw_text(
            image,
            &label,
            x - text_width(&label) / 2,
            PLOT_BOTTOM + 10,
            TEXT,
        );
    }
}

/// The axes, their names and the title.
fn draw_frame(image: &mut RgbImage, title: &str) {
    draw_line(
        image,
        (PLOT_LEFT, PLOT_TOP),
        (PLOT_LEFT, PLOT_BOTTOM),
        AXIS,
        1,
    );
    draw_line(
        image,
        (PLOT_LEFT, PLOT_BOTTOM),
        (PLOT_RIGHT, PLOT_BOTTOM),
        AXIS,
        1,
    );
    draw_text(
        image,
        "STEP",
        (PLOT_LEFT + PLOT_RIGHT) / 2 - text_width("STEP") / 2,
        PLOT_BOTTOM + 32,
        TEXT,
    );
    draw_text(image, "LOSS", 8, PLOT_TOP - GLYPH_HEIGHT - 8, TEXT);
    let title = title.to_ascii_uppercase();
    draw_text(
        image,
        &title,
        (WIDTH as i64 - text_width(&title)) / 2,
        10,
        TEXT,
    );
}

/// A series of (step, loss) points drawn in a colour and a line thickness.
type Series<'a> = (&'a [(f64, f64)], Rgb<u8>, i64);

/// Each series as a polyline (a dot when it has one point), later ones on top.
fn draw_series(image: &mut RgbImage, canvas: &Canvas, lines: &[Series<'_>]) {
    for &(series, color, thickness) in lines {
        let pixels: Vec<(i64, i64)> = series
            .iter()
            .map(|&(step, loss)| (canvas.x(step), canvas.y(loss)))
            .collect();
        if let [only] = pixels[..] {
            draw_line(image, only, only, color, thickness + 2);
        }
        for pair in pixels.windows(2) {
            draw_line(image, pair[0], pair[1], color, thickness);
        }
    }
}

/// Maps data coordinates to pixels of the plot area.
struct Canvas {
    step_min: f64,
    step_max: f64,
    loss_min: f64,
    loss_max: f64,
}

impl Canvas {
    fn x(&self, step: f64) -> i64 {
        let t = (step - self.step_min) / (self.step_max - self.step_min);
        PLOT_LEFT + (t * (PLOT_RIGHT - PLOT_LEFT) as f64).round() as i64
    }

    /// Larger losses are higher up, i.e. smaller `y`.
    fn y(&self, loss: f64) -> i64 {
        let t = (loss - self.loss_min) / (self.loss_max - self.loss_min);
        PLOT_BOTTOM - (t * (PLOT_BOTTOM - PLOT_TOP) as f64).round() as i64
    }
}

/// TensorBoard's smoothing: an exponential moving average divided by the weight it has
/// accumulated, so it starts at the first value instead of rising from zero.
fn moving_average(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let span = (points.len() as f64 / 20.0).max(1.0);
    let decay = 1.0 - 2.0 / (span + 1.0);
    let (mut average, mut weight) = (0.0, 0.0);
    points
        .iter()
        .map(|&(step, loss)| {
            average = average * decay + (1.0 - decay) * loss;
            weight = weight * decay + (1.0 - decay);
            (step, average / weight)
        })
        .collect()
}

/// The smallest and largest value, widened by `margin` of the span on each side; a single value
/// gets a span around it so the axis is never empty.
fn padded_range(values: impl Iterator<Item = f64>, margin: f64) -> (f64, f64) {
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if high > low {
        let pad = (high - low) * margin;
        (low - pad, high + pad)
    } else {
        let pad = (low.abs() * 0.1).max(1e-3);
        (low - pad, high + pad)
    }
}

/// A tick spacing of 1, 2 or 5 times a power of ten giving about five to ten ticks over the range.
fn nice_spacing(low: f64, high: f64) -> f64 {
    let rough = (high - low) / 6.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let multiple = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|m| m * magnitude >= rough)
        .unwrap_or(10.0);
    multiple * magnitude
}

/// Multiples of [`nice_spacing`] inside `[low, high]`.
fn nice_ticks(low: f64, high: f64) -> Vec<f64> {
    let spacing = nice_spacing(low, high);
    let first = (low / spacing).ceil() as i64;
    let last = (high / spacing).floor() as i64;
    (first..=last).map(|i| i as f64 * spacing).collect()
}

/// A tick label with as many decimals as the spacing needs, or in `1.5e-4` form for very small or
/// large values.
fn format_tick(value: f64, spacing: f64) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    let decimals = (-spacing.log10().floor()).max(0.0) as usize;
    if value.abs() >= 1e5 || decimals > 4 {
        let text = format!("{value:.1e}");
        // `1.0e-4` reads better as `1e-4`.
        return text.replace(".0e", "e");
    }
    format!("{value:.decimals$}")
}

/// Draws a segment with Bresenham's algorithm, each point as a `thickness`-wide square; pixels
/// outside the image are skipped.
fn draw_line(
    image: &mut RgbImage,
    from: (i64, i64),
    to: (i64, i64),
    color: Rgb<u8>,
    thickness: i64,
) {
    let (mut x, mut y) = from;
    let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
    let (step_x, step_y) = ((to.0 - x).signum(), (to.1 - y).signum());
    let mut error = dx + dy;
    loop {
        fill_square(
            image,
            x - thickness / 2,
            y - thickness / 2,
            thickness,
            color,
        );
        if (x, y) == to {
            break;
        }
        let doubled = 2 * error;
        if doubled >= dy {
            error += dy;
            x += step_x;
        }
        if doubled <= dx {
            error += dx;
            y += step_y;
        }
    }
}

fn fill_square(image: &mut RgbImage, left: i64, top: i64, size: i64, color: Rgb<u8>) {
    for y in top..top + size {
        for x in left..left + size {
            if let (Ok(px), Ok(py)) = (u32::try_from(x), u32::try_from(y))
                && px < image.width()
                && py < image.height()
            {
                image.put_pixel(px, py, color);
            }
        }
    }
}

fn text_width(text: &str) -> i64 {
    (text.chars().count() as i64 * CHAR_ADVANCE - GLYPH_SCALE).max(0)
}

/// Draws `text` with its top-left corner at (`left`, `top`).
fn draw_text(image: &mut RgbImage, text: &str, left: i64, top: i64, color: Rgb<u8>) {
    for (index, character) in text.chars().enumerate() {
        let glyph_left = left + index as i64 * CHAR_ADVANCE;
        for (row, bits) in glyph(character).iter().enumerate() {
            for column in 0..5 {
                if bits & (0b10000 >> column) != 0 {
                    let x = glyph_left + column * GLYPH_SCALE;
                    fill_square(image, x, top + row as i64 * GLYPH_SCALE, GLYPH_SCALE, color);
                }
            }
        }
    }
}

/// The 5×7 bitmap of a character, one row per byte, the leftmost pixel in bit 4. Letters are
/// capitals, except `e`, which tick labels use in `1e-4`; anything else is an empty box.
fn glyph(character: char) -> [u8; 7] {
    match character {
        '0' => [
            0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110,
        ],
        '1' => [
            0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
        '2' => [
            0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111,
        ],
        '3' => [
            0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110,
        ],
        '4' => [
            0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010,
        ],
        '5' => [
            0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110,
        ],
        '6' => [
            0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110,
        ],
        '7' => [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000,
        ],
        '8' => [
            0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110,
        ],
        '9' => [
            0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100,
        ],
        'e' => [
            0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110,
        ],
        'A' => [
            0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
        ],
        'B' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110,
        ],
        'C' => [
            0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110,
        ],
        'D' => [
            0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100,
        ],
        'E' => [
            0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111,
        ],
        'F' => [
            0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000,
        ],
        'G' => [
            0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111,
        ],
        'H' => [
            0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
        ],
        'I' => [
            0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
        'J' => [
            0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100,
        ],
        'K' => [
            0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001,
        ],
        'L' => [
            0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111,
        ],
        'M' => [
            0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001,
        ],
        'N' => [
            0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001,
        ],
        'O' => [
            0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
        'P' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000,
        ],
        'Q' => [
            0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101,
        ],
        'R' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001,
        ],
        'S' => [
            0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110,
        ],
        'T' => [
            0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100,
        ],
        'U' => [
            0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
        'V' => [
            0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100,
        ],
        'W' => [
            0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010,
        ],
        'X' => [
            0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001,
        ],
        'Y' => [
            0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00100,
        ],
        'Z' => [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111,
        ],
        ' ' => [0; 7],
        '.' => [
            0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100,
        ],
        ',' => [
            0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000,
        ],
        ':' => [
            0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000,
        ],
        '-' => [
            0b00000, 0b00000, 0b00000, 0b01110, 0b00000, 0b00000, 0b00000,
        ],
        '+' => [
            0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000,
        ],
        '=' => [
            0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000,
        ],
        '/' => [
            0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000,
        ],
        '_' => [
            0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111,
        ],
        '(' => [
            0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010,
        ],
        ')' => [
            0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000,
        ],
        '%' => [
            0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011,
        ],
        _ => [
            0b11111, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b11111,
        ],
    }
}

#[cfg(test)]
mod tests;
