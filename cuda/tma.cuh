// The Tensor Memory Accelerator (sm_90): the implicit GEMM's staging as bulk tensor copies, one per patch and
// one per weight tap in each pipeline stage. A tensor map describes a source of 16-channel rows: the forward's
// channels-last input [image][row][column][channel] (4-D), grad_input's g copy [plane][image][h'][w'][channel]
// (5-D), the packed weight [group x tap][output channel][channel] (3-D). One elected thread asks for a box
// starting at (possibly negative) coordinates; the hardware fills what lies outside the tensor with zeros,
// writes shared memory in whole lines with the 32- or 64-byte swizzle that tc_stage_offset reproduces, and
// signals an mbarrier with the bytes delivered. Host side: the driver's cuTensorMapEncodeTiled, reached
// through the runtime (no link against libcuda).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"

namespace fused_convt {

// ---- device ------------------------------------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
#endif
}

// Makes barrier initializations visible to the asynchronous proxy (the TMA unit) and to the cluster.
__device__ __forceinline__ void mbarrier_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  asm volatile("fence.proxy.async.shared::cta;\n" ::);
#endif
}

// Makes this thread's shared-memory writes visible to the asynchronous proxy: to wgmma's operand reads and the TMA's
// copies that follow (through a barrier) in other threads.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// A barrier of the thread block cluster (every thread of every block arrives). `publish`: with release /
// acquire semantics, so that shared-memory writes into partner blocks before it are visible after it;
// otherwise relaxed, ordering execution only, for hazards whose earlier accesses have all completed (reads
// whose values were consumed): no fence waits for this thread's outstanding global stores.
__device__ __forceinline__ void cluster_barrier(bool publish) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (publish) {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
  } else {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;\n" ::: "memory");
  }
#endif
}

// The one arrival of a stage's barrier, announcing the bytes its copy will deliver.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

// One plain arrival (a consumer releasing a stage to its producer).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}

// Waits until the barrier's phase `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// `bytes` (a multiple of 16) of contiguous global memory into shared memory at dst; completes on bar.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
#endif
}

// Box of the tensor map at coordinates (c, x, y, n), innermost first, into shared memory at dst; completes
// on bar.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c, int x, int y, int n,
                                            uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c), "r"(x), "r"(y), "r"(n), "r"(bar)
      : "memory");
#endif
}

// Box of a 5-D tensor map at coordinates (c, x, y, n, plane), innermost first.
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const CUtensorMap* map, int c, int x, int y, int n,
                                            int plane, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
      "%6}], [%7];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c), "r"(x), "r"(y), "r"(n), "r"(plane), "r"(bar)
      : "memory");
#endif
}

// Box of a 3-D tensor map at coordinates (c, row, slab), innermost first.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c, int row, int slab,
                                            uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c), "r"(row), "r"(slab), "r"(bar)
      : "memory");
#endif
}

// ---- host --------------------------------------------------------------------------------------------------

// FUSED_CONVT_NO_TMA set (and not "0"): every launch takes the cp.async variants instead, which otherwise run
// only before sm_90, so that tests on a Hopper machine cover them too (and can compare the two bitwise: both
// stage the same values). Read at each launch.
inline bool tma_disabled() { return env_switch_on("FUSED_CONVT_NO_TMA"); }

// cuTensorMapEncodeTiled (its declaration's type; the symbol itself is never linked), looked up once; null
// where the driver lacks it.
using TensorMapEncoder = decltype(&cuTensorMapEncodeTiled);
inline TensorMapEncoder tensor_map_encoder() {
  static const TensorMapEncoder encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else  // the unversioned query, deprecated from CUDA 12.5 on
    const cudaError_t status = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (status != cudaSuccess) {
      cudaGetLastError();  // a failed lookup must not surface as the next launch's error
      fn = nullptr;
    }
    return reinterpret_cast<TensorMapEncoder>(found == cudaDriverEntryPointSuccess ? fn : nullptr);
  }();
  return encode;
}

// The map of a dense tensor of rank 1-5 (element bytes 2 or 4; dims innermost first) read in boxes of box[0] x ...
// box[rank - 1] values, in the given swizzle. Coordinates past a dimension read as zeros. False where the driver
// cannot encode it (no entry point, a misaligned address or stride, a zero extent, ...).
inline bool encode_dense_map(CUtensorMap* map, const void* base, int element_bytes, int rank, const int64_t* dims,
                             const uint32_t* box, CUtensorMapSwizzle swizzle) {
  const TensorMapEncoder encode = tensor_map_encoder();
  if (!encode || rank < 1 || rank > 5) return false;
  cuuint64_t extent[5], strides[4];
  cuuint32_t boxes[5], steps[5];
  cuuint64_t bytes = cuuint64_t(element_bytes);
  for (int d = 0; d < rank; ++d) {
    extent[d] = cuuint64_t(dims[d]);
    if (d > 0) strides[d - 1] = bytes;
    bytes *= extent[d];
    boxes[d] = box[d];
    steps[d] = 1;
  }
  return encode(map, element_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                cuuint32_t(rank), const_cast<void*>(base), extent, strides, boxes, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The TMA swizzle of rows of row_bytes (32, 64 or 128) bytes, the pattern tc_stage_offset reproduces.
inline CUtensorMapSwizzle swizzle_of_rows(int row_bytes) {
  return row_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : row_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                                          : CU_TENSOR_MAP_SWIZZLE_32B;
}

// The map of a dense tensor of rank 3-5 whose innermost dimension holds staged rows' values (element bytes 2
// or 4): boxes of 16 values x box_1 x box_2 (x 1 beyond), swizzled as tc_stage_offset lays rows out (32-byte
// rows: the 32-byte swizzle, 64-byte rows: the 64-byte one).
inline bool encode_rows_map(CUtensorMap* map, const void* base, int element_bytes, int rank, const int64_t* dims,
                            int box_1, int box_2) {
  if (rank < 3) return false;
  const uint32_t box[5] = {16, uint32_t(box_1), uint32_t(box_2), 1, 1};
  return encode_dense_map(map, base, element_bytes, rank, dims, box, swizzle_of_rows(16 * element_bytes));
}

}  // namespace fused_convt
