//! Every validation rule, with one case that passes it and one that breaks it.

use dreambooth_api::spec::*;
use dreambooth_api::validation::{Severity, validate};

/// A valid session every case starts from.
fn base() -> SessionSpec {
    let mut spec = SessionSpec::default();
    spec.dataset.uri = "file:///data/anna".into();
    spec.dataset.token = Some("sksper".into());
    spec.output.uri = "s3://models/anna".into();
    spec
}

/// The problems at `path` with the given severity, as display strings.
fn findings(name: &str, spec: &SessionSpec, path: &str, severity: Severity) -> Vec<String> {
    validate(name, spec)
        .problems
        .into_iter()
        .filter(|p| p.path == path && p.severity == severity)
        .map(|p| p.to_string())
        .collect()
}

fn errors_at(spec: &SessionSpec, path: &str) -> Vec<String> {
    findings("anna", spec, path, Severity::Error)
}

fn warnings_at(spec: &SessionSpec, path: &str) -> Vec<String> {
    findings("anna", spec, path, Severity::Warning)
}

/// Asserts `edit` leaves `path` clean and `break_it` puts an error there mentioning `needle`.
fn rule(
    path: &str,
    edit: impl Fn(&mut SessionSpec),
    break_it: impl Fn(&mut SessionSpec),
    needle: &str,
) {
    let mut good = base();
    edit(&mut good);
    assert_eq!(
        errors_at(&good, path),
        Vec::<String>::new(),
        "valid case flagged at {path}"
    );
    let mut bad = base();
    break_it(&mut bad);
    let errors = errors_at(&bad, path);
    assert!(
        errors.iter().any(|e| e.contains(needle)),
        "expected `{needle}` at {path}, got {errors:?}"
    );
}

#[test]
fn the_base_session_is_valid_without_warnings() {
    let report = validate("anna", &base());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn name_is_a_kubernetes_name() {
    assert!(validate("anna-v2", &base()).is_valid());
    for bad in ["", "Anna", "anna_v2", "-anna", &"a".repeat(53)] {
        let report = validate(bad, &base());
        assert!(
            report.errors().any(|p| p.path == "metadata.name"),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn token_is_3_to_24_lowercase_letters_and_digits() {
    rule(
        "spec.dataset.token",
        |s| s.dataset.token = Some("zwx2024".into()),
        |s| s.dataset.token = Some("Sks".into()),
        "3 to 24",
    );
    rule(
        "spec.dataset.token",
        |s| s.dataset.token = Some("abc".into()),
        |s| s.dataset.token = Some("ab".into()),
        "3 to 24",
    );
    rule(
        "spec.dataset.token",
        |s| s.dataset.token = Some("a".repeat(24)),
        |s| s.dataset.token = Some("a".repeat(25)),
        "3 to 24",
    );
}

#[test]
fn token_is_not_an_ordinary_word() {
    rule(
        "spec.dataset.token",
        |s| s.dataset.token = Some("sksdog".into()),
        |s| s.dataset.token = Some("dog".into()),
        "ordinary word",
    );
}

#[test]
fn first_name_tokens_only_warn() {
    let mut spec = base();
    spec.dataset.token = Some("anna".into());
    assert!(errors_at(&spec, "spec.dataset.token").is_empty());
    assert_eq!(warnings_at(&spec, "spec.dataset.token").len(), 1);
    assert!(warnings_at(&base(), "spec.dataset.token").is_empty());
}

#[test]
fn resolution_is_a_multiple_of_64_from_64_to_2048() {
    rule(
        "spec.dataset.resolution",
        |s| s.dataset.resolution = 768,
        |s| s.dataset.resolution = 700,
        "700 is not a multiple of 64",
    );
    rule(
        "spec.dataset.resolution",
        |s| s.dataset.resolution = 2048,
        |s| s.dataset.resolution = 2112,
        "outside 64 to 2048",
    );
    rule(
        "spec.dataset.resolution",
        |s| s.dataset.resolution = 64,
        |s| s.dataset.resolution = 0,
        "outside 64 to 2048",
    );
}

#[test]
fn resolution_outside_256_to_1024_warns() {
    let mut spec = base();
    spec.dataset.resolution = 1024;
    assert!(warnings_at(&spec, "spec.dataset.resolution").is_empty());
    spec.dataset.resolution = 1536;
    assert_eq!(warnings_at(&spec, "spec.dataset.resolution").len(), 1);
    assert!(errors_at(&spec, "spec.dataset.resolution").is_empty());
}

#[test]
fn steps_are_not_all_zero() {
    let zero = |s: &mut SessionSpec| {
        s.training.unet.steps = Some(Steps::Count(0));
        s.training.text_encoder.steps = Some(Steps::Count(0));
    };
    rule(
        "spec.training",
        |s| s.training.text_encoder.steps = Some(Steps::Count(0)),
        zero,
        "nothing to train",
    );
}

#[test]
fn auto_steps_need_a_preset() {
    rule(
        "spec.training.unet.steps",
        |s| {
            s.training.preset = Preset::Face;
            s.training.unet.steps = Some(Steps::AUTO);
        },
        |s| s.training.unet.steps = Some(Steps::AUTO),
        "needs a preset",
    );
}

#[test]
fn learning_rates_are_in_0_to_1e_minus_3() {
    rule(
        "spec.training.unet.learningRate",
        |s| s.training.unet.learning_rate = Some(1e-3),
        |s| s.training.unet.learning_rate = Some(2e-3),
        "outside (0, 1e-3]",
    );
    rule(
        "spec.training.unet.learningRate",
        |s| s.training.unet.learning_rate = Some(1e-7),
        |s| s.training.unet.learning_rate = Some(0.0),
        "outside (0, 1e-3]",
    );
    rule(
        "spec.training.textEncoder.learningRate",
        |s| s.training.text_encoder.learning_rate = Some(5e-7),
        |s| s.training.text_encoder.learning_rate = Some(-1e-6),
        "outside (0, 1e-3]",
    );
}

#[test]
fn text_encoder_lr_above_unet_lr_warns() {
    let mut spec = base();
    spec.training.text_encoder.learning_rate = Some(2e-6);
    assert!(warnings_at(&spec, "spec.training.textEncoder.learningRate").is_empty());
    spec.training.text_encoder.learning_rate = Some(3e-6);
    assert_eq!(
        warnings_at(&spec, "spec.training.textEncoder.learningRate").len(),
        1
    );
    assert!(validate("anna", &spec).is_valid());
}

#[test]
fn start_from_is_within_the_total_steps() {
    rule(
        "spec.checkpoints.startFrom",
        |s| s.checkpoints.start_from = 1850,
        |s| s.checkpoints.start_from = 1851,
        "beyond the session's 1850 steps",
    );
}

#[test]
fn uris_use_a_supported_scheme() {
    rule(
        "spec.dataset.uri",
        |s| s.dataset.uri = "s3://bucket/anna".into(),
        |s| s.dataset.uri = "ftp://host/anna".into(),
        "scheme `ftp`",
    );
    rule(
        "spec.dataset.uri",
        |s| s.dataset.uri = "file://./photos".into(),
        |s| s.dataset.uri = "/data/anna".into(),
        "not a URI",
    );
    rule(
        "spec.dataset.uri",
        |_| {},
        |s| s.dataset.uri.clear(),
        "required",
    );
    rule(
        "spec.output.uri",
        |s| s.output.uri = "file:///out".into(),
        |s| s.output.uri = "https://example.com/out".into(),
        "scheme `https`",
    );
    rule(
        "spec.baseModel.uri",
        |s| s.base_model.uri = Some("hf://org/repo@main".into()),
        |s| s.base_model.uri = Some("gs://bucket/model".into()),
        "scheme `gs`",
    );
    rule(
        "spec.baseModel.uri",
        |s| s.base_model.uri = Some("https://example.com/model.safetensors".into()),
        |s| s.base_model.uri = Some("s3://".into()),
        "nothing after",
    );
}

#[test]
fn sha256_is_64_hex_characters() {
    rule(
        "spec.baseModel.sha256",
        |s| s.base_model.sha256 = Some("ab".repeat(32)),
        |s| s.base_model.sha256 = Some("abc".into()),
        "64 hexadecimal",
    );
}

#[test]
fn at_most_16_sample_prompts() {
    rule(
        "spec.samples.prompts",
        |s| s.samples.prompts = vec!["photo of sksper".into(); 16],
        |s| s.samples.prompts = vec!["photo of sksper".into(); 17],
        "at most 16",
    );
}

#[test]
fn prompt_captions_need_a_template_with_the_token() {
    rule(
        "spec.dataset.instancePrompt",
        |s| {
            s.dataset.captions = Captions::Prompt;
            s.dataset.instance_prompt = Some("photo of {token} person".into());
        },
        |s| s.dataset.captions = Captions::Prompt,
        "required",
    );
    rule(
        "spec.dataset.instancePrompt",
        |_| {},
        |s| {
            s.dataset.captions = Captions::Prompt;
            s.dataset.instance_prompt = Some("photo of a person".into());
        },
        "does not contain `{token}`",
    );
}

#[test]
fn prior_preservation_fields_are_checked() {
    let prior = |class_prompt: &str, count: u32, weight: f64| PriorPreservation {
        class_prompt: class_prompt.into(),
        class_images_uri: None,
        num_class_images: count,
        loss_weight: weight,
    };
    rule(
        "spec.dataset.priorPreservation.classPrompt",
        |s| s.dataset.prior_preservation = Some(prior("photo of a person", 200, 1.0)),
        |s| s.dataset.prior_preservation = Some(prior(" ", 200, 1.0)),
        "must not be empty",
    );
    rule(
        "spec.dataset.priorPreservation.numClassImages",
        |s| s.dataset.prior_preservation = Some(prior("a dog", 1, 1.0)),
        |s| s.dataset.prior_preservation = Some(prior("a dog", 0, 1.0)),
        "outside 1 to 10000",
    );
    rule(
        "spec.dataset.priorPreservation.lossWeight",
        |s| s.dataset.prior_preservation = Some(prior("a dog", 100, 0.5)),
        |s| s.dataset.prior_preservation = Some(prior("a dog", 100, 0.0)),
        "outside (0, 10]",
    );
}

#[test]
fn training_ranges_are_checked() {
    rule(
        "spec.training.batchSize",
        |s| s.training.batch_size = 4,
        |s| s.training.batch_size = 0,
        "outside 1 to 64",
    );
    rule(
        "spec.training.offsetNoise",
        |s| s.training.offset_noise = Some(0.1),
        |s| s.training.offset_noise = Some(1.5),
        "outside 0 to 1",
    );
    rule(
        "spec.training.minSnrGamma",
        |s| s.training.min_snr_gamma = Some(5.0),
        |s| s.training.min_snr_gamma = Some(0.0),
        "outside (0, 100]",
    );
    rule(
        "spec.training.lrWarmupSteps",
        |s| s.training.lr_warmup_steps = 100,
        |s| s.training.lr_warmup_steps = 5000,
        "longer than either phase",
    );
}

#[test]
fn low_memory_rejects_fp16_and_checkpointing_turned_off() {
    let low = |s: &mut SessionSpec| s.training.memory = MemoryMode::LowMemory;
    rule(
        "spec.training.mixedPrecision",
        |s| {
            low(s);
            s.training.mixed_precision = MixedPrecision::Bf16;
        },
        |s| {
            low(s);
            s.training.mixed_precision = MixedPrecision::Fp16;
        },
        "does not combine with `memory: lowMemory`",
    );
    rule(
        "spec.training.gradientCheckpointing",
        |s| {
            low(s);
            s.training.gradient_checkpointing = GradientCheckpointing::Forced(true);
        },
        |s| {
            low(s);
            s.training.gradient_checkpointing = GradientCheckpointing::Forced(false);
        },
        "contradicts `memory: lowMemory`",
    );
    // Both are fine in the default mode.
    let mut spec = base();
    spec.training.mixed_precision = MixedPrecision::Fp16;
    spec.training.gradient_checkpointing = GradientCheckpointing::Forced(false);
    assert!(errors_at(&spec, "spec.training.mixedPrecision").is_empty());
    assert!(errors_at(&spec, "spec.training.gradientCheckpointing").is_empty());
}

#[test]
fn checkpoint_settings_are_checked() {
    rule(
        "spec.checkpoints.every",
        |s| s.checkpoints.every = Some(500),
        |s| s.checkpoints.every = Some(0),
        "at least 1",
    );
    rule(
        "spec.checkpoints.formats",
        |s| s.checkpoints.formats = vec![ModelFormat::Ckpt],
        |s| s.checkpoints.formats.clear(),
        "at least one format",
    );
    rule(
        "spec.checkpoints.keepLastStates",
        |s| s.checkpoints.keep_last_states = 3,
        |s| s.checkpoints.keep_last_states = 0,
        "at least 1",
    );
}

#[test]
fn sample_settings_are_checked() {
    rule(
        "spec.samples.steps",
        |s| s.samples.steps = 50,
        |s| s.samples.steps = 0,
        "outside 1 to 1000",
    );
    rule(
        "spec.samples.guidanceScale",
        |s| s.samples.guidance_scale = 0.0,
        |s| s.samples.guidance_scale = -1.0,
        "outside 0 to 50",
    );
    rule(
        "spec.samples.width",
        |s| s.samples.width = Some(640),
        |s| s.samples.width = Some(500),
        "multiple of 8",
    );
    rule(
        "spec.samples.prompts[1]",
        |s| s.samples.prompts = vec!["a".into(), "b".into()],
        |s| s.samples.prompts = vec!["a".into(), "".into()],
        "must not be empty",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut spec = base();
    spec.dataset.resolution = 700;
    spec.dataset.token = Some("X".into());
    spec.training.unet.learning_rate = Some(1.0);
    spec.output.uri.clear();
    let report = validate("Bad Name", &spec);
    let paths: Vec<&str> = report.errors().map(|p| p.path.as_str()).collect();
    for expected in [
        "metadata.name",
        "spec.dataset.resolution",
        "spec.dataset.token",
        "spec.training.unet.learningRate",
        "spec.output.uri",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
}
