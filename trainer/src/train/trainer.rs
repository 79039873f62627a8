//! The two-phase DreamBooth loop: phase 1 trains the text encoder (the UNet frozen but
//! differentiated through), phase 2 trains the UNet on cached caption embeddings.
//!
//! Every random draw of step `g` comes from a generator seeded with `(seed, g)`, and the
//! data order of each epoch from `(seed, phase, epoch)`, so a run resumed at any step
//! continues exactly as the uninterrupted run would.
//!
//! On CUDA each phase runs a few eager warm-up steps and then replays the whole step as
//! one CUDA graph ([`captured_step`]); the graph draws the same random numbers as the
//! eager step, so both give the same losses.

mod captured_step;
mod phase_optimizer;

use tch::{Device, Kind, Tensor, nn::VarStore};

use dreambooth_api::spec::{LrScheduler, MemoryMode};

use super::examples::Example;
use super::loss_scale::LossScaler;
use super::lr_schedule::LrSchedule;
use super::objective::{NoiseSettings, NoisedBatch, loss, noise_batch};
use super::state::saved_tensor;
use crate::cuda;
use crate::pipeline::{ModelVarStores, ModelWeights, Models};
use captured_step::StepMode;
pub use phase_optimizer::PhaseOptimizer;

/// Which network a step trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    TextEncoder,
    Unet,
}

/// Everything the loop needs to know about the run, with presets resolved.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    pub text_encoder_steps: u32,
    pub text_encoder_lr: f64,
    pub unet_steps: u32,
    pub unet_lr: f64,
    pub batch_size: usize,
    pub lr_scheduler: LrScheduler,
    pub lr_warmup_steps: u32,
    pub noise: NoiseSettings,
    /// Prior-preservation loss weight; `None` without class images.
    pub prior_loss_weight: Option<f64>,
    pub seed: u64,
    /// Autocast on CUDA, and in which dtype.
    pub precision: StepPrecision,
    /// `lowMemory`: bf16 weights of both networks, the bf16 optimizer and gradient
    /// checkpointing, set up by [`Trainer::new`].
    pub memory: MemoryMode,
}

impl LoopSettings {
    pub fn total_steps(&self) -> u32 {
        self.text_encoder_steps + self.unet_steps
    }

    /// The phase of global step `step` (0-based) and the step's index inside it.
    pub fn phase_of(&self, step: u32) -> (Phase, u32) {
        if step < self.text_encoder_steps {
            (Phase::TextEncoder, step)
        } else {
            (Phase::Unet, step - self.text_encoder_steps)
        }
    }

    fn schedule(&self, phase: Phase) -> LrSchedule {
        let (base_lr, total_steps) = match phase {
            Phase::TextEncoder => (self.text_encoder_lr, self.text_encoder_steps),
            Phase::Unet => (self.unet_lr, self.unet_steps),
        };
        LrSchedule {
            kind: self.lr_scheduler,
            base_lr,
            warmup_steps: self.lr_warmup_steps,
            total_steps,
        }
    }
}

/// How a step computes on the GPU: fp32 master weights always, the forward pass under
/// bf16 or fp16 autocast (fp16 with dynamic loss scaling), or plain fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPrecision {
    Fp32,
    Bf16Autocast,
    Fp16Autocast,
}

impl StepPrecision {
    fn autocast(self) -> bool {
        self != StepPrecision::Fp32
    }
}

/// A step whose work is queued on the device; reading it waits for the step to finish.
pub struct PendingStep {
    pub phase: Phase,
    pub learning_rate: f64,
    loss: Tensor,
    grad_norm: Tensor,
    applied: bool,
}

impl PendingStep {
    pub fn read(&self) -> StepReport {
        StepReport {
            phase: self.phase,
            loss: self.loss.double_value(&[]),
            learning_rate: self.learning_rate,
            grad_norm: self.grad_norm.double_value(&[]),
            applied: self.applied,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub phase: Phase,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// False when fp16 gradients overflowed and the update was skipped.
    pub applied: bool,
}

pub struct Trainer {
    pub models: Models,
    pub stores: ModelVarStores,
    pub settings: LoopSettings,
    instances: Vec<Example>,
    /// Class images for prior preservation (their embedding is the class prompt's).
    classes: Vec<Example>,
    alphas_cumprod: Tensor,
    scaling_factor: f64,
    optimizer: Option<(Phase, PhaseOptimizer)>,
    /// Only for fp16 autocast.
    pub loss_scaler: Option<LossScaler>,
    device: Device,
    /// Whether a phase may be captured as a CUDA graph when it can be.
    cuda_graphs: bool,
    /// Whether the UNet phase may pack its fp32 masters
    /// ([`PackedAdamW`](super::packed_master::PackedAdamW)) when it can.
    packed_weights: bool,
    mode: StepMode,
}

impl Trainer {
    pub fn new(
        mut models: Models,
        mut stores: ModelVarStores,
        settings: LoopSettings,
        instances: Vec<Example>,
        classes: Vec<Example>,
        alphas_cumprod: &[f32],
    ) -> Self {
        if settings.memory == MemoryMode::LowMemory {
            // Both networks: the trained one is updated in bf16, and the frozen one is
            // differentiated through (phase 1) or only read, so fp32 would be wasted.
            // The VAE is not trained and stays as loaded, for samples.
            stores.text_encoder.bfloat16();
            stores.unet.bfloat16();
            models.unet.set_gradient_checkpointing(true);
            models.text_encoder.set_gradient_checkpointing(true);
            tracing::info!(
                "lowMemory: bf16 weights and AdamW states (stochastic rounding), \
                 gradient checkpointing on"
            );
        }
        let device = stores.unet.device();
        let settings_precision = settings.precision;
        let scaling_factor = models.vae.scaling_factor;
        Self {
            models,
            stores,
            settings,
            instances,
            classes,
            alphas_cumprod: Tensor::from_slice(alphas_cumprod).to_device(device),
            scaling_factor,
            optimizer: None,
            loss_scaler: (settings_precision == StepPrecision::Fp16Autocast)
                .then(LossScaler::default),
            device,
            cuda_graphs: true,
            packed_weights: true,
            mode: StepMode::Eager,
        }
    }

    /// Eager steps only (`false`), e.g. to compare against the CUDA graph. Takes effect
    /// at the next phase.
    pub fn set_cuda_graphs(&mut self, enabled: bool) {
        self.cuda_graphs = enabled;
    }

    /// Plain fp32 weights with autocast casts (`false`) instead of packed ones, e.g. to
    /// compare the two. Takes effect at the next phase.
    pub fn set_packed_weights(&mut self, enabled: bool) {
        self.packed_weights = enabled;
    }

    /// Whether the current phase trains packed weights.
    pub fn trains_packed_weights(&self) -> bool {
        matches!(self.optimizer, Some((_, PhaseOptimizer::Packed(_))))
    }

    /// Whether the current phase replays a captured CUDA graph.
    pub fn replays_cuda_graph(&self) -> bool {
        matches!(self.mode, StepMode::Replaying(_))
    }

    /// Runs global step `step` (0-based): the phase's network is updated once.
    pub fn step(&mut self, step: u32) -> StepReport {
        self.launch_step(step).read()
    }

    /// [`Trainer::step`] without waiting for the device (except where fp16 loss scaling
    /// must look at the gradients).
    pub fn launch_step(&mut self, step: u32) -> PendingStep {
        let (phase, phase_step) = self.settings.phase_of(step);
        self.enter_phase(phase);
        let instance_ids = batch_indices(
            self.settings.seed,
            phase,
            phase_step,
            self.settings.batch_size,
            self.instances.len(),
        );
        let class_ids = if self.classes.is_empty() {
            Vec::new()
        } else {
            batch_indices(
                self.settings.seed ^ CLASS_STREAM,
                phase,
                phase_step,
                self.settings.batch_size,
                self.classes.len(),
            )
        };
        tch::manual_seed(step_seed(self.settings.seed, step));
        let learning_rate = self.settings.schedule(phase).lr_at(phase_step);
        let picked: Vec<usize> = instance_ids
            .iter()
            .copied()
            .chain(class_ids.iter().map(|&i| self.instances.len() + i))
            .collect();
        let (loss, grad_norm, applied) = self.run_step(phase, &picked, learning_rate);
        PendingStep {
            phase,
            learning_rate,
            loss,
            grad_norm,
            applied,
        }
    }

    /// The example at `index` of instances followed by classes.
    fn example(&self, index: usize) -> &Example {
        self.instances
            .get(index)
            .unwrap_or_else(|| &self.classes[index - self.instances.len()])
    }

    /// One eager step on `picked` (indices into instances, then classes): forward,
    /// backward, clip, update. Returns the loss, the grad norm and whether the update
    /// was applied.
    fn eager_step(
        &mut self,
        phase: Phase,
        picked: &[usize],
        learning_rate: f64,
    ) -> (Tensor, Tensor, bool) {
        let examples: Vec<&Example> = picked.iter().map(|&i| self.example(i)).collect();
        let loss_scale = self.loss_scaler.map_or(1.0, |s| s.scale);
        let loss = self.forward_backward(phase, &examples, loss_scale);
        let (_, optimizer) = self.optimizer.as_mut().expect("entered a phase");
        if loss_scale != 1.0 {
            optimizer.scale_grads(1.0 / loss_scale);
        }
        let (grad_norm, applied) = match self.loss_scaler.as_mut() {
            // The scaler must see the norm now to decide whether to apply the update.
            Some(scaler) => {
                let norm = optimizer.clip_grad_norm(1.0);
                let applied = scaler.update(norm);
                if applied {
                    optimizer.step(learning_rate);
                }
                (Tensor::from(norm), applied)
            }
            // On a GPU the norm stays there: reading it would wait for the step.
            None if optimizer.is_capturable() || self.device.is_cuda() => {
                (optimizer.clip_and_step_on_device(1.0, learning_rate), true)
            }
            None => {
                let norm = optimizer.clip_grad_norm(1.0);
                optimizer.step(learning_rate);
                (Tensor::from(norm), true)
            }
        };
        optimizer.zero_grad();
        (loss, grad_norm, applied)
    }

    /// Loss of one batch (detached, on the device) and its gradients. Latents of
    /// different sizes (aspect buckets) go through the UNet in groups, each group's loss
    /// weighted by its share.
    fn forward_backward(&self, phase: Phase, picked: &[&Example], loss_scale: f64) -> Tensor {
        let with_prior = self
            .settings
            .prior_loss_weight
            .filter(|_| !self.classes.is_empty());
        let mut groups: Vec<(Vec<i64>, Vec<&Example>)> = Vec::new();
        for example in picked {
            let size = example.mean.size();
            match groups.iter_mut().find(|(s, _)| *s == size) {
                Some((_, members)) => members.push(example),
                None => groups.push((size, vec![example])),
            }
        }
        // Prior preservation needs instance and class halves side by side; with one
        // size (no buckets) that is a single group in [instances…, classes…] order.
        let total = picked.len() as f64;
        let mut loss_sum: Option<Tensor> = None;
        for (_, members) in groups {
            let share = members.len() as f64 / total;
            let latents = Tensor::cat(
                &members
                    .iter()
                    .map(|e| &e.mean + &e.std * Tensor::randn_like(&e.std))
                    .collect::<Vec<_>>(),
                0,
            ) * self.scaling_factor;
            let context = self.compute_dtype(self.context(phase, &members));
            let batch: NoisedBatch =
                noise_batch(&latents, &self.alphas_cumprod, &self.settings.noise);
            let noisy_latents = self.compute_dtype(batch.noisy_latents.shallow_clone());
            let prediction = cuda::autocast(self.settings.precision.autocast(), || {
                self.models
                    .unet
                    .forward(&noisy_latents, &batch.timesteps, &context)
            });
            let prior = with_prior.filter(|_| members.len() % 2 == 0);
            let group_loss = loss(&prediction, &batch, prior) * share;
            (&group_loss * loss_scale).backward();
            let group_loss = group_loss.detach();
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + group_loss,
                None => group_loss,
            });
        }
        loss_sum.expect("a step has at least one example")
    }

    /// `x` in the dtype the networks compute in: bf16 weights (`lowMemory`) need bf16
    /// inputs where no autocast converts them (the CPU); the noise, the target and the
    /// loss stay fp32.
    fn compute_dtype(&self, x: Tensor) -> Tensor {
        match self.settings.memory {
            MemoryMode::LowMemory => x.to_kind(Kind::BFloat16),
            MemoryMode::Default => x,
        }
    }

    /// The UNet's conditioning: the text encoder's output, differentiable in phase 1,
    /// the cached embedding in phase 2.
    fn context(&self, phase: Phase, members: &[&Example]) -> Tensor {
        match phase {
            Phase::TextEncoder => {
                let ids = Tensor::cat(&members.iter().map(|e| &e.input_ids).collect::<Vec<_>>(), 0);
                cuda::autocast(self.settings.precision.autocast(), || {
                    self.models.text_encoder.forward(&ids).last_hidden_state
                })
            }
            Phase::Unet => Tensor::cat(
                &members
                    .iter()
                    .map(|e| e.embedding.as_ref().expect("embeddings cached for phase 2"))
                    .collect::<Vec<_>>(),
                0,
            ),
        }
    }

    /// Sets what is trainable and builds the phase's optimizer on first use.
    fn enter_phase(&mut self, phase: Phase) {
        if self.optimizer.as_ref().is_some_and(|(p, _)| *p == phase) {
            return;
        }
        self.stores.vae.freeze();
        match phase {
            Phase::TextEncoder => {
                self.stores.unet.freeze();
                self.stores.text_encoder.unfreeze();
            }
            Phase::Unet => {
                self.stores.text_encoder.freeze();
                self.stores.unet.unfreeze();
                self.cache_embeddings();
            }
        }
        let params = trainable(self.store(phase));
        let pack = self.can_pack(phase);
        if pack {
            tracing::info!(
                ?phase,
                "fp32 master weights packed as bf16 + 16-bit remainder: no autocast casts, \
                 bf16 gradients"
            );
        }
        let optimizer =
            PhaseOptimizer::for_memory_mode(self.settings.memory, params, self.device, pack);
        // The previous phase's graph may still be running; its pool is freed with it.
        if let (StepMode::Replaying(_), Device::Cuda(index)) = (&self.mode, self.device) {
            tch::Cuda::synchronize(index as i64);
        }
        if let Some((_, previous)) = self.optimizer.replace((phase, optimizer)) {
            previous.finish();
        }
        self.mode = self.step_mode_for(phase);
    }

    /// Packed weights need the UNet phase (the text encoder's embeddings must stay fp32
    /// lookups), bf16 autocast, CUDA and our kernels.
    fn can_pack(&self, phase: Phase) -> bool {
        self.packed_weights
            && phase == Phase::Unet
            && self.settings.memory == MemoryMode::Default
            && self.settings.precision == StepPrecision::Bf16Autocast
            && self.device.is_cuda()
            && crate::cuda::foreach::kernels_available()
    }

    /// The networks' weights by name as they are saved: the VarStores' tensors, with the
    /// exact fp32 masters of packed parameters (on the CPU) in place of their bf16 halves.
    pub fn weights(&self) -> ModelWeights {
        let mut weights = ModelWeights::of(&self.stores);
        if let Some((Phase::Unet, optimizer)) = &self.optimizer {
            weights.unet.extend(optimizer.master_weights());
        }
        weights
    }

    /// The frozen text encoder's output for every caption, computed once for phase 2.
    fn cache_embeddings(&mut self) {
        let _guard = tch::no_grad_guard();
        for example in self.instances.iter_mut().chain(self.classes.iter_mut()) {
            let embedding = self
                .models
                .text_encoder
                .forward(&example.input_ids)
                .last_hidden_state;
            example.embedding = Some(embedding);
        }
    }

    pub fn store(&self, phase: Phase) -> &VarStore {
        match phase {
            Phase::TextEncoder => &self.stores.text_encoder,
            Phase::Unet => &self.stores.unet,
        }
    }

    /// The current phase's optimizer, for saving a training state.
    pub fn optimizer(&self) -> Option<(Phase, &PhaseOptimizer)> {
        self.optimizer.as_ref().map(|(p, o)| (*p, o))
    }

    /// Restores the optimizer of `phase` for a resumed run.
    pub fn restore_optimizer(
        &mut self,
        phase: Phase,
        state: &[(String, Tensor)],
        steps: i64,
    ) -> Result<(), String> {
        self.enter_phase(phase);
        let (_, optimizer) = self.optimizer.as_mut().expect("entered a phase");
        optimizer.load_state(state, steps)
    }

    pub fn device(&self) -> Device {
        self.device
    }
}

/// Keeps class-image order independent of the instance order.
const CLASS_STREAM: u64 = 0x5eed_c1a5;

/// The trainable tensors of a VarStore by name, in a stable (sorted) order.
fn trainable(store: &VarStore) -> Vec<(String, Tensor)> {
    let mut params: Vec<(String, Tensor)> = store.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// A seed for step `step`'s random draws, spread by SplitMix64 so nearby steps differ.
pub fn step_seed(seed: u64, step: u32) -> i64 {
    (splitmix64(seed ^ (u64::from(step) << 32 | 0x9e37)) >> 1) as i64
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The examples of phase step `phase_step`: consecutive slices of per-epoch shuffles,
/// each shuffle a function of `(seed, phase, epoch)` only.
pub fn batch_indices(
    seed: u64,
    phase: Phase,
    phase_step: u32,
    batch: usize,
    count: usize,
) -> Vec<usize> {
    let phase_salt = match phase {
        Phase::TextEncoder => 1,
        Phase::Unet => 2,
    };
    let start = phase_step as usize * batch;
    (start..start + batch)
        .map(|position| {
            let epoch = (position / count) as u64;
            let order = shuffle(
                count,
                splitmix64(seed ^ (phase_salt << 56) ^ epoch.wrapping_mul(0x100_0000_01b3)),
            );
            order[position % count]
        })
        .collect()
}

/// Fisher-Yates with SplitMix64: the same order on every machine.
fn shuffle(count: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    let mut state = seed;
    for i in (1..count).rev() {
        state = splitmix64(state);
        let j = (state % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Copies `tensors` into the matching variables of `store` (for resume).
pub fn restore_weights(
    store: &mut VarStore,
    tensors: &[(String, Tensor)],
    prefix: &str,
) -> Result<(), String> {
    let _guard = tch::no_grad_guard();
    for (name, mut var) in store.variables() {
        let key = format!("{prefix}{name}");
        let saved = saved_tensor(tensors, &key, &var.size(), "the model")?;
        // `copy_` converts to the variable's dtype (fp32, or bf16 for lowMemory).
        var.copy_(&saved.to_device(var.device()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_visits_every_example_once() {
        let mut seen: Vec<usize> = (0..5)
            .flat_map(|s| batch_indices(7, Phase::Unet, s, 2, 10))
            .collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn data_order_depends_only_on_seed_phase_and_step() {
        assert_eq!(
            batch_indices(7, Phase::Unet, 13, 3, 10),
            batch_indices(7, Phase::Unet, 13, 3, 10)
        );
        let epochs: Vec<Vec<usize>> = (0..4)
            .map(|e| batch_indices(7, Phase::Unet, e * 10, 10, 10))
            .collect();
        assert!(epochs.windows(2).any(|w| w[0] != w[1]), "epochs reshuffle");
        assert_ne!(
            batch_indices(7, Phase::Unet, 0, 10, 10),
            batch_indices(8, Phase::Unet, 0, 10, 10)
        );
    }

    #[test]
    fn step_seeds_differ_between_steps_and_seeds() {
        assert_ne!(step_seed(1, 0), step_seed(1, 1));
        assert_ne!(step_seed(1, 5), step_seed(2, 5));
        assert!(step_seed(u64::MAX, u32::MAX) >= 0);
    }

    #[test]
    fn phases_split_the_global_steps() {
        let settings = LoopSettings {
            text_encoder_steps: 3,
            text_encoder_lr: 1e-6,
            unet_steps: 5,
            unet_lr: 2e-6,
            batch_size: 1,
            lr_scheduler: LrScheduler::Constant,
            lr_warmup_steps: 0,
            noise: NoiseSettings {
                prediction: crate::schedulers::PredictionType::Epsilon,
                offset_noise: 0.0,
                min_snr_gamma: None,
            },
            prior_loss_weight: None,
            seed: 0,
            precision: StepPrecision::Fp32,
            memory: MemoryMode::Default,
        };
        assert_eq!(settings.phase_of(2), (Phase::TextEncoder, 2));
        assert_eq!(settings.phase_of(3), (Phase::Unet, 0));
        assert_eq!(settings.total_steps(), 8);
    }
}
