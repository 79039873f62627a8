//! Training examples cached once: each image's VAE latent distribution (per flip) and
//! its caption's token ids, and later the caption's text-encoder output.

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::models::AutoencoderKL;

/// One image (or its mirror image) ready for training.
pub struct Example {
    /// Mean and standard deviation of the VAE's latent distribution, `[1, C, h, w]`;
    /// a fresh latent is drawn from them at every step, as diffusers does.
    pub mean: Tensor,
    pub std: Tensor,
    /// Token ids `[1, 77]` of the caption.
    pub input_ids: Tensor,
    /// The frozen text encoder's output for the caption, once phase 2 starts.
    pub embedding: Option<Tensor>,
}

/// RGB pixels as the VAE expects them: `[1, 3, H, W]` in [-1, 1].
pub fn pixels_to_tensor(image: &RgbImage, device: Device) -> Tensor {
    let (width, height) = image.dimensions();
    Tensor::from_slice(image.as_raw())
        .view([i64::from(height), i64::from(width), 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
        .to_device(device)
        / 127.5
        - 1.0
}

/// Encodes an image once; the caller keeps the distribution for the whole run.
pub fn encode_example(
    vae: &AutoencoderKL,
    image: &RgbImage,
    input_ids: Tensor,
    device: Device,
) -> Example {
    let _guard = tch::no_grad_guard();
    let distribution = vae.encode(&pixels_to_tensor(image, device));
    Example {
        std: distribution.std(),
        mean: distribution.mean,
        input_ids,
        embedding: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_map_to_minus_one_one_in_channel_first_order() {
        let mut image = RgbImage::new(2, 1);
        image.put_pixel(0, 0, image::Rgb([0, 255, 0]));
        image.put_pixel(1, 0, image::Rgb([255, 0, 0]));
        let t = pixels_to_tensor(&image, Device::Cpu);
        assert_eq!(t.size(), [1, 3, 1, 2]);
        let values = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        // Red plane, green plane, blue plane.
        assert_eq!(values, [-1.0, 1.0, 1.0, -1.0, -1.0, -1.0]);
    }
}
