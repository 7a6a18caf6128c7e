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

    assert set(s2fast.__all__) == {"S2Config", "SGGConfig", "wrap", "unwrap", "trace", "trace_denoisers", "trace_steps",
                                   "config_of", "graph_stats", "register_adapter", "S2Guidance", "SGGGuidance",
                                   "__version__"}
    for name in ("wrap", "unwrap", "trace", "trace_denoisers", "trace_steps", "config_of", "graph_stats",
                 "register_adapter", "S2Guidance", "SGGGuidance"):
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


def test_kernels_come_from_the_same_checkout_as_s2fast(tmp_path):
    """s2fast imported from this checkout (its root first on sys.path, as when running from it) gets this
    checkout's kernels even when another editable install's finder, ahead in line, maps s2fast.kernels elsewhere."""
    decoy = tmp_path / "other_checkout" / "kernels"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the kernels of another checkout')\n")
    r = _python(
        "import sys, importlib.util\n"
        "from importlib.machinery import PathFinder\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "class OtherEditableInstall:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name != 's2fast.kernels':\n"
        "            return None\n"
        f"        return importlib.util.spec_from_file_location(name, {str(decoy / '__init__.py')!r},\n"
        f"                                                      submodule_search_locations=[{str(decoy)!r}])\n"
        "sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, OtherEditableInstall)\n"
        "import s2fast, s2fast.kernels, s2fast.kernels.flow_step\n"
        "print(s2fast.__file__); print(s2fast.kernels.__file__); print(s2fast.kernels.flow_step.__file__)\n"
    )
    assert r.returncode == 0, r.stderr
    package, kernels, flow_step = r.stdout.split()
    assert Path(package).parent == ROOT / "s2fast"
    assert Path(kernels).parent == ROOT / "kernels" and Path(flow_step).parent == ROOT / "kernels"


def test_the_extension_build_is_documented_without_build_isolation_and_fails_clearly_without_torch():
    """setup.py imports torch to build the extension: pip's isolated build environment has none, so every
    documented build command turns isolation off, and a build without torch says how to fix it."""
    for path in ("README.md", "setup.py", "kernels/flow_step_cuda.py"):
        for line in (ROOT / path).read_text().splitlines():
            if "S2FAST_BUILD_CUDA=1" in line and "pip install" in line:
                assert "--no-build-isolation" in line, f"{path}: {line.strip()}"
    blocker = ("import sys\n"
               "class NoTorch:\n"
               "    @staticmethod\n"
               "    def find_spec(name, path=None, target=None):\n"
               "        if name == 'torch' or name.startswith('torch.'):\n"
               "            raise ImportError('no torch in this build environment')\n"
               "sys.meta_path.insert(0, NoTorch)\n"
               "sys.argv = ['setup.py', '--name']\n"
               f"exec(compile(open({str(ROOT / 'setup.py')!r}).read(), 'setup.py', 'exec'))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["S2FAST_BUILD_CUDA"] = "1"
    r = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--no-build-isolation" in r.stderr, r.stderr
