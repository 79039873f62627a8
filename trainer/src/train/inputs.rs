//! A session's inputs as local paths: the base model, the instance images and the
//! class images, fetched from wherever their URIs point (`file://` in place; `s3://`,
//! `https://`, `hf://` into the cache) before anything is decoded or loaded.

use std::path::{Path, PathBuf};

use dreambooth_api::SessionSpec;

use super::session::SessionError;
use crate::storage::{Fetcher, StorageError, StorageSettings};

pub struct Inputs {
    /// A diffusers folder or a single checkpoint file.
    pub base_model: PathBuf,
    pub dataset: PathBuf,
    /// Only when prior preservation names a folder of class images.
    pub class_images: Option<PathBuf>,
    /// Keeps a default (temp) cache alive while the paths above are in use.
    _cache: Fetcher,
}

/// Fetches every input of `spec`, caching under `cache_dir` (a temp folder if `None`).
pub fn fetch_inputs(
    spec: &SessionSpec,
    settings: StorageSettings,
    cache_dir: Option<&Path>,
) -> Result<Inputs, SessionError> {
    let fetcher =
        Fetcher::new(cache_dir, settings).map_err(|e| storage_failure("--cache-dir", e))?;
    let base_model = fetcher
        .fetch(
            &spec.base_model.effective_uri(),
            spec.base_model.sha256.as_deref(),
        )
        .map_err(|e| storage_failure("spec.baseModel.uri", e))?;
    let dataset = fetcher
        .fetch(&spec.dataset.uri, None)
        .map_err(|e| storage_failure("spec.dataset.uri", e))?;
    let class_uri = spec
        .dataset
        .prior_preservation
        .as_ref()
        .and_then(|p| p.class_images_uri.as_ref());
    let class_images =
        match class_uri {
            Some(uri) => Some(fetcher.fetch(uri, None).map_err(|e| {
                storage_failure("spec.dataset.priorPreservation.classImagesUri", e)
            })?),
            None => None,
        };
    Ok(Inputs {
        base_model,
        dataset,
        class_images,
        _cache: fetcher,
    })
}

/// A location that failed, named by its field: retriable failures exit 75 for the
/// operator to retry; a wrong checksum pin is bad data; anything else (missing object
/// or bucket, refused credentials, bad URI) is the session's config.
pub fn storage_failure(field: &str, error: StorageError) -> SessionError {
    let message = format!("{field}: {error}");
    if error.is_retriable() {
        SessionError::Infrastructure(message)
    } else if matches!(error, StorageError::ChecksumMismatch { .. }) {
        SessionError::Data(message)
    } else {
        SessionError::Config(message)
    }
}
