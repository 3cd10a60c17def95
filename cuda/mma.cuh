// Warp-level tensor-core primitives (mma.sync, ldmatrix, cp.async) wrapped per element type, so the
// implicit-GEMM kernel is written once for TF32 (float storage), bfloat16 and float16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fused_convt {

// One MMA step per element type: K_STEP is the k extent of one mma.sync instruction
// (m16n8k8 for TF32, m16n8k16 for 16-bit types); a 16-byte smem row segment holds 16 / sizeof(Smem) values.
template <typename T> struct MmaTraits;

template <> struct MmaTraits<float> {
  using Smem = uint32_t;  // TF32 bit patterns, rounded once when staged
  static constexpr int kStep = 8;
  static constexpr int kValuesPerWord = 1;
  __device__ __forceinline__ static Smem to_smem(float v) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
  }
  __device__ __forceinline__ static uint32_t to_word(const float (&v)[1]) { return to_smem(v[0]); }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <> struct MmaTraits<__nv_bfloat16> {
  using Smem = __nv_bfloat16;
  static constexpr int kStep = 16;
  static constexpr int kValuesPerWord = 2;
  __device__ __forceinline__ static Smem to_smem(__nv_bfloat16 v) { return v; }
  __device__ __forceinline__ static uint32_t to_word(const float (&v)[2]) {
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(v[0]))) | (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(v[1]))) << 16);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <> struct MmaTraits<__half> {
  using Smem = __half;
  static constexpr int kStep = 16;
  static constexpr int kValuesPerWord = 2;
  __device__ __forceinline__ static Smem to_smem(__half v) { return v; }
  __device__ __forceinline__ static uint32_t to_word(const float (&v)[2]) {
    return uint32_t(__half_as_ushort(__float2half_rn(v[0]))) | (uint32_t(__half_as_ushort(__float2half_rn(v[1]))) << 16);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Four 8x8 b16 matrices (or 8x4 b32): lane i supplies the address of row (i % 8) of matrix (i / 8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// 16-byte asynchronous global->shared copy; src_bytes == 0 zero-fills the destination.
__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* global_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(global_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

}  // namespace fused_convt
