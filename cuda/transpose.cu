// A batch of matrices transposed on the device, [batch][rows][cols] -> [batch][cols][rows], values copied as raw
// 2-, 4- or 8-byte words: an NHWC (channels_last) tensor into NCHW with rows = H * W and cols = C. The backward
// takes its grad_output and input NCHW, and PyTorch's own `.contiguous()` of a channels_last tensor (its generic
// permuted copy) moved ~1 TB/s in float and ~0.5 in bfloat16: 2.3 ms of kb_v1's bf16 channels_last training step
// (H100). Here each block stages a tile in shared memory so that both the reads (along cols) and the writes
// (along rows) are consecutive across a warp.
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"

namespace fused_convt {

constexpr int kTransposeLanes = 32;
constexpr int kTransposeRows = 8;  // thread rows per block

// A tile of (32 kVec) x (32 kVec) values: each thread moves kVec consecutive values per global access, two for
// 2- and 4-byte values (one 4- or 8-byte word), so that a warp reads and writes at least 128 bytes a row or column
// (with one 2-byte value a lane the transpose moved 1.2 TB/s at kb_v1 bf16). vector: the launch's rows and columns
// are even and the pointers aligned to such a word, else each value goes alone. Shared memory is accessed value by
// value, its rows padded so that a tile column's values (the write phase) fall in distinct banks, up to 2-way.
// grid.x: batch x row tiles (the batch folded in, so neither bounds the grid), grid.y: column tiles.
template <typename Value, int kVec>
__global__ void __launch_bounds__(kTransposeLanes * kTransposeRows)
    transpose_kernel(const Value* __restrict__ src, Value* __restrict__ dst, int64_t rows, int64_t cols,
                     int64_t row_tiles, bool vector) {
  follow_previous_grid();
  constexpr int kTile = kTransposeLanes * kVec;
  using Vector = std::conditional_t<kVec == 1, Value, std::conditional_t<sizeof(Value) == 2, uint32_t, uint2>>;
  __shared__ __align__(16) Value tile[kTile][kTile + (sizeof(Value) == 2 ? 2 : 1)];
  const int64_t b = blockIdx.x / row_tiles, r0 = blockIdx.x % row_tiles * kTile;
  const int64_t c0 = int64_t(blockIdx.y) * kTile;
  const Value* in = src + b * rows * cols;
  Value* out = dst + b * rows * cols;
  const int x = threadIdx.x * kVec;
  for (int i = threadIdx.y; i < kTile; i += kTransposeRows) {
    const int64_t r = r0 + i, c = c0 + x;
    if (r >= rows) break;
    if (vector && c + kVec <= cols) {
      alignas(sizeof(Vector)) Value v[kVec];
      *reinterpret_cast<Vector*>(v) = *reinterpret_cast<const Vector*>(in + r * cols + c);
      for (int k = 0; k < kVec; ++k) tile[i][x + k] = v[k];
    } else {
      for (int k = 0; k < kVec; ++k)
        if (c + k < cols) tile[i][x + k] = in[r * cols + c + k];
    }
  }
  __syncthreads();
  for (int j = threadIdx.y; j < kTile; j += kTransposeRows) {
    const int64_t c = c0 + j, r = r0 + x;
    if (c >= cols) break;
    if (vector && r + kVec <= rows) {
      alignas(sizeof(Vector)) Value v[kVec];
      for (int k = 0; k < kVec; ++k) v[k] = tile[x + k][j];
      *reinterpret_cast<Vector*>(out + c * rows + r) = *reinterpret_cast<const Vector*>(v);
    } else {
      for (int k = 0; k < kVec; ++k)
        if (r + k < rows) out[c * rows + r + k] = tile[x + k][j];
    }
  }
}

void transpose_cuda(const void* src, void* dst, int64_t batch, int64_t rows, int64_t cols, int elem_bytes,
                    const CudaContext& ctx) {
  if (elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8)
    throw std::invalid_argument("fused_convt: transpose_cuda takes 2-, 4- or 8-byte values, got elem_bytes = " +
                                std::to_string(elem_bytes));
  if (batch < 0 || rows < 0 || cols < 0)
    throw std::invalid_argument("fused_convt: transpose_cuda got a negative extent");
  if (batch == 0 || rows == 0 || cols == 0) return;
  DeviceGuard guard(ctx.device);
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  auto launch = [&](auto value, auto vec) {
    using Value = decltype(value);
    constexpr int kVec = decltype(vec)::value, kTile = kTransposeLanes * kVec;
    const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
    if (batch * row_tiles > 0x7fffffff || col_tiles > 65535)
      throw std::invalid_argument("fused_convt: transpose_cuda grid too large (batch x row tiles > 2^31 - 1 or "
                                  "more than 65535 column tiles)");
    constexpr uintptr_t kWord = kVec * sizeof(Value);
    const bool vector = kVec == 1 || (rows % 2 == 0 && cols % 2 == 0 && reinterpret_cast<uintptr_t>(src) % kWord == 0 &&
                                      reinterpret_cast<uintptr_t>(dst) % kWord == 0);
    launch_kernel(transpose_kernel<Value, kVec>,
                  {dim3(unsigned(batch * row_tiles), unsigned(col_tiles)), dim3(kTransposeLanes, kTransposeRows), 0,
                   stream},
                  "transpose_kernel", static_cast<const Value*>(src), static_cast<Value*>(dst), rows, cols, row_tiles,
                  vector);
  };
  if (elem_bytes == 2) launch(uint16_t{}, std::integral_constant<int, 2>{});
  else if (elem_bytes == 4) launch(uint32_t{}, std::integral_constant<int, 2>{});
  else launch(uint64_t{}, std::integral_constant<int, 1>{});
}

}  // namespace fused_convt
