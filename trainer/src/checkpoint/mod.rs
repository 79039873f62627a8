//! Reading and writing model weights: diffusers folders, single-file checkpoints in
//! the original Stable Diffusion layout, and `.ckpt` files through a restricted reader.
//!
//! Everything meets at named tensor maps under diffusers names (fp32 on the CPU) plus
//! each network's diffusers `config.json` as JSON; the models build from the configs and
//! [`fill_var_store`] moves the tensors into their VarStores.

mod ckpt;
mod ckpt_writer;
mod diffusers_folder;
mod key_rules;
mod pickle;
mod safetensors;
pub mod single_file;
mod text_keys;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dreambooth_api::spec::Precision;
use serde_json::{Value, json};
use tch::Tensor;
use tch::nn::VarStore;

use crate::schedulers::PredictionType;
use single_file::{Components, Layouts, TextLayout};

pub use ckpt::{Checkpoint, read_ckpt};
pub use diffusers_folder::{read_diffusers_folder, save_diffusers_folder};
pub use safetensors::{
    fill_var_store, precision_kind, read_safetensors, read_safetensors_metadata, write_safetensors,
    write_safetensors_with_metadata,
};

/// Tensors by name, in name order so files come out the same every time.
pub type Tensors = BTreeMap<String, Tensor>;

/// Why weights could not be read, written or loaded; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: no such file or directory", .path.display())]
    NotFound { path: PathBuf },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: truncated or corrupt file: {message}", .path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("{}: {message}", .path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: tensor `{tensor}` has dtype {dtype}, which cannot hold weights", .path.display())]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error(
        "{}: the {component} needs tensor `{tensor}` (shape {expected:?}) but the file lacks it{}",
        .path.display(), more(*.others)
    )]
    MissingTensor {
        path: PathBuf,
        component: String,
        tensor: String,
        expected: Vec<i64>,
        others: usize,
    },
    #[error(
        "{}: tensor `{tensor}` (shape {shape:?}) is not a parameter of the {component}{}",
        .path.display(), more(*.others)
    )]
    UnexpectedTensor {
        path: PathBuf,
        component: String,
        tensor: String,
        shape: Vec<i64>,
        others: usize,
    },
    #[error(
        "{}: tensor `{tensor}` has shape {found:?} but the {component} expects {expected:?}",
        .path.display()
    )]
    ShapeMismatch {
        path: PathBuf,
        component: String,
        tensor: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{}: tensor `{tensor}`: {source}", .path.display())]
    Torch {
        path: PathBuf,
        tensor: String,
        source: tch::TchError,
    },
    #[error(
        "{}: refusing to load: the pickle calls `{global}`, which is not one of the tensor \
         rebuilders a checkpoint needs (convert it to .safetensors with a tool you trust)",
        .path.display()
    )]
    ForbiddenGlobal { path: PathBuf, global: String },
    #[error("{}: cannot read the pickle at byte {offset}: {message}", .path.display())]
    Pickle {
        path: PathBuf,
        offset: usize,
        message: String,
    },
}

fn more(others: usize) -> String {
    match others {
        0 => String::new(),
        1 => " (and 1 more)".into(),
        n => format!(" (and {n} more)"),
    }
}

impl CheckpointError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }

    pub(crate) fn torch(path: &Path, tensor: &str, source: tch::TchError) -> Self {
        CheckpointError::Torch {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|source| CheckpointError::io(path, source))
}

pub(crate) fn read_json(path: &Path) -> Result<Value, CheckpointError> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::invalid(path, format!("invalid JSON: {e}")))
}

/// Where a model's weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    DiffusersFolder,
    /// One `.safetensors` file in the original SD layout.
    SingleFile,
    /// A pickle `.ckpt` in the original SD layout, read without running it.
    Ckpt,
}

/// The Stable Diffusion generation, which decides the text encoder's single-file layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdVersion {
    /// OpenAI CLIP text encoder.
    Sd1,
    /// OpenCLIP ViT-H text encoder, linear attention projections.
    Sd2,
}

/// One network: its tensors under diffusers names and its diffusers `config.json`.
#[derive(Debug)]
pub struct Component {
    pub tensors: Tensors,
    pub config: Value,
    /// The file the tensors came from, for error messages when they are loaded.
    pub weights: PathBuf,
}

impl Component {
    /// Moves this component's tensors into `vs`; see [`fill_var_store`].
    pub fn fill(&self, vs: &mut VarStore, name: &str) -> Result<(), CheckpointError> {
        fill_var_store(vs, &self.tensors, &self.weights, name)
    }
}

/// A whole pipeline's weights and configs, whatever form it was stored in.
#[derive(Debug)]
pub struct LoadedModel {
    pub source: PathBuf,
    pub kind: SourceKind,
    pub version: SdVersion,
    pub prediction_type: PredictionType,
    pub unet: Component,
    pub text_encoder: Component,
    pub vae: Component,
    /// `scheduler/scheduler_config.json`, its `prediction_type` matching the field above.
    pub scheduler: Value,
    /// The folder with `vocab.json` and `merges.txt`; single files carry no tokenizer.
    pub tokenizer: Option<PathBuf>,
}

/// What weights alone cannot tell.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub version: Option<SdVersion>,
    /// SD 2.x single files are taken as v-prediction (the 768 model) unless told otherwise
    /// or a `.ckpt` records step 875000 (the 512 base model), as diffusers decides.
    pub prediction_type: Option<PredictionType>,
    /// A diffusers folder whose configs, scheduler and tokenizer go with a single file,
    /// instead of configs read off the tensor shapes.
    pub configs_from: Option<PathBuf>,
}

/// Loads a diffusers folder, a single `.safetensors` or a `.ckpt` with default options.
pub fn load_pipeline_weights(path: &Path) -> Result<LoadedModel, CheckpointError> {
    load_pipeline_weights_with(path, &LoadOptions::default())
}

/// Loads a pipeline, telling its form from the path: a folder is a diffusers folder,
/// `.safetensors` a single file, `.ckpt`/`.pt`/`.pth`/`.bin` a torch pickle.
pub fn load_pipeline_weights_with(
    path: &Path,
    options: &LoadOptions,
) -> Result<LoadedModel, CheckpointError> {
    if !path.exists() {
        return Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        let mut model = read_diffusers_folder(path)?;
        if let Some(version) = options.version {
            model.version = version;
        }
        if let Some(prediction) = options.prediction_type {
            set_prediction_type(&mut model, prediction);
        }
        return Ok(model);
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let (tensors, global_step, kind) = match extension.as_str() {
        "safetensors" => (read_safetensors(path)?, None, SourceKind::SingleFile),
        "ckpt" | "pt" | "pth" | "bin" => {
            let checkpoint = read_ckpt(path)?;
            (checkpoint.tensors, checkpoint.global_step, SourceKind::Ckpt)
        }
        _ => {
            return Err(CheckpointError::invalid(
                path,
                "not a model: expected a diffusers folder, a .safetensors or a .ckpt file",
            ));
        }
    };
    from_single_file(path, tensors, global_step, kind, options)
}

fn from_single_file(
    path: &Path,
    tensors: Tensors,
    global_step: Option<i64>,
    kind: SourceKind,
    options: &LoadOptions,
) -> Result<LoadedModel, CheckpointError> {
    let reference = options
        .configs_from
        .as_deref()
        .map(read_diffusers_configs)
        .transpose()?;
    let layouts = match &reference {
        Some(configs) => layouts_for(configs, path)?,
        None => Layouts::infer(&tensors).map_err(|e| {
            CheckpointError::invalid(path, format!("not a Stable Diffusion checkpoint: {e}"))
        })?,
    };
    let detected = match layouts.text {
        TextLayout::Clip => SdVersion::Sd1,
        TextLayout::OpenClip { .. } => SdVersion::Sd2,
    };
    let version = options.version.unwrap_or(detected);
    let components = single_file::from_original(tensors, &layouts, path)?;
    let (configs, tokenizer) = match reference {
        Some(configs) => (
            configs,
            options
                .configs_from
                .as_ref()
                .map(|d| d.join("tokenizer"))
                .filter(|d| d.is_dir()),
        ),
        None => {
            let prediction = match (version, global_step) {
                (SdVersion::Sd1, _) | (SdVersion::Sd2, Some(875_000)) => PredictionType::Epsilon,
                (SdVersion::Sd2, _) => PredictionType::VPrediction,
            };
            let prediction = options.prediction_type.unwrap_or(prediction);
            (
                single_file::infer_configs(&components, &layouts, version, prediction, path)?,
                None,
            )
        }
    };
    let tokenizer = match tokenizer {
        Some(dir) => Some(dir),
        None => bundled_tokenizer_for(&configs.text_encoder, version, path)?,
    };
    let component = |tensors, config| Component {
        tensors,
        config,
        weights: path.to_path_buf(),
    };
    let mut model = LoadedModel {
        source: path.to_path_buf(),
        kind,
        version,
        prediction_type: PredictionType::Epsilon,
        unet: component(components.unet, configs.unet),
        text_encoder: component(components.text_encoder, configs.text_encoder),
        vae: component(components.vae, configs.vae),
        scheduler: configs.scheduler,
        tokenizer,
    };
    let prediction = options
        .prediction_type
        .unwrap_or_else(|| scheduler_prediction(&model.scheduler));
    set_prediction_type(&mut model, prediction);
    Ok(model)
}

/// Writes the model as one `.safetensors` in the original SD layout; the text encoder's
/// config decides its layout (quick_gelu: CLIP under `cond_stage_model.transformer.text_model.`,
/// gelu: OpenCLIP under `cond_stage_model.model.`).
pub fn save_single_file(
    model: &LoadedModel,
    path: &Path,
    precision: Precision,
) -> Result<(), CheckpointError> {
    save_single_file_with_metadata(model, path, precision, &BTreeMap::new())
}

/// [`save_single_file`] with extra header metadata.
pub fn save_single_file_with_metadata(
    model: &LoadedModel,
    path: &Path,
    precision: Precision,
    metadata: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let tensors = original_layout(model)?;
    write_safetensors_with_metadata(path, &tensors, precision, metadata)
}

/// Writes the model as a `torch.save` `.ckpt` (`{"state_dict": ...}`) in the original
/// SD layout, for tools that predate safetensors.
pub fn save_ckpt(
    model: &LoadedModel,
    path: &Path,
    precision: Precision,
) -> Result<(), CheckpointError> {
    let tensors = original_layout(model)?;
    ckpt_writer::write_ckpt(path, &tensors, precision)
}

/// The model's tensors under original SD names (shared, not copied).
fn original_layout(model: &LoadedModel) -> Result<Tensors, CheckpointError> {
    let configs = Configs {
        unet: model.unet.config.clone(),
        vae: model.vae.config.clone(),
        text_encoder: model.text_encoder.config.clone(),
        scheduler: model.scheduler.clone(),
    };
    let layouts = layouts_for(&configs, &model.source)?;
    let view = |tensors: &Tensors| -> Tensors {
        tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect()
    };
    let components = Components {
        unet: view(&model.unet.tensors),
        vae: view(&model.vae.tensors),
        text_encoder: view(&model.text_encoder.tensors),
    };
    single_file::to_original(components, &layouts, &model.source)
}

/// CLIP's own vocabulary for a single file whose text encoder has CLIP's 49408 tokens
/// (every real SD 1.x/2.x model); smaller test models need their own tokenizer folder.
fn bundled_tokenizer_for(
    text_encoder: &Value,
    version: SdVersion,
    path: &Path,
) -> Result<Option<PathBuf>, CheckpointError> {
    if text_encoder["vocab_size"].as_u64() != Some(49_408) {
        return Ok(None);
    }
    crate::tokenizer::bundled_tokenizer_dir(version == SdVersion::Sd2)
        .map(Some)
        .map_err(|e| CheckpointError::io(path, e))
}

/// Converts between forms: `output` ending in `.safetensors` gets a single file,
/// `.ckpt` a pickle checkpoint, anything else a diffusers folder.
pub fn convert(
    input: &Path,
    output: &Path,
    precision: Precision,
    options: &LoadOptions,
) -> Result<LoadedModel, CheckpointError> {
    let model = load_pipeline_weights_with(input, options)?;
    let extension = output
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match extension.as_str() {
        "safetensors" => save_single_file(&model, output, precision)?,
        "ckpt" => save_ckpt(&model, output, precision)?,
        "pt" | "pth" | "bin" => {
            return Err(CheckpointError::invalid(
                output,
                "write a .ckpt, a .safetensors or a folder",
            ));
        }
        _ => save_diffusers_folder(&model, output, precision)?,
    }
    Ok(model)
}

/// The tensors of a VarStore, shared with it rather than copied, for saving.
pub fn var_store_tensors(vs: &VarStore) -> Tensors {
    vs.variables().into_iter().collect()
}

/// The four configs of a pipeline, as diffusers and transformers write them.
#[derive(Debug, Clone)]
pub(crate) struct Configs {
    pub unet: Value,
    pub vae: Value,
    pub text_encoder: Value,
    pub scheduler: Value,
}

fn read_diffusers_configs(root: &Path) -> Result<Configs, CheckpointError> {
    Ok(Configs {
        unet: read_json(&root.join("unet").join("config.json"))?,
        vae: read_json(&root.join("vae").join("config.json"))?,
        text_encoder: read_json(&root.join("text_encoder").join("config.json"))?,
        scheduler: read_json(&root.join("scheduler").join("scheduler_config.json"))?,
    })
}

fn layouts_for(configs: &Configs, path: &Path) -> Result<Layouts, CheckpointError> {
    Layouts::from_configs(&configs.unet, &configs.vae, &configs.text_encoder)
        .map_err(|e| CheckpointError::invalid(path, e))
}

fn scheduler_prediction(scheduler: &Value) -> PredictionType {
    serde_json::from_value(scheduler["prediction_type"].clone()).unwrap_or(PredictionType::Epsilon)
}

fn set_prediction_type(model: &mut LoadedModel, prediction: PredictionType) {
    model.prediction_type = prediction;
    if let Some(map) = model.scheduler.as_object_mut() {
        map.insert(
            "prediction_type".into(),
            serde_json::to_value(prediction).expect("enum serialises"),
        );
    }
}

/// The scheduler config SD 1.x/2.x repositories ship: scaled-linear betas 0.00085–0.012.
/// It leaves `timestep_spacing` unset on purpose: each sampler then takes its own default,
/// as diffusers does with those files.
pub(crate) fn default_scheduler(version: SdVersion, prediction: PredictionType) -> Value {
    let class = if version == SdVersion::Sd1 {
        "PNDMScheduler"
    } else {
        "DDIMScheduler"
    };
    json!({
        "_class_name": class,
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": prediction,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
        "clip_sample": false, "trained_betas": null
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_files_with_clips_vocabulary_get_the_bundled_tokenizer() {
        let path = Path::new("model.safetensors");
        let real = bundled_tokenizer_for(&json!({"vocab_size": 49408}), SdVersion::Sd2, path)
            .unwrap()
            .unwrap();
        assert!(real.join("vocab.json").is_file() && real.join("merges.txt").is_file());
        let config = std::fs::read_to_string(real.join("tokenizer_config.json")).unwrap();
        assert!(config.contains(r#""pad_token":"!""#), "{config}");
        assert_eq!(
            bundled_tokenizer_for(&json!({"vocab_size": 1014}), SdVersion::Sd1, path).unwrap(),
            None
        );
    }
}
