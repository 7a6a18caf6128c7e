"""The CUDA C++ twin in csrc/ compiles where its compilers are, even on a machine without a GPU.

Nothing built here can run without a GPU (test_flow_step_gpu.py runs it against the reference when one is there);
this catches a kernel or binding that would not build at `S2FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .`.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on this machine")


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])  # Ampere (A100) and Hopper (H100, H200, H20)
def test_kernel_compiles_with_nvcc(tmp_path, arch):
    cmd = ["nvcc", "-O3", "-std=c++17", "-Werror", "all-warnings", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-c", str(CSRC / "guided_flow_step.cu"), "-o", str(tmp_path / "kernel.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0


@needs_nvcc
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on this machine")
def test_binding_compiles_against_torch_headers(tmp_path):
    torch_include = Path(torch.__file__).parent / "include"
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include",
                  Path(shutil.which("nvcc")).resolve().parents[1] / "include"]
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        pytest.skip(f"no CUDA headers (cuda_runtime.h) in {[str(c) for c in candidates]}")
    # A CPU build of torch ships the c10/cuda headers but not this generated one (it only sets export macros).
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unused-function", "-DTORCH_EXTENSION_NAME=_C",
           f"-I{tmp_path}", f"-I{torch_include}", f"-I{torch_include / 'torch/csrc/api/include'}", f"-I{cuda_include}",
           f"-I{sysconfig.get_paths()['include']}", str(CSRC / "bindings.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "bindings.cpp" not in r.stderr, r.stderr[-4000:]  # no warning in our own file



_COMPILE_TRITON = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from s2fast.kernels.flow_step_triton import BLOCK, _guided_flow_step_kernel as kernel

types = {"dt_ptr": "*fp32", "n": "i64", "lam": "fp32", "omega": "fp32", "inv_num_subs": "fp32"}
results = {}
for arch in (80, 90):
    for exact in (True, False):
        constexprs = {"HAS_U": True, "NUM_SUBS": 2, "WRITE_D": True, "EXACT": exact, "ROUND_DT": True, "LOW": 2,
                      "BLOCK": BLOCK}
        signature = {a: "constexpr" if a in constexprs else types.get(a, "*bf16") for a in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"enable_fp_fusion": not exact, "num_warps": 4})
        results[f"sm{arch}-{'exact' if exact else 'fp32'}"] = {
            "cubin_bytes": len(compiled.asm["cubin"]), "fma": "fma.rn.f32" in compiled.asm["ptx"]}
print(json.dumps(results))
"""


def test_triton_kernel_compiles_for_the_gpu_and_exact_mode_has_no_fma():
    # Triton compiles to PTX and a cubin (with its bundled ptxas) without a GPU: this catches a kernel that runs in
    # the interpreter but does not lower. It also checks the switch exact mode relies on: no fused multiply-add.
    # A subprocess, because under TRITON_INTERPRET=1 (set for these tests) triton.jit gives no compilable kernel.
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", _COMPILE_TRITON], capture_output=True, text=True, env=env, timeout=300,
                       cwd="/")  # a neutral cwd: the installed s2fast.kernels, never the repo's top-level kernels/
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for name, result in results.items():
        assert result["cubin_bytes"] > 0, name
        # fp32 mode contracts U + λ(C − U) into an FMA; exact mode must not (torch rounds the product first).
        assert result["fma"] is name.endswith("fp32"), name
