// A second stream for a call's independent kernels: the backward runs grad_input beside grad_weight's x copy,
// GEMM and sum, which need only the g pass before them. Small problems leave most SMs idle in each of those
// kernels (a few waves or less, each ending in a ragged tail), so the two chains overlap.
//
// The side stream forks from the caller's stream by an event and joins it by another before the call returns:
// to the caller every kernel stays ordered on its own stream (tensors allocated there are safe to free after the
// call), and inside a CUDA graph capture the fork becomes two branches of the graph. Streams and events are
// per thread and device (created on first use, kept for the thread's life), so that concurrent callers on other
// threads never share them. FUSED_CONVT_SERIAL_BACKWARD set (and not "0") keeps everything on the caller's stream.
#pragma once

#include <cuda_runtime.h>

#include <map>

#include "cuda_common.cuh"

namespace fused_convt {

inline bool serial_backward() { return env_switch_on("FUSED_CONVT_SERIAL_BACKWARD"); }

class ForkJoin {
 public:
  // Forks a side stream from `main` where `enabled`; otherwise side() is `main` and join() does nothing.
  ForkJoin(cudaStream_t main, bool enabled) : main_(main), side_(main) {
    Resources* r = enabled ? resources(main) : nullptr;
    if (!r) return;
    check_cuda(cudaEventRecord(r->fork, main), "cudaEventRecord(fork)");
    check_cuda(cudaStreamWaitEvent(r->side, r->fork, 0), "cudaStreamWaitEvent(fork)");
    side_ = r->side;
    join_ = r->join;
  }
  cudaStream_t side() const { return side_; }
  // The caller's stream waits for everything queued on the side stream so far.
  void join() {
    if (side_ == main_) return;
    check_cuda(cudaEventRecord(join_, side_), "cudaEventRecord(join)");
    check_cuda(cudaStreamWaitEvent(main_, join_, 0), "cudaStreamWaitEvent(join)");
    side_ = main_;
  }
  // A launch that threw leaves the fork open: join anyway (a capture must not end with the side stream in it).
  ~ForkJoin() {
    if (side_ == main_) return;
    if (cudaEventRecord(join_, side_) == cudaSuccess) cudaStreamWaitEvent(main_, join_, 0);
    cudaGetLastError();
  }
  ForkJoin(const ForkJoin&) = delete;
  ForkJoin& operator=(const ForkJoin&) = delete;

 private:
  struct Resources {
    cudaStream_t side = nullptr;
    cudaEvent_t fork = nullptr, join = nullptr;
  };
  // This thread's stream and events on the current device. Re-recording an event later does not change what an
  // earlier cudaStreamWaitEvent waits for, so two events serve every call. Null (run serially) where they do not
  // exist yet and `main` is being captured into a graph: creating them is no operation to run during a capture.
  static Resources* resources(cudaStream_t main) {
    thread_local std::map<int, Resources> by_device;
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    Resources& r = by_device[device];
    if (!r.side) {  // kept only once all three exist (a failed creation is retried by the next call)
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(main, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
        cudaGetLastError();  // (the legacy stream while another thread captures answers with an error)
        return nullptr;
      }
      Resources made;
      check_cuda(cudaEventCreateWithFlags(&made.fork, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      check_cuda(cudaEventCreateWithFlags(&made.join, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      check_cuda(cudaStreamCreateWithFlags(&made.side, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      r = made;
    }
    return &r;
  }

  cudaStream_t main_, side_;
  cudaEvent_t join_ = nullptr;
};

}  // namespace fused_convt
