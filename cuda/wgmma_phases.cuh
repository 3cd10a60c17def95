// What the wgmma backward kernels (grad_weight_wgmma.cuh, grad_input_wgmma.cuh) share about the output phases:
// the tap table of phases of 2 x 2 taps and the tensor maps of the g pass's phase-split G (and their warpgroups'
// register split). Both kernels read G at the input's pixel grid: for tap t of phase (r_h, r_w), input pixel
// (n, i, j) pairs with G[phase, n, i - off_h[t], j - off_w[t], :] (zero outside the phase grid, as TMA fills it),
// so one G box of a tile's pixels plus one row and one column serves all four taps, each at an address offset.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "fused_convt/api.h"
#include "grad_weight_gemm.cuh"
#include "tma.cuh"

namespace fused_convt {

constexpr int kWgmmaTaps = 4;       // every phase has 2 x 2 taps (wgmma_phase_tables)
constexpr int kWgmmaMaxPhases = 4;  // a G tensor map per phase
// Output channels of both kernels' narrow tiles (kb_v0's 16), where their wide tiles' 64-row M (grad_weight) or
// 128-byte K chunks (grad_input) would be mostly empty.
constexpr int kWgmmaNarrowOc = 16;

// Whether this build and device run the wgmma backward kernels: an sm_90a build (FUSED_CONVT_SM90A) on a compute
// capability 9.0 device, with the driver's TMA encoder.
inline bool wgmma_backward_runs_here() {
#ifdef FUSED_CONVT_SM90A
  return tensor_map_encoder() && sm90a_kernels_run_here();
#else
  return false;
#endif
}

// A phase's four taps: input offsets, the largest of each axis (G's box origin), and the weight tap (kh kernel_w + kw).
struct WgmmaPhaseTaps {
  int off_h[kWgmmaTaps], off_w[kWgmmaTaps], max_h, max_w, tap[kWgmmaTaps];
};

// The tap tables (from the host's gemm_tap: one table, not every block's own) where every phase fits these kernels:
// at most four phases, none empty (the driver refuses a map of zero extent), each of 2 x 2 taps that read two
// neighbouring input rows and columns (kernel = 2 x stride at dilation 1, as kb_v0 and kb_v1); else false.
inline bool wgmma_phase_tables(const ConvTransposeParams& p, WgmmaPhaseTaps (&tables)[kWgmmaMaxPhases]) {
  if (p.stride_h * p.stride_w > kWgmmaMaxPhases) return false;
  for (int rh = 0; rh < p.stride_h; ++rh)
    for (int rw = 0; rw < p.stride_w; ++rw) {
      const int taps_w = phase_taps(p.kernel_w, p.stride_w, p.dil_w, rw);
      if (phase_taps(p.kernel_h, p.stride_h, p.dil_h, rh) * taps_w != kWgmmaTaps ||
          phase_span(p.out_h(), p.stride_h, p.pad_h, rh).extent == 0 || phase_span(p.out_w(), p.stride_w, p.pad_w, rw).extent == 0)
        return false;
      const GemmTapSpan span = gemm_tap_span(p, rh, rw, taps_w, 0, kWgmmaTaps);
      if (span.max_h - span.min_h != 1 || span.max_w - span.min_w != 1) return false;
      WgmmaPhaseTaps& taps = tables[rh * p.stride_w + rw];
      taps.max_h = span.max_h, taps.max_w = span.max_w;
      for (int t = 0; t < kWgmmaTaps; ++t) {
        const GemmTap tap = gemm_tap(p, rh, rw, taps_w, t);
        taps.off_h[t] = tap.off_h, taps.off_w[t] = tap.off_w, taps.tap[t] = int(tap.kh * p.kernel_w + tap.kw);
      }
    }
  return true;
}

// Registers per thread of the consumer warpgroups (kWgs of them) and the producer warpgroup (setmaxnreg; the launch
// bound alone gives every thread of three warpgroups 168, and grad_weight's 128 accumulators and two A fragment sets
// need more: ptxas serialized the wgmmas).
template <int kWgs>
constexpr int kWgmmaConsumerRegisters = kWgs == 2 ? 232 : 248;
constexpr int kWgmmaProducerRegisters = 40;

// G of each phase as a 4-D tensor [image][phase row][phase column][row of channels].
struct WgmmaGMaps {
  CUtensorMap phase[kWgmmaMaxPhases];
};

// The maps of G (g_split, laid out as g_layout, elements of kBytes) read in boxes of box[0] channels x box[1]
// phase columns x box[2] phase rows x 1 image, in the swizzle of box[0]'s bytes; false where the driver refuses
// one.
inline bool encode_g_phase_maps(const ConvTransposeParams& p, int kBytes, const PhaseSplitLayout& g_layout,
                                const void* g_split, const uint32_t (&box)[4], WgmmaGMaps* maps) {
  const CUtensorMapSwizzle swizzle = swizzle_of_rows(int(box[0]) * kBytes);
  for (int phase = 0; phase < int(p.stride_h * p.stride_w); ++phase) {
    const int rh = phase / int(p.stride_w), rw = phase % int(p.stride_w);
    const int64_t dims[4] = {g_layout.row, g_layout.w.extent(rw), g_layout.h.extent(rh), p.batch};
    const auto* base = static_cast<const unsigned char*>(g_split) + g_layout.phase_first_row(rh, rw) * g_layout.row * kBytes;
    if (!encode_dense_map(&maps->phase[phase], base, kBytes, 4, dims, box, swizzle)) return false;
  }
  return true;
}

}  // namespace fused_convt
