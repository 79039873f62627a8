//! Cropping a photo to the training aspect ratio and resizing it: `center`, or `smart`
//! around a focal point found from edge energy (no face model needed).

use image::{GrayImage, RgbImage, imageops};

use dreambooth_api::spec::Crop;

/// A crop rectangle in source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The largest box of the target aspect ratio inside a `width`×`height` image, centred
/// on `focus` (fractions of the image size) and pushed back inside the edges.
pub fn crop_box(
    width: u32,
    height: u32,
    target_width: u32,
    target_height: u32,
    focus: (f64, f64),
) -> CropBox {
    let (w, h, tw, th) = (
        u64::from(width),
        u64::from(height),
        u64::from(target_width),
        u64::from(target_height),
    );
    // Compare w/h with tw/th in integers so exact ratios stay exact.
    let (crop_w, crop_h) = if w * th > h * tw {
        ((h * tw / th).max(1), h)
    } else {
        (w, (w * th / tw).max(1))
    };
    let place = |size: u64, crop: u64, focus: f64| -> u64 {
        let centre = (focus.clamp(0.0, 1.0) * size as f64).round() as i64;
        (centre - crop as i64 / 2).clamp(0, (size - crop) as i64) as u64
    };
    CropBox {
        x: place(w, crop_w, focus.0) as u32,
        y: place(h, crop_h, focus.1) as u32,
        width: crop_w as u32,
        height: crop_h as u32,
    }
}

/// The centroid of gradient energy, as fractions of the image size: where the detail
/// (a face, the object) is, away from flat background. Computed on a small copy.
pub fn focal_point(image: &RgbImage) -> (f64, f64) {
    const ANALYSIS_SIDE: u32 = 128;
    let gray = imageops::grayscale(image);
    let scale = f64::from(ANALYSIS_SIDE) / f64::from(gray.width().max(gray.height()));
    let small: GrayImage = if scale < 1.0 {
        let w = ((f64::from(gray.width()) * scale).round() as u32).max(3);
        let h = ((f64::from(gray.height()) * scale).round() as u32).max(3);
        imageops::resize(&gray, w, h, imageops::FilterType::Triangle)
    } else {
        gray
    };
    let (w, h) = small.dimensions();
    if w < 3 || h < 3 {
        return (0.5, 0.5);
    }
    let at = |x: u32, y: u32| f64::from(small.get_pixel(x, y).0[0]);
    let (mut total, mut sum_x, mut sum_y) = (0.0, 0.0, 0.0);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let gx = at(x + 1, y) - at(x - 1, y);
            let gy = at(x, y + 1) - at(x, y - 1);
            // Squared magnitude favours strong detail over large areas of weak texture.
            let energy = gx * gx + gy * gy;
            total += energy;
            sum_x += energy * (f64::from(x) + 0.5);
            sum_y += energy * (f64::from(y) + 0.5);
        }
    }
    if total <= f64::EPSILON {
        return (0.5, 0.5);
    }
    (sum_x / total / f64::from(w), sum_y / total / f64::from(h))
}

/// Crops to the target aspect ratio and resizes to exactly `target_width`×`target_height`
/// with Lanczos (CatmullRom when enlarging, which rings less).
pub fn crop_and_resize(
    image: &RgbImage,
    mode: Crop,
    target_width: u32,
    target_height: u32,
) -> RgbImage {
    let focus = match mode {
        Crop::Center => (0.5, 0.5),
        Crop::Smart => focal_point(image),
    };
    let b = crop_box(
        image.width(),
        image.height(),
        target_width,
        target_height,
        focus,
    );
    let cropped = imageops::crop_imm(image, b.x, b.y, b.width, b.height).to_image();
    if cropped.dimensions() == (target_width, target_height) {
        return cropped;
    }
    let filter = if b.width >= target_width {
        imageops::FilterType::Lanczos3
    } else {
        imageops::FilterType::CatmullRom
    };
    imageops::resize(&cropped, target_width, target_height, filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_crop_of_a_landscape_keeps_the_full_height() {
        assert_eq!(
            crop_box(1200, 800, 512, 512, (0.5, 0.5)),
            CropBox {
                x: 200,
                y: 0,
                width: 800,
                height: 800
            }
        );
    }

    #[test]
    fn centre_crop_of_a_portrait_keeps_the_full_width() {
        assert_eq!(
            crop_box(600, 1000, 512, 512, (0.5, 0.5)),
            CropBox {
                x: 0,
                y: 200,
                width: 600,
                height: 600
            }
        );
    }

    #[test]
    fn crop_to_a_wide_bucket() {
        assert_eq!(
            crop_box(1000, 1000, 768, 384, (0.5, 0.5)),
            CropBox {
                x: 0,
                y: 250,
                width: 1000,
                height: 500
            }
        );
    }

    #[test]
    fn focus_near_an_edge_is_clamped_inside_the_image() {
        assert_eq!(crop_box(1200, 800, 512, 512, (0.0, 0.5)).x, 0);
        assert_eq!(crop_box(1200, 800, 512, 512, (1.0, 0.5)).x, 400);
        assert_eq!(crop_box(1200, 800, 512, 512, (0.6, 0.5)).x, 320);
    }

    #[test]
    fn focal_point_finds_the_detailed_region() {
        // Flat grey with a checkerboard patch in the right third.
        let image = RgbImage::from_fn(300, 100, |x, y| {
            if (220..260).contains(&x) && (30..70).contains(&y) && (x / 4 + y / 4) % 2 == 0 {
                image::Rgb([250, 250, 250])
            } else {
                image::Rgb([120, 120, 120])
            }
        });
        let (fx, fy) = focal_point(&image);
        assert!((0.70..0.90).contains(&fx), "fx = {fx}");
        assert!((0.35..0.65).contains(&fy), "fy = {fy}");
        let smart = crop_box(300, 100, 64, 64, (fx, fy));
        assert!(smart.x > 150, "{smart:?}");
    }

    #[test]
    fn flat_images_focus_on_the_centre() {
        let image = RgbImage::from_pixel(50, 40, image::Rgb([9, 9, 9]));
        assert_eq!(focal_point(&image), (0.5, 0.5));
    }

    #[test]
    fn output_has_the_target_size() {
        let image = RgbImage::from_pixel(333, 177, image::Rgb([1, 2, 3]));
        for mode in [Crop::Center, Crop::Smart] {
            assert_eq!(
                crop_and_resize(&image, mode, 64, 128).dimensions(),
                (64, 128)
            );
            assert_eq!(
                crop_and_resize(&image, mode, 512, 512).dimensions(),
                (512, 512)
            );
        }
    }
}
