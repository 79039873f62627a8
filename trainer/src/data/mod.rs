//! Dataset preparation: a folder of photos (and optional `.txt` captions) becomes
//! captioned RGB images at the training size, with a report of what was used and why.

pub mod buckets;
pub mod captions;
pub mod crop;
pub mod decode;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dreambooth_api::manifest::{DatasetReport, ReportedImage, SkippedFile};
use dreambooth_api::spec::{Captions, Dataset};
use image::RgbImage;
use sha2::{Digest, Sha256};

pub use decode::ImageProblem;

/// Fewer images than this is a warning; below `RECOMMENDED_IMAGES` a hint.
pub const MIN_IMAGES: usize = 5;
pub const RECOMMENDED_IMAGES: usize = 10;

/// One training image, cropped and resized.
#[derive(Debug, Clone)]
pub struct InstanceImage {
    pub file: String,
    pub caption: String,
    pub pixels: RgbImage,
}

#[derive(Debug)]
pub struct PreparedDataset {
    pub images: Vec<InstanceImage>,
    pub report: DatasetReport,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{dir}: cannot list the dataset folder: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {problem}")]
    InvalidImage {
        file: PathBuf,
        problem: ImageProblem,
    },
    #[error("{file}: captions are `external` but {caption_file} is missing")]
    MissingCaption {
        file: PathBuf,
        caption_file: PathBuf,
    },
    #[error(
        "{file}: the caption is empty; name the file after the token (e.g. `sksper (1).jpg`) or set dataset.token"
    )]
    EmptyCaption { file: PathBuf },
    #[error("{dir}: no usable images (JPEG, PNG, WebP or BMP)")]
    NoImages { dir: PathBuf },
}

impl DataError {
    /// The file at fault, for errors `skipInvalid` may skip.
    fn skippable_file(&self) -> Option<&Path> {
        match self {
            DataError::InvalidImage { file, .. }
            | DataError::MissingCaption { file, .. }
            | DataError::EmptyCaption { file } => Some(file),
            DataError::ReadDir { .. } | DataError::NoImages { .. } => None,
        }
    }
}

/// Reads every image in `dir` (sorted by name, so the order is reproducible), captions,
/// crops and resizes it. A bad file fails the whole preparation unless
/// `dataset.skipInvalid` is set, in which case it is skipped and reported.
pub fn prepare(dir: &Path, dataset: &Dataset) -> Result<PreparedDataset, DataError> {
    let (candidates, caption_files) = list_folder(dir)?;
    let bucket_sizes = dataset
        .buckets
        .then(|| buckets::bucket_sizes(dataset.resolution));
    let mut report = DatasetReport::default();
    let mut images = Vec::new();
    let mut by_hash: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in candidates {
        let name = file_name(&path);
        match prepare_one(&path, dataset, &caption_files, bucket_sizes.as_deref()) {
            Ok((image, reported)) => {
                if reported.width.min(reported.height)
                    < reported.train_width.min(reported.train_height)
                {
                    report.smaller_than_resolution.push(name.clone());
                }
                by_hash
                    .entry(reported.sha256.clone())
                    .or_default()
                    .push(name);
                report.images.push(reported);
                images.push(image);
            }
            Err(error) if dataset.skip_invalid && error.skippable_file().is_some() => {
                tracing::warn!("skipping {error}");
                report.skipped.push(SkippedFile {
                    file: name,
                    reason: skip_reason(&error),
                });
            }
            Err(error) => return Err(error),
        }
    }
    if images.is_empty() {
        return Err(DataError::NoImages {
            dir: dir.to_path_buf(),
        });
    }
    report.duplicates = by_hash
        .into_values()
        .filter(|files| files.len() > 1)
        .collect();
    report.warnings = warnings(&report);
    Ok(PreparedDataset { images, report })
}

/// Image candidates (every non-hidden file that is not a `.txt`) and the caption files by stem.
fn list_folder(dir: &Path) -> Result<(Vec<PathBuf>, BTreeMap<String, PathBuf>), DataError> {
    let read_error = |source| DataError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut candidates = Vec::new();
    let mut caption_files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        let name = file_name(&path);
        if name.starts_with('.') || path.is_dir() {
            continue;
        }
        let is_text = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
        if is_text {
            caption_files.insert(stem(&path), path);
        } else {
            candidates.push(path);
        }
    }
    candidates.sort();
    Ok((candidates, caption_files))
}

fn prepare_one(
    path: &Path,
    dataset: &Dataset,
    caption_files: &BTreeMap<String, PathBuf>,
    bucket_sizes: Option<&[(u32, u32)]>,
) -> Result<(InstanceImage, ReportedImage), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::InvalidImage {
        file: path.to_path_buf(),
        problem: ImageProblem::Unreadable(e.to_string()),
    })?;
    let rgb = decode::decode_rgb_bytes(&bytes).map_err(|problem| DataError::InvalidImage {
        file: path.to_path_buf(),
        problem,
    })?;
    let caption = caption_for(path, dataset, caption_files)?;
    let (train_width, train_height) = match bucket_sizes {
        Some(sizes) => buckets::nearest_bucket(sizes, rgb.width(), rgb.height()),
        None => (dataset.resolution, dataset.resolution),
    };
    let pixels = crop::crop_and_resize(&rgb, dataset.crop, train_width, train_height);
    let reported = ReportedImage {
        file: file_name(path),
        caption: caption.clone(),
        width: rgb.width(),
        height: rgb.height(),
        train_width,
        train_height,
        sha256: hex::encode(Sha256::digest(&bytes)),
    };
    Ok((
        InstanceImage {
            file: reported.file.clone(),
            caption,
            pixels,
        },
        reported,
    ))
}

fn caption_for(
    path: &Path,
    dataset: &Dataset,
    caption_files: &BTreeMap<String, PathBuf>,
) -> Result<String, DataError> {
    let from_name = captions::caption_from_stem(&stem(path));
    let caption = match dataset.captions {
        Captions::Filename => from_name,
        Captions::External => {
            let caption_file =
                caption_files
                    .get(&stem(path))
                    .ok_or_else(|| DataError::MissingCaption {
                        file: path.to_path_buf(),
                        caption_file: path.with_extension("txt"),
                    })?;
            let text =
                std::fs::read_to_string(caption_file).map_err(|e| DataError::InvalidImage {
                    file: caption_file.clone(),
                    problem: ImageProblem::Unreadable(e.to_string()),
                })?;
            captions::external_caption(&from_name, &text)
        }
        Captions::Prompt => {
            let token = dataset.token.clone().unwrap_or(from_name);
            let template = dataset.instance_prompt.as_deref().unwrap_or("{token}");
            captions::prompt_caption(template, &token)
        }
    };
    if caption.trim().is_empty() {
        return match &dataset.token {
            Some(token) if dataset.captions == Captions::Filename => Ok(token.clone()),
            _ => Err(DataError::EmptyCaption {
                file: path.to_path_buf(),
            }),
        };
    }
    Ok(caption)
}

fn warnings(report: &DatasetReport) -> Vec<String> {
    let mut warnings = Vec::new();
    let count = report.images.len();
    if count < MIN_IMAGES {
        warnings.push(format!(
            "only {count} image(s): DreamBooth needs at least {MIN_IMAGES}, and 10-20 varied photos work best"
        ));
    } else if count < RECOMMENDED_IMAGES {
        warnings.push(format!(
            "{count} images: 10-20 varied photos usually give a more faithful model"
        ));
    }
    for group in &report.duplicates {
        warnings.push(format!(
            "identical files {}: each copy is trained on again",
            group.join(", ")
        ));
    }
    if !report.smaller_than_resolution.is_empty() {
        warnings.push(format!(
            "{} image(s) smaller than the training size are upscaled and may look soft: {}",
            report.smaller_than_resolution.len(),
            report.smaller_than_resolution.join(", ")
        ));
    }
    if !report.skipped.is_empty() {
        warnings.push(format!(
            "{} file(s) skipped as unusable",
            report.skipped.len()
        ));
    }
    warnings
}

fn skip_reason(error: &DataError) -> String {
    match error {
        DataError::InvalidImage { problem, .. } => problem.to_string(),
        DataError::MissingCaption { caption_file, .. } => {
            format!("{} is missing", file_name(caption_file))
        }
        DataError::EmptyCaption { .. } => "empty caption".into(),
        DataError::ReadDir { .. } | DataError::NoImages { .. } => error.to_string(),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A mirror image, for `dataset.flip`.
pub fn flipped(image: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(image)
}
