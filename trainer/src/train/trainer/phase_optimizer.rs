//! The optimizer of the phase being trained, chosen once by `training.memory` and the
//! device: the reference AdamW (fp32 states; libtorch's fused kernel on CUDA), the same
//! update over packed weights ([`PackedAdamW`], the UNet under bf16 autocast on CUDA), or
//! the bf16 [`LowMemoryAdamW`]. The loop, the CUDA-graph capture and the training state
//! talk to this one type, so the choice is made in one place.

use tch::{Device, Tensor};

use dreambooth_api::spec::MemoryMode;

use crate::cuda;
use crate::train::low_memory::LowMemoryAdamW;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::packed_master::PackedAdamW;

pub enum PhaseOptimizer {
    /// fp32 master weights and states.
    Full(AdamW),
    /// fp32 master weights packed as bf16 + remainder, fp32 states.
    Packed(PackedAdamW),
    /// bf16 weights and states with stochastic rounding.
    LowMemory(LowMemoryAdamW),
}

impl PhaseOptimizer {
    /// The optimizer `memory` asks for over `params` on `device`: packed weights when
    /// `pack` (the caller checked bf16 autocast and the kernels), the fused kernel where
    /// the CUDA shim can run it, our own loop elsewhere (the tested reference).
    pub fn for_memory_mode(
        memory: MemoryMode,
        params: Vec<(String, Tensor)>,
        device: Device,
        pack: bool,
    ) -> Self {
        let config = AdamWConfig::default();
        match memory {
            MemoryMode::LowMemory => Self::LowMemory(LowMemoryAdamW::new(params, config)),
            MemoryMode::Default if pack => Self::Packed(PackedAdamW::new(params, config)),
            MemoryMode::Default if device.is_cuda() && cuda::shim_available() => {
                Self::Full(AdamW::new_fused(params, config).expect("the shim is built"))
            }
            MemoryMode::Default => Self::Full(AdamW::new(params, config)),
        }
    }

    /// Whether its update is all device kernels with the LR read from memory, which a
    /// CUDA graph can capture: the fused and the packed AdamW.
    pub fn is_capturable(&self) -> bool {
        match self {
            Self::Full(adamw) => adamw.is_fused(),
            Self::Packed(_) => true,
            Self::LowMemory(_) => false,
        }
    }

    pub fn steps_taken(&self) -> i64 {
        match self {
            Self::Full(o) => o.steps_taken(),
            Self::Packed(o) => o.steps_taken(),
            Self::LowMemory(o) => o.steps_taken(),
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            Self::Full(o) => o.zero_grad(),
            Self::Packed(o) => o.zero_grad(),
            Self::LowMemory(o) => o.zero_grad(),
        }
    }

    /// Multiplies every gradient by `factor` (undoing an fp16 loss scale).
    pub fn scale_grads(&mut self, factor: f64) {
        match self {
            Self::Full(o) => o.scale_grads(factor),
            Self::Packed(_) => unreachable!("packed weights run under bf16, without loss scaling"),
            Self::LowMemory(o) => o.scale_grads(factor),
        }
    }

    /// Clips the gradients' global norm to `max_norm`; returns the norm before clipping.
    /// Only fp16 loss scaling needs the norm on the host, before the update.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        match self {
            Self::Full(o) => o.clip_grad_norm(max_norm),
            Self::Packed(_) => unreachable!("packed weights run under bf16, without loss scaling"),
            Self::LowMemory(o) => o.clip_grad_norm(max_norm),
        }
    }

    pub fn step(&mut self, lr: f64) {
        match self {
            Self::Full(o) => o.step(lr),
            Self::Packed(o) => {
                o.set_next_step(lr);
                let _norm = o.apply_update(f64::INFINITY).expect("packed AdamW");
            }
            Self::LowMemory(o) => o.step(lr),
        }
    }

    /// Clip to `max_norm` and update at `lr`, the norm left on the device (no sync).
    pub fn clip_and_step_on_device(&mut self, max_norm: f64, lr: f64) -> Tensor {
        match self {
            Self::Packed(o) => {
                o.set_next_step(lr);
                o.apply_update(max_norm).expect("packed AdamW")
            }
            Self::Full(o) => {
                let norm = o.clip_grad_norm_on_device(max_norm);
                o.step(lr);
                norm
            }
            Self::LowMemory(o) => {
                let norm = o.clip_grad_norm_on_device(max_norm);
                o.step(lr);
                norm
            }
        }
    }

    /// The host half of a captured step: counts it and writes `lr` for the device.
    pub fn set_next_step(&mut self, lr: f64) {
        match self {
            Self::Full(o) => o.set_next_step(lr),
            Self::Packed(o) => o.set_next_step(lr),
            Self::LowMemory(_) => unreachable!("lowMemory steps are not captured"),
        }
    }

    /// The device half of a captured step: clip to `max_norm` and update, kernels only.
    /// Returns the norm before clipping.
    pub fn apply_captured_update(&mut self, max_norm: f64) -> Tensor {
        match self {
            Self::Full(o) => {
                let norm = o.clip_grad_norm_on_device(max_norm);
                o.apply_fused_update();
                norm
            }
            Self::Packed(o) => o.apply_update(max_norm).expect("packed AdamW"),
            Self::LowMemory(_) => unreachable!("lowMemory steps are not captured"),
        }
    }

    /// The exact fp32 weights of the packed parameters (on the CPU), by name; empty
    /// unless packed. Exports and training states read these instead of the bf16 halves.
    pub fn master_weights(&self) -> Vec<(String, Tensor)> {
        match self {
            Self::Packed(o) => o.master_weights(),
            Self::Full(_) | Self::LowMemory(_) => Vec::new(),
        }
    }

    /// Leaves the phase: packed parameters get their fp32 masters back.
    pub fn finish(self) {
        if let Self::Packed(o) = self {
            o.unpack_into_params();
        }
    }

    /// The moments by parameter name, in the optimizer's dtype (bf16 for `lowMemory`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            Self::Full(o) => o.state_tensors(),
            Self::Packed(o) => o.state_tensors(),
            Self::LowMemory(o) => o.state_tensors(),
        }
    }

    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: i64) -> Result<(), String> {
        match self {
            Self::Full(o) => o.load_state(state, steps),
            Self::Packed(o) => o.load_state(state, steps),
            Self::LowMemory(o) => o.load_state(state, steps),
        }
    }
}
