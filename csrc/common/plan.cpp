#include "common/plan.h"

#include <algorithm>

#include "common/gaussian.h"
#include "common/kd_math.h"

namespace kd_ext {

MapPlan make_plan(const std::vector<ScaleView>& scales, const MapParams& params) {
  MapPlan plan;
  plan.num_scales = static_cast<int>(scales.size());
  plan.height = params.out_h;
  plan.width = params.out_w;
  plan.plane = plan.height * plan.width;
  plan.blur = params.sigma > 0.0;
  plan.radius = plan.blur ? gaussian_radius(params.sigma) : 0;
  if (plan.blur) plan.taps = gaussian_kernel_1d(params.sigma);
  plan.dist_offset.assign(plan.num_scales + 1, 0);
  for (int k = 0; k < plan.num_scales; ++k) {
    plan.dist_offset[k + 1] = plan.dist_offset[k] + scales[k].height * scales[k].width;
    plan.max_low_width = std::max(plan.max_low_width, scales[k].width);
  }
  plan.weights.assign(plan.num_scales, 1.0f);
  if (params.fusion == math::kWeighted) plan.weights = params.weights;
  return plan;
}

std::string out_of_memory_message(const char* what, int64_t workspace_bytes, int64_t batch, int64_t out_h,
                                  int64_t out_w) {
  const auto mib = [](int64_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; };
  const int64_t output_bytes = batch * out_h * out_w * static_cast<int64_t>(sizeof(float));
  return std::string("out of memory in ") + what + ": " + std::to_string(batch) + " anomaly maps of " +
         std::to_string(out_h) + "x" + std::to_string(out_w) + " need " + mib(output_bytes) + " of output plus about " +
         mib(workspace_bytes) + " of working memory; pass a smaller batch or a smaller output_size";
}

}  // namespace kd_ext
