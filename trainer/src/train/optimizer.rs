//! AdamW with its state in plain tensors we own, so a training state can be saved and
//! resumed exactly (libtorch's C++ optimizers keep theirs out of reach). The update is
//! PyTorch's `AdamW` (decoupled weight decay, bias-corrected moments, fp32 states).

use tch::{Kind, Tensor};

/// fast-DreamBooth's and diffusers' settings: β 0.9/0.999, weight decay 1e-2, ε 1e-8.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
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

/// The parameters of one training phase and their moment estimates.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Optimizer steps taken, for bias correction.
    step: i64,
}

impl AdamW {
    /// `params` are the trainable tensors (shared with their VarStore) by name.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let zeros = |p: &Tensor| Tensor::zeros_like(p).to_kind(Kind::Float);
        let exp_avg = params.iter().map(|(_, p)| zeros(p)).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| zeros(p)).collect();
        Self {
            config,
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
        }
    }

    pub fn steps_taken(&self) -> i64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Multiplies every gradient by `factor` (undoing a loss scale).
    pub fn scale_grads(&mut self, factor: f64) {
        let _guard = tch::no_grad_guard();
        for (_, p) in &self.params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.g_mul_scalar_(factor);
            }
        }
    }

    /// Scales all gradients so their global L2 norm is at most `max_norm`; returns the
    /// norm before clipping (as `torch.nn.utils.clip_grad_norm_` does).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let squares: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        let total = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt();
        let coefficient = (max_norm / (total.double_value(&[]) + 1e-6)).min(1.0);
        if coefficient < 1.0 {
            for mut g in grads {
                let _ = g.g_mul_scalar_(coefficient);
            }
        }
        total.double_value(&[])
    }

    /// One update at learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            weight_decay,
            eps,
        } = self.config;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        for (((_, param), m), v) in self
            .params
            .iter_mut()
            .zip(&mut self.exp_avg)
            .zip(&mut self.exp_avg_sq)
        {
            let grad = param.grad();
            if !grad.defined() {
                continue;
            }
            let grad = grad.to_kind(Kind::Float);
            let _ = param.g_mul_scalar_(1.0 - lr * weight_decay);
            let _ = m.g_mul_scalar_(beta1);
            let _ = m.g_add_(&(&grad * (1.0 - beta1)));
            let _ = v.g_mul_scalar_(beta2);
            let _ = v.g_add_(&(grad.square() * (1.0 - beta2)));
            let denominator = v.sqrt() / bias2_sqrt + eps;
            let update = &*m / denominator * (lr / bias1);
            let _ = param.g_sub_(&update.to_kind(param.kind()));
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

    /// Restores moments saved by [`AdamW::state_tensors`] after `steps` updates.
    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: i64) -> Result<(), String> {
        let find = |key: &str| {
            state
                .iter()
                .find(|(n, _)| n == key)
                .map(|(_, t)| t)
                .ok_or_else(|| format!("optimizer state lacks `{key}`"))
        };
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
                let saved = find(&key)?;
                if saved.size() != slot.size() {
                    return Err(format!(
                        "`{key}` has shape {:?}, the parameter {:?}",
                        saved.size(),
                        slot.size()
                    ));
                }
                slot.copy_(saved);
            }
        }
        self.step = steps;
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

    #[test]
    fn saved_state_resumes_the_same_trajectory() {
        let run = |split: Option<usize>| {
            let p = Tensor::from_slice(&[0.5f32, -1.5, 2.0]).set_requires_grad(true);
            let mut opt = AdamW::new(
                vec![("w".into(), p.shallow_clone())],
                AdamWConfig::default(),
            );
            for i in 0..6 {
                if Some(i) == split {
                    let state: Vec<(String, Tensor)> = opt
                        .state_tensors()
                        .into_iter()
                        .map(|(n, t)| (n, t.copy()))
                        .collect();
                    let steps = opt.steps_taken();
                    opt = AdamW::new(
                        vec![("w".into(), p.shallow_clone())],
                        AdamWConfig::default(),
                    );
                    opt.load_state(&state, steps).unwrap();
                }
                opt.zero_grad();
                (p.square() * Tensor::from_slice(&[1f32, 2.0, 3.0]))
                    .sum(Kind::Float)
                    .backward();
                opt.step(0.05);
            }
            p.detach()
        };
        assert!(run(None).equal(&run(Some(3))));
    }
}
