//! The CUDA-graph path of the training loop. A phase that can be captured runs
//! [`WARMUP_STEPS`] eager steps on the capture stream, then records one whole step
//! (latent and noise draws, forward, loss, backward, clip, fused or packed AdamW)
//! as a CUDA graph and replays it for every later step of the phase: one launch per step
//! instead of thousands, and no host sync inside.
//!
//! Replays read their examples from static copies refreshed before each launch, and the
//! learning rate from the optimizer's device tensor. The gradients are dropped before
//! capture, so backward allocates them in the graph's pool, where their memory is reused
//! by the next replay's forward pass once the update has consumed them (as PyTorch's
//! whole-network capture does); they are not meaningful between replays. The default CUDA generator feeds the
//! graph its seed and offset at each replay, so the per-step `manual_seed` gives a replay
//! the same random numbers as the eager step.

use tch::{Device, Tensor};

use dreambooth_api::spec::MemoryMode;

use super::{Example, Phase, StepPrecision, Trainer};
use crate::cuda::ShimError;
use crate::cuda::graph::CudaGraph;

/// Eager steps before capture: they create the optimizer state and the per-stream state
/// (cuBLAS workspaces, kernel choices) that capture must not create.
pub const WARMUP_STEPS: u32 = 3;

/// How the current phase's steps run.
pub enum StepMode {
    Eager,
    WarmingUp { graph: CudaGraph, remaining: u32 },
    Replaying(CapturedStep),
}

/// A recorded step with the tensors it reads and writes.
pub struct CapturedStep {
    graph: CudaGraph,
    /// Static copies of one step's examples (instances, then classes).
    inputs: Vec<Example>,
    loss: Tensor,
    grad_norm: Tensor,
}

impl Trainer {
    /// Graph replay when the phase can be captured; otherwise eager, with a log line
    /// saying why.
    pub(super) fn step_mode_for(&self, phase: Phase) -> StepMode {
        if let Some(reason) = self.graph_obstacle() {
            tracing::info!(?phase, "eager training steps: {reason}");
            return StepMode::Eager;
        }
        let Device::Cuda(index) = self.device else {
            unreachable!("graph_obstacle rules out other devices")
        };
        match CudaGraph::new(index) {
            Ok(graph) => {
                tracing::info!(
                    ?phase,
                    "training steps replay a CUDA graph after {WARMUP_STEPS} eager steps"
                );
                StepMode::WarmingUp {
                    graph,
                    remaining: WARMUP_STEPS,
                }
            }
            Err(error) => {
                tracing::info!(?phase, "eager training steps: {error}");
                StepMode::Eager
            }
        }
    }

    /// Why the current phase's step cannot be captured, if it cannot.
    fn graph_obstacle(&self) -> Option<&'static str> {
        if !self.device.is_cuda() {
            return Some("CUDA graphs need a CUDA device");
        }
        if !self.cuda_graphs {
            return Some("CUDA graphs are turned off");
        }
        if !crate::cuda::shim_available() {
            return Some("this build has no CUDA shim");
        }
        if self.settings.memory == MemoryMode::LowMemory {
            return Some(
                "lowMemory updates bf16 weights with its own per-tensor loop, not the fused kernel",
            );
        }
        if self.settings.precision == StepPrecision::Fp16Autocast {
            return Some("fp16 loss scaling decides on the CPU whether to apply each update");
        }
        let first = self.instances.first().map(|e| e.mean.size());
        let mixed = self
            .instances
            .iter()
            .chain(&self.classes)
            .any(|e| Some(e.mean.size()) != first);
        if mixed {
            return Some("the latents have several sizes (aspect-ratio buckets)");
        }
        if !self
            .optimizer
            .as_ref()
            .is_some_and(|(_, o)| o.is_capturable())
        {
            return Some("the optimizer is not a fused kernel");
        }
        None
    }

    /// One step of `picked` (indices into instances, then classes) in the phase's mode.
    /// Returns the loss, the grad norm (both on the device) and whether the update was
    /// applied.
    pub(super) fn run_step(
        &mut self,
        phase: Phase,
        picked: &[usize],
        learning_rate: f64,
    ) -> (Tensor, Tensor, bool) {
        match std::mem::replace(&mut self.mode, StepMode::Eager) {
            StepMode::Eager => self.eager_step(phase, picked, learning_rate),
            StepMode::WarmingUp {
                mut graph,
                remaining,
            } if remaining > 0 => {
                let out = graph
                    .on_side_stream(|| self.eager_step(phase, picked, learning_rate))
                    .expect("warm-up on the capture stream");
                self.mode = StepMode::WarmingUp {
                    graph,
                    remaining: remaining - 1,
                };
                out
            }
            StepMode::WarmingUp { graph, .. } => {
                let mut captured = self
                    .capture(phase, graph, picked)
                    .expect("capturing the training step as a CUDA graph");
                let out = self.replay(&mut captured, picked, learning_rate);
                self.mode = StepMode::Replaying(captured);
                out
            }
            StepMode::Replaying(mut captured) => {
                let out = self.replay(&mut captured, picked, learning_rate);
                self.mode = StepMode::Replaying(captured);
                out
            }
        }
    }

    /// Records the step. Capture launches nothing, so no training happens here.
    fn capture(
        &mut self,
        phase: Phase,
        mut graph: CudaGraph,
        picked: &[usize],
    ) -> Result<CapturedStep, ShimError> {
        let inputs: Vec<Example> = picked
            .iter()
            .map(|&i| static_copy(self.example(i)))
            .collect();
        let (loss, grad_norm) = graph.capture(|| {
            let (_, optimizer) = self.optimizer.as_mut().expect("entered a phase");
            optimizer.zero_grad();
            let loss = self.forward_backward(phase, &inputs.iter().collect::<Vec<_>>(), 1.0);
            let (_, optimizer) = self.optimizer.as_mut().expect("entered a phase");
            let grad_norm = optimizer.apply_captured_update(1.0);
            (loss, grad_norm)
        })?;
        Ok(CapturedStep {
            graph,
            inputs,
            loss,
            grad_norm,
        })
    }

    /// Copies the step's examples and LR in, launches the graph, and returns copies of
    /// its outputs (the next replay overwrites the originals).
    fn replay(
        &mut self,
        captured: &mut CapturedStep,
        picked: &[usize],
        learning_rate: f64,
    ) -> (Tensor, Tensor, bool) {
        for (slot, &index) in captured.inputs.iter_mut().zip(picked) {
            let example = self.example(index);
            slot.mean.copy_(&example.mean);
            slot.std.copy_(&example.std);
            slot.input_ids.copy_(&example.input_ids);
            if let (Some(to), Some(from)) = (&mut slot.embedding, &example.embedding) {
                to.copy_(from);
            }
        }
        let (_, optimizer) = self.optimizer.as_mut().expect("entered a phase");
        optimizer.set_next_step(learning_rate);
        captured
            .graph
            .replay()
            .expect("replaying the training step");
        (captured.loss.copy(), captured.grad_norm.copy(), true)
    }
}

/// A copy in fresh memory outside the graph's pool, which replays read from.
fn static_copy(example: &Example) -> Example {
    Example {
        mean: example.mean.copy(),
        std: example.std.copy(),
        input_ids: example.input_ids.copy(),
        embedding: example.embedding.as_ref().map(Tensor::copy),
    }
}
