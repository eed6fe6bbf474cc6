// Counter-based dropout mask shared by the CPU and CUDA kernels.
//
// keep(seed, i) depends only on the seed and the flat element index i = row * cols + col, so the
// backward pass regenerates the forward mask instead of storing it, and both backends draw the same
// mask for the same seed. The hash is the splitmix64 finalizer applied to seed + (i + 1) * golden.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FB_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace fastbert {

FB_HOST_DEVICE uint32_t dropout_hash(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1u) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 32);
}

// An element is kept when dropout_hash(seed, i) >= threshold; P(drop) = threshold / 2^32 ~= p.
inline uint32_t dropout_threshold(double p) {
  double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Scale applied to kept elements, 1 / (1 - p).
inline float dropout_scale(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

}  // namespace fastbert
