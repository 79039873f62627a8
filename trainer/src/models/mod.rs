//! Stable Diffusion's networks, assembled from the same building blocks and with the
//! same parameter names as diffusers, so real checkpoints load unchanged.

pub mod attention;
pub mod checkpointing;
pub mod clip;
pub mod config;
pub mod downsampling;
pub mod embeddings;
pub mod resnet;
pub mod unet;
pub mod unet_blocks;
pub mod upsampling;
pub mod vae;
pub mod versions;

pub use config::{ConfigError, UNetConfig, VaeConfig};
pub use unet::{UNet2DConditionModel, unet};
pub use vae::{AutoencoderKL, DiagonalGaussian, autoencoder_kl};
