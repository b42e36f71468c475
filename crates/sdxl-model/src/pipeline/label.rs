//! Text on images without font files: a built-in 5×8 bitmap font of the printable ASCII characters,
//! and a labelled grid (a header row of column labels, a label column), as A1111's X/Y plot draws.

use crate::{Error, Result};

/// Pixels of one glyph's width at scale 1 (5 columns drawn, 1 of spacing).
pub const GLYPH_ADVANCE: u32 = 6;
/// Pixels of one line's height at scale 1 (8 rows, descenders included, 1 of spacing).
pub const LINE_HEIGHT: u32 = 9;

/// The glyphs of `' '` to `'~'`, 5 columns each, bit 0 the top row, bit 7 the bottom (descenders).
const GLYPHS: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5F, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7F, 0x14, 0x7F, 0x14], // #
    [0x24, 0x2A, 0x7F, 0x2A, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x56, 0x20, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1C, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1C, 0x00], // )
    [0x2A, 0x1C, 0x7F, 0x1C, 0x2A], // *
    [0x08, 0x08, 0x3E, 0x08, 0x08], // +
    [0x00, 0x80, 0x70, 0x30, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x00, 0x60, 0x60, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3E, 0x51, 0x49, 0x45, 0x3E], // 0
    [0x00, 0x42, 0x7F, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4B, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7F, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3C, 0x4A, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1E], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3E], // @
    [0x7E, 0x11, 0x11, 0x11, 0x7E], // A
    [0x7F, 0x49, 0x49, 0x49, 0x36], // B
    [0x3E, 0x41, 0x41, 0x41, 0x22], // C
    [0x7F, 0x41, 0x41, 0x22, 0x1C], // D
    [0x7F, 0x49, 0x49, 0x49, 0x41], // E
    [0x7F, 0x09, 0x09, 0x09, 0x01], // F
    [0x3E, 0x41, 0x49, 0x49, 0x7A], // G
    [0x7F, 0x08, 0x08, 0x08, 0x7F], // H
    [0x00, 0x41, 0x7F, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3F, 0x01], // J
    [0x7F, 0x08, 0x14, 0x22, 0x41], // K
    [0x7F, 0x40, 0x40, 0x40, 0x40], // L
    [0x7F, 0x02, 0x0C, 0x02, 0x7F], // M
    [0x7F, 0x04, 0x08, 0x10, 0x7F], // N
    [0x3E, 0x41, 0x41, 0x41, 0x3E], // O
    [0x7F, 0x09, 0x09, 0x09, 0x06], // P
    [0x3E, 0x41, 0x51, 0x21, 0x5E], // Q
    [0x7F, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7F, 0x01, 0x01], // T
    [0x3F, 0x40, 0x40, 0x40, 0x3F], // U
    [0x1F, 0x20, 0x40, 0x20, 0x1F], // V
    [0x3F, 0x40, 0x38, 0x40, 0x3F], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7F, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // \
    [0x00, 0x41, 0x41, 0x7F, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x80, 0x80, 0x80, 0x80, 0x80], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7F, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7F], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7E, 0x09, 0x01, 0x02], // f
    [0x18, 0xA4, 0xA4, 0xA4, 0x7C], // g
    [0x7F, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7D, 0x40, 0x00], // i
    [0x40, 0x80, 0x84, 0x7D, 0x00], // j
    [0x7F, 0x10, 0x28, 0x44, 0x00], // k
    [0x00, 0x41, 0x7F, 0x40, 0x00], // l
    [0x7C, 0x04, 0x18, 0x04, 0x78], // m
    [0x7C, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0xFC, 0x24, 0x24, 0x24, 0x18], // p
    [0x18, 0x24, 0x24, 0x24, 0xFC], // q
    [0x7C, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3F, 0x44, 0x40, 0x20], // t
    [0x3C, 0x40, 0x40, 0x20, 0x7C], // u
    [0x1C, 0x20, 0x40, 0x20, 0x1C], // v
    [0x3C, 0x40, 0x30, 0x40, 0x3C], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x1C, 0xA0, 0xA0, 0xA0, 0x7C], // y
    [0x44, 0x64, 0x54, 0x4C, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7F, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x08, 0x04, 0x08, 0x10, 0x08], // ~
];

/// The glyph of `c`: printable ASCII as itself, anything else (non-ASCII, control characters) as `?`.
fn glyph(c: char) -> &'static [u8; 5] {
    let index = match c {
        ' '..='~' => c as usize - ' ' as usize,
        _ => '?' as usize - ' ' as usize,
    };
    &GLYPHS[index]
}

/// The size in pixels `(width, height)` of `text` drawn on one line at `scale` (each font pixel a
/// `scale`×`scale` square): [`GLYPH_ADVANCE`] and [`LINE_HEIGHT`] times `scale` per character and line.
pub fn text_size(text: &str, scale: u32) -> (u32, u32) {
    let chars = text.chars().count() as u32;
    (chars * GLYPH_ADVANCE * scale, LINE_HEIGHT * scale)
}

/// Draws `text` on one line with its top-left corner at `(x, y)`, each font pixel a `scale`×`scale`
/// square of `color`; what falls outside the image is clipped. Characters outside printable ASCII
/// are drawn as `?`.
pub fn draw_text(
    image: &mut image::RgbImage,
    text: &str,
    (x, y): (i64, i64),
    scale: u32,
    color: image::Rgb<u8>,
) {
    let scale = i64::from(scale.max(1));
    let (width, height) = (i64::from(image.width()), i64::from(image.height()));
    for (n, c) in text.chars().enumerate() {
        let left = x + n as i64 * i64::from(GLYPH_ADVANCE) * scale;
        for (column, bits) in glyph(c).iter().enumerate() {
            for row in 0..8 {
                if bits >> row & 1 == 0 {
                    continue;
                }
                let (px, py) = (left + column as i64 * scale, y + row * scale);
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (u, v) = (px + dx, py + dy);
                        if (0..width).contains(&u) && (0..height).contains(&v) {
                            image.put_pixel(u as u32, v as u32, color);
                        }
                    }
                }
            }
        }
    }
}

/// The font scale [`labeled_grid`] uses for cells of this size: 1 up to 255 px on the shorter side,
/// then one more per 256 px (4 for 1024×1024 images: 20×32 px glyphs).
pub fn label_scale(cell_width: u32, cell_height: u32) -> u32 {
    (cell_width.min(cell_height) / 256).max(1)
}

/// A grid of equally sized images with labels, black on white: `rows[r][c]` is the cell in row `r`
/// and column `c`, `column_labels[c]` is drawn above column `c` (a header row), `row_labels[r]`
/// left of row `r` (a label column as wide as the longest label), each on one line, centred, at
/// [`label_scale`]. Labels wider than their space are clipped.
///
/// # Errors
/// [`Error::Shape`] when there are no cells, the rows have different lengths or the cells different
/// sizes, or the label counts differ from the columns and rows.
pub fn labeled_grid(
    rows: &[Vec<image::RgbImage>],
    column_labels: &[String],
    row_labels: &[String],
) -> Result<image::RgbImage> {
    let shape_error = |what: &str, expected: String, actual: String| Error::Shape {
        what: what.into(),
        expected,
        actual,
    };
    let first = rows
        .first()
        .and_then(|row| row.first())
        .ok_or_else(|| shape_error("grid cells", "at least one".into(), "none".into()))?;
    let (cell_width, cell_height) = first.dimensions();
    let columns = rows[0].len();
    for row in rows {
        if row.len() != columns {
            return Err(shape_error(
                "grid row",
                format!("{columns} cells"),
                format!("{} cells", row.len()),
            ));
        }
        if let Some(cell) = row
            .iter()
            .find(|c| c.dimensions() != (cell_width, cell_height))
        {
            return Err(shape_error(
                "grid cell",
                format!("{cell_width}×{cell_height} px"),
                format!("{}×{} px", cell.width(), cell.height()),
            ));
        }
    }
    if column_labels.len() != columns || row_labels.len() != rows.len() {
        return Err(shape_error(
            "grid labels",
            format!("{columns} column and {} row labels", rows.len()),
            format!(
                "{} column and {} row labels",
                column_labels.len(),
                row_labels.len()
            ),
        ));
    }
    let scale = label_scale(cell_width, cell_height);
    let margin = 2 * scale;
    let header = LINE_HEIGHT * scale + 2 * margin;
    let label_width = row_labels
        .iter()
        .map(|label| text_size(label, scale).0)
        .max()
        .unwrap_or(0)
        + 2 * margin;
    let width = label_width + cell_width * columns as u32;
    let height = header + cell_height * rows.len() as u32;
    let mut grid = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let black = image::Rgb([0, 0, 0]);
    let line = i64::from(LINE_HEIGHT * scale);
    for (c, label) in column_labels.iter().enumerate() {
        let left = i64::from(label_width + cell_width * c as u32);
        let text = i64::from(text_size(label, scale).0);
        let x = left + (i64::from(cell_width) - text).max(0) / 2;
        draw_text(
            &mut grid,
            label,
            (x, (i64::from(header) - line) / 2),
            scale,
            black,
        );
    }
    for (r, (row, label)) in rows.iter().zip(row_labels).enumerate() {
        let top = header + cell_height * r as u32;
        let y = i64::from(top) + (i64::from(cell_height) - line) / 2;
        draw_text(&mut grid, label, (i64::from(margin), y), scale, black);
        for (c, cell) in row.iter().enumerate() {
            let left = label_width + cell_width * c as u32;
            image::imageops::replace(&mut grid, cell, i64::from(left), i64::from(top));
        }
    }
    Ok(grid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(text: &str, scale: u32) -> image::RgbImage {
        let (width, height) = text_size(text, scale);
        let mut image = image::RgbImage::new(width, height);
        draw_text(&mut image, text, (0, 0), scale, image::Rgb([255, 255, 255]));
        image
    }

    #[test]
    fn every_printable_character_has_its_own_glyph_inside_its_cell() {
        let printable: Vec<char> = (' '..='~').collect();
        assert_eq!(printable.len(), GLYPHS.len());
        for (i, &c) in printable.iter().enumerate() {
            let lit = rendered(&c.to_string(), 1)
                .pixels()
                .filter(|p| p.0[0] == 255)
                .count();
            assert_eq!(lit == 0, c == ' ', "{c:?} lights {lit} pixels");
            for &d in &printable[i + 1..] {
                assert_ne!(glyph(c), glyph(d), "{c:?} and {d:?} look the same");
            }
        }
        // Non-ASCII and control characters fall back to '?'.
        assert_eq!(rendered("×", 1), rendered("?", 1));
        assert_eq!(rendered("\n", 1), rendered("?", 1));
    }

    #[test]
    fn text_scales_and_clips() {
        let one = rendered("Ab,", 1);
        let three = rendered("Ab,", 3);
        assert_eq!(three.dimensions(), (3 * one.width(), 3 * one.height()));
        for (x, y, p) in one.enumerate_pixels() {
            assert_eq!(three.get_pixel(3 * x + 2, 3 * y + 1), p, "({x}, {y})");
        }
        // Partly or wholly outside the image: clipped, no panic.
        let mut small = image::RgbImage::new(4, 4);
        draw_text(&mut small, "WWW", (-3, -6), 2, image::Rgb([1, 2, 3]));
        draw_text(&mut small, "W", (100, 100), 1, image::Rgb([1, 2, 3]));
        assert!(small.pixels().any(|p| p.0 == [1, 2, 3]));
    }

    #[test]
    fn labeled_grid_places_cells_under_the_header_right_of_the_labels() {
        let cell = |v: u8| image::RgbImage::from_pixel(16, 12, image::Rgb([v, v, v]));
        let rows = vec![vec![cell(10), cell(20)], vec![cell(30), cell(40)]];
        let grid = labeled_grid(
            &rows,
            &["x0".into(), "x1".into()],
            &["seed 1".into(), "s2".into()],
        )
        .unwrap();
        let label_width = text_size("seed 1", 1).0 + 4;
        let header = LINE_HEIGHT + 4;
        assert_eq!(grid.dimensions(), (label_width + 32, header + 24));
        for (r, row) in rows.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                let view = image::imageops::crop_imm(
                    &grid,
                    label_width + 16 * c as u32,
                    header + 12 * r as u32,
                    16,
                    12,
                )
                .to_image();
                assert_eq!(&view, cell, "cell ({r}, {c})");
            }
        }
        // Some ink in the header and in the label column, none in the corner's margins.
        let dark = |x0: u32, y0: u32, w: u32, h: u32| {
            (x0..x0 + w).any(|x| (y0..y0 + h).any(|y| grid.get_pixel(x, y).0 == [0, 0, 0]))
        };
        assert!(dark(label_width, 0, 32, header));
        assert!(dark(0, header, label_width, 24));
        assert!(!dark(0, 0, label_width, 2));
        // Mismatched shapes are errors.
        assert!(labeled_grid(&[], &[], &[]).is_err());
        assert!(labeled_grid(&rows, &["x0".into()], &["a".into(), "b".into()]).is_err());
        let ragged = vec![vec![cell(1), cell(2)], vec![cell(3)]];
        assert!(
            labeled_grid(
                &ragged,
                &["a".into(), "b".into()],
                &["a".into(), "b".into()]
            )
            .is_err()
        );
    }
}
