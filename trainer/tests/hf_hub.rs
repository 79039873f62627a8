//! `hf://org/repo` through the hf-hub crate against a local server that speaks the
//! hub's protocol (`/api/models/<repo>/revision/<rev>` and `/<repo>/resolve/<rev>/<file>`
//! with range requests): only the files training needs are fetched, fp16 weights are
//! preferred, `HF_ENDPOINT` and `HF_TOKEN` are honoured, and the result loads.
//!
//! One test in its own binary: it sets process environment variables.

#[path = "common/http_server.rs"]
mod http_server;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use dreambooth_trainer::checkpoint::load_pipeline_weights;
use dreambooth_trainer::storage::{Fetcher, StorageSettings, sha256_hex};
use dreambooth_trainer::tiny_model::{TinyVariant, write_tiny_model};
use http_server::{Request, Response, TestServer};

const REPO: &str = "tiny-org/tiny-sd";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_test_token";

/// The repository: the tiny model with its UNet weights offered as the fp16 variant,
/// plus files a trainer must not download (garbage, so loading them would fail).
fn repository(model: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![model.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path
                    .strip_prefix(model)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    let unet = files
        .remove("unet/diffusion_pytorch_model.safetensors")
        .unwrap();
    files.insert("unet/diffusion_pytorch_model.fp16.safetensors".into(), unet);
    for unwanted in [
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "safety_checker/model.safetensors",
        "README.md",
    ] {
        files.insert(unwanted.into(), b"must not be downloaded".to_vec());
    }
    files
}

/// Answers like the hub: repository info, and resolve URLs honouring `Range`.
fn hub(files: &BTreeMap<String, Vec<u8>>, request: &Request) -> Response {
    if request.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return Response::new(401, "missing token");
    }
    let path = request.path.split('?').next().unwrap();
    if path == format!("/api/models/{REPO}/revision/main") {
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings });
        return Response::new(200, body.to_string()).header("Content-Type", "application/json");
    }
    let Some(file) = path.strip_prefix(&format!("/{REPO}/resolve/main/")) else {
        return Response::new(404, "no such route");
    };
    let Some(content) = files.get(file) else {
        return Response::new(404, "no such file");
    };
    let len = content.len();
    let start = request
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let end = match request.header("range") {
        Some("bytes=0-0") => 0,
        _ => len.saturating_sub(1),
    };
    let response = match start {
        Some(start) => Response::new(206, content[start..=end.max(start).min(len - 1)].to_vec())
            .header("Content-Range", format!("bytes {start}-{end}/{len}")),
        None => Response::new(200, content.clone()),
    };
    response
        .header("X-Repo-Commit", COMMIT)
        .header("ETag", format!("\"{}\"", sha256_hex(content)))
}

#[test]
fn a_diffusers_repository_downloads_only_what_training_needs_and_loads() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    write_tiny_model(&model, TinyVariant::Sd1, 5).unwrap();
    let files = Arc::new(repository(&model));
    let served = files.clone();
    let server = TestServer::start(move |request| hub(&served, request));
    // SAFETY: this binary's only test sets these before any thread reads them.
    unsafe {
        std::env::set_var("HF_ENDPOINT", server.url(""));
        std::env::set_var("HF_TOKEN", TOKEN);
    }

    let cache = work.path().join("cache");
    let fetcher = Fetcher::new(Some(&cache), StorageSettings::default()).unwrap();
    let snapshot = fetcher.fetch(&format!("hf://{REPO}"), None).unwrap();
    assert!(snapshot.starts_with(&cache), "{}", snapshot.display());
    assert!(snapshot.ends_with(COMMIT), "{}", snapshot.display());

    let downloaded: Vec<String> = server
        .requests()
        .iter()
        .filter_map(|r| r.split("/resolve/main/").nth(1).map(str::to_string))
        .collect();
    for unwanted in [
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "safety_checker/model.safetensors",
        "README.md",
    ] {
        assert!(
            !downloaded.iter().any(|d| d == unwanted),
            "{unwanted} was fetched"
        );
        assert!(!snapshot.join(unwanted).exists());
    }
    for needed in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert_eq!(
            std::fs::read(snapshot.join(needed)).unwrap(),
            files[needed],
            "{needed}"
        );
    }
    let loaded = load_pipeline_weights(&snapshot).unwrap();
    assert!(loaded.tokenizer.is_some());
    assert!(!loaded.unet.tensors.is_empty());

    // A second run with the same cache asks for the file list only.
    let before = server.requests().len();
    let again = Fetcher::new(Some(&cache), StorageSettings::default())
        .unwrap()
        .fetch(&format!("hf://{REPO}@main"), None)
        .unwrap();
    assert_eq!(again, snapshot);
    let later = &server.requests()[before..];
    assert!(
        later.iter().all(|r| r.contains("/api/models/")),
        "{later:?}"
    );

    // Without the token the hub refuses, and the error says what to do.
    unsafe { std::env::remove_var("HF_TOKEN") };
    let err = Fetcher::new(
        Some(&work.path().join("cache2")),
        StorageSettings::default(),
    )
    .unwrap()
    .fetch(&format!("hf://{REPO}"), None)
    .unwrap_err();
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    assert!(!err.is_retriable());
}
