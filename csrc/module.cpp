// Python bindings of the kd_ext native module.
//
// Torch-free: CPU inputs arrive through the buffer protocol (numpy arrays; a torch CPU tensor's
// .numpy() view is zero-copy), CUDA inputs through __cuda_array_interface__ (torch, cupy, numba).
// Every argument is validated here; bad input raises ValueError/TypeError, never crashes. The
// user-facing option rules (sigma, output size, weights) live in kd_ext/kernels/_options.py and
// run before dispatch; the checks here re-state only the bounds this code's memory safety needs
// (MAX_MAP_PIXELS, blur radius below the map size), so a direct call cannot crash either.
// Out of memory raises MemoryError naming the sizes and the fix.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "anomaly_map.h"
#include "gaussian.h"
#include "kd_math.h"
#include "parallel.h"

namespace py = pybind11;

namespace {

constexpr int64_t kMaxDim = int64_t{1} << 30;  // keeps every index/offset computation in range

py::dict build_info() {
  py::dict info;
#ifdef KD_EXT_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef KD_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_devices"] = kd_ext::cuda_device_count();
#else
  info["cuda"] = false;
  info["cuda_devices"] = 0;
#endif
  return info;
}

py::array_t<float> gaussian_kernel_1d_py(double sigma) {
  const std::vector<float> taps = kd_ext::gaussian_kernel_1d(sigma);
  py::array_t<float> out(static_cast<py::ssize_t>(taps.size()));
  std::copy(taps.begin(), taps.end(), out.mutable_data());
  return out;
}

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

int parse_distance(const std::string& name) {
  if (name == "cosine") return kd_ext::math::kCosine;
  if (name == "l2") return kd_ext::math::kL2;
  value_error("distance must be 'cosine' or 'l2', got '" + name + "'");
}

int parse_fusion(const std::string& name) {
  if (name == "sum") return kd_ext::math::kSum;
  if (name == "mean") return kd_ext::math::kMean;
  if (name == "product") return kd_ext::math::kProduct;
  if (name == "weighted") return kd_ext::math::kWeighted;
  value_error("fusion must be 'sum', 'mean', 'product' or 'weighted', got '" + name + "'");
}

int parse_score(const std::string& name) {
  if (name == "none") return kd_ext::math::kScoreNone;
  if (name == "max") return kd_ext::math::kScoreMax;
  if (name == "topk") return kd_ext::math::kScoreTopK;
  value_error("score mode must be 'none', 'max' or 'topk', got '" + name + "'");
}

std::vector<py::object> as_list(const py::object& obj, const char* name) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj)) {
    type_error(std::string(name) + " must be a list or tuple of [B, C, H, W] float32 arrays, got " +
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  std::vector<py::object> items;
  for (py::handle item : obj) items.push_back(py::reinterpret_borrow<py::object>(item));
  return items;
}

// A validated, contiguous float32 array view (CPU buffer or CUDA array interface).
struct ArrayView {
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

void check_shape(const std::vector<int64_t>& shape, const std::string& what) {
  for (int64_t d : shape) {
    if (d <= 0) value_error(what + " has an empty dimension, shape " + shape_str(shape) + "; pass non-empty arrays");
    if (d >= kMaxDim) value_error(what + " is too large, shape " + shape_str(shape));
  }
}

ArrayView view_buffer(const py::object& obj, const std::string& what, size_t ndim, std::vector<py::buffer_info>& keep) {
  if (!py::isinstance<py::buffer>(obj)) {
    type_error(what + " must be a float32 numpy array (or buffer), got " +
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
  if (info.itemsize != static_cast<py::ssize_t>(sizeof(float)) || info.format != py::format_descriptor<float>::format()) {
    type_error(what + " must have dtype float32, got buffer format '" + info.format +
               "'; convert with .astype(numpy.float32) or tensor.float()");
  }
  if (static_cast<size_t>(info.ndim) != ndim) {
    value_error(what + " must be " + std::to_string(ndim) + "-D, got " + std::to_string(info.ndim) + "-D");
  }
  ArrayView view;
  view.shape.assign(info.shape.begin(), info.shape.end());
  check_shape(view.shape, what);
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] != 1 && info.strides[i] != expected) {
      value_error(what + " must be C-contiguous (got strides that are not row-major, e.g. a transposed, sliced or "
                         "channels-last array); make it contiguous with numpy.ascontiguousarray() or "
                         "tensor.contiguous()");
    }
    expected *= info.shape[i];
  }
  view.data = static_cast<const float*>(info.ptr);
  keep.push_back(std::move(info));
  return view;
}

#ifdef KD_EXT_WITH_CUDA
ArrayView view_cuda(const py::object& obj, const std::string& what, size_t ndim, int* device) {
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    type_error(what + " must be a CUDA array (with __cuda_array_interface__), got " +
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))) +
               "; do not mix CPU and CUDA inputs");
  }
  py::dict cai = obj.attr("__cuda_array_interface__");
  const std::string typestr = py::str(cai["typestr"]);
  if (typestr != "<f4") {
    type_error(what + " must have dtype float32, got typestr '" + typestr + "'; convert with tensor.float()");
  }
  py::tuple shape = cai["shape"];
  if (shape.size() != ndim) {
    value_error(what + " must be " + std::to_string(ndim) + "-D, got " + std::to_string(shape.size()) + "-D");
  }
  ArrayView view;
  for (py::handle d : shape) view.shape.push_back(d.cast<int64_t>());
  check_shape(view.shape, what);
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    py::tuple strides = cai["strides"];
    int64_t expected = sizeof(float);
    for (int64_t i = static_cast<int64_t>(ndim) - 1; i >= 0; --i) {
      if (view.shape[i] != 1 && strides[i].cast<int64_t>() != expected) {
        value_error(what + " must be C-contiguous; make it contiguous with tensor.contiguous()");
      }
      expected *= view.shape[i];
    }
  }
  py::tuple data = cai["data"];
  const auto ptr = data[0].cast<uintptr_t>();
  view.data = reinterpret_cast<const float*>(ptr);
  const int dev = kd_ext::cuda_pointer_device(view.data);
  if (dev < 0) value_error(what + " does not point to CUDA device memory");
  if (*device < 0) *device = dev;
  if (dev != *device) {
    value_error(what + " is on CUDA device " + std::to_string(dev) + " but other inputs are on device " +
                std::to_string(*device) + "; put all inputs on one device");
  }
  return view;
}
#endif

struct Prepared {
  std::vector<kd_ext::ScaleView> scales;
  int64_t batch = 0;
  kd_ext::MapParams params;
};

// Validates everything but the per-array storage; `views` holds the (teacher, student) views.
Prepared prepare(const std::vector<ArrayView>& teacher, const std::vector<ArrayView>& student, int64_t out_h,
                 int64_t out_w, const std::string& distance, const std::string& fusion,
                 const std::optional<std::vector<float>>& weights, bool align_corners, double sigma,
                 const std::string& score, int64_t top_k) {
  Prepared p;
  p.params.distance = parse_distance(distance);
  p.params.fusion = parse_fusion(fusion);
  p.params.score_mode = parse_score(score);
  const size_t num_scales = teacher.size();
  for (size_t k = 0; k < num_scales; ++k) {
    const auto& t = teacher[k].shape;
    const auto& s = student[k].shape;
    if (t != s) {
      value_error("teacher and student features at scale " + std::to_string(k) + " differ in shape: " + shape_str(t) +
                  " vs " + shape_str(s) + "; pair features of the same layer");
    }
    if (t[0] != teacher[0].shape[0]) {
      value_error("batch size differs across scales: scale 0 has " + std::to_string(teacher[0].shape[0]) +
                  ", scale " + std::to_string(k) + " has " + std::to_string(t[0]));
    }
    p.scales.push_back({teacher[k].data, student[k].data, t[1], t[2], t[3]});
  }
  p.batch = teacher[0].shape[0];
  if (out_h <= 0 || out_w <= 0) {
    value_error("output_size must be positive, got (" + std::to_string(out_h) + ", " + std::to_string(out_w) + ")");
  }
  if (out_h >= kMaxDim || out_w >= kMaxDim || out_h * out_w >= kMaxDim) {
    value_error("output_size (" + std::to_string(out_h) + ", " + std::to_string(out_w) + ") is too large: at most " +
                std::to_string(kMaxDim - 1) + " pixels per map; use a smaller output_size");
  }
  p.params.out_h = out_h;
  p.params.out_w = out_w;
  if (p.params.fusion == kd_ext::math::kWeighted) {
    if (!weights || weights->size() != num_scales) {
      value_error("fusion='weighted' needs one weight per scale (" + std::to_string(num_scales) + "), got " +
                  (weights ? std::to_string(weights->size()) : std::string("none")));
    }
    p.params.weights = *weights;
  } else if (weights) {
    value_error("weights are only used with fusion='weighted', got fusion='" + fusion + "'");
  }
  p.params.align_corners = align_corners;
  if (!std::isfinite(sigma) || sigma < 0.0) {
    value_error("sigma must be a finite number >= 0 (0 disables smoothing), got " + std::to_string(sigma));
  }
  if (sigma > 0.0) {
    const double radius = std::floor(4.0 * sigma + 0.5);
    if (radius >= static_cast<double>(std::min(out_h, out_w))) {
      value_error("sigma=" + std::to_string(sigma) + " gives a blur radius of " + std::to_string(int64_t(radius)) +
                  " which must be smaller than the output height and width (" + std::to_string(out_h) + ", " +
                  std::to_string(out_w) + ") for reflect padding; use a larger output_size or a smaller sigma");
    }
  }
  p.params.sigma = sigma;
  if (p.params.score_mode == kd_ext::math::kScoreTopK && (top_k < 1 || top_k > out_h * out_w)) {
    value_error("top_k must be in [1, H*W] = [1, " + std::to_string(out_h * out_w) + "], got " + std::to_string(top_k));
  }
  p.params.top_k = top_k;
  return p;
}

void check_lists(size_t nt, size_t ns) {
  if (nt == 0) value_error("teacher_features is empty; pass at least one feature scale");
  if (nt != ns) {
    value_error("teacher_features and student_features have different lengths (" + std::to_string(nt) + " vs " +
                std::to_string(ns) + "); pass one student map per teacher map");
  }
}

py::tuple anomaly_map_py(const py::object& teacher_obj, const py::object& student_obj, int64_t out_h, int64_t out_w,
                         const std::string& distance, const std::string& fusion,
                         const std::optional<std::vector<float>>& weights, bool align_corners, double sigma,
                         const std::string& score, int64_t top_k) {
  const std::vector<py::object> teacher_list = as_list(teacher_obj, "teacher_features");
  const std::vector<py::object> student_list = as_list(student_obj, "student_features");
  check_lists(teacher_list.size(), student_list.size());
  std::vector<py::buffer_info> keep;
  std::vector<ArrayView> teacher, student;
  for (size_t k = 0; k < teacher_list.size(); ++k) {
    teacher.push_back(view_buffer(teacher_list[k], "teacher_features[" + std::to_string(k) + "]", 4, keep));
    student.push_back(view_buffer(student_list[k], "student_features[" + std::to_string(k) + "]", 4, keep));
  }
  Prepared p = prepare(teacher, student, out_h, out_w, distance, fusion, weights, align_corners, sigma, score, top_k);
  py::array_t<float> maps({p.batch, int64_t{1}, out_h, out_w});
  py::object scores_obj = py::none();
  float* scores_ptr = nullptr;
  if (p.params.score_mode != kd_ext::math::kScoreNone) {
    py::array_t<float> scores(p.batch);
    scores_ptr = scores.mutable_data();
    scores_obj = scores;
  }
  float* maps_ptr = maps.mutable_data();
  {
    py::gil_scoped_release release;
    kd_ext::anomaly_map_cpu(p.scales, p.batch, p.params, maps_ptr, scores_ptr);
  }
  return py::make_tuple(maps, scores_obj);
}

int64_t score_top_k(int mode, int64_t top_k, int64_t hw) {
  if (mode == kd_ext::math::kScoreNone) value_error("score mode must be 'max' or 'topk' for image_score");
  if (mode == kd_ext::math::kScoreTopK && (top_k < 1 || top_k > hw)) {
    value_error("top_k must be in [1, H*W] = [1, " + std::to_string(hw) + "], got " + std::to_string(top_k));
  }
  return top_k;
}

py::array_t<float> image_score_py(const py::object& maps_obj, const std::string& mode, int64_t top_k) {
  std::vector<py::buffer_info> keep;
  ArrayView maps = view_buffer(maps_obj, "anomaly_map", 4, keep);
  if (maps.shape[1] != 1) value_error("anomaly_map must have shape [B, 1, H, W], got " + shape_str(maps.shape));
  const int score_mode = parse_score(mode);
  const int64_t hw = maps.shape[2] * maps.shape[3];
  score_top_k(score_mode, top_k, hw);
  py::array_t<float> scores(maps.shape[0]);
  float* scores_ptr = scores.mutable_data();
  {
    py::gil_scoped_release release;
    kd_ext::image_score_cpu(maps.data, maps.shape[0], hw, score_mode, top_k, scores_ptr);
  }
  return scores;
}

#ifdef KD_EXT_WITH_CUDA
float* cuda_output(const py::object& obj, const std::string& what, const std::vector<int64_t>& shape, int* device) {
  ArrayView v = view_cuda(obj, what, shape.size(), device);
  if (v.shape != shape) value_error(what + " must have shape " + shape_str(shape) + ", got " + shape_str(v.shape));
  return const_cast<float*>(v.data);
}

void require_cuda_device() {
  if (kd_ext::cuda_device_count() <= 0) {
    throw std::runtime_error("no CUDA device: kd_ext was built with CUDA but no GPU/driver is available");
  }
}

void anomaly_map_cuda_py(const py::object& teacher_obj, const py::object& student_obj, const py::object& maps_obj,
                         const py::object& scores_obj, int64_t out_h, int64_t out_w, const std::string& distance,
                         const std::string& fusion, const std::optional<std::vector<float>>& weights,
                         bool align_corners, double sigma, const std::string& score, int64_t top_k, uintptr_t stream) {
  require_cuda_device();
  const std::vector<py::object> teacher_list = as_list(teacher_obj, "teacher_features");
  const std::vector<py::object> student_list = as_list(student_obj, "student_features");
  check_lists(teacher_list.size(), student_list.size());
  if (teacher_list.size() > static_cast<size_t>(kd_ext::kMaxCudaScales)) {
    value_error("the CUDA kernel supports at most " + std::to_string(kd_ext::kMaxCudaScales) + " scales, got " +
                std::to_string(teacher_list.size()));
  }
  int device = -1;
  std::vector<ArrayView> teacher, student;
  for (size_t k = 0; k < teacher_list.size(); ++k) {
    teacher.push_back(view_cuda(teacher_list[k], "teacher_features[" + std::to_string(k) + "]", 4, &device));
    student.push_back(view_cuda(student_list[k], "student_features[" + std::to_string(k) + "]", 4, &device));
  }
  Prepared p = prepare(teacher, student, out_h, out_w, distance, fusion, weights, align_corners, sigma, score, top_k);
  float* maps_ptr = cuda_output(maps_obj, "out", {p.batch, 1, out_h, out_w}, &device);
  float* scores_ptr = nullptr;
  if (p.params.score_mode != kd_ext::math::kScoreNone) {
    if (scores_obj.is_none()) value_error("scores output is required when a score mode is given");
    scores_ptr = cuda_output(scores_obj, "scores", {p.batch}, &device);
  }
  py::gil_scoped_release release;
  kd_ext::anomaly_map_cuda(p.scales, p.batch, p.params, maps_ptr, scores_ptr, reinterpret_cast<void*>(stream));
}

void image_score_cuda_py(const py::object& maps_obj, const py::object& scores_obj, const std::string& mode,
                         int64_t top_k, uintptr_t stream) {
  require_cuda_device();
  int device = -1;
  ArrayView maps = view_cuda(maps_obj, "anomaly_map", 4, &device);
  if (maps.shape[1] != 1) value_error("anomaly_map must have shape [B, 1, H, W], got " + shape_str(maps.shape));
  const int score_mode = parse_score(mode);
  const int64_t hw = maps.shape[2] * maps.shape[3];
  score_top_k(score_mode, top_k, hw);
  float* scores_ptr = cuda_output(scores_obj, "scores", {maps.shape[0]}, &device);
  py::gil_scoped_release release;
  kd_ext::image_score_cuda(maps.data, maps.shape[0], hw, score_mode, top_k, scores_ptr, reinterpret_cast<void*>(stream));
}
#endif

// Test hook for parallel_for's exception handling: runs n calls in which the thread with worker
// id `throwing_worker` throws std::bad_alloc (the others wait up to 2 s for it to start, once).
// Raises MemoryError when it threw; returns the number of calls otherwise (no such worker ran).
int64_t parallel_for_probe(int64_t n, int throwing_worker) {
  py::gil_scoped_release release;
  std::atomic<bool> thrown{false}, waited{false};
  std::atomic<int64_t> calls{0};
  kd_ext::parallel_for(n, [&](int64_t, int worker) {
    calls.fetch_add(1);
    if (worker == throwing_worker) {
      thrown = true;
      throw std::bad_alloc();
    }
    if (waited.exchange(true)) return;
    for (int i = 0; i < 2000 && !thrown; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  return calls.load();
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kd_ext native kernels (torch-free; float32 CPU, CUDA when built with it).";
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const kd_ext::OutOfMemory& oom) {
      PyErr_SetString(PyExc_MemoryError, oom.what());
    }
  });
  m.attr("MAX_MAP_PIXELS") = kMaxDim - 1;
  m.def("build_info", &build_info, "Features this build was compiled with.");
  m.def("gaussian_kernel_1d", &gaussian_kernel_1d_py, py::arg("sigma"),
        "Normalised 1-D Gaussian taps, size 2*floor(4*sigma+0.5)+1 (sigma > 0).");
  m.def("anomaly_map", &anomaly_map_py, py::arg("teacher_features"), py::arg("student_features"), py::arg("out_h"),
        py::arg("out_w"), py::arg("distance") = "cosine", py::arg("fusion") = "sum", py::arg("weights") = py::none(),
        py::arg("align_corners") = false, py::arg("sigma") = 4.0, py::arg("score") = "none", py::arg("top_k") = 1,
        "Fused anomaly maps [B, 1, out_h, out_w] (float32 numpy) and image scores [B] (None when score='none') "
        "from lists of C-contiguous float32 [B, C_k, H_k, W_k] arrays.");
  m.def("image_score", &image_score_py, py::arg("anomaly_map"), py::arg("mode") = "max", py::arg("top_k") = 1,
        "Image scores [B] of float32 maps [B, 1, H, W]: 'max' or 'topk' (mean of the top_k largest).");
  m.def("_parallel_for_probe", &parallel_for_probe, py::arg("n"), py::arg("throwing_worker"),
        "Test hook: parallel_for with one worker throwing std::bad_alloc (MemoryError when it ran).");
#ifdef KD_EXT_WITH_CUDA
  m.def("cuda_device_count", &kd_ext::cuda_device_count, "Visible CUDA devices (0 without a driver/GPU).");
  m.def("anomaly_map_cuda", &anomaly_map_cuda_py, py::arg("teacher_features"), py::arg("student_features"),
        py::arg("out"), py::arg("scores"), py::arg("out_h"), py::arg("out_w"), py::arg("distance") = "cosine",
        py::arg("fusion") = "sum", py::arg("weights") = py::none(), py::arg("align_corners") = false,
        py::arg("sigma") = 4.0, py::arg("score") = "none", py::arg("top_k") = 1, py::arg("stream") = 0,
        "CUDA version of anomaly_map writing into preallocated CUDA arrays out [B, 1, H, W] and scores [B] "
        "(objects with __cuda_array_interface__), queued on `stream` (a cudaStream_t as int).");
  m.def("image_score_cuda", &image_score_cuda_py, py::arg("anomaly_map"), py::arg("scores"), py::arg("mode") = "max",
        py::arg("top_k") = 1, py::arg("stream") = 0, "CUDA version of image_score writing into `scores` [B].");
#endif
}
