// CPU image score of anomaly maps: max, or mean of the top-k values; NaN anywhere -> NaN.
#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

#include "anomaly_map.h"
#include "kd_math.h"

namespace kd_ext {

void image_score_cpu(const float* maps, int64_t batch, int64_t hw, int score_mode, int64_t top_k, float* scores) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel
  {
    std::vector<float> work;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const float* map = maps + b * hw;
      float m = -std::numeric_limits<float>::infinity();
      int64_t nan_count = 0;
      for (int64_t i = 0; i < hw; ++i) {
        const float v = map[i];
        m = v > m ? v : m;
        nan_count += (v != v);
      }
      if (nan_count) {
        scores[b] = nan;
        continue;
      }
      if (score_mode != math::kScoreTopK || top_k == 1) {
        scores[b] = m;
        continue;
      }
      work.assign(map, map + hw);
      std::nth_element(work.begin(), work.begin() + (top_k - 1), work.end(), std::greater<float>());
      double total = 0.0;
      for (int64_t i = 0; i < top_k; ++i) total += work[i];
      scores[b] = static_cast<float>(total / static_cast<double>(top_k));
    }
  }
}

}  // namespace kd_ext
