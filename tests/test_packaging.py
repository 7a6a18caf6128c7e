"""Packaging and the project's standing promises: cheap import, kernels only as s2fast.kernels, the README's
commands are what CI runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    # Run from a neutral folder so that the repo root is not on sys.path (as for an installed package).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)


def test_import_is_cheap_and_kernels_is_only_a_subpackage():
    r = _python(
        "import sys, importlib.util, s2fast\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'import s2fast must stay cheap'\n"
        "import s2fast.kernels\n"
        "assert importlib.util.find_spec('kernels') is None, 'kernels/ must not be a top-level package'\n"
        "assert 'triton' not in sys.modules and 's2fast.kernels._C' not in sys.modules, 'optional backends load lazily'\n"
        "print(s2fast.kernels.__name__)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "s2fast.kernels"


def test_public_surface():
    import s2fast

    assert set(s2fast.__all__) == {"S2Config", "wrap", "unwrap", "trace", "config_of", "graph_stats",
                                   "register_adapter", "__version__"}
    for name in ("wrap", "unwrap", "trace", "config_of", "graph_stats", "register_adapter"):
        assert callable(getattr(s2fast, name)) and getattr(s2fast, name).__doc__
    fields = [f for f in s2fast.S2Config.__dataclass_fields__ if not f.startswith("_")]
    for f in fields:  # every field documented in the docstring
        assert re.search(rf"^\s+{f}:", s2fast.S2Config.__doc__, re.M), f"S2Config.{f} is not documented"


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (make \w+)", readme, re.M)
    assert commands[:2] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: \$\(STAMP\)", makefile, re.M) and re.search(r"^test: \$\(STAMP\)", makefile, re.M)
