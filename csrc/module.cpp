// Python bindings of the kd_ext native module.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gaussian.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef KD_EXT_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cuda"] = false;
  return info;
}

py::array_t<float> gaussian_kernel_1d_py(double sigma) {
  const std::vector<float> taps = kd_ext::gaussian_kernel_1d(sigma);
  py::array_t<float> out(static_cast<py::ssize_t>(taps.size()));
  std::copy(taps.begin(), taps.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kd_ext native kernels (torch-free; float32 CPU, CUDA when built with it).";
  m.def("build_info", &build_info, "Features this build was compiled with.");
  m.def("gaussian_kernel_1d", &gaussian_kernel_1d_py, py::arg("sigma"),
        "Normalised 1-D Gaussian taps, size 2*floor(4*sigma+0.5)+1 (sigma > 0).");
}
