#include "gaussian.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace kd_ext {

int gaussian_radius(double sigma) { return static_cast<int>(std::floor(4.0 * sigma + 0.5)); }

std::vector<float> gaussian_kernel_1d(double sigma) {
  if (!(sigma > 0.0) || !std::isfinite(sigma)) {
    throw std::invalid_argument("sigma must be a finite number > 0, got " + std::to_string(sigma));
  }
  if (4.0 * sigma + 0.5 >= static_cast<double>(kMaxGaussianRadius)) {
    throw std::invalid_argument("sigma=" + std::to_string(sigma) + " gives a blur radius above " +
                                std::to_string(kMaxGaussianRadius) + "; use a smaller sigma");
  }
  const int radius = gaussian_radius(sigma);
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
