// CPU image score of anomaly maps: max, or mean of the top-k values; NaN anywhere -> NaN.
#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "common/kd_math.h"
#include "common/plan.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace kd_ext {

float max_or_nan(const float* values, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t nan_count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = values[i];
    m = v > m ? v : m;
    nan_count += (v != v);
  }
  return nan_count ? std::numeric_limits<float>::quiet_NaN() : m;
}

namespace {

// Score of one map; `work` holds hw floats for the top-k selection (unused otherwise).
float score_one(const float* map, int64_t hw, int score_mode, int64_t top_k, float* work) {
  const float m = max_or_nan(map, hw);
  if (m != m || score_mode != math::kScoreTopK || top_k == 1) return m;
  std::copy(map, map + hw, work);
  std::nth_element(work, work + (top_k - 1), work + hw, std::greater<float>());
  double total = 0.0;
  for (int64_t i = 0; i < top_k; ++i) total += work[i];
  return static_cast<float>(total / static_cast<double>(top_k));
}

}  // namespace

void image_score_cpu(const float* maps, int64_t batch, int64_t hw, int score_mode, int64_t top_k, float* scores) {
  // Images are dealt round-robin to `slots` claims, each with its own top-k working copy,
  // allocated before the threads start.
  const bool copies = score_mode == math::kScoreTopK && top_k > 1;
  const int64_t slots = std::min<int64_t>(batch, max_threads());
  std::vector<std::unique_ptr<float[]>> work;
  try {
    if (copies) {
      work.reserve(static_cast<size_t>(slots));
      for (int64_t i = 0; i < slots; ++i) work.emplace_back(new float[static_cast<size_t>(hw)]);
    }
  } catch (const std::bad_alloc&) {
    const int64_t mib = (slots * hw * static_cast<int64_t>(sizeof(float)) + (1 << 20) - 1) >> 20;
    throw OutOfMemory("out of memory in the CPU top-k image score: it needs about " + std::to_string(mib) +
                      " MiB for working copies of the maps; score fewer or smaller maps per call");
  }
  parallel_for(slots, [&](int64_t slot, int) {
    float* buf = copies ? work[slot].get() : nullptr;
    for (int64_t b = slot; b < batch; b += slots) scores[b] = score_one(maps + b * hw, hw, score_mode, top_k, buf);
  });
}

}  // namespace kd_ext
