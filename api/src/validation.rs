//! Validation of a session: every problem at once, each naming the field path and the rule.
//!
//! Errors stop a session before it starts; warnings are printed (and become events in a
//! cluster) but let it run.

use std::fmt;

use crate::presets::{self, ResolveError};
use crate::spec::{
    Captions, GradientCheckpointing, MemoryMode, MixedPrecision, SessionSpec, Steps, Training,
};

/// Tokens that are ordinary words: training one would overwrite what the model knows.
const DENIED_TOKENS: &[&str] = &[
    "person", "people", "man", "woman", "men", "women", "boy", "girl", "child", "baby", "dog",
    "cat", "photo", "picture", "image", "style", "art", "painting", "face", "portrait", "car",
    "house", "the", "and", "sks",
];

/// Common first names: allowed (a user may want exactly that), but they collide with
/// what the base model already knows, so they get a warning.
const FIRST_NAMES: &[&str] = &[
    "anna", "alex", "john", "mary", "james", "david", "maria", "michael", "sarah", "emma", "olga",
    "ivan", "elena", "peter", "paul", "laura", "lisa", "mark", "tom", "kate",
];

/// URI schemes each kind of location accepts.
const MODEL_SCHEMES: &[&str] = &["s3", "https", "hf", "file"];
const DATA_SCHEMES: &[&str] = &["s3", "file"];

pub const MAX_SAMPLE_PROMPTS: usize = 16;
pub const MAX_LEARNING_RATE: f64 = 1e-3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding: `spec.dataset.resolution: 700 is not a multiple of 64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything validation found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }

    pub fn is_valid(&self) -> bool {
        self.errors().next().is_none()
    }

    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.push(Severity::Error, path, message.into());
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.push(Severity::Warning, path, message.into());
    }

    fn push(&mut self, severity: Severity, path: &str, message: String) {
        self.problems.push(Problem {
            severity,
            path: format!("spec.{path}"),
            message,
        });
    }
}

/// Checks a session's name and spec against every rule.
pub fn validate(name: &str, spec: &SessionSpec) -> Report {
    let mut report = Report::default();
    check_name(&mut report, name);
    check_base_model(&mut report, spec);
    check_dataset(&mut report, spec);
    check_training(&mut report, spec);
    check_checkpoints(&mut report, spec);
    check_samples(&mut report, spec);
    check_uri(
        &mut report,
        "output.uri",
        &spec.output.uri,
        DATA_SCHEMES,
        true,
    );
    report
}

/// A Kubernetes object name (DNS-1123 label), short enough for `<name>-<attempt>` Jobs.
fn check_name(report: &mut Report, name: &str) {
    let valid = !name.is_empty()
        && name.len() <= 52
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !valid {
        // The name lives in metadata, not spec, so it gets its own path.
        report.problems.push(Problem {
            severity: Severity::Error,
            path: "metadata.name".into(),
            message: format!(
                "`{name}` must be 1 to 52 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"
            ),
        });
    }
}

fn check_base_model(report: &mut Report, spec: &SessionSpec) {
    let model = &spec.base_model;
    if let Some(uri) = &model.uri {
        check_uri(report, "baseModel.uri", uri, MODEL_SCHEMES, true);
    }
    if let Some(sha) = &model.sha256
        && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        report.error(
            "baseModel.sha256",
            format!("`{sha}` is not 64 hexadecimal characters"),
        );
    }
}

fn check_dataset(report: &mut Report, spec: &SessionSpec) {
    let dataset = &spec.dataset;
    check_uri(report, "dataset.uri", &dataset.uri, DATA_SCHEMES, true);
    if let Some(token) = &dataset.token {
        check_token(report, token);
    }
    match dataset.captions {
        Captions::Prompt => match &dataset.instance_prompt {
            None => report.error(
                "dataset.instancePrompt",
                "required when captions is `prompt`",
            ),
            Some(prompt) if dataset.token.is_some() && !prompt.contains("{token}") => report.error(
                "dataset.instancePrompt",
                format!("`{prompt}` does not contain `{{token}}`"),
            ),
            Some(_) => {}
        },
        Captions::Filename | Captions::External => {
            if dataset.instance_prompt.is_some() {
                report.warn(
                    "dataset.instancePrompt",
                    "ignored unless captions is `prompt`",
                );
            }
        }
    }
    let resolution = dataset.resolution;
    if !resolution.is_multiple_of(64) {
        report.error(
            "dataset.resolution",
            format!("{resolution} is not a multiple of 64"),
        );
    } else if !(64..=2048).contains(&resolution) {
        report.error(
            "dataset.resolution",
            format!("{resolution} is outside 64 to 2048"),
        );
    } else if !(256..=1024).contains(&resolution) {
        report.warn(
            "dataset.resolution",
            format!(
                "{resolution} is outside 256 to 1024, where Stable Diffusion 1 and 2 work well"
            ),
        );
    }
    if let Some(prior) = &dataset.prior_preservation {
        if prior.class_prompt.trim().is_empty() {
            report.error("dataset.priorPreservation.classPrompt", "must not be empty");
        }
        if let Some(uri) = &prior.class_images_uri {
            check_uri(
                report,
                "dataset.priorPreservation.classImagesUri",
                uri,
                DATA_SCHEMES,
                true,
            );
        }
        if !(1..=10_000).contains(&prior.num_class_images) {
            report.error(
                "dataset.priorPreservation.numClassImages",
                format!("{} is outside 1 to 10000", prior.num_class_images),
            );
        }
        if !(prior.loss_weight > 0.0 && prior.loss_weight <= 10.0) {
            report.error(
                "dataset.priorPreservation.lossWeight",
                format!("{} is outside (0, 10]", prior.loss_weight),
            );
        }
    }
}

fn check_token(report: &mut Report, token: &str) {
    let charset_ok = token
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !(3..=24).contains(&token.len()) || !charset_ok {
        report.error(
            "dataset.token",
            format!("`{token}` must be 3 to 24 characters of a-z and 0-9"),
        );
    } else if DENIED_TOKENS.contains(&token) {
        report.error(
            "dataset.token",
            format!("`{token}` is an ordinary word the model already knows; pick a rare token like `sksper`"),
        );
    } else if FIRST_NAMES.contains(&token) {
        report.warn(
            "dataset.token",
            format!("`{token}` is a common first name; the base model's idea of it will mix in"),
        );
    }
}

fn check_training(report: &mut Report, spec: &SessionSpec) {
    let training = &spec.training;
    for (path, lr) in [
        ("training.unet.learningRate", training.unet.learning_rate),
        (
            "training.textEncoder.learningRate",
            training.text_encoder.learning_rate,
        ),
    ] {
        if let Some(lr) = lr
            && !(lr > 0.0 && lr <= MAX_LEARNING_RATE)
        {
            report.error(path, format!("{lr:e} is outside (0, 1e-3]"));
        }
    }
    match presets::resolve(training, None) {
        Ok(resolved) => {
            if resolved.total_steps() == 0 {
                report.error(
                    "training",
                    "unet.steps and textEncoder.steps are both 0: nothing to train",
                );
            }
            if resolved.text_encoder_learning_rate > resolved.unet_learning_rate {
                report.warn(
                    "training.textEncoder.learningRate",
                    format!(
                        "{:e} is above the UNet's {:e}; the text encoder overfits quickly, keep it lower",
                        resolved.text_encoder_learning_rate, resolved.unet_learning_rate
                    ),
                );
            }
            let start_from = spec.checkpoints.start_from;
            if start_from > resolved.total_steps() {
                report.error(
                    "checkpoints.startFrom",
                    format!(
                        "{start_from} is beyond the session's {} steps",
                        resolved.total_steps()
                    ),
                );
            }
            let warmup = training.lr_warmup_steps;
            if warmup > resolved.unet_steps.max(resolved.text_encoder_steps) {
                report.error(
                    "training.lrWarmupSteps",
                    format!("{warmup} is longer than either phase"),
                );
            }
        }
        Err(ResolveError::AutoWithoutPreset { phase }) => {
            report.error(
                &format!("training.{phase}.steps"),
                "`auto` needs a preset (face, style or object)",
            );
        }
        // Counted once the images are read; the table never yields 0 steps.
        Err(ResolveError::AutoWithoutImageCount { .. }) => {}
    }
    if let Some(Steps::Count(0)) = training.unet.steps
        && training.text_encoder.steps == Some(Steps::AUTO)
    {
        report.error(
            "training.textEncoder.steps",
            "`auto` is relative to the UNet steps, which are 0",
        );
    }
    if !(1..=64).contains(&training.batch_size) {
        report.error(
            "training.batchSize",
            format!("{} is outside 1 to 64", training.batch_size),
        );
    }
    if let Some(offset) = training.offset_noise
        && !(0.0..=1.0).contains(&offset)
    {
        report.error(
            "training.offsetNoise",
            format!("{offset} is outside 0 to 1"),
        );
    }
    if let Some(gamma) = training.min_snr_gamma
        && !(gamma > 0.0 && gamma <= 100.0)
    {
        report.error(
            "training.minSnrGamma",
            format!("{gamma} is outside (0, 100]"),
        );
    }
    check_memory(report, training);
}

/// `lowMemory` keeps the weights in bf16 and relies on checkpointing for its saving.
fn check_memory(report: &mut Report, training: &Training) {
    if training.memory != MemoryMode::LowMemory {
        return;
    }
    if training.mixed_precision == MixedPrecision::Fp16 {
        report.error(
            "training.mixedPrecision",
            "`fp16` does not combine with `memory: lowMemory`, whose weights are bf16; \
             use `bf16`",
        );
    }
    if training.gradient_checkpointing == GradientCheckpointing::Forced(false) {
        report.error(
            "training.gradientCheckpointing",
            "`false` contradicts `memory: lowMemory`, which turns checkpointing on; \
             use `auto` or `true`",
        );
    }
}

fn check_checkpoints(report: &mut Report, spec: &SessionSpec) {
    let checkpoints = &spec.checkpoints;
    if checkpoints.every == Some(0) {
        report.error(
            "checkpoints.every",
            "must be at least 1 (leave it out to turn checkpoints off)",
        );
    }
    if checkpoints.formats.is_empty() {
        report.error("checkpoints.formats", "must name at least one format");
    }
    if checkpoints.keep_last_states == 0 {
        report.error(
            "checkpoints.keepLastStates",
            "must be at least 1 so the session can resume",
        );
    }
}

fn check_samples(report: &mut Report, spec: &SessionSpec) {
    let samples = &spec.samples;
    if samples.prompts.len() > MAX_SAMPLE_PROMPTS {
        report.error(
            "samples.prompts",
            format!(
                "{} prompts, at most {MAX_SAMPLE_PROMPTS} allowed",
                samples.prompts.len()
            ),
        );
    }
    for (index, prompt) in samples.prompts.iter().enumerate() {
        if prompt.trim().is_empty() {
            report.error(&format!("samples.prompts[{index}]"), "must not be empty");
        }
    }
    if !(1..=1000).contains(&samples.steps) {
        report.error(
            "samples.steps",
            format!("{} is outside 1 to 1000", samples.steps),
        );
    }
    if !(samples.guidance_scale >= 0.0 && samples.guidance_scale <= 50.0) {
        report.error(
            "samples.guidanceScale",
            format!("{} is outside 0 to 50", samples.guidance_scale),
        );
    }
    for (path, size) in [
        ("samples.width", samples.width),
        ("samples.height", samples.height),
    ] {
        if let Some(size) = size
            && (size % 8 != 0 || !(64..=2048).contains(&size))
        {
            report.error(
                path,
                format!("{size} must be a multiple of 8 from 64 to 2048"),
            );
        }
    }
}

fn check_uri(report: &mut Report, path: &str, uri: &str, schemes: &[&str], required: bool) {
    if uri.is_empty() {
        if required {
            report.error(path, "required");
        }
        return;
    }
    match uri.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) => {
            if rest.is_empty() || (scheme != "file" && rest.starts_with('/')) {
                report.error(path, format!("`{uri}` has nothing after `{scheme}://`"));
            }
        }
        Some((scheme, _)) => report.error(
            path,
            format!(
                "scheme `{scheme}` is not supported here; use one of {}",
                scheme_list(schemes)
            ),
        ),
        None => report.error(
            path,
            format!("`{uri}` is not a URI; use one of {}", scheme_list(schemes)),
        ),
    }
}

fn scheme_list(schemes: &[&str]) -> String {
    schemes
        .iter()
        .map(|s| format!("{s}://"))
        .collect::<Vec<_>>()
        .join(", ")
}
