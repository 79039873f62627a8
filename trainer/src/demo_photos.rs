//! Example photos for `make demo`: one toy robot, drawn procedurally on varied backgrounds.
//!
//! DreamBooth needs several photos of the *same* subject in *different* surroundings, so the
//! robot keeps its design and colours while the room, floor, clutter, pose and lighting change
//! from photo to photo. Everything comes from a seeded PRNG, so a demo is reproducible and the
//! repository ships no binary images.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::{ImageFormat, Rgb, RgbImage};

/// The rare token the demo photos are named after.
pub const DEMO_TOKEN: &str = "zwxtoy";

type Colour = [f32; 3];

/// The robot's signature colour (head and body); backgrounds never use orange hues.
const ORANGE: Colour = [236.0, 112.0, 28.0];
const GREY: Colour = [120.0, 126.0, 136.0];
const DARK: Colour = [52.0, 56.0, 64.0];
const CYAN: Colour = [40.0, 200.0, 235.0];
const YELLOW: Colour = [250.0, 212.0, 40.0];
const RED: Colour = [214.0, 36.0, 48.0];

/// splitmix64: tiny, statistically fine for pictures, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 24 bits (exact in f32).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % u64::from(n)) as u32
    }
}

#[derive(Clone, Copy)]
enum Shape {
    Rect { cx: f32, cy: f32, hw: f32, hh: f32 },
    Disc { cx: f32, cy: f32, r: f32 },
    Triangle([(f32, f32); 3]),
}

impl Shape {
    fn contains(&self, x: f32, y: f32) -> bool {
        match *self {
            Shape::Rect { cx, cy, hw, hh } => (x - cx).abs() <= hw && (y - cy).abs() <= hh,
            Shape::Disc { cx, cy, r } => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
            Shape::Triangle([a, b, c]) => {
                let edge = |p: (f32, f32), q: (f32, f32)| {
                    (q.0 - p.0) * (y - p.1) - (q.1 - p.1) * (x - p.0)
                };
                let (e1, e2, e3) = (edge(a, b), edge(b, c), edge(c, a));
                (e1 >= 0.0 && e2 >= 0.0 && e3 >= 0.0) || (e1 <= 0.0 && e2 <= 0.0 && e3 <= 0.0)
            }
        }
    }
}

struct Part(Shape, Colour);

const fn rect(cx: f32, cy: f32, hw: f32, hh: f32, colour: Colour) -> Part {
    Part(Shape::Rect { cx, cy, hw, hh }, colour)
}

const fn disc(cx: f32, cy: f32, r: f32, colour: Colour) -> Part {
    Part(Shape::Disc { cx, cy, r }, colour)
}

/// The robot, back to front, in units of its height: feet at v = 0, antenna tip near v = -1.
/// One arm is raised so that horizontal flips are visible.
const ROBOT: [Part; 19] = [
    rect(-0.32, -0.43, 0.055, 0.15, GREY),
    disc(-0.32, -0.27, 0.07, DARK),
    rect(0.32, -0.62, 0.055, 0.15, GREY),
    disc(0.32, -0.78, 0.07, DARK),
    rect(-0.12, -0.13, 0.07, 0.12, GREY),
    rect(0.12, -0.13, 0.07, 0.12, GREY),
    rect(-0.14, -0.035, 0.11, 0.035, DARK),
    rect(0.14, -0.035, 0.11, 0.035, DARK),
    rect(0.0, -0.43, 0.27, 0.19, ORANGE),
    disc(0.0, -0.44, 0.085, YELLOW),
    Part(
        Shape::Triangle([(-0.035, -0.48), (-0.035, -0.40), (0.045, -0.44)]),
        RED,
    ),
    rect(0.0, -0.645, 0.06, 0.03, DARK),
    rect(0.0, -0.79, 0.21, 0.13, ORANGE),
    disc(-0.09, -0.80, 0.05, CYAN),
    disc(0.09, -0.80, 0.05, CYAN),
    rect(0.0, -0.71, 0.09, 0.017, DARK),
    rect(0.0, -0.955, 0.014, 0.035, DARK),
    disc(0.0, -0.99, 0.035, RED),
    // A dark seam between head and neck keeps the two orange blocks apart.
    rect(0.0, -0.662, 0.21, 0.004, DARK),
];

/// Wall and floor patterns: how much of the pattern colour to mix in at (u, v).
const PATTERNS: [fn(f32, f32, u64) -> f32; 5] = [
    |_, _, _| 0.0,
    |u, _, _| (u.floor() as i64).rem_euclid(2) as f32,
    |u, v, _| (u.floor() as i64 + v.floor() as i64).rem_euclid(2) as f32,
    |u, v, _| f32::from((u.fract().abs() - 0.5).powi(2) + (v.fract().abs() - 0.5).powi(2) < 0.06),
    |u, v, seed| smooth(value_noise(seed, 1.5 * u, 1.5 * v)),
];

/// A surface: a gradient with a pattern mixed in.
struct Surface {
    from: Colour,
    to: Colour,
    pattern: fn(f32, f32, u64) -> f32,
    ink: Colour,
    strength: f32,
    scale: f32,
}

impl Surface {
    fn random(rng: &mut Rng, max_saturation: f32) -> Surface {
        let from = muted(rng, max_saturation);
        let shade = rng.range(0.7, 1.15);
        Surface {
            from,
            to: from.map(|c| (c * shade).min(255.0)),
            pattern: PATTERNS[rng.below(5) as usize],
            ink: muted(rng, max_saturation),
            strength: rng.range(0.25, 0.6),
            scale: rng.range(0.6, 1.6),
        }
    }

    /// `t` runs along the gradient; (u, v) are pattern coordinates; `fade` scales the pattern.
    fn colour(&self, t: f32, u: f32, v: f32, fade: f32, seed: u64) -> Colour {
        let weight = (self.pattern)(u * self.scale, v * self.scale, seed);
        let base = mix(self.from, self.to, t);
        mix(base, self.ink, weight * self.strength * fade)
    }
}

/// Where and how the robot stands, in pixels.
struct Pose {
    feet: (f32, f32),
    height: f32,
    /// Radians, clockwise.
    angle: f32,
    flip: bool,
}

struct Scene {
    size: f32,
    horizon: f32,
    wall: Surface,
    floor: Surface,
    clutter: Vec<Part>,
    /// `None` leaves the robot (and its shadow) out, for tests.
    toy: Option<Pose>,
    seed: u64,
}

impl Scene {
    fn random(rng: &mut Rng, size: u32) -> Scene {
        let s = size as f32;
        let horizon = rng.range(0.4, 0.65) * s;
        let wall = Surface::random(rng, 0.45);
        let floor = Surface::random(rng, 0.45);
        let feet_y = rng.range(horizon + 0.12 * s, 0.94 * s);
        let height = (rng.range(0.38, 0.78) * s).min(feet_y - 0.04 * s);
        let margin = 0.38 * height + 0.02 * s;
        let feet = (rng.range(margin, s - margin), feet_y);
        let (angle, flip) = (rng.range(-0.2, 0.2), rng.below(2) == 1);
        let mut clutter = Vec::new();
        for _ in 0..2 + rng.below(4) {
            add_clutter(rng, s, horizon, &mut clutter);
        }
        Scene {
            size: s,
            horizon,
            wall,
            floor,
            clutter,
            toy: Some(Pose {
                feet,
                height,
                angle,
                flip,
            }),
            seed: rng.next_u64(),
        }
    }

    fn colour_at(&self, x: f32, y: f32) -> Colour {
        let s = self.size;
        let mut colour = if y < self.horizon {
            let (u, v) = (x / (0.1 * s), y / (0.1 * s));
            self.wall.colour(y / self.horizon, u, v, 1.0, self.seed)
        } else {
            // Perspective floor: pattern cells shrink towards the horizon, where they fade out.
            let d = (y - self.horizon).max(0.5);
            let fade = (d / (0.15 * s)).min(1.0);
            let (u, v) = (2.0 * (x - 0.5 * s) / d, 0.6 * s / d);
            self.floor
                .colour(d / (s - self.horizon), u, v, fade, self.seed)
        };
        if (y - self.horizon).abs() < 0.006 * s {
            colour = colour.map(|c| c * 0.6);
        }
        if let Some(Pose { feet, height, .. }) = self.toy {
            let shadow =
                ((x - feet.0) / (0.32 * height)).powi(2) + ((y - feet.1) / (0.05 * height)).powi(2);
            if shadow < 1.0 {
                colour = colour.map(|c| c * (0.55 + 0.45 * shadow));
            }
        }
        for Part(shape, c) in &self.clutter {
            if shape.contains(x, y) {
                colour = *c;
            }
        }
        let Some(Pose {
            feet,
            height,
            angle,
            flip,
        }) = self.toy
        else {
            return colour;
        };
        // Into the robot's frame: about its feet, unrotated, in units of its height.
        let (dx, dy, (sin, cos)) = (x - feet.0, y - feet.1, angle.sin_cos());
        let u = (dx * cos + dy * sin) / height;
        let v = (-dx * sin + dy * cos) / height;
        let lit = 1.1 - 0.2 * (u + 0.5);
        let u = if flip { -u } else { u };
        for Part(shape, c) in &ROBOT {
            if shape.contains(u, v) {
                colour = c.map(|c| (c * lit).min(255.0));
            }
        }
        colour
    }
}

/// Balls, boxes and cones on the floor, framed pictures on the wall.
fn add_clutter(rng: &mut Rng, s: f32, horizon: f32, parts: &mut Vec<Part>) {
    let colour = muted(rng, 0.75);
    let x = rng.range(0.0, s);
    let base = rng.range(horizon + 0.02 * s, s);
    // Nearer objects (lower in the frame) look larger.
    let near = 0.5 + 0.5 * (base - horizon) / (s - horizon);
    let r = rng.range(0.04, 0.13) * s * near;
    match rng.below(4) {
        0 => parts.push(disc(x, base - r, r, colour)),
        1 => {
            let (hw, hh) = (r * rng.range(0.8, 1.6), r * rng.range(0.6, 1.3));
            parts.push(rect(x, base - hh, hw, hh, colour));
        }
        2 => parts.push(Part(
            Shape::Triangle([(x - r, base), (x + r, base), (x, base - 2.5 * r)]),
            colour,
        )),
        _ => {
            let (cy, hw, hh) = (rng.range(0.1, 0.7) * horizon, r * 1.4, r);
            parts.push(rect(x, cy, hw, hh, DARK));
            parts.push(rect(x, cy, 0.85 * hw, 0.8 * hh, colour));
        }
    }
}

/// A background colour: greys, or hues from yellow-green round to pink, never orange or red,
/// so that the robot's orange identifies it.
fn muted(rng: &mut Rng, max_saturation: f32) -> Colour {
    let value = rng.range(0.4, 0.95);
    if rng.below(5) == 0 {
        return hsv(0.0, rng.range(0.0, 0.06), value);
    }
    hsv(
        rng.range(75.0, 320.0),
        rng.range(0.1, max_saturation),
        value,
    )
}

fn hsv(hue: f32, saturation: f32, value: f32) -> Colour {
    let channel = |n: f32| {
        let k = (n + hue / 60.0) % 6.0;
        255.0 * value * (1.0 - saturation * k.min(4.0 - k).clamp(0.0, 1.0))
    };
    [channel(5.0), channel(3.0), channel(1.0)]
}

fn mix(a: Colour, b: Colour, t: f32) -> Colour {
    [0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * t)
}

fn smooth(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

/// Lattice value noise in [0, 1] for blotchy textures.
fn value_noise(seed: u64, u: f32, v: f32) -> f32 {
    let lattice = |ix: i64, iy: i64| {
        let key = (ix as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (iy as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        Rng(seed ^ key).unit()
    };
    let (x0, y0) = (u.floor(), v.floor());
    let (tx, ty) = (smooth(u - x0), smooth(v - y0));
    let (ix, iy) = (x0 as i64, y0 as i64);
    let top = lattice(ix, iy) + (lattice(ix + 1, iy) - lattice(ix, iy)) * tx;
    let bottom = lattice(ix, iy + 1) + (lattice(ix + 1, iy + 1) - lattice(ix, iy + 1)) * tx;
    top + (bottom - top) * ty
}

/// Draws one photo; `toy: false` leaves the robot (and its shadow) out of the same scene.
fn render(rng: &mut Rng, size: u32, toy: bool) -> RgbImage {
    let mut scene = Scene::random(rng, size);
    if !toy {
        scene.toy = None;
    }
    // Lighting, as a camera would see it: exposure, contrast, white balance, vignetting.
    let brightness = rng.range(0.8, 1.2);
    let contrast = rng.range(0.85, 1.15);
    let warmth = rng.range(-0.06, 0.06);
    let tint = [1.0 + warmth, 1.0, 1.0 - warmth];
    let vignette = rng.range(0.0, 0.25);
    let noise = rng.range(2.0, 7.0);
    let grid = if size <= 128 { 3 } else { 2 };
    let offset = |k: u32| (k as f32 + 0.5) / grid as f32;
    let half = size as f32 / 2.0;
    let mut image = RgbImage::new(size, size);
    for (x, y, pixel) in image.enumerate_pixels_mut() {
        let mut sum = [0.0; 3];
        for sy in 0..grid {
            for sx in 0..grid {
                let c = scene.colour_at(x as f32 + offset(sx), y as f32 + offset(sy));
                sum = [0, 1, 2].map(|i| sum[i] + c[i]);
            }
        }
        let r2 = ((x as f32 - half).powi(2) + (y as f32 - half).powi(2)) / (2.0 * half * half);
        let light = brightness * (1.0 - vignette * r2);
        let grain = noise * (rng.unit() + rng.unit() - 1.0);
        let n = (grid * grid) as f32;
        *pixel = Rgb([0, 1, 2].map(|i| {
            let c = ((sum[i] / n - 128.0) * contrast + 128.0) * light * tint[i] + grain;
            c.round().clamp(0.0, 255.0) as u8
        }));
    }
    image
}

/// Writes `count` photos of the toy robot, `size`×`size`, as `zwxtoy (1).jpg`, `zwxtoy (2).jpg`,
/// ... (every fourth as PNG, to exercise both decoders), and returns their paths in order.
/// The same `seed` gives byte-identical files.
pub fn write_demo_photos(
    dir: &Path,
    count: usize,
    seed: u64,
    size: u32,
) -> io::Result<Vec<PathBuf>> {
    if size < 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("photo size {size} is below 32 pixels"),
        ));
    }
    fs::create_dir_all(dir)?;
    let mut paths = Vec::with_capacity(count);
    for index in 1..=count {
        // Each photo has its own stream, so photo k does not depend on `count`.
        let mut rng = Rng(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let image = render(&mut rng, size, true);
        let png = index % 4 == 0;
        let path = dir.join(format!(
            "{DEMO_TOKEN} ({index}).{}",
            if png { "png" } else { "jpg" }
        ));
        if png {
            image
                .save_with_format(&path, ImageFormat::Png)
                .map_err(io::Error::other)?;
        } else {
            let mut file = BufWriter::new(File::create(&path)?);
            JpegEncoder::new_with_quality(&mut file, 90)
                .encode_image(&image)
                .map_err(io::Error::other)?;
            io::Write::flush(&mut file)?;
        }
        paths.push(path);
    }
    Ok(paths)
}

/// The demo session as a bare-spec YAML file: the photos above, the tiny model, 64 pixels,
/// a few steps of each phase, one intermediate checkpoint and samples, so it runs in a
/// minute or two on a CPU.
pub fn demo_session_yaml(photos_uri: &str, output_uri: &str, model_uri: &str) -> String {
    // JSON strings are valid YAML double-quoted scalars, so any URI is quoted safely.
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "# The `make demo` session: generated photos of a toy robot, a tiny model, a CPU.
baseModel:
  uri: {model}
dataset:
  uri: {photos}
  token: {DEMO_TOKEN}
  captions: filename
  resolution: 64
training:
  unet:
    steps: 40
    learningRate: 0.0001
  textEncoder:
    steps: 10
    learningRate: 0.00005
  offsetNoise: 0.05
  seed: 7
checkpoints:
  every: 20
  formats: [safetensors]
samples:
  prompts:
    - photo of {DEMO_TOKEN}
    - {DEMO_TOKEN} on a beach
  steps: 10
  sampler: ddim
  width: 64
  height: 64
output:
  uri: {output}
",
        model = quote(model_uri),
        photos = quote(photos_uri),
        output = quote(output_uri),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops;

    /// The share of pixels in the robot's orange: its hue, saturated and not dark.
    fn orange_share(image: &RgbImage) -> f32 {
        let orange = image
            .pixels()
            .filter(|Rgb([r, g, b])| {
                let (r, g, b) = (f32::from(*r), f32::from(*g), f32::from(*b));
                let (max, min) = (r.max(g).max(b), r.min(g).min(b));
                let hue = 60.0 * (g - b) / (max - min).max(1.0);
                max == r && (10.0..40.0).contains(&hue) && max > 90.0 && (max - min) / max > 0.55
            })
            .count();
        orange as f32 / (image.width() * image.height()) as f32
    }

    #[test]
    fn writes_named_photos_of_the_given_size_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_demo_photos(dir.path(), 9, 1, 96).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names[0], "zwxtoy (1).jpg");
        assert_eq!(names[3], "zwxtoy (4).png");
        assert_eq!(names[8], "zwxtoy (9).jpg");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 9);
        for path in &paths {
            let reader = image::ImageReader::open(path)
                .unwrap()
                .with_guessed_format()
                .unwrap();
            let expected = if path.extension().unwrap() == "png" {
                ImageFormat::Png
            } else {
                ImageFormat::Jpeg
            };
            assert_eq!(reader.format(), Some(expected), "{}", path.display());
            assert_eq!(reader.decode().unwrap().to_rgb8().dimensions(), (96, 96));
        }
        assert!(write_demo_photos(dir.path(), 1, 1, 16).is_err());
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_photos() {
        let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
        let first = write_demo_photos(dirs[0].path(), 4, 11, 64).unwrap();
        let again = write_demo_photos(dirs[1].path(), 4, 11, 64).unwrap();
        let other = write_demo_photos(dirs[2].path(), 4, 12, 64).unwrap();
        for i in 0..4 {
            let bytes = fs::read(&first[i]).unwrap();
            assert_eq!(bytes, fs::read(&again[i]).unwrap(), "photo {i}");
            assert_ne!(bytes, fs::read(&other[i]).unwrap(), "photo {i}");
        }
        // Photos within one set differ from each other too.
        assert_ne!(fs::read(&first[0]).unwrap(), fs::read(&first[1]).unwrap());
    }

    #[test]
    fn every_photo_shows_the_robot_and_only_the_robot_is_orange() {
        let dir = tempfile::tempdir().unwrap();
        for path in write_demo_photos(dir.path(), 12, 3, 128).unwrap() {
            let image = image::open(&path).unwrap().to_rgb8();
            let share = orange_share(&image);
            assert!(share > 0.02, "{}: {share}", path.display());
        }
        // The same scenes without the robot have (almost) no orange at all.
        for seed in 0..12 {
            let share = orange_share(&render(&mut Rng(seed), 128, false));
            assert!(share < 0.002, "seed {seed}: {share}");
        }
    }

    #[test]
    fn backgrounds_vary_between_photos() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_demo_photos(dir.path(), 8, 5, 64).unwrap();
        let mut corners: Vec<[u8; 3]> = paths
            .iter()
            .map(|path| {
                let image = image::open(path).unwrap().to_rgb8();
                // The mean of the top-left 4×4 block, quantised so that noise does not count.
                let block = imageops::crop_imm(&image, 0, 0, 4, 4).to_image();
                imageops::thumbnail(&block, 1, 1)
                    .get_pixel(0, 0)
                    .0
                    .map(|c| c / 24)
            })
            .collect();
        corners.sort();
        corners.dedup();
        assert!(corners.len() >= 6, "{corners:?}");
    }

    #[test]
    fn demo_session_validates() {
        let yaml = demo_session_yaml(
            "file:///tmp/demo/photos",
            "file:///tmp/demo/out",
            "file:///tmp/demo/tiny model",
        );
        let session = dreambooth_api::Session::parse(&yaml, false, "demo.yaml", "demo").unwrap();
        let report = dreambooth_api::validate(&session.name, &session.spec);
        assert!(report.is_valid(), "{:?}", report.problems);
        let spec = &session.spec;
        assert_eq!(
            spec.base_model.uri.as_deref(),
            Some("file:///tmp/demo/tiny model")
        );
        assert_eq!(spec.dataset.token.as_deref(), Some(DEMO_TOKEN));
        assert_eq!(spec.dataset.resolution, 64);
        assert_eq!(spec.training.unet.learning_rate, Some(1e-4));
        assert_eq!(spec.training.text_encoder.learning_rate, Some(5e-5));
        assert_eq!(spec.checkpoints.every, Some(20));
        assert_eq!(
            spec.samples.prompts,
            ["photo of zwxtoy", "zwxtoy on a beach"]
        );
        assert_eq!(spec.output.uri, "file:///tmp/demo/out");
        let resolved = dreambooth_api::resolve(&spec.training, None).unwrap();
        assert_eq!((resolved.unet_steps, resolved.text_encoder_steps), (40, 10));
    }
}
