//! Aspect-ratio buckets (kohya style): sizes in 64-pixel steps whose area stays within
//! resolution², and each image goes to the bucket nearest its own aspect ratio.

/// Bucket sides step by this many pixels (the VAE and UNet need multiples of 64 for SD).
pub const BUCKET_STEP: u32 = 64;

/// All bucket sizes (width, height) for `resolution`, squarest first. Sides range from
/// half the resolution to twice it, and width × height never exceeds resolution².
pub fn bucket_sizes(resolution: u32) -> Vec<(u32, u32)> {
    let max_area = u64::from(resolution) * u64::from(resolution);
    let min_side = (resolution / 2 / BUCKET_STEP * BUCKET_STEP).max(BUCKET_STEP);
    let max_side = resolution * 2;
    let mut sizes = Vec::new();
    let mut width = min_side;
    while width <= max_side {
        let height =
            ((max_area / u64::from(width)) as u32 / BUCKET_STEP * BUCKET_STEP).min(max_side);
        if height >= min_side {
            sizes.push((width, height));
        }
        width += BUCKET_STEP;
    }
    sizes.sort_by(|a, b| {
        aspect_distance(a.0, a.1, 1, 1).total_cmp(&aspect_distance(b.0, b.1, 1, 1))
    });
    sizes.dedup();
    sizes
}

/// The bucket whose aspect ratio is nearest the image's (in log space, so 2:1 and 1:2
/// are equally far from square).
pub fn nearest_bucket(buckets: &[(u32, u32)], width: u32, height: u32) -> (u32, u32) {
    *buckets
        .iter()
        .min_by(|a, b| {
            aspect_distance(a.0, a.1, width, height)
                .total_cmp(&aspect_distance(b.0, b.1, width, height))
        })
        .expect("at least one bucket")
}

fn aspect_distance(w1: u32, h1: u32, w2: u32, h2: u32) -> f64 {
    ((f64::from(w1) / f64::from(h1)).ln() - (f64::from(w2) / f64::from(h2)).ln()).abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_multiples_of_64_within_the_area() {
        let buckets = bucket_sizes(512);
        assert_eq!(buckets[0], (512, 512));
        for &(w, h) in &buckets {
            assert_eq!((w % 64, h % 64), (0, 0), "{w}x{h}");
            assert!(u64::from(w) * u64::from(h) <= 512 * 512, "{w}x{h}");
            assert!(
                (256..=1024).contains(&w) && (256..=1024).contains(&h),
                "{w}x{h}"
            );
        }
        assert!(buckets.contains(&(768, 320)));
        assert!(buckets.contains(&(320, 768)));
    }

    #[test]
    fn images_go_to_the_nearest_aspect() {
        let buckets = bucket_sizes(512);
        assert_eq!(nearest_bucket(&buckets, 1000, 1000), (512, 512));
        assert_eq!(nearest_bucket(&buckets, 1920, 1080), (640, 384));
        assert_eq!(nearest_bucket(&buckets, 1080, 1920), (384, 640));
        assert_eq!(nearest_bucket(&buckets, 4000, 3000), (576, 448));
    }
}
