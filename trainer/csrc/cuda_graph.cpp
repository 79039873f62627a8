// CUDA-graph capture and replay of a whole training step (at::cuda::CUDAGraph), on a
// side stream with the graph's private memory pool. The step itself is Rust code run
// between dbt_graph_capture_begin and dbt_graph_capture_end; libtorch records every
// kernel it launches, including the autograd engine's backward and the default CUDA
// generator's draws (re-seeded from the generator's state on each replay).

#include <ATen/autocast_mode.h>
#include <c10/core/Event.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdio>
#include <exception>

namespace {

struct Graph {
  explicit Graph(c10::DeviceIndex device)
      : stream(c10::cuda::getStreamFromPool(false, device)) {}
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream stream;
  // Between stream_enter and stream_exit the side stream is current and `caller` is
  // the stream it replaced. (Not CUDAStreamGuard: its inline device-guard vtable would
  // need cudart symbols this shim does not link.)
  bool entered = false;
  c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream();
  bool autocast_cache = true;
};

void report(const std::exception& e, char* error, size_t error_len) {
  if (error != nullptr && error_len > 0) std::snprintf(error, error_len, "%s", e.what());
}

// `waiting` runs nothing more until the work queued so far on `done` has finished; an
// event between the streams, no host sync.
void wait_for(const c10::cuda::CUDAStream& waiting, const c10::cuda::CUDAStream& done) {
  c10::Event event(c10::DeviceType::CUDA);
  event.record(done.unwrap());
  event.block(waiting.unwrap());
}

// The side stream waits for work already queued on the caller's stream, then becomes
// the current stream.
void stream_enter(Graph* g) {
  g->caller = c10::cuda::getCurrentCUDAStream(g->stream.device_index());
  wait_for(g->stream, g->caller);
  c10::cuda::setCurrentCUDAStream(g->stream);
  g->entered = true;
}

void stream_exit(Graph* g) {
  c10::cuda::setCurrentCUDAStream(g->caller);
  g->entered = false;
  wait_for(g->caller, g->stream);
}

}  // namespace

extern "C" {

void* dbt_graph_new(int device, char* error, size_t error_len) {
  try {
    return new Graph(static_cast<c10::DeviceIndex>(device));
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return nullptr;
  }
}

void dbt_graph_free(void* graph) { delete static_cast<Graph*>(graph); }

// Eager warm-up steps run on the capture stream, as PyTorch advises, so lazily created
// per-stream state (cuBLAS workspaces, autograd buffers) exists before capture.
int dbt_graph_stream_enter(void* graph, char* error, size_t error_len) {
  try {
    stream_enter(static_cast<Graph*>(graph));
    return 0;
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return 1;
  }
}

int dbt_graph_stream_exit(void* graph, char* error, size_t error_len) {
  try {
    stream_exit(static_cast<Graph*>(graph));
    return 0;
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return 1;
  }
}

int dbt_graph_capture_begin(void* graph, char* error, size_t error_len) {
  auto* g = static_cast<Graph*>(graph);
  try {
    stream_enter(g);
    // Autocast's weight cache would keep casts made during capture alive across
    // replays outside the pool's bookkeeping; each replay re-casts instead.
    g->autocast_cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    g->graph.capture_begin();
    return 0;
  } catch (const std::exception& e) {
    at::autocast::set_autocast_cache_enabled(g->autocast_cache);
    if (g->entered) stream_exit(g);
    report(e, error, error_len);
    return 1;
  }
}

int dbt_graph_capture_end(void* graph, char* error, size_t error_len) {
  auto* g = static_cast<Graph*>(graph);
  int status = 0;
  try {
    g->graph.capture_end();
  } catch (const std::exception& e) {
    report(e, error, error_len);
    status = 1;
  }
  at::autocast::set_autocast_cache_enabled(g->autocast_cache);
  try {
    stream_exit(g);
  } catch (const std::exception& e) {
    if (status == 0) report(e, error, error_len);
    status = 1;
  }
  return status;
}

// Launches the whole captured step on the current stream; returns without waiting.
int dbt_graph_replay(void* graph, char* error, size_t error_len) {
  try {
    static_cast<Graph*>(graph)->graph.replay();
    return 0;
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return 1;
  }
}

}  // extern "C"
