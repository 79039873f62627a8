//! A whole training step captured once as a CUDA graph and replayed (backed by
//! `csrc/cuda_graph.cpp`). Capture records the kernels the step launches on a side
//! stream into a private memory pool: tensors the step creates stay where they are, so
//! inputs are copied into static buffers before each replay and outputs are read from
//! the tensors the captured step returned.

use std::ffi::c_void;

use super::ShimError;

#[cfg(dbt_cuda_shim)]
mod ffi {
    use std::ffi::{c_char, c_void};
    unsafe extern "C" {
        pub fn dbt_graph_new(device: i32, error: *mut c_char, error_len: usize) -> *mut c_void;
        pub fn dbt_graph_free(graph: *mut c_void);
        pub fn dbt_graph_stream_enter(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn dbt_graph_stream_exit(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn dbt_graph_capture_begin(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn dbt_graph_capture_end(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
        pub fn dbt_graph_replay(graph: *mut c_void, error: *mut c_char, len: usize) -> i32;
    }
}

/// One CUDA graph with its side stream and memory pool.
pub struct CudaGraph {
    handle: *mut c_void,
    captured: bool,
}

impl CudaGraph {
    pub fn new(device: usize) -> Result<Self, ShimError> {
        #[cfg(dbt_cuda_shim)]
        {
            let handle = super::with_error_buffer("creating a CUDA graph", |error, len| {
                // SAFETY: plain constructor; null on failure.
                let handle = unsafe { ffi::dbt_graph_new(device as i32, error, len) };
                (!handle.is_null()).then_some(handle)
            })?;
            return Ok(Self {
                handle,
                captured: false,
            });
        }
        #[allow(unreachable_code)]
        {
            let _ = device;
            Err(ShimError::Unavailable("CUDA graphs"))
        }
    }

    /// Runs `f` eagerly on the graph's side stream (warm-up before capture).
    pub fn on_side_stream<T>(&mut self, f: impl FnOnce() -> T) -> Result<T, ShimError> {
        self.call("entering the capture stream", Op::StreamEnter)?;
        let out = f();
        self.call("leaving the capture stream", Op::StreamExit)?;
        Ok(out)
    }

    /// Records what `f` launches instead of running it. Nothing in `f` may read a value
    /// back to the CPU or copy from host memory.
    pub fn capture<T>(&mut self, f: impl FnOnce() -> T) -> Result<T, ShimError> {
        self.call("beginning the capture", Op::CaptureBegin)?;
        let out = f();
        self.call("ending the capture", Op::CaptureEnd)?;
        self.captured = true;
        Ok(out)
    }

    /// Launches the captured step on the current stream; returns without waiting.
    pub fn replay(&mut self) -> Result<(), ShimError> {
        assert!(self.captured, "replay before capture");
        self.call("replaying the CUDA graph", Op::Replay)
    }

    fn call(&mut self, what: &'static str, op: Op) -> Result<(), ShimError> {
        #[cfg(dbt_cuda_shim)]
        {
            let handle = self.handle;
            return super::with_error_buffer(what, |error, len| {
                // SAFETY: `handle` is the live graph from `dbt_graph_new`.
                let status = unsafe {
                    match op {
                        Op::StreamEnter => ffi::dbt_graph_stream_enter(handle, error, len),
                        Op::StreamExit => ffi::dbt_graph_stream_exit(handle, error, len),
                        Op::CaptureBegin => ffi::dbt_graph_capture_begin(handle, error, len),
                        Op::CaptureEnd => ffi::dbt_graph_capture_end(handle, error, len),
                        Op::Replay => ffi::dbt_graph_replay(handle, error, len),
                    }
                };
                (status == 0).then_some(())
            });
        }
        #[allow(unreachable_code)]
        {
            let _ = op;
            Err(ShimError::Unavailable(what))
        }
    }
}

#[derive(Clone, Copy)]
enum Op {
    StreamEnter,
    StreamExit,
    CaptureBegin,
    CaptureEnd,
    Replay,
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(dbt_cuda_shim)]
        // SAFETY: the handle came from `dbt_graph_new` and is freed once.
        unsafe {
            ffi::dbt_graph_free(self.handle)
        };
    }
}
