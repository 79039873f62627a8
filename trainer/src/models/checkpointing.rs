//! Gradient checkpointing: a block run through [`checkpoint`] keeps only its inputs for
//! the backward pass instead of every activation inside it, and is run a second time
//! during backward to get them back. That trades about a third more compute for most
//! of the activation memory, which is what lets a UNet fine-tune fit a small GPU.
//!
//! tch has no checkpoint primitive, so the autograd function is C++
//! (`csrc/checkpoint.cpp`, torch.utils.checkpoint's reentrant variant); a build without
//! the shim runs blocks plainly and says so once.

use std::ops::Deref;
use std::sync::Arc;

use tch::Tensor;

/// A block shared by its model and by the autograd nodes that will run it again in the
/// backward pass, which can outlive the borrow of a forward call.
#[derive(Debug)]
pub struct Shared<T>(Arc<T>);

impl<T> Shared<T> {
    pub fn new(block: T) -> Self {
        Self(Arc::new(block))
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

// SAFETY: libtorch may run a node's backward on its device thread while the model stays
// with the training thread. Blocks are plain structs of tensor handles that forward
// passes only read; libtorch tensor handles may be read from several threads (their
// reference counts are atomic). tch leaves `Tensor` !Sync only because it cannot know
// that no one mutates in place, and nothing does while a step's graph is alive.
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}

/// Whether this build can checkpoint (it carries the C++ shim).
pub fn available() -> bool {
    cfg!(dbt_cuda_shim)
}

/// Runs `f` on `inputs` without keeping its intermediate activations; the backward pass
/// runs `f` again on the same inputs, with the same autocast state, and back-propagates
/// through that. Gradients, to the inputs and to every parameter `f` uses, are those of
/// calling `f` directly. `f` must compute the same thing both times: no randomness.
///
/// A Rust panic inside `f` in the forward pass resumes here; in the backward pass it
/// makes the `backward()` call fail.
pub fn checkpoint<F>(inputs: &[&Tensor], f: F) -> Vec<Tensor>
where
    F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
{
    #[cfg(dbt_cuda_shim)]
    {
        shim::apply(inputs, f)
    }
    #[cfg(not(dbt_cuda_shim))]
    {
        warn_unavailable();
        let owned: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        f(&owned)
    }
}

/// [`checkpoint`] for a block with one output.
pub fn checkpoint_one<F>(inputs: &[&Tensor], f: F) -> Tensor
where
    F: Fn(&[Tensor]) -> Tensor + Send + 'static,
{
    let mut outputs = checkpoint(inputs, move |xs| vec![f(xs)]);
    outputs.pop().expect("one output")
}

/// `gradientCheckpointing: auto` turns it on for CUDA devices with less memory than
/// this: a full SD 1.5 UNet fine-tune at 512 peaks near 14 GiB with fp32 weights and
/// AdamW states, which a 16 GiB card does not fit with activations on top, while 24 GiB
/// cards train faster without recomputation.
pub const AUTO_BELOW_BYTES: u64 = 20 << 30;

/// Resolves `gradientCheckpointing` for `device`: `auto` is on for a CUDA device under
/// [`AUTO_BELOW_BYTES`] and off on the CPU, where memory is rarely the limit and the
/// recomputation only costs time.
pub fn resolve(setting: dreambooth_api::spec::GradientCheckpointing, device: tch::Device) -> bool {
    use dreambooth_api::spec::GradientCheckpointing;
    match setting {
        GradientCheckpointing::Forced(on) => on,
        GradientCheckpointing::Auto => match device {
            tch::Device::Cuda(index) => {
                cuda_total_memory(index).is_some_and(|total| total < AUTO_BELOW_BYTES)
            }
            _ => false,
        },
    }
}

/// Total memory of CUDA device `index`, when the build can ask.
pub fn cuda_total_memory(index: usize) -> Option<u64> {
    #[cfg(dbt_cuda_shim)]
    {
        unsafe extern "C" {
            fn dbt_cuda_total_memory(device: i32) -> i64;
        }
        // SAFETY: index-checked in the shim; 0 means no such device.
        let total = unsafe { dbt_cuda_total_memory(index as i32) };
        (total > 0).then_some(total as u64)
    }
    #[cfg(not(dbt_cuda_shim))]
    {
        let _ = index;
        None
    }
}

#[cfg(not(dbt_cuda_shim))]
fn warn_unavailable() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "gradient checkpointing needs the C++ shim, which this build lacks \
             (no CUDA headers beside libtorch); running without it"
        );
    });
}

#[cfg(dbt_cuda_shim)]
mod shim {
    use std::any::Any;
    use std::ffi::{CStr, c_char, c_int, c_void};
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
    use std::sync::{Arc, Mutex};

    use tch::Tensor;
    use torch_sys::C_tensor;

    /// More than any block returns; the shim refuses more.
    const MAX_OUTPUTS: usize = 64;

    type Call = unsafe extern "C" fn(*mut c_void, *mut *mut C_tensor, usize, *mut c_void) -> c_int;
    type Drop = unsafe extern "C" fn(*mut c_void);
    type PanicSlot = Arc<Mutex<Option<Box<dyn Any + Send>>>>;

    unsafe extern "C" {
        fn dbt_checkpoint_push_output(sink: *mut c_void, output: *const C_tensor);
        #[allow(clippy::too_many_arguments)]
        fn dbt_checkpoint_apply(
            call: Call,
            drop: Drop,
            context: *mut c_void,
            inputs: *const *const C_tensor,
            n_inputs: usize,
            outputs: *mut *mut C_tensor,
            max_outputs: usize,
            n_outputs: *mut usize,
            error: *mut c_char,
            error_len: usize,
        ) -> c_int;
    }

    /// What the autograd node owns: the function and where a panic inside it goes.
    struct Closure<F> {
        f: F,
        panic: PanicSlot,
    }

    /// Runs the closure for the shim. Owns the input handles it is given; never unwinds
    /// into C++.
    unsafe extern "C" fn call<F>(
        context: *mut c_void,
        inputs: *mut *mut C_tensor,
        n_inputs: usize,
        sink: *mut c_void,
    ) -> c_int
    where
        F: Fn(&[Tensor]) -> Vec<Tensor>,
    {
        // SAFETY: `context` is the Box<Closure<F>> that `apply` leaked to the node, alive
        // until `drop_closure`; the shim hands over `n_inputs` new tensor handles.
        let closure = unsafe { &*(context as *const Closure<F>) };
        let inputs: Vec<Tensor> = (0..n_inputs)
            .map(|i| unsafe { Tensor::from_ptr(*inputs.add(i)) })
            .collect();
        match catch_unwind(AssertUnwindSafe(|| (closure.f)(&inputs))) {
            Ok(outputs) => {
                for output in &outputs {
                    // SAFETY: the shim copies the handle into the vector behind `sink`.
                    unsafe { dbt_checkpoint_push_output(sink, output.as_ptr()) };
                }
                0
            }
            Err(payload) => {
                if let Ok(mut slot) = closure.panic.lock() {
                    slot.get_or_insert(payload);
                }
                1
            }
        }
    }

    unsafe extern "C" fn drop_closure<F>(context: *mut c_void) {
        // SAFETY: called exactly once by the shim, with the pointer `apply` leaked.
        drop(unsafe { Box::from_raw(context as *mut Closure<F>) });
    }

    pub(super) fn apply<F>(inputs: &[&Tensor], f: F) -> Vec<Tensor>
    where
        F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
    {
        let panic = PanicSlot::default();
        let context = Box::into_raw(Box::new(Closure {
            f,
            panic: Arc::clone(&panic),
        }));
        let input_ptrs: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
        let mut outputs = [std::ptr::null_mut::<C_tensor>(); MAX_OUTPUTS];
        let mut n_outputs = 0usize;
        let mut error = [0 as c_char; 1024];
        // SAFETY: the inputs are live borrowed handles; the shim owns `context` from
        // here on and frees it through `drop_closure`; it writes at most MAX_OUTPUTS
        // new handles and a NUL-terminated message within `error`.
        let status = unsafe {
            dbt_checkpoint_apply(
                call::<F>,
                drop_closure::<F>,
                context.cast(),
                input_ptrs.as_ptr(),
                input_ptrs.len(),
                outputs.as_mut_ptr(),
                MAX_OUTPUTS,
                &mut n_outputs,
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if status != 0 {
            if let Some(payload) = panic.lock().ok().and_then(|mut slot| slot.take()) {
                resume_unwind(payload);
            }
            // SAFETY: the shim always NUL-terminates the message.
            let message = unsafe { CStr::from_ptr(error.as_ptr()) };
            panic!("gradient checkpoint failed: {}", message.to_string_lossy());
        }
        outputs[..n_outputs]
            .iter()
            // SAFETY: each is a new handle the shim allocated for us.
            .map(|&ptr| unsafe { Tensor::from_ptr(ptr) })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tch::{Device, Kind};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn gradients_match_the_plain_function_and_the_function_runs_again_in_backward() {
        if !available() {
            eprintln!("skipped: this build has no checkpoint shim");
            return;
        }
        tch::manual_seed(1);
        let opts = (Kind::Double, Device::Cpu);
        let weight = Shared::new(Tensor::randn([5, 5], opts).set_requires_grad(true));
        let x = Tensor::randn([3, 5], opts).set_requires_grad(true);
        let y = Tensor::randn([3, 5], opts).set_requires_grad(true);
        let block = |w: &Tensor, x: &Tensor, y: &Tensor| (x.matmul(w).tanh() * y).sin();

        block(&weight, &x, &y).sum(Kind::Double).backward();
        let plain = [&*weight, &x, &y].map(|t| t.grad().copy());
        for t in [&*weight, &x, &y] {
            let _ = t.grad().zero_();
        }

        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let w = weight.clone();
        let out = checkpoint_one(&[&x, &y], move |xs| {
            CALLS.fetch_add(1, Ordering::SeqCst);
            block(&w, &xs[0], &xs[1])
        });
        assert_eq!(CALLS.load(Ordering::SeqCst), 1);
        assert!(out.requires_grad());
        out.sum(Kind::Double).backward();
        assert_eq!(
            CALLS.load(Ordering::SeqCst),
            2,
            "recomputed once in backward"
        );
        for (name, (t, expected)) in ["weight", "x", "y"]
            .iter()
            .zip([&*weight, &x, &y].into_iter().zip(&plain))
        {
            let diff = max_diff(&t.grad(), expected);
            assert!(diff < 1e-12, "{name}: gradient differs by {diff}");
        }
    }

    #[test]
    fn auto_is_off_on_the_cpu_and_forced_values_win() {
        use dreambooth_api::spec::GradientCheckpointing as Setting;
        assert!(!resolve(Setting::Auto, Device::Cpu));
        assert!(resolve(Setting::Forced(true), Device::Cpu));
        assert!(!resolve(Setting::Forced(false), Device::Cuda(0)));
        // A device that does not exist has no memory to judge by: off.
        assert!(!resolve(Setting::Auto, Device::Cuda(999)));
    }

    #[test]
    fn the_node_owns_the_function_until_its_graph_is_freed() {
        if !available() {
            return;
        }
        let x = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let owned = Arc::new(());
        let held = Arc::clone(&owned);
        let out = checkpoint_one(&[&x], move |xs| {
            let _ = &held;
            &xs[0] * 2.0
        });
        assert_eq!(Arc::strong_count(&owned), 2, "the graph keeps the closure");
        drop(out);
        assert_eq!(Arc::strong_count(&owned), 1, "freed with the graph");
    }

    #[test]
    #[should_panic(expected = "block exploded")]
    fn a_panic_in_the_forward_pass_reaches_the_caller() {
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let _ = checkpoint_one(&[&x], |_| panic!("block exploded"));
    }

    #[test]
    fn inputs_that_need_no_gradient_get_none_and_no_grad_mode_builds_no_graph() {
        if !available() {
            return;
        }
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([3], opts).set_requires_grad(true);
        let frozen = Tensor::randn([3], opts);
        let out = checkpoint_one(&[&x, &frozen], |xs| &xs[0] * &xs[1]);
        out.sum(Kind::Float).backward();
        assert!(max_diff(&x.grad(), &frozen) < 1e-7);
        assert!(!frozen.grad().defined());

        let out = tch::no_grad(|| checkpoint_one(&[&x], |xs| &xs[0] + 1.0));
        assert!(!out.requires_grad());
    }
}
