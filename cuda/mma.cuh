// Warp-level tensor-core primitives (mma.sync, ldmatrix, cp.async) wrapped per element type, so the
// implicit-GEMM kernel is written once for TF32 (float storage), bfloat16 and float16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fused_convt {

// The tensor-core math of one operand precision. Each policy says how values are staged in shared memory
// (Smem, to_word: kValuesPerWord values per 32-bit word), how raw ldmatrix registers become MMA operands
// (AFrag/BFrag, make_a/make_b) and how one mma.sync step accumulates (mma, k extent kStep).
// A 16-byte smem row segment holds 16 / sizeof(Smem) values.

__device__ __forceinline__ uint32_t round_to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Operands used as loaded (TF32 bits, or 16-bit pairs).
struct PlainFragments {
  struct AFrag { uint32_t r[4]; };
  struct BFrag { uint32_t r[2]; };
  __device__ __forceinline__ static void make_a(AFrag& a, const uint32_t (&raw)[4]) {
    a.r[0] = raw[0], a.r[1] = raw[1], a.r[2] = raw[2], a.r[3] = raw[3];
  }
  __device__ __forceinline__ static void make_b(BFrag& b, uint32_t r0, uint32_t r1) { b.r[0] = r0, b.r[1] = r1; }
};

// float with TF32 allowed: operands rounded to TF32 once, when staged; one m16n8k8 per step.
struct Tf32Math : PlainFragments {
  using Smem = uint32_t;
  using Factor = FactorType<float, true>;  // the saved factor's type
  static constexpr int kStep = 8;
  static constexpr int kValuesPerWord = 1;
  __device__ __forceinline__ static Smem to_smem(float v) { return round_to_tf32(v); }
  __device__ __forceinline__ static uint32_t to_word(const float (&v)[1]) { return to_smem(v[0]); }
  __device__ __forceinline__ static void mma(float (&d)[4], const AFrag& a, const BFrag& b) { mma_tf32(d, a.r, b.r); }
};

// Exact float32 on tensor cores ("3xTF32"): each operand x = hi + lo with hi = tf32(x), lo = tf32(x - hi);
// a*b ~ hi_a*hi_b + hi_a*lo_b + lo_a*hi_b (the lo*lo term is below float32 rounding). Operands are staged
// as raw float bits and split in registers; the small products are accumulated first.
// Non-finite values follow PyTorch's composite only if they enter the big product alone: an infinite hi
// times the other operand's lo would add inf * 0 = NaN (lo is 0 for any tf32-exact value) or an infinity of
// the wrong sign. So the cross products use `cross` = hi where hi is finite, else 0, and lo is 0 there.
struct Fp32SplitMath {
  using Smem = uint32_t;
  using Factor = FactorType<float, false>;
  static constexpr int kStep = 8;
  static constexpr int kValuesPerWord = 1;
  struct AFrag { uint32_t hi[4], cross[4], lo[4]; };
  struct BFrag { uint32_t hi[2], cross[2], lo[2]; };
  __device__ __forceinline__ static Smem to_smem(float v) { return __float_as_uint(v); }
  __device__ __forceinline__ static uint32_t to_word(const float (&v)[1]) { return to_smem(v[0]); }
  // hi may be non-finite also for a finite value that rounds up past FLT_MAX.
  __device__ __forceinline__ static void split(uint32_t raw, uint32_t& hi, uint32_t& cross, uint32_t& lo) {
    const float v = __uint_as_float(raw);
    hi = round_to_tf32(v);
    const bool finite = (hi & 0x7f800000u) != 0x7f800000u;
    cross = finite ? hi : 0u;
    lo = round_to_tf32(finite ? v - __uint_as_float(hi) : 0.0f);
  }
  __device__ __forceinline__ static void make_a(AFrag& a, const uint32_t (&raw)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) split(raw[i], a.hi[i], a.cross[i], a.lo[i]);
  }
  __device__ __forceinline__ static void make_b(BFrag& b, uint32_t r0, uint32_t r1) {
    split(r0, b.hi[0], b.cross[0], b.lo[0]);
    split(r1, b.hi[1], b.cross[1], b.lo[1]);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const AFrag& a, const BFrag& b) {
    mma_tf32(d, a.lo, b.cross);
    mma_tf32(d, a.cross, b.lo);
    mma_tf32(d, a.hi, b.hi);
  }
};

// bfloat16 / float16: operands as stored; one m16n8k16 per step.
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
template <typename T> __device__ __forceinline__ T round_from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 round_from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half round_from_float(float v) { return __float2half_rn(v); }

template <typename T>
struct Half16Math : PlainFragments {
  using Smem = T;
  using Factor = T;
  static constexpr int kStep = 16;
  static constexpr int kValuesPerWord = 2;
  __device__ __forceinline__ static Smem to_smem(T v) { return v; }
  __device__ __forceinline__ static uint32_t to_word(const float (&v)[2]) {
    return bits_of(round_from_float<T>(v[0])) | (bits_of(round_from_float<T>(v[1])) << 16);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const AFrag& a, const BFrag& b) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
    }
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

// The same with each matrix transposed: lane i then receives column elements (16-bit operands staged with
// the reduction index outermost).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ uint32_t lds32(uint32_t address) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(address));
  return v;
}

__device__ __forceinline__ uint4 lds128(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address));
  return v;
}
__device__ __forceinline__ void sts128(uint32_t address, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// 16-byte asynchronous global->shared copy; src_bytes == 0 zero-fills the destination.
__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* global_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(global_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
// Waits until at most `pending` of this thread's committed copy groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(pending)); }

}  // namespace fused_convt
