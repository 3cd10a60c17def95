// Warpgroup-level tensor-core MMA (wgmma, sm_90a): operands read from shared memory through 64-bit descriptors
// (or A from registers), fp32 accumulators in registers, issued asynchronously by the four warps of a warpgroup.
// Used by the column-pair forward (pair_forward.cuh: both operands from shared memory, unswizzled) and grad_weight
// (grad_weight_wgmma.cuh: A from registers, B K-major in the 128-byte swizzle). Only compiled into sm_90a code
// (__CUDA_ARCH_FEAT_SM90_ALL); the host runs those kernels only on compute capability 9.0 devices of a build
// that includes sm_90a (FUSED_CONVT_SM90A).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fused_convt {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FCT_WGMMA_ENABLED 1
#endif

// Shared-memory matrix descriptor without swizzling, K-major: core matrices of 8 rows x 16 bytes whose rows
// are 16 bytes apart; `k_stride`: bytes to the next core matrix along K, `row_stride`: to the next 8 rows.
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t smem_address, uint32_t k_stride, uint32_t row_stride) {
  return uint64_t((smem_address >> 4) & 0x3FFF) | (uint64_t((k_stride >> 4) & 0x3FFF) << 16) |
         (uint64_t((row_stride >> 4) & 0x3FFF) << 32);
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef FCT_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef FCT_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most kPending committed groups of this warp's wgmmas are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef FCT_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() { wgmma_wait<0>(); }

// The operand lists of the m64nN instructions: N / 2 accumulators per thread. `trans`: the two transpose
// immediates, which the 16-bit types take (0: both K-major) and TF32 does not.
#define FCT_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                    "+f"(d[i + 6]), "+f"(d[i + 7])
#define FCT_WGMMA_ASM(shape, type, trans, regs, ops, dn, ...)                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #dn ", 0;\n"                                            \
               "wgmma.mma_async.sync.aligned." shape ".f32." type "." type " {" regs "}, %" ops ", p, 1, 1" trans ";\n}\n" \
               : __VA_ARGS__                                                                                  \
               : "l"(a), "l"(b), "r"(accumulate))
#define FCT_REGS8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define FCT_REGS16 FCT_REGS8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define FCT_REGS32 FCT_REGS16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FCT_REGS64                                                                                              \
  FCT_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, " \
             "%51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// One wgmma by the operands' type T (in scope where it expands): bfloat16 / float16 with K 16 and the 16-bit types'
// transpose immediates `trans16`, or TF32 with K 8 and none. ASM: FCT_WGMMA_ASM or FCT_WGMMA_RS_ASM.
#define FCT_WGMMA_BY_TYPE(ASM, n, trans16, ...)                                                              \
  if constexpr (std::is_same<T, __nv_bfloat16>::value)                                                      \
    ASM("m64n" n "k16", "bf16", trans16, __VA_ARGS__);                                                       \
  else if constexpr (std::is_same<T, __half>::value)                                                        \
    ASM("m64n" n "k16", "f16", trans16, __VA_ARGS__);                                                        \
  else                                                                                                      \
    ASM("m64n" n "k8", "tf32", "", __VA_ARGS__);

// D (64 x N, fp32) = A (64 x K, from descriptor a) x B (K x N, descriptor b) + (accumulate ? D : 0) for one K
// step of 32 bytes per row: K = 16 for the 16-bit types (bfloat16, float16), K = 8 for T = float (its operands
// TF32 bits).
template <typename T, int N>
__device__ __forceinline__ void wgmma_k32bytes(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
#ifdef FCT_WGMMA_ENABLED
  static_assert(N == 32 || N == 64 || N == 128, "wgmma_k32bytes: N is 32, 64 or 128");
#define FCT_WGMMA_TYPED(n, ...) FCT_WGMMA_BY_TYPE(FCT_WGMMA_ASM, n, ", 0, 0", __VA_ARGS__)
  // Operands: the N / 2 accumulators, then a, b and the accumulate flag.
  if constexpr (N == 32) {
    FCT_WGMMA_TYPED("32", FCT_REGS16, "16, %17", 18, FCT_ACC8(0), FCT_ACC8(8))
  } else if constexpr (N == 64) {
    FCT_WGMMA_TYPED("64", FCT_REGS32, "32, %33", 34, FCT_ACC8(0), FCT_ACC8(8), FCT_ACC8(16), FCT_ACC8(24))
  } else {
    FCT_WGMMA_TYPED("128", FCT_REGS64, "64, %65", 66, FCT_ACC8(0), FCT_ACC8(8), FCT_ACC8(16), FCT_ACC8(24),
                    FCT_ACC8(32), FCT_ACC8(40), FCT_ACC8(48), FCT_ACC8(56))
  }
#undef FCT_WGMMA_TYPED
#endif
}

// K-major operand descriptor in the swizzle of kRowBytes-byte rows (128, 64 or 32: the TMA's swizzle of that span,
// layout types 1, 2, 3), 8-row atoms 8 x kRowBytes apart.
template <int kRowBytes>
__device__ __forceinline__ uint64_t wgmma_swizzled_descriptor(uint32_t smem_address) {
  static_assert(kRowBytes == 128 || kRowBytes == 64 || kRowBytes == 32, "rows of 128, 64 or 32 bytes");
  constexpr uint64_t kLayout = kRowBytes == 128 ? 1 : kRowBytes == 64 ? 2 : 3;
  return uint64_t((smem_address >> 4) & 0x3FFF) | (uint64_t(1) << 16) | (uint64_t(8 * kRowBytes >> 4) << 32) |
         (kLayout << 62);
}
__device__ __forceinline__ uint64_t wgmma_sw128_descriptor(uint32_t smem_address) {
  return wgmma_swizzled_descriptor<128>(smem_address);
}

// D (64 x N, N 32 or 64) = A (64 x K, registers: rows g and g + 8, 32-bit words t and t + 4 of the warp's 16 rows,
// as mma.sync's A fragment) x B (K x N, descriptor b) + (accumulate ? D : 0), K 32 bytes: 8 TF32 or 16 16-bit
// values. (The register form takes one transpose immediate, B's, for the 16-bit types.)
#define FCT_WGMMA_RS_ASM(shape, type, trans, regs, a_ops, b_op, dn, ...)                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #dn ", 0;\n"                                              \
               "wgmma.mma_async.sync.aligned." shape ".f32." type "." type " {" regs "}, {" a_ops "}, %" b_op    \
               ", p, 1, 1" trans ";\n}\n"                                                                       \
               : __VA_ARGS__                                                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate))
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64n_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int accumulate) {
#ifdef FCT_WGMMA_ENABLED
  static_assert(N == 32 || N == 64, "wgmma_m64n_rs: N is 32 or 64");
#define FCT_WGMMA_RS_TYPED(n, ...) FCT_WGMMA_BY_TYPE(FCT_WGMMA_RS_ASM, n, ", 0", __VA_ARGS__)
  if constexpr (N == 32) {
    FCT_WGMMA_RS_TYPED("32", FCT_REGS16, "%16, %17, %18, %19", "20", 21, FCT_ACC8(0), FCT_ACC8(8))
  } else {
    FCT_WGMMA_RS_TYPED("64", FCT_REGS32, "%32, %33, %34, %35", "36", 37, FCT_ACC8(0), FCT_ACC8(8), FCT_ACC8(16),
                       FCT_ACC8(24))
  }
#undef FCT_WGMMA_RS_TYPED
#endif
}
#undef FCT_WGMMA_RS_ASM

#undef FCT_REGS64
#undef FCT_REGS32
#undef FCT_REGS16
#undef FCT_REGS8
#undef FCT_WGMMA_BY_TYPE
#undef FCT_WGMMA_ASM
#undef FCT_ACC8

}  // namespace fused_convt
