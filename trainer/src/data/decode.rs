//! Reading one instance image: the formats we accept, EXIF orientation, and every
//! colour model flattened to 8-bit RGB.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

/// Formats a photo folder may hold. GIF (animation), HEIC and the rest are refused.
pub const ACCEPTED_FORMATS: [ImageFormat; 4] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Bmp,
];

/// Why a file is not a usable image. Each message is meant to follow the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageProblem {
    #[error("the file is empty")]
    Empty,
    #[error("not an image in a supported format (JPEG, PNG, WebP, BMP)")]
    Unrecognised,
    #[error("{0:?} images are not supported; convert it to JPEG or PNG")]
    UnsupportedFormat(ImageFormat),
    #[error("HEIC/HEIF images are not supported; convert it to JPEG or PNG")]
    Heic,
    #[error("cannot be read: {0}")]
    Unreadable(String),
    #[error("cannot be decoded: {0}")]
    Corrupt(String),
}

/// Decodes `path` by its content (not its extension), applies the EXIF orientation and
/// converts to RGB, compositing any transparency over white.
pub fn decode_rgb(path: &Path) -> Result<RgbImage, ImageProblem> {
    let bytes = std::fs::read(path).map_err(|e| ImageProblem::Unreadable(e.to_string()))?;
    decode_rgb_bytes(&bytes)
}

pub fn decode_rgb_bytes(bytes: &[u8]) -> Result<RgbImage, ImageProblem> {
    if bytes.is_empty() {
        return Err(ImageProblem::Empty);
    }
    if is_heif(bytes) {
        return Err(ImageProblem::Heic);
    }
    let format = image::guess_format(bytes).map_err(|_| ImageProblem::Unrecognised)?;
    if !ACCEPTED_FORMATS.contains(&format) {
        return Err(ImageProblem::UnsupportedFormat(format));
    }
    let reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let corrupt = |e: image::ImageError| ImageProblem::Corrupt(e.to_string());
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let orientation = decoder.orientation().map_err(corrupt)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(flatten_to_rgb(image))
}

/// iPhone photos: an ISO-BMFF `ftyp` box with a HEIF brand.
fn is_heif(bytes: &[u8]) -> bool {
    bytes.len() >= 12
        && &bytes[4..8] == b"ftyp"
        && [
            b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1",
        ]
        .contains(&&bytes[8..12].try_into().unwrap_or([0u8; 4]))
}

/// Transparent pixels would otherwise show whatever colour they happen to store
/// (often black), which the model would learn as part of the subject.
fn flatten_to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let alpha = u32::from(a);
        let over_white = |c: u8| ((u32::from(c) * alpha + 255 * (255 - alpha) + 127) / 255) as u8;
        image::Rgb([over_white(r), over_white(g), over_white(b)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparent_pixels_become_white() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        let rgb = flatten_to_rgb(DynamicImage::ImageRgba8(rgba));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [10, 20, 30]);
    }

    #[test]
    fn empty_and_unknown_bytes_are_refused() {
        assert_eq!(decode_rgb_bytes(&[]), Err(ImageProblem::Empty));
        assert_eq!(
            decode_rgb_bytes(b"just some text, not a photo"),
            Err(ImageProblem::Unrecognised)
        );
    }
}
