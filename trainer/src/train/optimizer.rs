//! AdamW with its state in plain tensors we own, so a training state can be saved and
//! resumed exactly (libtorch's C++ optimizers keep theirs out of reach). The update is
//! PyTorch's `AdamW` (decoupled weight decay, bias-corrected moments, fp32 states).
//!
//! Two ways to apply it: our own per-tensor loop (CPU, and the reference the tests pin
//! down), or libtorch's fused multi-tensor kernel with the step count and LR in device
//! tensors (CUDA), which launches a handful of kernels for the whole model, never syncs,
//! and can therefore be captured in a CUDA graph.

use tch::{Kind, Tensor};

use super::adam_moments::AdamMoments;
use crate::cuda::ShimError;
use crate::cuda::foreach::{self, AdamWHyper};

/// fast-DreamBooth's and diffusers' settings: β 0.9/0.999, weight decay 1e-2, ε 1e-8.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

impl AdamWConfig {
    /// The scalars a fused kernel takes.
    pub fn hyper(&self) -> AdamWHyper {
        AdamWHyper {
            beta1: self.beta1,
            beta2: self.beta2,
            weight_decay: self.weight_decay,
            eps: self.eps,
        }
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 1e-2,
            eps: 1e-8,
        }
    }
}

/// The parameters of one training phase and their fp32 moment estimates.
pub struct AdamW {
    config: AdamWConfig,
    moments: AdamMoments,
    /// Set when the fused kernel applies the update.
    fused: Option<DeviceCounters>,
}

/// What the fused kernel reads from device memory: the step count (mirroring
/// `AdamW::step`) and the learning rate, both 0-d fp32.
struct DeviceCounters {
    step: Tensor,
    lr: Tensor,
}

impl AdamW {
    /// `params` are the trainable tensors (shared with their VarStore) by name.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        Self {
            config,
            moments: AdamMoments::zeros(params, Kind::Float),
            fused: None,
        }
    }

    /// The same optimizer applied by libtorch's fused AdamW kernel (needs the shim).
    pub fn new_fused(
        params: Vec<(String, Tensor)>,
        config: AdamWConfig,
    ) -> Result<Self, ShimError> {
        if !crate::cuda::shim_available() {
            return Err(ShimError::Unavailable("fused AdamW"));
        }
        let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        let counter = || Tensor::zeros([], (Kind::Float, device));
        let mut optimizer = Self::new(params, config);
        optimizer.fused = Some(DeviceCounters {
            step: counter(),
            lr: counter(),
        });
        Ok(optimizer)
    }

    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    pub fn steps_taken(&self) -> i64 {
        self.moments.step
    }

    /// Resets the gradients for the next backward. Fused (CUDA): drops them, so they are
    /// not held through the forward pass (about 3 GiB for SD1.5's UNet), and so a CUDA
    /// graph captured next allocates them in its own pool. Loop: zeroes them in place.
    pub fn zero_grad(&mut self) {
        if self.fused.is_some() {
            let params: Vec<Tensor> = self
                .moments
                .params
                .iter()
                .map(|(_, p)| p.shallow_clone())
                .collect();
            foreach::clear_grads(&params).expect("dropping gradients");
            return;
        }
        self.moments.zero_grads();
    }

    /// [`AdamW::clip_grad_norm`] without reading the norm back: it stays on the device.
    /// Fused optimizers use one foreach norm; the loop one stays sync-free too.
    pub fn clip_grad_norm_on_device(&mut self, max_norm: f64) -> Tensor {
        if self.fused.is_some() {
            let _guard = tch::no_grad_guard();
            let grads = self.moments.defined_grads();
            if grads.is_empty() {
                return Tensor::zeros([], (Kind::Float, self.moments.device()));
            }
            return foreach::clip_grad_norm(&grads, max_norm).expect("clipping gradients");
        }
        self.moments.clip_grad_norm_on_device(max_norm)
    }

    /// Multiplies every gradient by `factor` (undoing a loss scale).
    pub fn scale_grads(&mut self, factor: f64) {
        self.moments.scale_grads(factor);
    }

    /// Scales all gradients so their global L2 norm is at most `max_norm`; returns the
    /// norm before clipping (as `torch.nn.utils.clip_grad_norm_` does).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        if self.fused.is_some() {
            return self.clip_grad_norm_on_device(max_norm).double_value(&[]);
        }
        self.moments.clip_grad_norm(max_norm)
    }

    /// One update at learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        if self.fused.is_some() {
            self.set_next_step(lr);
            self.apply_fused_update();
            return;
        }
        let config = self.config;
        self.moments.for_each_update(|param, moments, grad, bias| {
            config.update_in_place(param, moments, grad, lr, bias);
        });
    }

    /// The host half of a fused step: counts it and writes `lr` into the device tensor the
    /// kernel reads. A CUDA graph replays [`AdamW::apply_fused_update`] after this.
    pub fn set_next_step(&mut self, lr: f64) {
        let counters = self.fused.as_mut().expect("a fused optimizer");
        self.moments.step += 1;
        let _ = counters.lr.fill_(lr);
    }

    /// The device half of a fused step: `step += 1` on the device and one fused AdamW
    /// update of every parameter with a gradient. Launches kernels only.
    pub fn apply_fused_update(&mut self) {
        let counters = self.fused.as_ref().expect("a fused optimizer");
        let with_grads = self.moments.with_grads();
        foreach::fused_adamw(
            &with_grads.tensors(),
            &counters.step,
            &counters.lr,
            self.config.hyper(),
        )
        .expect("fused AdamW");
    }

    /// The moment estimates by parameter name (`exp_avg.<name>`, `exp_avg_sq.<name>`),
    /// shared with the optimizer, for saving.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.moments.state_tensors()
    }

    /// Restores moments saved by [`AdamW::state_tensors`] (or by the bf16
    /// `LowMemoryAdamW`, widened) after `steps` updates.
    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: i64) -> Result<(), String> {
        self.moments.load_state(state, steps)?;
        if let Some(counters) = &mut self.fused {
            let _ = counters.step.fill_(steps as f64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch 2.11 `torch.optim.AdamW(lr=0.1, weight_decay=0.01)` on p = [1, -2] with
    /// loss = sum(p²) for two steps gives these values.
    #[test]
    fn matches_torch_adamw_on_a_quadratic() {
        let p = Tensor::from_slice(&[1f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig::default(),
        );
        for _ in 0..2 {
            opt.zero_grad();
            p.square().sum(Kind::Float).backward();
            opt.step(0.1);
        }
        let values = Vec::<f32>::try_from(&p).unwrap();
        let expected = [0.798_519_1f32, -1.796_272_6];
        for (got, want) in values.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{values:?} vs {expected:?}");
        }
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let p = Tensor::from_slice(&[3f32, 4.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig::default(),
        );
        (&p * 1.0).sum(Kind::Float).backward();
        // Gradient [1, 1]: norm √2, clipped to 1.
        let norm = opt.clip_grad_norm(1.0);
        assert!((norm - 2f64.sqrt()).abs() < 1e-6);
        let grad = Vec::<f32>::try_from(p.grad()).unwrap();
        assert!((grad[0] - 1.0 / 2f32.sqrt()).abs() < 1e-5, "{grad:?}");
    }

    /// The parameter after six steps on a fixed quadratic, the optimizer rebuilt by
    /// `fresh` and restored from its saved state before step `split` (if any).
    fn resumed_trajectory(split: Option<usize>, fresh: impl Fn(&Tensor) -> AdamW) -> Tensor {
        let p = Tensor::from_slice(&[0.5f32, -1.5, 2.0]).set_requires_grad(true);
        let mut opt = fresh(&p);
        for i in 0..6 {
            if Some(i) == split {
                let state: Vec<(String, Tensor)> = opt
                    .state_tensors()
                    .into_iter()
                    .map(|(n, t)| (n, t.copy()))
                    .collect();
                let steps = opt.steps_taken();
                opt = fresh(&p);
                opt.load_state(&state, steps).unwrap();
            }
            opt.zero_grad();
            (p.square() * Tensor::from_slice(&[1f32, 2.0, 3.0]))
                .sum(Kind::Float)
                .backward();
            opt.step(0.05);
        }
        p.detach()
    }

    #[test]
    fn saved_state_resumes_the_same_trajectory() {
        let fresh = |p: &Tensor| {
            AdamW::new(
                vec![("w".into(), p.shallow_clone())],
                AdamWConfig::default(),
            )
        };
        assert!(resumed_trajectory(None, fresh).equal(&resumed_trajectory(Some(3), fresh)));
    }

    /// Same parameters, gradients and LRs through our loop and libtorch's fused kernel
    /// (its CPU kernel), with a clip that bites on the first steps.
    #[cfg(dbt_cuda_shim)]
    #[test]
    fn fused_kernel_matches_our_loop_on_the_cpu() {
        let run = |fused: bool| {
            let w = Tensor::from_slice(&[0.5f32, -1.5, 2.0, 4.0]).set_requires_grad(true);
            let b = Tensor::from_slice(&[0.25f32]).set_requires_grad(true);
            let params = vec![
                ("b".into(), b.shallow_clone()),
                ("w".into(), w.shallow_clone()),
            ];
            let mut opt = if fused {
                AdamW::new_fused(params, AdamWConfig::default()).unwrap()
            } else {
                AdamW::new(params, AdamWConfig::default())
            };
            let mut norms = Vec::new();
            for i in 0..5 {
                opt.zero_grad();
                ((w.square() * Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0])).sum(Kind::Float)
                    + &b * 3.0)
                    .sum(Kind::Float)
                    .backward();
                norms.push(opt.clip_grad_norm(1.0));
                opt.step(0.05 * f64::from(i + 1));
            }
            (w.detach(), b.detach(), norms, opt.steps_taken())
        };
        let (own_w, own_b, own_norms, own_steps) = run(false);
        let (fused_w, fused_b, fused_norms, fused_steps) = run(true);
        assert_eq!(own_steps, fused_steps);
        for (a, b) in own_norms.iter().zip(&fused_norms) {
            assert!(
                (a - b).abs() < 1e-5 * a.max(1.0),
                "{own_norms:?} vs {fused_norms:?}"
            );
        }
        assert!(own_norms[0] > 1.0, "the clip is exercised");
        let diff = (own_w - &fused_w).abs().max().double_value(&[])
            + (own_b - fused_b).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "fused AdamW differs by {diff}: {fused_w:?}");
    }

    /// The device-side clip gives the host-side clip's norm and clipped gradients.
    #[test]
    fn clip_on_device_matches_the_host_clip() {
        for fused in [false, cfg!(dbt_cuda_shim)] {
            let p = Tensor::from_slice(&[3f32, 4.0]).set_requires_grad(true);
            let params = vec![("p".into(), p.shallow_clone())];
            let mut opt = if fused {
                AdamW::new_fused(params, AdamWConfig::default()).unwrap()
            } else {
                AdamW::new(params, AdamWConfig::default())
            };
            (&p * 3.0).sum(Kind::Float).backward();
            let norm = opt.clip_grad_norm_on_device(1.0).double_value(&[]);
            assert!((norm - 18f64.sqrt()).abs() < 1e-5, "{norm}");
            let grad = Vec::<f32>::try_from(p.grad()).unwrap();
            assert!((grad[0] - 1.0 / 2f32.sqrt()).abs() < 1e-5, "{grad:?}");
        }
    }

    #[test]
    fn fused_state_resumes_the_same_trajectory() {
        if !crate::cuda::shim_available() {
            assert!(AdamW::new_fused(Vec::new(), AdamWConfig::default()).is_err());
            return;
        }
        let fresh = |p: &Tensor| {
            AdamW::new_fused(
                vec![("w".into(), p.shallow_clone())],
                AdamWConfig::default(),
            )
            .unwrap()
        };
        assert!(resumed_trajectory(None, fresh).equal(&resumed_trajectory(Some(3), fresh)));
    }
}
