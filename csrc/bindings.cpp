// The fastprobe._C module: each operation family registers its functions here.
// Arguments are raw data pointers, sizes and strides (in elements) from the Python
// layer, which validated them; every function releases the GIL while it runs. The functions
// check again what they can without the buffers' lengths (check_size and check_layout in
// common.h, and every index read from the data), since they can be called directly.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

namespace fastprobe {
void bind_divergence(py::module_& m);
void bind_concepts(py::module_& m);
void bind_bridge(py::module_& m);
void bind_attention(py::module_& m);
void bind_dual_attention(py::module_& m);
}  // namespace fastprobe

namespace {

bool has_f16c() {
#ifdef FASTPROBE_F16C
  return fastprobe::cpu_has_f16c();
#else
  return false;
#endif
}

// For tests: count contiguous float16 -> float32 (and back, below) by the F16C instructions
// (hardware; needs has_f16c()) or by the portable code that other CPUs run.
void fp16_to_float_for_test(uintptr_t src, int64_t count, uintptr_t out, bool hardware) {
  fastprobe::check_size(count, 0, "count");
  const auto* halves = fastprobe::pointer<const uint16_t>(src, count > 0, "src");
  auto* floats = fastprobe::pointer<float>(out, count > 0, "out");
  if (hardware && !has_f16c()) throw std::runtime_error("fastprobe._C: this CPU or build has no F16C path");
#ifdef FASTPROBE_F16C
  if (hardware) return fastprobe::f16c_load(halves, count, floats);
#endif
  for (int64_t i = 0; i < count; ++i) floats[i] = fastprobe::fp16_to_float(halves[i]);
}

void float_to_fp16_for_test(uintptr_t src, int64_t count, uintptr_t out, bool hardware) {
  fastprobe::check_size(count, 0, "count");
  const auto* floats = fastprobe::pointer<const float>(src, count > 0, "src");
  auto* halves = fastprobe::pointer<uint16_t>(out, count > 0, "out");
  if (hardware && !has_f16c()) throw std::runtime_error("fastprobe._C: this CPU or build has no F16C path");
#ifdef FASTPROBE_F16C
  if (hardware) return fastprobe::f16c_store(floats, count, halves);
#endif
  for (int64_t i = 0; i < count; ++i) halves[i] = fastprobe::float_to_fp16_bits(floats[i]);
}

// For tests: run_rows (common.h) over N rows of two stages (each_part(2, ...), then each_row), a job
// of `logits` logits (below kInlineLogits: inline), with an exception thrown where `fail` says: 1
// making thread 0's scratch, 2 in part 1 of row fail_row, 3 in the row stage of fail_row (0:
// nowhere). Returns the steps that ran.
int64_t run_rows_for_test(int64_t N, int64_t num_threads, double logits, int64_t fail, int64_t fail_row) {
  fastprobe::check_size(N, 0, "N");
  const int threads = fastprobe::clamp_threads(num_threads);
  std::atomic<int64_t> steps{0};
  auto fail_if = [](bool condition) {
    if (condition) throw std::runtime_error("fastprobe._C: the failure a test asked for");
  };
  fastprobe::run_rows(
      N, threads, logits,
      [&] {
        fail_if(fail == 1 && fastprobe::thread_index() == 0);
        return fastprobe::scratch_floats(16);
      },
      fastprobe::each_part(2, [&](int64_t n, int64_t part, int64_t, std::vector<float>&) {
        fail_if(fail == 2 && n == fail_row && part == 1);
        steps += 1;
      }),
      fastprobe::each_row([&](int64_t n, int64_t, std::vector<float>&) {
        fail_if(fail == 3 && n == fail_row);
        steps += 1;
      }));
  return steps.load();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastprobe CPU kernels (torch-free; called through fastprobe.ops)";
  m.def("has_openmp", []() {
#ifdef FASTPROBE_OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("simd_clone", &fastprobe::simd_clone);
  m.def("has_f16c", &has_f16c);
  m.def("_fp16_to_float", &fp16_to_float_for_test);
  m.def("_float_to_fp16", &float_to_fp16_for_test);
  m.def("_run_rows", &run_rows_for_test, py::call_guard<py::gil_scoped_release>());
  fastprobe::bind_divergence(m);
  fastprobe::bind_concepts(m);
  fastprobe::bind_bridge(m);
  fastprobe::bind_attention(m);
  fastprobe::bind_dual_attention(m);
}
