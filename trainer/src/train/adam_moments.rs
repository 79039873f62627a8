//! What both AdamW variants ([`super::optimizer::AdamW`], fp32 states, and
//! [`super::low_memory::LowMemoryAdamW`], bf16 states) have in common: the parameters
//! with their two moment estimates and step count, the gradient clip, PyTorch's update
//! rule, and saving and restoring the moments by parameter name.

use tch::{Device, Kind, Tensor};

use super::optimizer::AdamWConfig;
use super::state::saved_tensor;
use crate::cuda::foreach::AdamWTensors;

/// The trainable tensors (shared with their VarStore) by name, index-aligned with their
/// first and second moment estimates.
pub(super) struct AdamMoments {
    pub params: Vec<(String, Tensor)>,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// Optimizer steps taken, for bias correction.
    pub step: i64,
}

impl AdamMoments {
    /// Zero moments of dtype `kind` for every parameter.
    pub fn zeros(params: Vec<(String, Tensor)>, kind: Kind) -> Self {
        let zeros = |p: &Tensor| Tensor::zeros(p.size(), (kind, p.device()));
        let exp_avg = params.iter().map(|(_, p)| zeros(p)).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| zeros(p)).collect();
        Self {
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
        }
    }

    pub fn device(&self) -> Device {
        self.params.first().map_or(Device::Cpu, |(_, p)| p.device())
    }

    /// The gradients that exist, in parameter order.
    pub fn defined_grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// The parameters that have a gradient, with it and their moments, index-aligned:
    /// what a fused multi-tensor kernel takes.
    pub fn with_grads(&self) -> WithGrads {
        let mut group = WithGrads::default();
        for (((_, p), m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            let grad = p.grad();
            if grad.defined() {
                group.params.push(p.shallow_clone());
                group.grads.push(grad);
                group.exp_avgs.push(m.shallow_clone());
                group.exp_avg_sqs.push(v.shallow_clone());
            }
        }
        group
    }

    /// Zeroes the gradients in place.
    pub fn zero_grads(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Multiplies every gradient by `factor` (undoing a loss scale).
    pub fn scale_grads(&self, factor: f64) {
        let _guard = tch::no_grad_guard();
        for mut grad in self.defined_grads() {
            let _ = grad.g_mul_scalar_(factor);
        }
    }

    /// Scales all gradients so their global L2 norm (in fp32) is at most `max_norm`;
    /// returns the norm before clipping, as `torch.nn.utils.clip_grad_norm_` does.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let grads = self.defined_grads();
        if grads.is_empty() {
            return 0.0;
        }
        let total = global_norm(&grads).double_value(&[]);
        let coefficient = (max_norm / (total + 1e-6)).min(1.0);
        if coefficient < 1.0 {
            for mut g in grads {
                let _ = g.g_mul_scalar_(coefficient);
            }
        }
        total
    }

    /// [`AdamMoments::clip_grad_norm`] without reading the norm back: it stays on the
    /// device, and the clip is applied by a device-side coefficient.
    pub fn clip_grad_norm_on_device(&self, max_norm: f64) -> Tensor {
        let _guard = tch::no_grad_guard();
        let grads = self.defined_grads();
        if grads.is_empty() {
            return Tensor::zeros([], (Kind::Float, self.device()));
        }
        let total = global_norm(&grads);
        let coefficient = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for mut g in grads {
            let _ = g.g_mul_(&coefficient);
        }
        total
    }

    /// Counts a step and calls `update(param, (exp_avg, exp_avg_sq), fp32 grad, bias)`
    /// for every parameter with a gradient, without autograd.
    pub fn for_each_update(
        &mut self,
        mut update: impl FnMut(&mut Tensor, (&mut Tensor, &mut Tensor), &Tensor, BiasCorrection),
    ) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let bias = BiasCorrection { step: self.step };
        for (((_, param), m), v) in self
            .params
            .iter_mut()
            .zip(&mut self.exp_avg)
            .zip(&mut self.exp_avg_sq)
        {
            let grad = param.grad();
            if grad.defined() {
                update(param, (m, v), &grad.to_kind(Kind::Float), bias);
            }
        }
    }

    /// The moment estimates by parameter name (`exp_avg.<name>`, `exp_avg_sq.<name>`),
    /// shared with the optimizer, for saving.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = Vec::with_capacity(self.params.len() * 2);
        for (((name, _), m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            state.push((format!("exp_avg.{name}"), m.shallow_clone()));
            state.push((format!("exp_avg_sq.{name}"), v.shallow_clone()));
        }
        state
    }

    /// Restores moments saved by [`AdamMoments::state_tensors`] after `steps` updates,
    /// converted to this optimizer's dtype.
    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: i64) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        for (((name, _), m), v) in self
            .params
            .iter()
            .zip(&mut self.exp_avg)
            .zip(&mut self.exp_avg_sq)
        {
            for (slot, key) in [
                (m, format!("exp_avg.{name}")),
                (v, format!("exp_avg_sq.{name}")),
            ] {
                slot.copy_(saved_tensor(state, &key, &slot.size(), "the parameter")?);
            }
        }
        self.step = steps;
        Ok(())
    }

    /// Bytes held by the parameters and the moments (gradients not counted).
    pub fn memory_bytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let params: i64 = self.params.iter().map(|(_, p)| bytes(p)).sum();
        let states: i64 = self.exp_avg.iter().chain(&self.exp_avg_sq).map(bytes).sum();
        params + states
    }
}

/// See [`AdamMoments::with_grads`].
#[derive(Default)]
pub(super) struct WithGrads {
    params: Vec<Tensor>,
    grads: Vec<Tensor>,
    exp_avgs: Vec<Tensor>,
    exp_avg_sqs: Vec<Tensor>,
}

impl WithGrads {
    pub fn tensors(&self) -> AdamWTensors<'_> {
        AdamWTensors {
            params: &self.params,
            grads: &self.grads,
            exp_avgs: &self.exp_avgs,
            exp_avg_sqs: &self.exp_avg_sqs,
        }
    }
}

/// The global L2 norm of `grads`, summed in fp32 whatever their dtype (0-d, on their device).
fn global_norm(grads: &[Tensor]) -> Tensor {
    let squares: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
        .collect();
    Tensor::stack(&squares, 0).sum(Kind::Float).sqrt()
}

/// Adam's bias corrections after `step` updates: `1 - β₁ᵗ` and `√(1 - β₂ᵗ)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct BiasCorrection {
    step: i64,
}

impl AdamWConfig {
    /// PyTorch's AdamW update of one tensor, in place: decoupled weight decay, then the
    /// moments, then the bias-corrected step. `param`, `m` and `v` are updated in their
    /// own dtypes (fp32 for the reference numerics).
    pub(super) fn update_in_place(
        &self,
        param: &mut Tensor,
        (m, v): (&mut Tensor, &mut Tensor),
        grad: &Tensor,
        lr: f64,
        bias: BiasCorrection,
    ) {
        let bias1 = 1.0 - self.beta1.powi(bias.step as i32);
        let bias2_sqrt = (1.0 - self.beta2.powi(bias.step as i32)).sqrt();
        let _ = param.g_mul_scalar_(1.0 - lr * self.weight_decay);
        let _ = m.g_mul_scalar_(self.beta1);
        let _ = m.g_add_(&(grad * (1.0 - self.beta1)));
        let _ = v.g_mul_scalar_(self.beta2);
        let _ = v.g_add_(&(grad.square() * (1.0 - self.beta2)));
        let denominator = v.sqrt() / bias2_sqrt + self.eps;
        let update = &*m / denominator * (lr / bias1);
        let _ = param.g_sub_(&update.to_kind(param.kind()));
    }
}
