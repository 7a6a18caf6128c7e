// Eq. 4 of S²-Guidance fused with the FlowMatchEulerDiscrete update: one pass over the latents.
// Mode "exact" rounds after every op where torch does (the __f*_rn intrinsics are never contracted into FMAs);
// mode "fp32" keeps fp32 (FMA allowed) and rounds once. Reference: kernels/flow_step_reference.py.
// Memory access: 16-byte vector loads/stores when every pointer is 16-byte aligned (8 bf16/fp16 or 4 fp32
// elements per access), in a grid-stride loop; the n % VEC tail runs element by element.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "guided_flow_step.h"

namespace s2fast {
namespace {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);  // round to nearest, ties to even
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round to T and back: what a torch op in dtype T stores.
template <typename T> __device__ __forceinline__ float rnd(float v) { return to_f32<T>(from_f32<T>(v)); }

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const void* base, int64_t i) {
  return reinterpret_cast<const Pack<T, VEC>*>(base)[i];
}

// One element; `s_sum` is the fp32 sum of the sub-network values, added in order. Writes D to *d_store.
template <typename T, bool EXACT>
__device__ __forceinline__ float step_one(const GuidedFlowStepArgs& a, float x, float c, float u, float s_sum,
                                          float dt, float* d_store) {
  float d = c;
  if (EXACT) {
    if (a.uncond) d = rnd<T>(__fadd_rn(u, rnd<T>(__fmul_rn(a.lam, rnd<T>(__fsub_rn(c, u))))));
    if (a.num_subs > 0) {
      const float sbar = a.num_subs > 1 ? rnd<T>(__fmul_rn(s_sum, 1.0f / a.num_subs)) : s_sum;
      d = rnd<T>(__fsub_rn(d, rnd<T>(__fmul_rn(a.omega, rnd<T>(__fsub_rn(sbar, c))))));
    }
    *d_store = d;
    // The pipeline's own CFG line on [D, D]: D back, except -0 -> +0.
    if (a.uncond) d = rnd<T>(__fadd_rn(d, rnd<T>(__fmul_rn(a.lam, rnd<T>(__fsub_rn(d, d))))));
    const float dt_used = a.round_dt ? rnd<T>(dt) : dt;
    return rnd<T>(__fadd_rn(x, rnd<T>(__fmul_rn(dt_used, d))));
  }
  if (a.uncond) d = u + a.lam * (c - u);
  if (a.num_subs > 0) {
    const float sbar = a.num_subs > 1 ? s_sum * (1.0f / a.num_subs) : s_sum;
    d = d - a.omega * (sbar - c);
  }
  *d_store = rnd<T>(d);
  return rnd<T>(x + dt * d);
}

template <typename T, bool EXACT, int VEC>
__global__ void guided_flow_step_kernel(const GuidedFlowStepArgs a) {
  const float dt = *a.dt;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = a.n / VEC;
  for (int64_t i = first; i < packs; i += stride) {
    const Pack<T, VEC> xv = load<T, VEC>(a.sample, i), cv = load<T, VEC>(a.cond, i);
    Pack<T, VEC> uv{}, sv{}, ov, dv;
    if (a.uncond) uv = load<T, VEC>(a.uncond, i);
    float s_sum[VEC];
    if (a.num_subs > 0) {
      sv = load<T, VEC>(a.subs, i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) s_sum[k] = to_f32<T>(sv.v[k]);
      // Stacked subs start n elements apart; the host picks VEC > 1 only when that keeps 16-byte alignment.
      for (int j = 1; j < a.num_subs; ++j) {
        const Pack<T, VEC> sj = load<T, VEC>(static_cast<const T*>(a.subs) + j * a.n, i);
#pragma unroll
        for (int k = 0; k < VEC; ++k) s_sum[k] = __fadd_rn(s_sum[k], to_f32<T>(sj.v[k]));
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float d;
      const float x = to_f32<T>(xv.v[k]), c = to_f32<T>(cv.v[k]), u = a.uncond ? to_f32<T>(uv.v[k]) : 0.0f;
      ov.v[k] = from_f32<T>(step_one<T, EXACT>(a, x, c, u, a.num_subs > 0 ? s_sum[k] : 0.0f, dt, &d));
      dv.v[k] = from_f32<T>(d);
    }
    reinterpret_cast<Pack<T, VEC>*>(a.out)[i] = ov;
    if (a.guided_out) reinterpret_cast<Pack<T, VEC>*>(a.guided_out)[i] = dv;
  }
  // The tail that does not fill a pack.
  for (int64_t e = packs * VEC + first; e < a.n; e += stride) {
    const T* s = static_cast<const T*>(a.subs);
    float s_sum = 0.0f;
    if (a.num_subs > 0) {
      s_sum = to_f32<T>(s[e]);
      for (int j = 1; j < a.num_subs; ++j) s_sum = __fadd_rn(s_sum, to_f32<T>(s[j * a.n + e]));
    }
    const float x = to_f32<T>(static_cast<const T*>(a.sample)[e]);
    const float c = to_f32<T>(static_cast<const T*>(a.cond)[e]);
    const float u = a.uncond ? to_f32<T>(static_cast<const T*>(a.uncond)[e]) : 0.0f;
    float d;
    static_cast<T*>(a.out)[e] = from_f32<T>(step_one<T, EXACT>(a, x, c, u, s_sum, dt, &d));
    if (a.guided_out) static_cast<T*>(a.guided_out)[e] = from_f32<T>(d);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t launch_typed(const GuidedFlowStepArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kThreads = 256;
  const bool vectorised = aligned16(a.sample) && aligned16(a.cond) && aligned16(a.uncond) && aligned16(a.subs) &&
                          aligned16(a.out) && aligned16(a.guided_out) && (a.num_subs <= 1 || a.n % kVec == 0);
  const int vec = vectorised ? kVec : 1;
  const int64_t work = (a.n + vec - 1) / vec;
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < a.max_blocks ? (wanted > 0 ? wanted : 1) : a.max_blocks);
  if (a.exact) {
    if (vectorised) guided_flow_step_kernel<T, true, kVec><<<blocks, kThreads, 0, stream>>>(a);
    else guided_flow_step_kernel<T, true, 1><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    if (vectorised) guided_flow_step_kernel<T, false, kVec><<<blocks, kThreads, 0, stream>>>(a);
    else guided_flow_step_kernel<T, false, 1><<<blocks, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_guided_flow_step(const GuidedFlowStepArgs& args, DType dtype, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(args, stream);
    case DType::kFloat16: return launch_typed<__half>(args, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace s2fast
