"""The diffusers-suite harness's wrapping (evaluation/diffusers_suite/wrapping.py): a supported pipeline class's
instances are wrapped at their first call with the chosen ω, the class's own call is back after uninstall, and
the tests' introspection of ``__call__`` (its signature) sees the pipeline's own."""

import inspect

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers_suite.wrapping import WRAPPED, install, omega_from, uninstall

import s2fast
from s2fast import tiny


@pytest.fixture
def installed():
    original = StableDiffusion3Pipeline.__dict__["__call__"]
    signature = inspect.signature(StableDiffusion3Pipeline.__call__)
    patched = install(0.25)
    yield patched
    uninstall()
    assert StableDiffusion3Pipeline.__dict__["__call__"] is original
    assert inspect.signature(StableDiffusion3Pipeline.__call__) == signature


def test_a_supported_pipeline_is_wrapped_at_its_first_call(installed):
    assert "StableDiffusion3Pipeline" in installed and "FluxPipeline" in installed
    pipe, kw = tiny.sd3_latent_call(steps=2)
    assert s2fast.config_of(pipe) is None
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert s2fast.config_of(pipe) == s2fast.S2Config(omega=0.25)
    assert WRAPPED["StableDiffusion3Pipeline"] == 1
    assert len(s2fast.trace(pipe)) == 2 and all(s2fast.trace(pipe))  # a sub-network at each step: S² ran
    s2fast.unwrap(pipe)
    stock = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(out, stock)


def test_the_signature_the_tests_read_is_the_pipelines_own(installed):
    params = inspect.signature(StableDiffusion3Pipeline.__call__).parameters
    assert "callback_on_step_end_tensor_inputs" in params and "_original" not in params


@pytest.mark.parametrize("value,expected", [(None, None), ("stock", None), ("0", 0.0), ("0.25", 0.25)])
def test_omega_from_the_option(value, expected, monkeypatch):
    monkeypatch.delenv("S2FAST_SUITE_OMEGA", raising=False)
    assert omega_from(value) == expected


def test_a_negative_omega_is_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        omega_from("-1")
