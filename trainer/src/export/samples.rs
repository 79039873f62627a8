//! Sample images at a checkpoint: one PNG per sample prompt and a grid of all of them,
//! so checkpoints made with the same seeds can be compared at a glance.

use std::io::Cursor;

use dreambooth_api::manifest::{Artifact, ArtifactKind};
use image::{ImageFormat, RgbImage};

use super::{ExportError, OutputWriter, sample_grid_key, sample_key, samples_prefix};

// The output names live in `export`; re-exported here beside the sample names.
pub use super::{checkpoint_key, model_key, state_prefix};

/// Columns and rows of a near-square grid for `n` images: `ceil(sqrt(n))` columns and as
/// many rows as needed (3 → 2×2, 5 → 3×2, 10 → 4×3).
pub fn grid_layout(n: usize) -> (usize, usize) {
    if n == 0 {
        return (0, 0);
    }
    let mut cols = (n as f64).sqrt() as usize;
    // Float rounding can land one off either way; settle on the exact ceiling.
    while cols * cols < n {
        cols += 1;
    }
    while cols > 1 && (cols - 1) * (cols - 1) >= n {
        cols -= 1;
    }
    (cols, n.div_ceil(cols))
}

/// Images of one size laid out row by row; unused cells of the last row stay black.
pub fn grid_image(images: &[RgbImage]) -> Result<RgbImage, ExportError> {
    let first = images.first().ok_or(ExportError::EmptyGrid)?;
    let (w, h) = first.dimensions();
    if let Some((index, other)) = images
        .iter()
        .enumerate()
        .find(|(_, img)| img.dimensions() != (w, h))
    {
        return Err(ExportError::GridSizeMismatch {
            index,
            want_w: w,
            want_h: h,
            found_w: other.width(),
            found_h: other.height(),
        });
    }
    let (cols, rows) = grid_layout(images.len());
    let mut grid = RgbImage::new(w * cols as u32, h * rows as u32);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % cols) as u32 * w, (i / cols) as u32 * h);
        image::imageops::replace(&mut grid, img, i64::from(x), i64::from(y));
    }
    Ok(grid)
}

/// PNG bytes of `image`; `key` only names the image in an error.
pub fn encode_png(image: &RgbImage, key: &str) -> Result<Vec<u8>, ExportError> {
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|source| ExportError::Png {
            key: key.to_string(),
            source,
        })?;
    Ok(out.into_inner())
}

/// Writes `samples/step_<N>/<i>.png` for each image (in prompt order) and then
/// `samples/step_<N>/grid.png`, all recorded as samples of `step`. Whatever an earlier
/// attempt left under that folder is removed first, so it holds exactly these images.
pub fn write_samples(
    writer: &mut OutputWriter,
    step: u32,
    images: &[RgbImage],
) -> Result<Vec<Artifact>, ExportError> {
    let grid = grid_image(images)?;
    writer.drop_prefix(&samples_prefix(step))?;
    let mut written = Vec::with_capacity(images.len() + 1);
    for (i, img) in images.iter().enumerate() {
        let key = sample_key(step, i);
        let png = encode_png(img, &key)?;
        written.push(writer.record_bytes(ArtifactKind::Sample, step, &key, &png)?);
    }
    let key = sample_grid_key(step);
    let png = encode_png(&grid, &key)?;
    written.push(writer.record_bytes(ArtifactKind::Sample, step, &key, &png)?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FileStorage, Storage, sha256_hex};
    use image::Rgb;

    fn solid(w: u32, h: u32, shade: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([shade, 255 - shade, shade / 2]))
    }

    #[test]
    fn grids_are_near_square_with_ceil_sqrt_columns() {
        let cases = [
            (1, (1, 1)),
            (2, (2, 1)),
            (3, (2, 2)),
            (4, (2, 2)),
            (5, (3, 2)),
            (9, (3, 3)),
            (10, (4, 3)),
            (16, (4, 4)),
            (17, (5, 4)),
        ];
        for (n, layout) in cases {
            assert_eq!(grid_layout(n), layout, "n = {n}");
        }
        for n in 1..2000 {
            let (cols, rows) = grid_layout(n);
            assert!(cols * cols >= n && (cols - 1) * (cols - 1) < n, "n = {n}");
            assert!(cols * rows >= n && cols * (rows - 1) < n, "n = {n}");
        }
    }

    #[test]
    fn each_image_lands_in_its_cell() {
        let images: Vec<_> = (0..5).map(|i| solid(4, 3, i * 40 + 10)).collect();
        let grid = grid_image(&images).unwrap();
        assert_eq!(grid.dimensions(), (12, 6));
        for (i, img) in images.iter().enumerate() {
            let (x, y) = ((i % 3) as u32 * 4, (i / 3) as u32 * 3);
            assert_eq!(
                grid.get_pixel(x + 3, y + 2),
                img.get_pixel(0, 0),
                "image {i}"
            );
        }
        assert_eq!(
            *grid.get_pixel(11, 5),
            Rgb([0, 0, 0]),
            "the unused cell is black"
        );
    }

    #[test]
    fn grids_refuse_mixed_sizes_and_no_images() {
        let err = grid_image(&[solid(4, 4, 0), solid(4, 4, 1), solid(4, 5, 2)]).unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::GridSizeMismatch {
                    index: 2,
                    found_h: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(grid_image(&[]), Err(ExportError::EmptyGrid)));
    }

    #[test]
    fn samples_are_written_as_pngs_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FileStorage::new(dir.path()).unwrap();
        let mut writer = OutputWriter::new(Box::new(storage.clone()));
        // A stale image from an earlier attempt with more prompts.
        storage
            .put_bytes("samples/step_40/7.png", b"stale")
            .unwrap();
        let images: Vec<_> = (0..3).map(|i| solid(8, 6, i * 90)).collect();

        let written = write_samples(&mut writer, 40, &images).unwrap();
        let keys: Vec<String> = storage
            .list("samples/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(
            keys,
            [
                "samples/step_40/0.png",
                "samples/step_40/1.png",
                "samples/step_40/2.png",
                "samples/step_40/grid.png"
            ]
        );
        assert_eq!(written.len(), 4);
        for (artifact, key) in written.iter().zip(&keys) {
            assert_eq!(artifact.kind, ArtifactKind::Sample);
            assert_eq!(artifact.step, 40);
            assert_eq!(artifact.uri, storage.uri(key));
            let bytes = storage.get_bytes(key).unwrap();
            assert_eq!(artifact.sha256, sha256_hex(&bytes));
        }
        let back = image::load_from_memory(&storage.get_bytes("samples/step_40/1.png").unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(back, images[1]);
        let grid = image::load_from_memory(&storage.get_bytes("samples/step_40/grid.png").unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(grid.dimensions(), (16, 12));
        assert_eq!(writer.artifacts().len(), 4);
    }
}
