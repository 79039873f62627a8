//! The optimizer of the phase being trained, chosen once by `training.memory`: the
//! reference AdamW (fp32 states; libtorch's fused kernel on CUDA) or the bf16
//! [`LowMemoryAdamW`]. The loop, the CUDA-graph capture and the training state talk to
//! this one type, so the memory mode is decided in one place.

use tch::{Device, Tensor};

use dreambooth_api::spec::MemoryMode;

use crate::cuda;
use crate::train::low_memory::LowMemoryAdamW;
use crate::train::optimizer::{AdamW, AdamWConfig};

pub enum PhaseOptimizer {
    /// fp32 master weights and states.
    Full(AdamW),
    /// bf16 weights and states with stochastic rounding.
    LowMemory(LowMemoryAdamW),
}

impl PhaseOptimizer {
    /// The optimizer `memory` asks for over `params` on `device`: the fused kernel where
    /// the CUDA shim can run it, our own loop elsewhere (the tested reference).
    pub fn for_memory_mode(
        memory: MemoryMode,
        params: Vec<(String, Tensor)>,
        device: Device,
    ) -> Self {
        let config = AdamWConfig::default();
        match memory {
            MemoryMode::LowMemory => Self::LowMemory(LowMemoryAdamW::new(params, config)),
            MemoryMode::Default if device.is_cuda() && cuda::shim_available() => {
                Self::Full(AdamW::new_fused(params, config).expect("the shim is built"))
            }
            MemoryMode::Default => Self::Full(AdamW::new(params, config)),
        }
    }

    /// The fused AdamW, the only optimizer a CUDA graph can capture.
    pub fn fused(&mut self) -> Option<&mut AdamW> {
        match self {
            Self::Full(adamw) if adamw.is_fused() => Some(adamw),
            _ => None,
        }
    }

    pub fn is_fused(&self) -> bool {
        matches!(self, Self::Full(adamw) if adamw.is_fused())
    }

    pub fn steps_taken(&self) -> i64 {
        match self {
            Self::Full(o) => o.steps_taken(),
            Self::LowMemory(o) => o.steps_taken(),
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            Self::Full(o) => o.zero_grad(),
            Self::LowMemory(o) => o.zero_grad(),
        }
    }

    pub fn scale_grads(&mut self, factor: f64) {
        match self {
            Self::Full(o) => o.scale_grads(factor),
            Self::LowMemory(o) => o.scale_grads(factor),
        }
    }

    /// Clips the gradients' global norm to `max_norm`; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        match self {
            Self::Full(o) => o.clip_grad_norm(max_norm),
            Self::LowMemory(o) => o.clip_grad_norm(max_norm),
        }
    }

    /// The clip with the norm left on the device (no sync).
    pub fn clip_grad_norm_on_device(&mut self, max_norm: f64) -> Tensor {
        match self {
            Self::Full(o) => o.clip_grad_norm_on_device(max_norm),
            Self::LowMemory(o) => o.clip_grad_norm_on_device(max_norm),
        }
    }

    pub fn step(&mut self, lr: f64) {
        match self {
            Self::Full(o) => o.step(lr),
            Self::LowMemory(o) => o.step(lr),
        }
    }

    /// The moments by parameter name, in the optimizer's dtype (bf16 for `lowMemory`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            Self::Full(o) => o.state_tensors(),
            Self::LowMemory(o) => o.state_tensors(),
        }
    }

    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: i64) -> Result<(), String> {
        match self {
            Self::Full(o) => o.load_state(state, steps),
            Self::LowMemory(o) => o.load_state(state, steps),
        }
    }
}
