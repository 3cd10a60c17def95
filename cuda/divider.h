// Division by a divisor fixed at launch, as a multiply-high, an add and a shift: the quotient of a kernel's
// per-tile and per-pixel index math without the ~20 instructions of a 32-bit integer division (the pair
// forward divides tile numbers by the tiles per image and grid pixels by the row width on every tile).
//
// For a divisor d >= 1 take s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1 (< 2^32). For 0 <= n < 2^31,
// floor(n / d) = (floor(m n / 2^32) + n) >> s: the round-up method of Granlund and Montgomery ("Division by
// invariant integers using multiplication", 1994); n < 2^31 keeps the sum within 32 bits.
// tests/cpp/test_pair_plan.cpp checks it against the division on the host.
#pragma once

#include <cstdint>

#include "fused_convt/macros.h"

namespace fused_convt {

struct Divider {
  uint32_t divisor = 1, multiplier = 0, shift = 0;

  Divider() = default;
  explicit Divider(uint32_t d) : divisor(d) {  // d >= 1
    while ((uint64_t(1) << shift) < d) ++shift;
    multiplier = uint32_t((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d) / d + 1);
  }
  // n in [0, 2^31).
  FCT_HD int quotient(int n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(uint32_t(n), multiplier);
#else
    const uint32_t high = uint32_t((uint64_t(uint32_t(n)) * multiplier) >> 32);
#endif
    return int((high + uint32_t(n)) >> shift);
  }
  FCT_HD int remainder(int n, int q) const { return n - q * int(divisor); }
};

}  // namespace fused_convt
