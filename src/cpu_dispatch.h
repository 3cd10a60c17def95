// Maps a run-time DType to the CPU path's storage type and calls fn with a value of that type
// (only its type matters). One place for the dtype switch of every CPU entry point.
#pragma once

#include "fused_convt/dtype.h"

namespace fused_convt {

template <typename Fn>
void dispatch_host_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); return;
    case DType::Float64: fn(double{}); return;
    case DType::Float16: fn(HalfBits{}); return;
    case DType::BFloat16: fn(BFloat16Bits{}); return;
  }
  throw std::invalid_argument("fused_convt: unsupported dtype tag " + std::to_string(static_cast<int>(dtype)));
}

// Loads a stored element as its accumulation type.
template <typename T>
inline typename AccumulatorOf<T>::type load_acc(const T* ptr, int64_t index) {
  return static_cast<typename AccumulatorOf<T>::type>(to_float(ptr[index]));
}

template <typename T, typename Acc>
inline void store_from_acc(T* ptr, int64_t index, Acc value) {
  ptr[index] = HostStorage<T>::from(static_cast<decltype(to_float(T{}))>(value));
}

}  // namespace fused_convt
