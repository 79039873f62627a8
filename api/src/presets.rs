//! Presets and `steps: auto`: the fast-DreamBooth guide's tables, written down once.
//!
//! A preset only fills what the user left unset. `auto` step counts depend on the
//! number of instance images, which only the trainer knows, so resolution happens
//! once the dataset has been read.

use crate::spec::{Preset, Steps, Training};

/// fast-DreamBooth's defaults, used by the `custom` preset.
pub const DEFAULT_UNET_STEPS: u32 = 1500;
pub const DEFAULT_UNET_LR: f64 = 2e-6;
pub const DEFAULT_TEXT_ENCODER_STEPS: u32 = 350;
pub const DEFAULT_TEXT_ENCODER_LR: f64 = 1e-6;
/// Offset noise of the `style` preset.
pub const STYLE_OFFSET_NOISE: f64 = 0.1;

/// The guide's UNet step ranges by image count: (fewest images of the row, low, high).
/// Rows are 5–9, 10–14, 15–19 and 20 or more photos.
fn unet_step_table(preset: Preset) -> Option<[(usize, u32, u32); 4]> {
    match preset {
        Preset::Face => Some([
            (5, 1200, 1500),
            (10, 1500, 1800),
            (15, 1800, 2200),
            (20, 2000, 2500),
        ]),
        Preset::Style => Some([
            (5, 2000, 2500),
            (10, 2500, 3000),
            (15, 3000, 3500),
            (20, 3500, 4000),
        ]),
        Preset::Object => Some([
            (5, 1000, 1200),
            (10, 1200, 1500),
            (15, 1500, 1800),
            (20, 1800, 2200),
        ]),
        Preset::Custom => None,
    }
}

/// The guide's "optimum" text-encoder steps per preset.
fn text_encoder_step_range(preset: Preset) -> Option<(u32, u32)> {
    match preset {
        Preset::Face => Some((300, 400)),
        Preset::Style => Some((400, 600)),
        Preset::Object => Some((250, 350)),
        Preset::Custom => None,
    }
}

/// UNet steps for `auto`: the middle of the table row for this many images, rounded to 50.
/// Fewer than 5 images use the first row, more than 30 the last.
pub fn auto_unet_steps(preset: Preset, images: usize) -> Option<u32> {
    let table = unet_step_table(preset)?;
    let row = table
        .iter()
        .rev()
        .find(|(min, _, _)| images >= *min)
        .unwrap_or(&table[0]);
    Some(round_to((row.1 + row.2) / 2, 50))
}

/// Text-encoder steps for `auto`: a quarter of the UNet steps (the guide's 20–30 %),
/// kept inside the preset's optimum range, rounded to 10.
pub fn auto_text_encoder_steps(preset: Preset, unet_steps: u32) -> Option<u32> {
    let (low, high) = text_encoder_step_range(preset)?;
    Some(round_to(unet_steps / 4, 10).clamp(low, high))
}

fn round_to(value: u32, multiple: u32) -> u32 {
    (value + multiple / 2) / multiple * multiple
}

/// Training settings with every preset-dependent value decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResolvedTraining {
    pub unet_steps: u32,
    pub unet_learning_rate: f64,
    pub text_encoder_steps: u32,
    pub text_encoder_learning_rate: f64,
    pub offset_noise: f64,
}

impl ResolvedTraining {
    pub fn total_steps(&self) -> u32 {
        self.unet_steps + self.text_encoder_steps
    }
}

/// Why `auto` could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("spec.training.{phase}.steps: `auto` needs a preset (face, style or object)")]
    AutoWithoutPreset { phase: &'static str },
    #[error("spec.training.{phase}.steps: `auto` needs the number of instance images")]
    AutoWithoutImageCount { phase: &'static str },
}

/// Fills unset values from the preset. `images` is the instance image count, needed
/// only when a step count is `auto` (or unset under a non-custom preset).
pub fn resolve(
    training: &Training,
    images: Option<usize>,
) -> Result<ResolvedTraining, ResolveError> {
    let preset = training.preset;
    let unet_steps = match effective_steps(preset, training.unet.steps, DEFAULT_UNET_STEPS) {
        Steps::Count(n) => n,
        Steps::Auto(_) => {
            if preset == Preset::Custom {
                return Err(ResolveError::AutoWithoutPreset { phase: "unet" });
            }
            let count = images.ok_or(ResolveError::AutoWithoutImageCount { phase: "unet" })?;
            auto_unet_steps(preset, count).expect("every preset but custom has a table")
        }
    };
    let text_encoder_steps = match effective_steps(
        preset,
        training.text_encoder.steps,
        DEFAULT_TEXT_ENCODER_STEPS,
    ) {
        Steps::Count(n) => n,
        Steps::Auto(_) => {
            // The text-encoder table is relative to the UNet steps, so a fixed
            // UNet count still lets it resolve without the image count.
            auto_text_encoder_steps(preset, unet_steps).ok_or(ResolveError::AutoWithoutPreset {
                phase: "textEncoder",
            })?
        }
    };
    let offset_noise = training.offset_noise.unwrap_or(match preset {
        Preset::Style => STYLE_OFFSET_NOISE,
        _ => 0.0,
    });
    Ok(ResolvedTraining {
        unet_steps,
        unet_learning_rate: training.unet.learning_rate.unwrap_or(DEFAULT_UNET_LR),
        text_encoder_steps,
        text_encoder_learning_rate: training
            .text_encoder
            .learning_rate
            .unwrap_or(DEFAULT_TEXT_ENCODER_LR),
        offset_noise,
    })
}

/// An unset step count is `auto` under a preset and the fast-DreamBooth default otherwise.
fn effective_steps(preset: Preset, steps: Option<Steps>, default: u32) -> Steps {
    match (steps, preset) {
        (Some(steps), _) => steps,
        (None, Preset::Custom) => Steps::Count(default),
        (None, _) => Steps::AUTO,
    }
}

/// Whether the total step count is known before the images are counted.
pub fn steps_known_without_images(training: &Training) -> bool {
    resolve(training, None).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PhaseSpec;

    fn training(preset: Preset, unet: Option<Steps>, text_encoder: Option<Steps>) -> Training {
        Training {
            preset,
            unet: PhaseSpec {
                steps: unet,
                learning_rate: None,
            },
            text_encoder: PhaseSpec {
                steps: text_encoder,
                learning_rate: None,
            },
            ..Training::default()
        }
    }

    #[test]
    fn auto_unet_steps_follow_the_guide_table() {
        let cases = [
            (Preset::Face, 3, 1350),
            (Preset::Face, 5, 1350),
            (Preset::Face, 9, 1350),
            (Preset::Face, 10, 1650),
            (Preset::Face, 15, 2000),
            (Preset::Face, 20, 2250),
            (Preset::Face, 40, 2250),
            (Preset::Style, 7, 2250),
            (Preset::Style, 12, 2750),
            (Preset::Style, 17, 3250),
            (Preset::Style, 25, 3750),
            (Preset::Object, 7, 1100),
            (Preset::Object, 12, 1350),
            (Preset::Object, 17, 1650),
            (Preset::Object, 25, 2000),
        ];
        for (preset, images, expected) in cases {
            assert_eq!(
                auto_unet_steps(preset, images),
                Some(expected),
                "{preset:?} with {images} images"
            );
        }
        assert_eq!(auto_unet_steps(Preset::Custom, 10), None);
    }

    #[test]
    fn auto_steps_stay_inside_every_table_row() {
        for preset in [Preset::Face, Preset::Style, Preset::Object] {
            for (min, low, high) in unet_step_table(preset).unwrap() {
                let steps = auto_unet_steps(preset, min).unwrap();
                assert!((low..=high).contains(&steps), "{preset:?} {min}: {steps}");
            }
        }
    }

    #[test]
    fn auto_text_encoder_steps_are_a_quarter_within_the_preset_range() {
        assert_eq!(auto_text_encoder_steps(Preset::Face, 1350), Some(340));
        assert_eq!(auto_text_encoder_steps(Preset::Face, 2250), Some(400));
        assert_eq!(auto_text_encoder_steps(Preset::Face, 800), Some(300));
        assert_eq!(auto_text_encoder_steps(Preset::Style, 2250), Some(560));
        assert_eq!(auto_text_encoder_steps(Preset::Style, 3750), Some(600));
        assert_eq!(auto_text_encoder_steps(Preset::Object, 1100), Some(280));
        assert_eq!(auto_text_encoder_steps(Preset::Custom, 1500), None);
    }

    #[test]
    fn custom_preset_uses_fast_dreambooth_defaults() {
        let resolved = resolve(&Training::default(), None).unwrap();
        assert_eq!(resolved.unet_steps, 1500);
        assert_eq!(resolved.unet_learning_rate, 2e-6);
        assert_eq!(resolved.text_encoder_steps, 350);
        assert_eq!(resolved.text_encoder_learning_rate, 1e-6);
        assert_eq!(resolved.offset_noise, 0.0);
    }

    #[test]
    fn presets_fill_only_unset_fields() {
        let mut style = training(Preset::Style, None, Some(Steps::Count(123)));
        let resolved = resolve(&style, Some(12)).unwrap();
        assert_eq!(resolved.unet_steps, 2750);
        assert_eq!(resolved.text_encoder_steps, 123);
        assert_eq!(resolved.offset_noise, STYLE_OFFSET_NOISE);
        style.offset_noise = Some(0.0);
        style.unet.steps = Some(Steps::Count(999));
        let resolved = resolve(&style, Some(12)).unwrap();
        assert_eq!(resolved.unet_steps, 999);
        assert_eq!(resolved.offset_noise, 0.0);
    }

    #[test]
    fn auto_needs_a_preset_and_the_image_count() {
        let custom_auto = training(Preset::Custom, Some(Steps::AUTO), None);
        assert_eq!(
            resolve(&custom_auto, Some(10)),
            Err(ResolveError::AutoWithoutPreset { phase: "unet" })
        );
        let face = training(Preset::Face, None, None);
        assert_eq!(
            resolve(&face, None),
            Err(ResolveError::AutoWithoutImageCount { phase: "unet" })
        );
        assert!(!steps_known_without_images(&face));
        let face_fixed_unet = training(Preset::Face, Some(Steps::Count(1600)), None);
        assert_eq!(
            resolve(&face_fixed_unet, None).unwrap().text_encoder_steps,
            400
        );
    }
}
