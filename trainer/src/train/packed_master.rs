//! fp32 master weights packed as the bf16 tensor the forward pass computes with plus a
//! 16-bit remainder, for the UNet phase under bf16 autocast on CUDA (`training.memory:
//! default`).
//!
//! With plain fp32 weights, autocast casts every matrix to bf16 on each forward pass and
//! backward casts each bf16 gradient back to fp32: two passes over the weights and two
//! over the gradients a step, and 4 bytes a parameter for gradients that only ever held
//! bf16 values. Packed, the matrices (and their biases) *are* bf16 tensors (the
//! rounding autocast would have made), their gradients arrive in bf16, and the remainder
//! keeps the exact fp32 master, so AdamW (`csrc/packed_adamw.cu`) still updates fp32
//! masters in fp32 arithmetic, on 14 bytes a parameter instead of 16. The clip is folded
//! into the update. Norm scales and shifts, which autocast runs in fp32, stay plain fp32
//! tensors with libtorch's fused AdamW.
//!
//! The packing is exact: `unpack(pack(x)) == x` for every finite fp32 `x` (the bf16 half
//! rounds to nearest, exact ties away from zero, so the remainder fits in 16 bits).

use std::collections::HashSet;

use tch::{Device, Kind, Tensor};

use super::adam_moments::AdamMoments;
use super::optimizer::AdamWConfig;
use super::state::saved_tensor;
use crate::cuda::ShimError;
use crate::cuda::foreach::{self, PackedTensors};

/// The bf16 half and the int16 remainder of fp32 `x`, elementwise.
pub fn pack(x: &Tensor) -> (Tensor, Tensor) {
    let bits = x
        .to_kind(Kind::Float)
        .view_dtype(Kind::Int)
        .to_kind(Kind::Int64)
        .bitwise_and(0xFFFF_FFFFi64);
    let high = (&bits + 0x8000i64).divide_scalar_mode(0x1_0000i64, "floor");
    let remainder = (&bits - &high * 0x1_0000i64).to_kind(Kind::Int16);
    let high = (&high - high.ge(0x8000i64).to_kind(Kind::Int64) * 0x1_0000i64)
        .to_kind(Kind::Int16)
        .view_dtype(Kind::BFloat16);
    (high, remainder)
}

/// The fp32 value of a bf16 half and its remainder, elementwise.
pub fn unpack(hi: &Tensor, lo: &Tensor) -> Tensor {
    let bits = hi
        .view_dtype(Kind::Int16)
        .to_kind(Kind::Int64)
        .bitwise_and(0xFFFFi64)
        * 0x1_0000i64
        + lo.to_kind(Kind::Int64);
    (&bits - bits.ge(0x8000_0000i64).to_kind(Kind::Int64) * 0x1_0000_0000i64)
        .to_kind(Kind::Int)
        .view_dtype(Kind::Float)
}

/// Where packed tensors start in the flat buffers: every 256 elements (512 bytes of bf16,
/// the caching allocator's own alignment). cuBLAS and cuDNN pick their vectorized kernels
/// only for aligned weights; a 4-element bias would otherwise shift every later weight
/// off 16 bytes and slow the whole network down by a quarter.
const ALIGNMENT: i64 = 256;

fn aligned(offset: i64) -> i64 {
    (offset + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT
}

/// The modules whose parameters are packed: those with a weight of two or more
/// dimensions (linear and conv matrices, which autocast runs in bf16).
fn matrix_modules(params: &[(String, Tensor)]) -> HashSet<String> {
    params
        .iter()
        .filter(|(_, p)| p.dim() >= 2)
        .filter_map(|(name, _)| name.strip_suffix(".weight").map(str::to_owned))
        .collect()
}

/// Whether parameter `name` is packed: the weight or bias of a matrix module.
fn is_packed(name: &str, matrices: &HashSet<String>) -> bool {
    name.rsplit_once('.').is_some_and(|(module, kind)| {
        matches!(kind, "weight" | "bias") && matrices.contains(module)
    })
}

/// AdamW over packed weights (flat buffers) and plain fp32 rest.
pub struct PackedAdamW {
    config: AdamWConfig,
    /// The packed parameters by name: bf16 views into `hi`, shared with their VarStore
    /// and modules (autograd leaves), with where each starts in the flat buffers.
    packed: Vec<(String, Tensor, i64)>,
    hi: Tensor,
    lo: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Norm scales and shifts: fp32, libtorch's fused kernel.
    rest: AdamMoments,
    /// Device scalars the kernels read: the step count and the learning rate.
    step: Tensor,
    lr: Tensor,
}

impl PackedAdamW {
    /// Packs the matrices among `params` (fp32) in place: from here on their VarStore
    /// and modules hold the bf16 halves. Updates need a CUDA device and our kernels
    /// ([`foreach::kernels_available`]).
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let device = params.first().map_or(Device::Cpu, |(_, p)| p.device());
        let matrices = matrix_modules(&params);
        let (packed_params, rest): (Vec<_>, Vec<_>) = params
            .into_iter()
            .partition(|(name, _)| is_packed(name, &matrices));
        let offsets: Vec<i64> = packed_params
            .iter()
            .scan(0, |next, (_, p)| {
                let offset = *next;
                *next = aligned(offset + p.numel() as i64);
                Some(offset)
            })
            .collect();
        let total = packed_params
            .last()
            .map_or(0, |(_, p)| offsets[offsets.len() - 1] + p.numel() as i64);
        let _guard = tch::no_grad_guard();
        let hi = Tensor::zeros([total], (Kind::BFloat16, device));
        let lo = Tensor::zeros([total], (Kind::Int16, device));
        let mut packed = Vec::with_capacity(packed_params.len());
        for ((name, mut param), offset) in packed_params.into_iter().zip(offsets) {
            let numel = param.numel() as i64;
            let shape = param.size();
            let (h, l) = pack(&param.flatten(0, -1));
            hi.narrow(0, offset, numel).copy_(&h);
            lo.narrow(0, offset, numel).copy_(&l);
            param.set_data(&hi.narrow(0, offset, numel).view(shape.as_slice()));
            packed.push((name, param, offset));
        }
        // Zeros, so the padding between tensors holds defined values.
        let zeros = || Tensor::zeros([total], (Kind::Float, device));
        let counter = || Tensor::zeros([], (Kind::Float, device));
        Self {
            config,
            packed,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            hi,
            lo,
            rest: AdamMoments::zeros(rest, Kind::Float),
            step: counter(),
            lr: counter(),
        }
    }

    pub fn steps_taken(&self) -> i64 {
        self.rest.step
    }

    /// Drops every gradient, as the fused optimizer does.
    pub fn zero_grad(&mut self) {
        let params: Vec<Tensor> = self
            .packed
            .iter()
            .map(|(_, p, _)| p.shallow_clone())
            .chain(self.rest.params.iter().map(|(_, p)| p.shallow_clone()))
            .collect();
        foreach::clear_grads(&params).expect("dropping gradients");
    }

    /// The host half of a step: counts it and writes `lr` where the kernels read it.
    pub fn set_next_step(&mut self, lr: f64) {
        self.rest.step += 1;
        let _ = self.lr.fill_(lr);
    }

    /// The device half: the global norm, the clip and the update of every parameter with
    /// a gradient. Launches kernels only; returns the norm before clipping.
    pub fn apply_update(&mut self, max_norm: f64) -> Result<Tensor, ShimError> {
        let mut grads = Vec::with_capacity(self.packed.len());
        let mut offsets = Vec::with_capacity(self.packed.len());
        for (_, param, offset) in &self.packed {
            let grad = param.grad();
            if grad.defined() {
                grads.push(grad);
                offsets.push(*offset);
            }
        }
        let rest = self.rest.with_grads();
        foreach::packed_adamw(
            &PackedTensors {
                grads: &grads,
                offsets: &offsets,
                hi: &self.hi,
                lo: &self.lo,
                exp_avg: &self.exp_avg,
                exp_avg_sq: &self.exp_avg_sq,
            },
            &rest.tensors(),
            &self.step,
            &self.lr,
            max_norm,
            self.config.hyper(),
        )
    }

    /// The fp32 master of every packed parameter by name, copied to the CPU one tensor
    /// at a time (no device memory beyond one tensor's worth).
    pub fn master_weights(&self) -> Vec<(String, Tensor)> {
        let _guard = tch::no_grad_guard();
        self.packed
            .iter()
            .map(|(name, param, offset)| (name.clone(), self.master(param, *offset)))
            .collect()
    }

    fn master(&self, param: &Tensor, offset: i64) -> Tensor {
        self.master_on_device(param, offset).to_device(Device::Cpu)
    }

    fn master_on_device(&self, param: &Tensor, offset: i64) -> Tensor {
        let numel = param.numel() as i64;
        unpack(
            &self.hi.narrow(0, offset, numel),
            &self.lo.narrow(0, offset, numel),
        )
        .view(param.size().as_slice())
    }

    /// Gives the packed parameters their fp32 masters back (on their device), ending
    /// the packing.
    pub fn unpack_into_params(self) {
        let _guard = tch::no_grad_guard();
        for (_, param, offset) in &self.packed {
            let master = self.master_on_device(param, *offset);
            param.shallow_clone().set_data(&master);
        }
    }

    /// The moments by parameter name, as `AdamW` names them, so states are
    /// interchangeable between the two.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = self.rest.state_tensors();
        for (name, param, offset) in &self.packed {
            let numel = param.numel() as i64;
            let view = |flat: &Tensor| flat.narrow(0, *offset, numel).view(param.size().as_slice());
            state.push((format!("exp_avg.{name}"), view(&self.exp_avg)));
            state.push((format!("exp_avg_sq.{name}"), view(&self.exp_avg_sq)));
        }
        state
    }

    /// Restores moments saved by this optimizer or by `AdamW` after `steps` updates.
    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: i64) -> Result<(), String> {
        self.rest.load_state(state, steps)?;
        let _guard = tch::no_grad_guard();
        for (name, param, offset) in &self.packed {
            let numel = param.numel() as i64;
            for (flat, key) in [
                (&self.exp_avg, format!("exp_avg.{name}")),
                (&self.exp_avg_sq, format!("exp_avg_sq.{name}")),
            ] {
                let saved = saved_tensor(state, &key, &param.size(), "the parameter")?;
                flat.narrow(0, *offset, numel).copy_(&saved.flatten(0, -1));
            }
        }
        let _ = self.step.fill_(steps as f64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_is_exact_and_its_half_is_the_nearest_bf16() {
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-45,
            -1e-45,
            f32::MAX,
            f32::MIN,
            std::f32::consts::PI,
            -std::f32::consts::E,
            // Exact ties between two bf16 values: the half rounds away from zero.
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0xBF80_8000),
            f32::from_bits(0x3F81_8000),
        ];
        values.extend((0..4096).map(|i| ((i as f32) * 0.737).sin() * 10f32.powi(i % 17 - 8)));
        let x = Tensor::from_slice(&values);
        let (hi, lo) = pack(&x);
        assert_eq!(hi.kind(), Kind::BFloat16);
        assert_eq!(lo.kind(), Kind::Int16);
        let back = Vec::<f32>::try_from(unpack(&hi, &lo)).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} came back as {b}");
        }
        // Away from exact ties the half is libtorch's own rounding (nearest even).
        let halves = Vec::<f32>::try_from(hi.to_kind(Kind::Float)).unwrap();
        let rounded = Vec::<f32>::try_from(x.to_kind(Kind::BFloat16).to_kind(Kind::Float)).unwrap();
        for ((v, h), r) in values.iter().zip(&halves).zip(&rounded) {
            if v.to_bits() & 0xFFFF == 0x8000 {
                assert!(h.abs() >= v.abs(), "tie {v} rounded to {h}");
            } else {
                assert_eq!(h.to_bits(), r.to_bits(), "{v}: {h} vs {r}");
            }
        }
    }

    #[test]
    fn matrices_and_their_biases_are_packed_norms_are_not() {
        let param = |name: &str, shape: &[i64]| {
            (
                name.to_owned(),
                Tensor::zeros(shape, (Kind::Float, Device::Cpu)),
            )
        };
        let matrices = matrix_modules(&[
            param("conv1.weight", &[8, 4, 3, 3]),
            param("conv1.bias", &[8]),
            param("proj.weight", &[8, 4]),
            param("norm1.weight", &[8]),
            param("norm1.bias", &[8]),
        ]);
        assert!(is_packed("conv1.weight", &matrices));
        assert!(is_packed("conv1.bias", &matrices));
        assert!(is_packed("proj.weight", &matrices));
        assert!(!is_packed("norm1.weight", &matrices));
        assert!(!is_packed("norm1.bias", &matrices));
    }

    #[test]
    fn packed_parameters_keep_their_exact_masters_and_moments() {
        let weight = Tensor::randn([6, 5], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([6], (Kind::Float, Device::Cpu));
        let hi_start = |optimizer: &PackedAdamW| optimizer.hi.data_ptr() as usize;
        let norm = Tensor::randn([5], (Kind::Float, Device::Cpu));
        let originals = [weight.copy(), bias.copy(), norm.copy()];
        let params = vec![
            ("proj.weight".to_owned(), weight.shallow_clone()),
            ("proj.bias".to_owned(), bias.shallow_clone()),
            ("norm.weight".to_owned(), norm.shallow_clone()),
        ];
        let mut optimizer = PackedAdamW::new(params, AdamWConfig::default());
        // The shared tensors (VarStore, modules) now hold the bf16 halves.
        assert_eq!(weight.kind(), Kind::BFloat16);
        assert_eq!(bias.kind(), Kind::BFloat16);
        assert_eq!(norm.kind(), Kind::Float);
        // Each packed tensor starts on a 512-byte boundary of the flat buffer.
        assert_eq!(weight.data_ptr() as usize - hi_start(&optimizer), 0);
        assert_eq!(bias.data_ptr() as usize - hi_start(&optimizer), 512);
        let masters = optimizer.master_weights();
        let names: Vec<&str> = masters.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["proj.weight", "proj.bias"]);
        for ((_, master), original) in masters.iter().zip(&originals) {
            assert!(
                master.equal(original),
                "the master is the fp32 value it was"
            );
        }

        let state = optimizer.state_tensors();
        assert_eq!(state.len(), 6);
        let moments: Vec<(String, Tensor)> = state
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    Tensor::randn(t.size(), (Kind::Float, Device::Cpu)),
                )
            })
            .collect();
        optimizer.load_state(&moments, 7).unwrap();
        assert_eq!(optimizer.steps_taken(), 7);
        for ((name, restored), (_, saved)) in optimizer.state_tensors().iter().zip(&moments) {
            assert!(restored.equal(saved), "{name}");
        }
        let missing: Vec<(String, Tensor)> = moments
            .iter()
            .filter(|(n, _)| n != "exp_avg_sq.proj.weight")
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let error = optimizer.load_state(&missing, 7).unwrap_err();
        assert!(error.contains("exp_avg_sq.proj.weight"), "{error}");

        optimizer.unpack_into_params();
        assert_eq!(weight.kind(), Kind::Float);
        assert!(weight.equal(&originals[0]) && bias.equal(&originals[1]));
    }
}
