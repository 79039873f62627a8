//! DreamBooth fine-tuning of Stable Diffusion on libtorch: models, schedulers,
//! checkpoint loading and the command-line tools built on them.

pub mod bench;
pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod demo_photos;
pub mod export;
pub mod models;
pub mod pipeline;
pub mod runtime;
pub mod schedulers;
pub mod storage;
pub mod telemetry;
pub mod tiny_model;
pub mod tokenizer;
pub mod train;
