// Streaming k-smallest selection shared by the scoring kernels (host and device).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SLSG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SLSG_HOST_DEVICE inline
#endif

namespace slsg {

// Inserts (v, j) into the ascending list vals/idx of length k, dropping the last entry.
// Scanning j in increasing order and shifting only strictly larger values keeps ties
// ordered by the lowest index.
template <typename acc_t>
SLSG_HOST_DEVICE void insert_sorted(acc_t* vals, int64_t* idx, int64_t k, acc_t v, int64_t j) {
  int64_t p = k - 1;
  while (p > 0 && vals[p - 1] > v) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = v;
  idx[p] = j;
}

// One row of a block: dot[j * dot_stride] = x.c_{k0+j}; the candidate value is the clamped
// squared distance minus the squared radius. center_offset = ||c||^2 - r^2 and radius_sq
// (may be null) point at the block's first centre.
template <typename acc_t>
SLSG_HOST_DEVICE void scan_block(const acc_t* dot, int64_t dot_stride, acc_t x_norm,
                                 const acc_t* center_offset, const acc_t* radius_sq, int64_t k0,
                                 int64_t kb, acc_t* vals, int64_t* idx, int64_t k) {
  acc_t worst = vals[k - 1];
  bool full = idx[k - 1] >= 0;
  for (int64_t j = 0; j < kb; ++j) {
    acc_t v = x_norm + (center_offset[j] - acc_t(2) * dot[j * dot_stride]);
    if (v < worst || !full) {
      // Rounding can make the squared distance slightly negative: clamp it at zero.
      const acc_t r2 = radius_sq ? radius_sq[j] : acc_t(0);
      if (v + r2 < acc_t(0)) v = -r2;
      if (v < worst || !full) {
        insert_sorted(vals, idx, k, v, k0 + j);
        worst = vals[k - 1];
        full = idx[k - 1] >= 0;
      }
    }
  }
}

}  // namespace slsg
