// CPU image score of anomaly maps: max, or mean of the top-k values; NaN anywhere -> NaN.
#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

#include "anomaly_map.h"
#include "kd_math.h"
#include "parallel.h"

namespace kd_ext {

void image_score_cpu(const float* maps, int64_t batch, int64_t hw, int score_mode, int64_t top_k, float* scores) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::vector<float>> work(max_threads());
  parallel_for(batch, [&](int64_t b, int w) {
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
      return;
    }
    if (score_mode != math::kScoreTopK || top_k == 1) {
      scores[b] = m;
      return;
    }
    std::vector<float>& buf = work[w];
    buf.assign(map, map + hw);
    std::nth_element(buf.begin(), buf.begin() + (top_k - 1), buf.end(), std::greater<float>());
    double total = 0.0;
    for (int64_t i = 0; i < top_k; ++i) total += buf[i];
    scores[b] = static_cast<float>(total / static_cast<double>(top_k));
  });
}

}  // namespace kd_ext
