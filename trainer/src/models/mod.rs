//! Stable Diffusion's networks, assembled from the same building blocks and with the
//! same parameter names as diffusers, so real checkpoints load unchanged.

pub mod clip;
