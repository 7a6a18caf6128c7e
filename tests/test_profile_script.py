"""benchmarks/profile_gpu.py runs without a GPU (the tiny model on the CPU) and writes its markdown and JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_gpu.py"


@pytest.fixture(scope="module")
def profile_gpu():
    spec = importlib.util.spec_from_file_location("profile_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_on_cpu_writes_markdown_and_json(profile_gpu, tmp_path):
    report = profile_gpu.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--top", "5", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["nvml"]["reason"] == "not a CUDA device: no NVML samples"
    assert len(saved["top"]) == 5 and saved["top"][0]["total_ms"] > 0 and len(saved["masks"]) == 2
    md = (tmp_path / "profile.md").read_text()
    assert "| kernel / op | calls | total ms | share % |" in md and report["wall_s"] > 0


def test_profile_runs_the_wan_pipeline_on_cpu(profile_gpu, tmp_path):
    report = profile_gpu.main(["--model", "wan-tiny", "--device", "cpu", "--steps", "2", "--top", "3", "--out",
                               str(tmp_path)])
    assert len(report["masks"]) == 2 and len(report["top"]) == 3 and report["wall_s"] > 0


def test_nvml_sampler_without_nvml_reports_why(profile_gpu, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError("no pynvml"))
                        if name == "pynvml" else real_import(name, *a, **k))
    sampler = profile_gpu.NvmlSampler()
    sampler.start()
    sampler.stop()
    assert sampler.reason.startswith("NVML unavailable (ImportError") and sampler.samples == [] and sampler.summary() == {}
