//! The `lowMemory` optimizer: AdamW over bf16 weights with bf16 moment estimates, half
//! the bytes of fp32 master weights and states (SD 1.5's UNet: ~6.9 GB of weights, grads
//! and states instead of ~13.8 GB).
//!
//! Plain bf16 AdamW stalls: bf16 keeps 8 significant bits, so an update smaller than
//! half a weight's spacing (lr 1e-6 on a weight near 0.1) rounds back to the old weight,
//! and `v ← 0.999·v + 0.001·g²` never moves `v`. Here every update is computed in fp32
//! and written back with *stochastic rounding*: up or down at random, in proportion to
//! the distance, so each stored value is unbiased and small updates land on average.

use tch::{Device, Kind, Tensor};

use super::adam_moments::AdamMoments;
use super::optimizer::AdamWConfig;

/// How fp32 results are stored back into bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Unbiased random rounding: what the optimizer uses.
    Stochastic,
    /// Round to nearest, as a plain `.to(bfloat16)` does (for comparison).
    Nearest,
}

/// `x` (fp32) rounded to bf16 up or down at random, with the probability of rounding up
/// equal to how far `x` lies towards the upper neighbour. The noise comes from the
/// default generator of `x`'s device, so a run seeded per step stays reproducible.
pub fn stochastic_round_to_bf16(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    // bf16 is the top 16 bits of fp32: add uniform noise below them, then truncate.
    // Adding to the bit pattern moves away from zero for either sign, as rounding must.
    let noise = Tensor::randint_low(0, 1 << 16, x.size(), (Kind::Int, x.device()));
    let bits = x.view_dtype(Kind::Int) + noise;
    // -65536 is 0xFFFF0000 as an i32: keep sign, exponent and the top 7 mantissa bits.
    let truncated = bits.bitwise_and(-65536i64).view_dtype(Kind::Float);
    // Exact: the low 16 bits are zero. NaN and infinity pass through unchanged.
    let finite = x.isfinite();
    truncated.where_self(&finite, &x).to_kind(Kind::BFloat16)
}

fn store(x: &Tensor, rounding: Rounding) -> Tensor {
    match rounding {
        Rounding::Stochastic => stochastic_round_to_bf16(x),
        Rounding::Nearest => x.to_kind(Kind::BFloat16),
    }
}

/// AdamW (PyTorch's update, the same hyper-parameters as [`super::optimizer::AdamW`])
/// whose weights and moments live in bf16. Parameters that are not bf16 are updated in
/// their own dtype, so a model can keep a few tensors (norms) in fp32.
pub struct LowMemoryAdamW {
    config: AdamWConfig,
    rounding: Rounding,
    moments: AdamMoments,
}

impl LowMemoryAdamW {
    /// `params` are the trainable tensors by name, shared with their VarStore; convert
    /// the store to bf16 first (`VarStore::bfloat16`) to get the memory saving.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        Self::with_rounding(params, config, Rounding::Stochastic)
    }

    /// The same optimizer storing with `rounding` (the tests compare the two).
    pub fn with_rounding(
        params: Vec<(String, Tensor)>,
        config: AdamWConfig,
        rounding: Rounding,
    ) -> Self {
        Self {
            config,
            rounding,
            moments: AdamMoments::zeros(params, Kind::BFloat16),
        }
    }

    pub fn steps_taken(&self) -> i64 {
        self.moments.step
    }

    /// Bytes held by the parameters and the optimizer state (gradients not counted).
    pub fn memory_bytes(&self) -> i64 {
        self.moments.memory_bytes()
    }

    pub fn zero_grad(&mut self) {
        self.moments.zero_grads();
    }

    /// Multiplies every gradient by `factor` (undoing a loss scale).
    pub fn scale_grads(&mut self, factor: f64) {
        self.moments.scale_grads(factor);
    }

    /// Scales all gradients so their global L2 norm (computed in fp32) is at most
    /// `max_norm`; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        self.moments.clip_grad_norm(max_norm)
    }

    /// The clip with the norm left on the device (no sync).
    pub fn clip_grad_norm_on_device(&mut self, max_norm: f64) -> Tensor {
        self.moments.clip_grad_norm_on_device(max_norm)
    }

    /// One update at learning rate `lr`, computed in fp32 one tensor at a time (so the
    /// fp32 temporaries are the size of the largest parameter, not of the model), then
    /// stored back rounded.
    pub fn step(&mut self, lr: f64) {
        let Self {
            config, rounding, ..
        } = *self;
        self.moments.for_each_update(|param, (m, v), grad, bias| {
            let mut m32 = m.to_kind(Kind::Float);
            let mut v32 = v.to_kind(Kind::Float);
            // An fp32 parameter is its own temporary: updated in place.
            let mut weights = param.to_kind(Kind::Float);
            config.update_in_place(&mut weights, (&mut m32, &mut v32), grad, lr, bias);
            m.copy_(&store(&m32, rounding));
            v.copy_(&store(&v32, rounding));
            if param.kind() == Kind::BFloat16 {
                param.copy_(&store(&weights, rounding));
            } else if weights.data_ptr() != param.data_ptr() {
                param.copy_(&weights);
            }
        });
    }

    /// The moment estimates by parameter name (`exp_avg.<name>`, `exp_avg_sq.<name>`,
    /// bf16), shared with the optimizer, for saving; the same keys as the fp32 AdamW.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.moments.state_tensors()
    }

    /// Restores moments saved by [`LowMemoryAdamW::state_tensors`] (or by the fp32 AdamW,
    /// rounded) after `steps` updates.
    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: i64) -> Result<(), String> {
        self.moments.load_state(state, steps)
    }

    pub fn device(&self) -> Device {
        self.moments.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optimizer::AdamW;

    #[test]
    fn stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() {
        tch::manual_seed(0);
        // 1 + 0.3 spacings: bf16 neighbours are 1 and 1 + 2^-7.
        let spacing = 2f64.powi(-7);
        let x = Tensor::full([200_000], 1.0 + 0.3 * spacing, (Kind::Float, Device::Cpu));
        let rounded = stochastic_round_to_bf16(&x).to_kind(Kind::Double);
        let up = rounded.gt(1.0).to_kind(Kind::Double).mean(Kind::Double);
        let up = up.double_value(&[]);
        assert!((up - 0.3).abs() < 0.01, "rounded up {up}, expected 0.3");
        let lo = rounded.min().double_value(&[]);
        let hi = rounded.max().double_value(&[]);
        assert_eq!((lo, hi), (1.0, 1.0 + spacing));
        // Negative values round symmetrically; exact bf16 values are kept; specials pass.
        let neg = stochastic_round_to_bf16(&(-&x)).to_kind(Kind::Double);
        assert!((neg.mean(Kind::Double).double_value(&[]) + 1.0 + 0.3 * spacing).abs() < 1e-4);
        let exact = Tensor::from_slice(&[0.5f32, -2.0, 0.0, f32::INFINITY]);
        let kept = stochastic_round_to_bf16(&exact).to_kind(Kind::Float);
        assert!(kept.equal(&exact));
        assert!(
            stochastic_round_to_bf16(&Tensor::from_slice(&[f32::NAN]))
                .isnan()
                .int64_value(&[0])
                == 1
        );
    }

    /// A least-squares problem with weights near 1 and a small LR, where each AdamW
    /// update (~lr) is under half a bf16 spacing (2^-8 ≈ 0.004).
    struct Problem {
        inputs: Tensor,
        targets: Tensor,
    }

    impl Problem {
        fn new() -> Self {
            tch::manual_seed(11);
            let opts = (Kind::Float, Device::Cpu);
            let inputs = Tensor::randn([64, 16], opts);
            let truth = Tensor::randn([16, 8], opts) * 0.5 + 1.0;
            Self {
                targets: inputs.matmul(&truth),
                inputs,
            }
        }

        fn loss(&self, w: &Tensor) -> Tensor {
            (self.inputs.matmul(&w.to_kind(Kind::Float)) - &self.targets)
                .square()
                .mean(Kind::Float)
        }

        fn start(&self, kind: Kind) -> Tensor {
            tch::manual_seed(12);
            let w = Tensor::randn([16, 8], (Kind::Float, Device::Cpu)) * 0.1 + 1.0;
            w.to_kind(kind).set_requires_grad(true)
        }
    }

    /// Runs `steps` updates; returns the final weights and loss.
    fn train(
        problem: &Problem,
        w: &Tensor,
        steps: usize,
        mut update: impl FnMut(f64),
    ) -> (Tensor, f64) {
        for step in 0..steps {
            // Per-step seeds, as the trainer does, so the rounding noise is reproducible.
            tch::manual_seed(1000 + step as i64);
            problem.loss(w).backward();
            update(1e-3);
        }
        let loss = tch::no_grad(|| problem.loss(w).double_value(&[]));
        (w.to_kind(Kind::Float), loss)
    }

    #[test]
    fn tracks_the_fp32_adamw_trajectory_far_better_than_plain_bf16() {
        let problem = Problem::new();
        let steps = 400;
        let run_low = |rounding: Rounding| {
            let w = problem.start(Kind::BFloat16);
            let mut opt = LowMemoryAdamW::with_rounding(
                vec![("w".into(), w.shallow_clone())],
                AdamWConfig::default(),
                rounding,
            );
            train(&problem, &w, steps, |lr| {
                opt.step(lr);
                opt.zero_grad();
            })
        };
        let w32 = problem.start(Kind::Float);
        let start_loss = tch::no_grad(|| problem.loss(&w32).double_value(&[]));
        let mut reference = AdamW::new(
            vec![("w".into(), w32.shallow_clone())],
            AdamWConfig::default(),
        );
        let (w_ref, loss_ref) = train(&problem, &w32, steps, |lr| {
            reference.step(lr);
            reference.zero_grad();
        });
        let (w_sr, loss_sr) = run_low(Rounding::Stochastic);
        let (w_rn, loss_rn) = run_low(Rounding::Nearest);
        let distance = |w: &Tensor| (w - &w_ref).norm().double_value(&[]);
        let moved = (&w_ref - problem.start(Kind::Float))
            .norm()
            .double_value(&[]);
        let (d_sr, d_rn) = (distance(&w_sr), distance(&w_rn));
        eprintln!(
            "after {steps} steps: loss fp32 {loss_ref:.5}, stochastic bf16 {loss_sr:.5}, \
             nearest bf16 {loss_rn:.5} (start {start_loss:.5}); distance to the fp32 weights \
             {d_sr:.5} vs {d_rn:.5} (fp32 moved {moved:.4})"
        );
        assert!(loss_ref < 0.5 * start_loss, "the reference did not learn");
        assert!(d_sr < 0.25 * d_rn, "stochastic {d_sr} vs nearest {d_rn}");
        assert!(d_sr < 0.2 * moved, "stochastic strayed {d_sr} of {moved}");
        assert!((loss_sr - loss_ref).abs() < 0.25 * (loss_rn - loss_ref).abs());
    }

    #[test]
    fn halves_the_bytes_of_fp32_weights_and_states_and_saves_its_state() {
        let params = || {
            vec![
                (
                    "a".to_string(),
                    Tensor::ones([100, 10], (Kind::BFloat16, Device::Cpu)),
                ),
                (
                    "b".to_string(),
                    Tensor::ones([10], (Kind::BFloat16, Device::Cpu)),
                ),
            ]
        };
        let opt = LowMemoryAdamW::new(params(), AdamWConfig::default());
        // 1010 parameters × (2 bytes weight + 2 + 2 states).
        assert_eq!(opt.memory_bytes(), 1010 * 6);
        let state = opt.state_tensors();
        assert_eq!(state.len(), 4);
        assert!(state.iter().all(|(_, t)| t.kind() == Kind::BFloat16));
        let mut restored = LowMemoryAdamW::new(params(), AdamWConfig::default());
        restored.load_state(&state, 7).unwrap();
        assert_eq!(restored.steps_taken(), 7);
        let err = restored.load_state(&state[..1], 7).unwrap_err();
        assert!(err.contains("exp_avg_sq.a"), "{err}");
    }
}
