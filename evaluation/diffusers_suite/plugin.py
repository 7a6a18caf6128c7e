"""pytest plugin: diffusers' own pipeline tests with every pipeline s2fast supports wrapped at its first call.

Load with ``-p diffusers_suite.plugin`` (PYTHONPATH=evaluation). ``--s2fast-omega W`` (or S2FAST_SUITE_OMEGA=W)
wraps each instance of a supported pipeline class (s2fast.adapters' registry) with ``S2Config(omega=W)`` when it
is first called; without either, nothing is wrapped (the stock run). The hub repositories the tests load are
stood in for offline (hub_standins.py): HF_HUB_OFFLINE=1 and HF_HUB_CACHE at the stand-ins' folder, set here
before diffusers or transformers is imported.
"""

from __future__ import annotations

import os

from .hub_standins import build_cache, default_cache

# Before anything reads huggingface_hub's constants (it reads the environment once, at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(default_cache())
os.environ.setdefault("TQDM_DISABLE", "1")

from .wrapping import WRAPPED, forget_pipelines, install, omega_from  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--s2fast-omega", default=None, help="wrap supported pipelines with S2Config(omega=W)")


def pytest_configure(config):
    build_cache(default_cache())
    omega = omega_from(config.getoption("--s2fast-omega"))
    config._s2fast_suite = {"omega": omega, "patched": install(omega) if omega is not None else []}


def pytest_report_header(config):
    info = getattr(config, "_s2fast_suite", {})
    if info.get("omega") is None:
        return "s2fast suite: stock (nothing wrapped)"
    return f"s2fast suite: omega={info['omega']}, wrapping {', '.join(info['patched'])}"


def pytest_runtest_teardown(item):
    forget_pipelines()  # a finished test's pipelines are released


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    info = getattr(config, "_s2fast_suite", {})
    if info.get("omega") is not None:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(WRAPPED.items())) or "none"
        terminalreporter.write_line(f"s2fast suite: omega={info['omega']}; pipelines wrapped: {counts}")
