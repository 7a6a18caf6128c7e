// Torch binding of guided_flow_step (s2fast._C). Built only when asked: S2FAST_BUILD_CUDA=1 pip install -e .
// Every check runs before the launch, so a bad call raises and writes nothing.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "guided_flow_step.h"

namespace {

s2fast::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return s2fast::DType::kFloat32;
    case at::kHalf: return s2fast::DType::kFloat16;
    case at::kBFloat16: return s2fast::DType::kBFloat16;
    default: TORCH_CHECK(false, "s2fast._C.guided_flow_step: cond must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& cond, int64_t numel) {
  TORCH_CHECK(t.is_cuda(), "s2fast._C.guided_flow_step: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == cond.device(), "s2fast._C.guided_flow_step: ", name, " is on ", t.device(), ", cond on ",
              cond.device());
  TORCH_CHECK(t.is_contiguous(), "s2fast._C.guided_flow_step: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == cond.scalar_type(), "s2fast._C.guided_flow_step: ", name, " has dtype ", t.scalar_type(),
              ", cond ", cond.scalar_type());
  TORCH_CHECK(t.numel() == numel, "s2fast._C.guided_flow_step: ", name, " has ", t.numel(), " elements, expected ", numel);
}

void guided_flow_step(const at::Tensor& sample, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                      const c10::optional<at::Tensor>& subs, int64_t num_subs, const at::Tensor& dt, const at::Tensor& out,
                      const c10::optional<at::Tensor>& guided_out, double lam, double omega, bool exact, bool round_dt) {
  const int64_t n = cond.numel();
  check_like("cond", cond, cond, n);
  check_like("sample", sample, cond, n);
  check_like("out", out, cond, n);
  if (uncond) check_like("uncond", *uncond, cond, n);
  if (guided_out) check_like("guided_out", *guided_out, cond, n);
  TORCH_CHECK(num_subs >= 0, "s2fast._C.guided_flow_step: num_subs must be >= 0, got ", num_subs);
  TORCH_CHECK((num_subs > 0) == subs.has_value(), "s2fast._C.guided_flow_step: num_subs=", num_subs,
              " does not match whether subs is given");
  if (subs) check_like("subs", *subs, cond, n * num_subs);
  TORCH_CHECK(dt.is_cuda() && dt.device() == cond.device() && dt.numel() == 1 && dt.scalar_type() == at::kFloat,
              "s2fast._C.guided_flow_step: dt must be a 1-element float32 tensor on ", cond.device());

  const c10::cuda::CUDAGuard guard(cond.device());
  s2fast::GuidedFlowStepArgs args{};
  args.sample = sample.data_ptr();
  args.cond = cond.data_ptr();
  args.uncond = uncond ? uncond->data_ptr() : nullptr;
  args.subs = subs ? subs->data_ptr() : nullptr;
  args.dt = dt.data_ptr<float>();
  args.out = out.data_ptr();
  args.guided_out = guided_out ? guided_out->data_ptr() : nullptr;
  args.n = n;
  args.num_subs = static_cast<int>(num_subs);
  args.lam = static_cast<float>(lam);
  args.omega = static_cast<float>(omega);
  args.round_dt = round_dt;
  args.exact = exact;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cond.get_device());
  args.max_blocks = (sms > 0 ? sms : 132) * 8;  // 8 blocks of 256 threads per SM: full occupancy on Hopper/Ampere
  const cudaError_t err =
      s2fast::launch_guided_flow_step(args, dtype_of(cond), c10::cuda::getCurrentCUDAStream(cond.get_device()));
  TORCH_CHECK(err == cudaSuccess, "s2fast._C.guided_flow_step: launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("guided_flow_step", &guided_flow_step, "Eq. 4 of S²-Guidance fused with the FlowMatchEulerDiscrete update",
        py::arg("sample"), py::arg("cond"), py::arg("uncond"), py::arg("subs"), py::arg("num_subs"), py::arg("dt"),
        py::arg("out"), py::arg("guided_out"), py::arg("lam"), py::arg("omega"), py::arg("exact"), py::arg("round_dt"));
}
