// Per-element math of the fused anomaly-map kernels, shared by the CPU (.cpp) and CUDA (.cu)
// paths so that both follow exactly the same formulas (torch conventions, float32).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

namespace kd_ext {
namespace math {

enum Distance : int { kCosine = 0, kL2 = 1 };
enum Fusion : int { kSum = 0, kMean = 1, kProduct = 2, kWeighted = 3 };
enum ScoreMode : int { kScoreNone = 0, kScoreMax = 1, kScoreTopK = 2 };

// torch.nn.functional.cosine_similarity clamps each norm at eps=1e-8;
// torch.nn.functional.normalize (used by anomalib's STFPM) clamps the norm at eps=1e-12.
constexpr float kCosineEps = 1e-8f;
constexpr float kNormalizeEps = 1e-12f;

// Round-to-nearest multiply/add without FMA contraction, so CUDA index math matches the CPU.
KD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
KD_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// max(v, lo) that lets NaN through (like torch.clamp_min), so NaN features give NaN distances.
KD_HD float clamp_min_nan(float v, float lo) { return (v < lo) ? lo : v; }

// Distance of one (teacher, student) channel vector from its three moments:
// dot = <t, s>, tt = <t, t>, ss = <s, s>.
//   cosine: 1 - <t, s> / (max(|t|, 1e-8) * max(|s|, 1e-8))
//   l2:     0.5 * | t / max(|t|, 1e-12) - s / max(|s|, 1e-12) |^2   (anomalib STFPM)
KD_HD float distance_from_moments(int distance, float dot, float tt, float ss) {
  if (distance == kCosine) {
    const float nt = clamp_min_nan(sqrtf(tt), kCosineEps);
    const float ns = clamp_min_nan(sqrtf(ss), kCosineEps);
    return 1.0f - dot / (nt * ns);
  }
  const float nt = clamp_min_nan(sqrtf(tt), kNormalizeEps);
  const float ns = clamp_min_nan(sqrtf(ss), kNormalizeEps);
  const float value = 0.5f * (tt / (nt * nt) + ss / (ns * ns) - 2.0f * dot / (nt * ns));
  return clamp_min_nan(value, 0.0f);  // rounding can give -1e-8 for t == s; the true value is >= 0
}

// Bilinear source coordinate of output index `dst` along one axis, exactly as
// torch.nn.functional.interpolate(mode="bilinear") computes it on the CPU (float arithmetic,
// scale = in/out or (in-1)/(out-1), source index clamped at 0, lambda clamped to [0, 1]).
struct LinearTap {
  int i0;
  int i1;
  float l0;
  float l1;
};

KD_HD LinearTap linear_tap(int dst, int in_size, int out_size, bool align_corners) {
  float src;
  if (align_corners) {
    const float scale = out_size > 1 ? static_cast<float>(in_size - 1) / static_cast<float>(out_size - 1) : 0.0f;
    src = mul_rn(scale, static_cast<float>(dst));
  } else {
    const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
    src = add_rn(mul_rn(scale, add_rn(static_cast<float>(dst), 0.5f)), -0.5f);
    if (src < 0.0f) src = 0.0f;
  }
  int i0 = static_cast<int>(floorf(src));
  if (i0 > in_size - 1) i0 = in_size - 1;
  float l1 = src - static_cast<float>(i0);
  l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  LinearTap tap;
  tap.i0 = i0;
  tap.i1 = i0 + ((i0 < in_size - 1) ? 1 : 0);
  tap.l1 = l1;
  tap.l0 = 1.0f - l1;
  return tap;
}

// Reflect padding index (torch "reflect": -1 -> 1, n -> n-2); valid for pad < n.
KD_HD int reflect_index(int i, int n) {
  if (i < 0) i = -i;
  if (i >= n) i = 2 * (n - 1) - i;
  return i;
}

// Fusion accumulator: start value and one update step (sum/mean/weighted add, product multiplies).
KD_HD float fuse_init(int fusion) { return fusion == kProduct ? 1.0f : 0.0f; }
KD_HD float fuse_step(int fusion, float acc, float value, float weight) {
  if (fusion == kProduct) return acc * value;
  if (fusion == kWeighted) return acc + weight * value;
  return acc + value;
}
KD_HD float fuse_finish(int fusion, float acc, int num_scales) {
  return fusion == kMean ? acc / static_cast<float>(num_scales) : acc;
}

// Order-preserving map of float bits to unsigned keys (for top-k radix selection on the GPU).
KD_HD uint32_t float_to_ordered(uint32_t bits) { return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u); }
KD_HD uint32_t ordered_to_float(uint32_t key) { return (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key; }

}  // namespace math
}  // namespace kd_ext
