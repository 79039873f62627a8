//! `hf://org/repo[@revision]` base models through the `hf-hub` crate: only the files a
//! diffusers folder needs for training (configs, tokenizer, and one weights variant per
//! network, fp16 when the repository has it), not the whole repository. `HF_ENDPOINT`
//! (mirrors) and `HF_TOKEN` (private or gated repositories) are honoured.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};

use super::{StorageError, stats};

/// Folders whose small files (configs, vocabulary) the trainer reads.
const CONFIG_FOLDERS: &[&str] = &["scheduler", "tokenizer", "text_encoder", "unet", "vae"];

/// Networks and their weight-file stems, as diffusers and transformers name them.
const NETWORKS: &[(&str, &str, &str)] = &[
    ("text_encoder", "model", "pytorch_model"),
    ("unet", "diffusion_pytorch_model", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model"),
];

/// `hf://org/repo@rev` → (`org/repo`, revision, default `main`).
pub fn parse_hf_uri(uri: &str) -> Result<(String, String), StorageError> {
    let invalid = |reason: &str| StorageError::InvalidUri {
        uri: uri.to_string(),
        reason: reason.to_string(),
    };
    let rest = uri
        .strip_prefix("hf://")
        .ok_or_else(|| invalid("expected `hf://org/repo[@revision]`"))?;
    let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
    let parts: Vec<&str> = repo.split('/').collect();
    let name_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if parts.len() != 2 || !parts.iter().all(|p| name_ok(p)) {
        return Err(invalid("expected `hf://org/repo[@revision]`"));
    }
    if revision.is_empty() || revision.contains("..") {
        return Err(invalid("the revision after `@` is empty or invalid"));
    }
    Ok((repo.to_string(), revision.to_string()))
}

/// The files of a diffusers repository the trainer needs, from its file list: every
/// config and tokenizer file, and per network the first weights variant present of
/// fp16 safetensors, safetensors, fp16 `.bin`, `.bin` (a sharded index stands for its
/// shards, which `fetch_diffusers` adds from the index).
pub fn select_diffusers_files(files: &[String]) -> Result<Vec<String>, String> {
    let has = |name: &str| files.iter().any(|f| f == name);
    if !has("model_index.json") {
        return Err("no model_index.json: not a diffusers folder".into());
    }
    let mut chosen = vec!["model_index.json".to_string()];
    for file in files {
        let Some((folder, name)) = file.split_once('/') else {
            continue;
        };
        let small = name.ends_with(".json") || name.ends_with(".txt");
        if CONFIG_FOLDERS.contains(&folder)
            && small
            && !name.contains('/')
            && !name.contains(".safetensors")
            && !name.contains(".bin")
        {
            chosen.push(file.clone());
        }
    }
    for (network, safetensors, bin) in NETWORKS {
        let candidates = [
            format!("{network}/{safetensors}.fp16.safetensors"),
            format!("{network}/{safetensors}.fp16.safetensors.index.json"),
            format!("{network}/{safetensors}.safetensors"),
            format!("{network}/{safetensors}.safetensors.index.json"),
            format!("{network}/{bin}.fp16.bin"),
            format!("{network}/{bin}.bin"),
        ];
        let weights = candidates
            .iter()
            .find(|c| has(c))
            .ok_or_else(|| format!("no {network} weights: looked for {}", candidates.join(", ")))?;
        chosen.push(weights.clone());
    }
    chosen.sort();
    chosen.dedup();
    Ok(chosen)
}

/// Downloads the files a diffusers folder needs into `cache` (hf-hub's own layout, so
/// later runs reuse them) and returns the snapshot folder.
pub fn fetch_diffusers(uri: &str, cache: &Path) -> Result<PathBuf, StorageError> {
    let (repo_id, revision) = parse_hf_uri(uri)?;
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    let api = ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .with_token(token)
        .with_progress(false)
        .with_retries(3)
        .build()
        .map_err(|e| hub_error(uri, e))?;
    let repo = api.repo(Repo::with_revision(
        repo_id,
        RepoType::Model,
        revision.clone(),
    ));
    let info = repo.info().map_err(|e| hub_error(uri, e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let wanted = select_diffusers_files(&files).map_err(|reason| StorageError::Rejected {
        uri: uri.to_string(),
        message: reason,
    })?;
    let started = Instant::now();
    let mut bytes = 0;
    let mut snapshot = None;
    for file in &wanted {
        let path = download(&repo, uri, file, &mut bytes)?;
        if file == "model_index.json" {
            snapshot = path.parent().map(Path::to_path_buf);
        }
        if file.ends_with(".index.json") {
            for shard in shard_names(&path, uri)? {
                let folder = file.rsplit_once('/').map(|(f, _)| f).unwrap_or("");
                download(&repo, uri, &format!("{folder}/{shard}"), &mut bytes)?;
            }
        }
    }
    stats::record_download(bytes, started.elapsed());
    snapshot.ok_or_else(|| StorageError::Rejected {
        uri: uri.to_string(),
        message: "model_index.json did not download".into(),
    })
}

fn download(
    repo: &ApiRepo,
    uri: &str,
    file: &str,
    bytes: &mut u64,
) -> Result<PathBuf, StorageError> {
    let path = repo
        .get(file)
        .map_err(|e| hub_error(&format!("{uri}/{file}"), e))?;
    *bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok(path)
}

/// The shard file names a sharded-weights index lists.
fn shard_names(index: &Path, uri: &str) -> Result<Vec<String>, StorageError> {
    let text = std::fs::read(index).map_err(|e| StorageError::io(index, "read", e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| StorageError::Rejected {
            uri: uri.to_string(),
            message: format!("{}: {e}", index.display()),
        })?;
    let mut names: Vec<String> = json["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    Ok(names)
}

/// hf-hub's errors, sorted into permanent (unknown repo, no access) and retriable
/// (unreachable, 5xx) like the other backends'.
fn hub_error(uri: &str, error: ApiError) -> StorageError {
    let message = error.to_string();
    let error = match &error {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(404, _) => StorageError::NotFound {
                location: uri.to_string(),
            },
            ureq::Error::Status(401 | 403, _) => StorageError::AccessDenied {
                uri: uri.to_string(),
                message: format!("{message}; set HF_TOKEN for a private or gated repository"),
            },
            ureq::Error::Status(status, _) if *status < 500 && *status != 429 => {
                StorageError::Rejected {
                    uri: uri.to_string(),
                    message,
                }
            }
            _ => StorageError::Unavailable {
                uri: uri.to_string(),
                attempts: 1,
                message,
            },
        },
        ApiError::IoError(_) | ApiError::TooManyRetries(_) => StorageError::Unavailable {
            uri: uri.to_string(),
            attempts: 1,
            message,
        },
        _ => StorageError::Rejected {
            uri: uri.to_string(),
            message,
        },
    };
    error.counted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_uris_name_a_repository_and_a_revision() {
        assert_eq!(
            parse_hf_uri("hf://org/repo").unwrap(),
            ("org/repo".into(), "main".into())
        );
        assert_eq!(
            parse_hf_uri("hf://stable-diffusion-v1-5/stable-diffusion-v1-5@fp16").unwrap(),
            (
                "stable-diffusion-v1-5/stable-diffusion-v1-5".into(),
                "fp16".into()
            )
        );
        for bad in ["hf://repo", "hf://a/b/c", "hf://org/repo@", "hf://../x"] {
            let err = parse_hf_uri(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn fp16_weights_are_preferred_and_other_files_skipped() {
        let files: Vec<String> = [
            ".gitattributes",
            "README.md",
            "model_index.json",
            "feature_extractor/preprocessor_config.json",
            "safety_checker/model.safetensors",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/pytorch_model.bin",
            "tokenizer/merges.txt",
            "tokenizer/vocab.json",
            "tokenizer/tokenizer_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.non_ema.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.bin",
        ]
        .map(String::from)
        .to_vec();
        let chosen = select_diffusers_files(&files).unwrap();
        assert_eq!(
            chosen,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.fp16.safetensors",
                "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json",
                "tokenizer/vocab.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.bin",
            ]
        );
        let without_unet: Vec<String> = files
            .iter()
            .filter(|f| !f.starts_with("unet/diffusion"))
            .cloned()
            .collect();
        let err = select_diffusers_files(&without_unet).unwrap_err();
        assert!(err.contains("no unet weights"), "{err}");
    }
}
