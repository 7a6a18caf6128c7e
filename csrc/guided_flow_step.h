// guided_flow_step in CUDA C++: the twin of kernels/flow_step_triton.py (same formula, same two modes).
// This header and guided_flow_step.cu use only the CUDA toolkit, so the kernel compiles with nvcc alone;
// bindings.cpp adds the torch binding.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace s2fast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct GuidedFlowStepArgs {
  const void* sample;    // x_t, in `dtype`
  const void* cond;      // C
  const void* uncond;    // U, or nullptr (no CFG branch)
  const void* subs;      // S: num_subs contiguous tensors of n elements, or nullptr
  const float* dt;       // 0-dim fp32 on the device: read at run time, so a graph replay sees its current value
  void* out;             // x_{t-1}, in `dtype` (may alias sample)
  void* guided_out;      // D, or nullptr
  int64_t n;             // elements per tensor
  int num_subs;          // 0, 1 or N (naive S²: S is their mean)
  float lam;             // λ as torch multiplies by it (already rounded by the caller where torch rounds it)
  float omega;           // ω, likewise
  bool round_dt;         // exact mode: round dt to `dtype` before dt * D (torch's type promotion)
  bool exact;            // true: one rounding per torch op, no FMA; false: fp32 throughout, one rounding
  int max_blocks;        // grid size cap for the grid-stride loop (a few waves of the device's SMs)
};

// Launches on `stream`; returns the launch error (cudaSuccess when queued).
cudaError_t launch_guided_flow_step(const GuidedFlowStepArgs& args, DType dtype, cudaStream_t stream);

}  // namespace s2fast
