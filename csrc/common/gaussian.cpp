#include "common/gaussian.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace kd_ext {

int gaussian_radius(double sigma) {
  const double radius = std::floor(4.0 * sigma + 0.5);
  if (!(radius > 0.0)) return 0;
  return radius >= static_cast<double>(std::numeric_limits<int>::max()) ? std::numeric_limits<int>::max()
                                                                        : static_cast<int>(radius);
}

std::vector<float> gaussian_kernel_1d(double sigma) {
  if (!(sigma > 0.0) || !std::isfinite(sigma)) {
    throw std::invalid_argument("sigma must be a finite number > 0, got " + std::to_string(sigma));
  }
  const int radius = gaussian_radius(sigma);
  if (radius >= kMaxGaussianRadius) {
    throw std::invalid_argument("sigma=" + std::to_string(sigma) + " gives a blur radius above " +
                                std::to_string(kMaxGaussianRadius) + "; use a smaller sigma");
  }
  std::vector<double> taps(2 * radius + 1);
  double total = 0.0;
  for (int i = -radius; i <= radius; ++i) {
    const double value = std::exp(-0.5 * (i * i) / (sigma * sigma));
    taps[i + radius] = value;
    total += value;
  }
  std::vector<float> normalised(taps.size());
  for (size_t i = 0; i < taps.size(); ++i) normalised[i] = static_cast<float>(taps[i] / total);
  return normalised;
}

}  // namespace kd_ext
