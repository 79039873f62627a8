//! `dreambooth-trainer train SESSION.yaml`: a whole session from photos to a model.
//!
//! Prepare the data, cache latents, run both phases, and at every checkpoint write the
//! model, samples and a training state; at the end the model in every requested format,
//! the last samples and, written last, `manifest.json`. A rerun with the same output
//! continues from the latest state.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dreambooth_api::manifest::ArtifactKind;
use dreambooth_api::spec::{Dataset, MixedPrecision};
use dreambooth_api::{ExitKind, Manifest, Progress, Session, Stage};
use tch::Device;

use super::class_images::ensure_class_images;
use super::examples::{Example, encode_example};
use super::inputs::{fetch_inputs, storage_failure};
use super::preemption::StopSignal;
use super::run_settings::{
    continued_training, describe, gradient_checkpointing, is_checkpoint, loop_settings,
    random_seed, resolved_config, sample_prompts,
};
use super::state::{StateInfo, load_state, save_state};
use super::trainer::{StepPrecision, Trainer};
use crate::checkpoint::{LoadedModel, load_pipeline_weights};
use crate::data::{self, InstanceImage};
use crate::export::ExportError;
use crate::export::manifest::rfc3339_utc;
use crate::export::model::{SampleRenderer, snapshot, write_model};
use crate::export::{
    MANIFEST_FILE, OutputWriter, checkpoint_key, load_manifest, model_key, state_prefix,
    state_steps, write_samples,
};
use crate::pipeline::{ModelWeights, Models};
use crate::schedulers::SchedulerConfig;
use crate::storage::{Storage, StorageError, StorageSettings, open_storage_with};
use crate::tokenizer::ClipTokenizer;

/// Why a session stopped early, with the exit code the operator acts on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Infrastructure(String),
    #[error("stopped by a signal after step {step}; the training state is saved")]
    Preempted { step: u32 },
    /// A signal before the first step: nothing to save, a rerun starts over.
    #[error("stopped by a signal while {stage}, before training started")]
    StoppedBeforeTraining { stage: &'static str },
    #[error("{0}")]
    Internal(String),
}

impl SessionError {
    pub fn exit_kind(&self) -> ExitKind {
        match self {
            SessionError::Config(_) => ExitKind::BadConfig,
            SessionError::Data(_) => ExitKind::BadData,
            SessionError::Infrastructure(_) => ExitKind::Retriable,
            SessionError::Preempted { .. } | SessionError::StoppedBeforeTraining { .. } => {
                ExitKind::Preempted
            }
            SessionError::Internal(_) => ExitKind::Internal,
        }
    }
}

/// What a finished session produced.
#[derive(Debug, Clone)]
pub struct SessionOutcome {
    pub step: u32,
    pub manifest_uri: String,
    pub model_uri: String,
}

/// Called after every step with the current progress.
pub type ProgressSink<'a> = &'a mut dyn FnMut(&Progress);

pub struct SessionOptions {
    pub device: Device,
    pub stop: StopSignal,
    /// Where downloaded inputs (base model, images) are cached between attempts
    /// (`--cache-dir`; an emptyDir in a pod). `None`: a scratch folder for this run.
    pub cache_dir: Option<PathBuf>,
}

pub fn run_session(
    session: &Session,
    options: &SessionOptions,
    progress: ProgressSink,
) -> Result<SessionOutcome, SessionError> {
    let spec = &session.spec;
    let report = dreambooth_api::validate(&session.name, spec);
    if !report.is_valid() {
        let errors: Vec<String> = report.errors().map(|p| p.to_string()).collect();
        return Err(SessionError::Config(errors.join("\n")));
    }
    let settings = StorageSettings::from(&spec.storage);
    let storage = open_storage_with(&spec.output.uri, &settings)
        .map_err(|e| storage_failure("spec.output.uri", e))?;
    if let Some(done) = finished_before(session, storage.as_ref())? {
        tracing::info!("{} is already complete; nothing to do", done.manifest_uri);
        return Ok(done);
    }
    let scratch = tempfile::tempdir().map_err(|e| SessionError::Infrastructure(e.to_string()))?;
    let mut snapshot_progress = Progress {
        session: session.name.clone(),
        stage: Stage::Downloading,
        ..Progress::default()
    };
    progress(&snapshot_progress);
    let inputs = fetch_inputs(spec, settings, options.cache_dir.as_deref())?;
    stop_point(options, "downloading the inputs")?;
    snapshot_progress.stage = Stage::Preparing;
    progress(&snapshot_progress);

    let mut base = load_pipeline_weights(&inputs.base_model)
        .map_err(|e| SessionError::Config(e.to_string()))?;
    let prepared = data::prepare(&inputs.dataset, &spec.dataset)
        .map_err(|e| SessionError::Data(e.to_string()))?;
    for warning in &prepared.report.warnings {
        tracing::warn!("dataset: {warning}");
    }
    let training = continued_training(&spec.training, &base);
    let resolved = dreambooth_api::resolve(&training, Some(prepared.images.len()))
        .map_err(|e| SessionError::Config(e.to_string()))?;
    let seed = spec.training.seed.unwrap_or_else(random_seed);
    let tokenizer_dir = base.tokenizer.clone().ok_or_else(|| {
        SessionError::Config(format!(
            "{}: a single-file base model carries no tokenizer; use a diffusers folder",
            base.source.display()
        ))
    })?;
    let tokenizer =
        ClipTokenizer::from_dir(&tokenizer_dir).map_err(|e| SessionError::Config(e.to_string()))?;
    let device = options.device;
    let (mut models, stores) =
        Models::load(&base, device).map_err(|e| SessionError::Config(e.to_string()))?;
    // The networks hold their own copy; from here on `base` only lends its configs.
    for component in [&mut base.unet, &mut base.text_encoder, &mut base.vae] {
        component.tensors.clear();
    }

    let scheduler_config: SchedulerConfig = serde_json::from_value(base.scheduler.clone())
        .map_err(|e| SessionError::Config(format!("scheduler config: {e}")))?;
    let instances = encode_examples(
        &models,
        &tokenizer,
        &prepared.images,
        spec.dataset.flip,
        device,
    )?;
    let sample_prompts = sample_prompts(spec, &prepared);
    let side = i64::from(spec.dataset.resolution);
    let renderer = SampleRenderer {
        tokenizer: &tokenizer,
        scheduler: &scheduler_config,
        samples: &spec.samples,
        prompts: &sample_prompts,
        size: (side, side),
    };
    let generated = generated_class_images(spec, &models, &renderer, storage.as_ref())?;
    let classes = class_examples(
        spec,
        &models,
        &tokenizer,
        device,
        inputs.class_images.as_deref(),
        &generated,
    )?;
    stop_point(options, "preparing the data")?;
    let settings = loop_settings(spec, &resolved, &base, seed, device, !classes.is_empty());
    match settings.precision {
        StepPrecision::Bf16Autocast => {
            crate::cuda::set_autocast_bf16(true).map_err(|e| SessionError::Config(e.to_string()))?
        }
        StepPrecision::Fp16Autocast => crate::cuda::set_autocast_bf16(false)
            .map_err(|e| SessionError::Config(e.to_string()))?,
        StepPrecision::Fp32 if spec.training.mixed_precision != MixedPrecision::No => {
            tracing::info!("training in fp32: mixed precision applies on a GPU only");
        }
        StepPrecision::Fp32 => {}
    }
    let checkpointing = gradient_checkpointing(
        spec.training.gradient_checkpointing,
        spec.training.memory,
        device,
    );
    models.unet.set_gradient_checkpointing(checkpointing);
    models
        .text_encoder
        .set_gradient_checkpointing(checkpointing);
    let total = settings.total_steps();
    let alphas_cumprod = scheduler_config.alphas_cumprod();
    let mut trainer = Trainer::new(
        models,
        stores,
        settings,
        instances,
        classes,
        &alphas_cumprod,
    );

    let (mut writer, start) = resume(&mut trainer, storage, scratch.path())?;
    for (key, bytes) in &generated {
        writer
            .record_bytes(ArtifactKind::ClassImage, 0, key, bytes)
            .map_err(infra)?;
    }
    snapshot_progress.total_steps = total;
    snapshot_progress.step = start;
    // Training starts now: observers see the total and the end of data preparation
    // before the first step, which may take long (CUDA graph capture, a cold cache).
    if start < total {
        snapshot_progress.stage = match trainer.settings.phase_of(start).0 {
            super::trainer::Phase::TextEncoder => Stage::TextEncoder,
            super::trainer::Phase::Unet => Stage::Unet,
        };
        progress(&snapshot_progress);
    }

    let timer = Instant::now();
    for step in start..total {
        let report = trainer.step(step);
        let done = step + 1;
        let elapsed = timer.elapsed().as_secs_f64();
        let speed = f64::from(done - start) / elapsed.max(1e-9);
        snapshot_progress.stage = match report.phase {
            super::trainer::Phase::TextEncoder => Stage::TextEncoder,
            super::trainer::Phase::Unet => Stage::Unet,
        };
        snapshot_progress.step = done;
        snapshot_progress.loss = Some(report.loss);
        snapshot_progress.learning_rate = Some(report.learning_rate);
        snapshot_progress.steps_per_second = Some(speed);
        snapshot_progress.images_per_second = Some(speed * spec.training.batch_size as f64);
        snapshot_progress.eta_seconds = Progress::estimate_eta(done, total, Some(speed));
        if is_checkpoint(spec, done, total) {
            write_checkpoint(
                &trainer,
                &base,
                &renderer,
                session,
                done,
                &mut writer,
                scratch.path(),
            )?;
            snapshot_progress
                .checkpoints
                .push(writer.storage().uri(&checkpoint_key(&session.name, done)));
        }
        progress(&snapshot_progress);
        if options.stop.requested() && done < total {
            save_training_state(
                &trainer,
                &trainer.weights(),
                done,
                &mut writer,
                scratch.path(),
                spec.checkpoints.keep_last_states,
            )?;
            return Err(SessionError::Preempted { step: done });
        }
    }

    snapshot_progress.stage = Stage::Exporting;
    progress(&snapshot_progress);
    let model = snapshot(&base, &trainer.weights());
    let metadata = describe(session, total, seed).metadata(&model);
    let names = write_model(
        &model,
        scratch.path(),
        &session.name,
        &spec.checkpoints.formats,
        spec.checkpoints.precision,
        &metadata,
    )
    .map_err(|e| SessionError::Internal(e.to_string()))?;
    for name in &names {
        writer
            .record_path(ArtifactKind::Model, total, name, &scratch.path().join(name))
            .map_err(infra)?;
    }
    let images = renderer
        .render(&trainer.models)
        .map_err(|e| SessionError::Internal(e.to_string()))?;
    write_samples(&mut writer, total, &images).map_err(infra)?;
    let manifest = Manifest {
        session: session.name.clone(),
        base_model: spec.base_model.effective_uri(),
        step: total,
        total_steps: total,
        seed,
        created_at: rfc3339_utc(std::time::SystemTime::now()),
        artifacts: Vec::new(),
        dataset: Some(prepared.report.clone()),
        config: resolved_config(session, &resolved, seed, checkpointing),
    };
    let manifest_uri = writer.finish(manifest).map_err(infra)?;
    snapshot_progress.stage = Stage::Done;
    progress(&snapshot_progress);
    Ok(SessionOutcome {
        step: total,
        manifest_uri,
        model_uri: writer.storage().uri(&model_key(&session.name)),
    })
}

/// A manifest in the output prefix means an earlier run finished: a rerun (a Job retried
/// after its pod succeeded, a user running the command again) changes nothing.
fn finished_before(
    session: &Session,
    storage: &dyn Storage,
) -> Result<Option<SessionOutcome>, SessionError> {
    let Some(manifest) = load_manifest(storage).map_err(infra)? else {
        return Ok(None);
    };
    if manifest.session != session.name {
        return Err(SessionError::Config(format!(
            "{} belongs to session `{}`; give `{}` its own output prefix",
            storage.uri(MANIFEST_FILE),
            manifest.session,
            session.name
        )));
    }
    Ok(Some(SessionOutcome {
        step: manifest.step,
        manifest_uri: storage.uri(MANIFEST_FILE),
        model_uri: storage.uri(&model_key(&session.name)),
    }))
}

/// Errors while writing or reading outputs: storage that may recover (unreachable,
/// throttled, a local disk hiccup) is retriable; refused credentials or a missing
/// bucket need the user.
/// Downloads and data preparation can outlast a pod's grace period; a signal during them
/// is honoured at the next stage boundary rather than at the first step.
fn stop_point(options: &SessionOptions, stage: &'static str) -> Result<(), SessionError> {
    if options.stop.requested() {
        return Err(SessionError::StoppedBeforeTraining { stage });
    }
    Ok(())
}

fn infra(error: impl Into<ExportError>) -> SessionError {
    match error.into() {
        ExportError::Storage(error) if is_config_error(&error) => {
            SessionError::Config(error.to_string())
        }
        other => SessionError::Infrastructure(other.to_string()),
    }
}

fn is_config_error(error: &StorageError) -> bool {
    matches!(
        error,
        StorageError::AccessDenied { .. }
            | StorageError::NoSuchBucket { .. }
            | StorageError::InvalidUri { .. }
            | StorageError::ReadOnly { .. }
    )
}

fn encode_examples(
    models: &Models,
    tokenizer: &ClipTokenizer,
    images: &[InstanceImage],
    flip: bool,
    device: Device,
) -> Result<Vec<Example>, SessionError> {
    let mut examples = Vec::new();
    for image in images {
        let ids = tokenizer
            .encode_tensor(&[image.caption.as_str()])
            .map_err(|e| SessionError::Data(e.to_string()))?;
        let ids = ids.to_device(device);
        examples.push(encode_example(
            &models.vae,
            &image.pixels,
            ids.shallow_clone(),
            device,
        ));
        if flip {
            examples.push(encode_example(
                &models.vae,
                &data::flipped(&image.pixels),
                ids,
                device,
            ));
        }
    }
    Ok(examples)
}

/// Class images generated by the base model when prior preservation has no folder.
fn generated_class_images(
    spec: &dreambooth_api::SessionSpec,
    models: &Models,
    renderer: &SampleRenderer,
    storage: &dyn Storage,
) -> Result<Vec<(String, Vec<u8>)>, SessionError> {
    let Some(prior) = spec
        .dataset
        .prior_preservation
        .as_ref()
        .filter(|p| p.class_images_uri.is_none())
    else {
        return Ok(Vec::new());
    };
    ensure_class_images(
        models,
        renderer,
        &prior.class_prompt,
        prior.num_class_images as usize,
        storage,
    )
    .map_err(SessionError::Internal)
}

/// Class images for prior preservation, captioned with the class prompt: from
/// `classImagesUri`, or the generated ones.
fn class_examples(
    spec: &dreambooth_api::SessionSpec,
    models: &Models,
    tokenizer: &ClipTokenizer,
    device: Device,
    class_dir: Option<&Path>,
    generated: &[(String, Vec<u8>)],
) -> Result<Vec<Example>, SessionError> {
    let Some(prior) = &spec.dataset.prior_preservation else {
        return Ok(Vec::new());
    };
    let side = spec.dataset.resolution;
    let images: Vec<InstanceImage> = match (&prior.class_images_uri, class_dir) {
        (Some(uri), Some(folder)) => {
            let class_dataset = Dataset {
                uri: uri.clone(),
                token: Some("class".into()),
                captions: dreambooth_api::spec::Captions::Filename,
                skip_invalid: true,
                ..spec.dataset.clone()
            };
            let prepared = data::prepare(folder, &class_dataset)
                .map_err(|e| SessionError::Data(e.to_string()))?;
            prepared
                .images
                .into_iter()
                .take(prior.num_class_images as usize)
                .collect()
        }
        _ => generated
            .iter()
            .map(|(key, bytes)| {
                let rgb = data::decode::decode_rgb_bytes(bytes)
                    .map_err(|e| SessionError::Data(format!("{key}: {e}")))?;
                let pixels = data::crop::crop_and_resize(&rgb, spec.dataset.crop, side, side);
                Ok(InstanceImage {
                    file: key.clone(),
                    caption: String::new(),
                    pixels,
                })
            })
            .collect::<Result<_, SessionError>>()?,
    };
    let images: Vec<InstanceImage> = images
        .into_iter()
        .map(|image| InstanceImage {
            caption: prior.class_prompt.clone(),
            ..image
        })
        .collect();
    encode_examples(models, tokenizer, &images, false, device)
}

fn write_checkpoint(
    trainer: &Trainer,
    base: &LoadedModel,
    renderer: &SampleRenderer,
    session: &Session,
    step: u32,
    writer: &mut OutputWriter,
    scratch: &Path,
) -> Result<(), SessionError> {
    let spec = &session.spec;
    // Read once for the model and the state: packed masters are copied off the device.
    let weights = trainer.weights();
    let model = snapshot(base, &weights);
    let stem = format!("{}_step_{step}", session.name);
    let metadata = describe(session, step, trainer.settings.seed).metadata(&model);
    let names = write_model(
        &model,
        scratch,
        &stem,
        &[dreambooth_api::spec::ModelFormat::Safetensors],
        spec.checkpoints.precision,
        &metadata,
    )
    .map_err(|e| SessionError::Internal(e.to_string()))?;
    for name in names {
        writer
            .record_path(ArtifactKind::Checkpoint, step, &name, &scratch.join(&name))
            .map_err(infra)?;
        let _ = std::fs::remove_file(scratch.join(&name));
    }
    let images = renderer
        .render(&trainer.models)
        .map_err(|e| SessionError::Internal(e.to_string()))?;
    write_samples(writer, step, &images).map_err(infra)?;
    save_training_state(
        trainer,
        &weights,
        step,
        writer,
        scratch,
        spec.checkpoints.keep_last_states,
    )
}

/// The file a state writes last, listing every artifact recorded so far: a state
/// without it is incomplete, and a resumed run's manifest starts from it.
const JOURNAL_FILE: &str = "artifacts.json";

/// Saves `state/step_<N>/` (weights and optimizer, `state.json`, then the artifact
/// journal) and deletes the states beyond the newest `keep`.
fn save_training_state(
    trainer: &Trainer,
    weights: &ModelWeights,
    step: u32,
    writer: &mut OutputWriter,
    scratch: &Path,
    keep: u32,
) -> Result<(), SessionError> {
    let dir = scratch.join(format!("state_{step}"));
    save_state(trainer, weights, step, &dir).map_err(|e| SessionError::Internal(e.to_string()))?;
    let prefix = state_prefix(step);
    for file in [super::state::WEIGHTS_FILE, super::state::INFO_FILE] {
        writer
            .record_path(
                ArtifactKind::State,
                step,
                &format!("{prefix}{file}"),
                &dir.join(file),
            )
            .map_err(infra)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let journal = serde_json::to_vec_pretty(&writer.artifacts()).expect("artifacts serialise");
    writer
        .record_bytes(
            ArtifactKind::State,
            step,
            &format!("{prefix}{JOURNAL_FILE}"),
            &journal,
        )
        .map_err(infra)?;
    writer.prune_states(keep.max(1) as usize).map_err(infra)?;
    Ok(())
}

/// Continues from the newest complete state in the output prefix, if there is one:
/// loads it into `trainer` and adopts the artifacts its journal lists.
fn resume(
    trainer: &mut Trainer,
    storage: Box<dyn Storage>,
    scratch: &Path,
) -> Result<(OutputWriter, u32), SessionError> {
    let mut complete = Vec::new();
    for step in state_steps(storage.as_ref()).map_err(infra)? {
        if storage
            .stat(&format!("{}{JOURNAL_FILE}", state_prefix(step)))
            .map_err(infra)?
            .is_some()
        {
            complete.push(step);
        }
    }
    let Some(&step) = complete.last() else {
        return Ok((OutputWriter::new(storage), 0));
    };
    let prefix = state_prefix(step);
    let dir = scratch.join("resume");
    for file in [super::state::WEIGHTS_FILE, super::state::INFO_FILE] {
        storage
            .get_to_file(&format!("{prefix}{file}"), &dir.join(file))
            .map_err(infra)?;
    }
    let info: StateInfo =
        load_state(trainer, &dir).map_err(|e| SessionError::Config(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&dir);
    let journal_key = format!("{prefix}{JOURNAL_FILE}");
    let journal = storage.get_bytes(&journal_key).map_err(infra)?;
    let previous: Vec<dreambooth_api::Artifact> = serde_json::from_slice(&journal)
        .map_err(|e| SessionError::Config(format!("{}: {e}", storage.uri(&journal_key))))?;
    let mut writer = OutputWriter::resume(storage, &previous).map_err(infra)?;
    writer
        .record_bytes(ArtifactKind::State, step, &journal_key, &journal)
        .map_err(infra)?;
    tracing::info!("resuming from step {} of {}", info.step, info.total_steps);
    Ok((writer, info.step))
}
