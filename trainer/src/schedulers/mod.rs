//! Noise schedulers: DDPM for training, and the samplers used for inference.
