"""Branch parallelism (S2Config/SGGConfig ``branch_parallel=True``, s2fast/branch_parallel.py).

The schedules are checked as data (every pass computed once, each rank's block-rows against the cost model); the
refusals in one process; the sampling on real gloo groups of 3 and 2 ranks, spawned as separate processes with a
hard timeout (tests/branch_parallel_cases.py), against ``batch_branches=False`` in one process, bit for bit.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import s2fast
from s2fast import S2Config, SGGConfig, tiny
from s2fast.branch_parallel import schedule

ROOT = Path(__file__).resolve().parents[1]
HARD_TIMEOUT_S = 240  # both groups' cases on 2 loaded cores take ~30–60 s; a hang is killed, not waited for


def _block_rows(programs, passes):
    """Block-rows each rank computes (dropped blocks cost nothing) and the blocks each pass runs in all."""
    per_rank, per_pass = [], {}
    for program in programs:
        rows = 0
        for op in program:
            if op.kind == "run":
                ran = [j for j in range(op.start, op.stop) if j not in passes[op.pass_id].drops]
                rows += len(ran)
                per_pass.setdefault(op.pass_id, []).extend(ran)
        per_rank.append(rows)
    return per_rank, per_pass


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_the_schedules_run_every_block_of_every_pass_once_at_the_cost_models_critical_path(world, reuse):
    L, mask = 24, (8, 15)
    k, d = (8 if reuse else 0), 2
    passes, programs = schedule(2, 1, mask, L, world, reuse)
    per_rank, per_pass = _block_rows(programs, passes)
    # U and C run all L blocks; S runs from k, without its drops (its prefix comes from C where k > 0)
    assert sorted(per_pass[0]) == list(range(L)) and sorted(per_pass[1]) == list(range(L))
    assert sorted(per_pass[2]) == [j for j in range(k, L) if j not in mask]
    heads = sorted(passes[op.pass_id].output for p in programs for op in p if op.kind == "head")
    assert heads == [0, 1, 2]
    # critical path in block-rows: 3 ranks L; 2 ranks (3L − k − d)/2, rounded up (SD3-medium-like: 31 with k = 8)
    expected = L if world == 3 else -(-(3 * L - k - d) // 2)
    assert max(per_rank) == expected
    # every send has its receive on the peer
    sends = sorted((r, op.peer) for r, p in enumerate(programs) for op in p if op.kind == "send")
    recvs = sorted((op.peer, r) for r, p in enumerate(programs) for op in p if op.kind == "recv")
    assert sends == recvs


@pytest.mark.parametrize("world", [2, 3])
def test_steps_with_fewer_passes_split_them_without_duplicating_any(world):
    for count, mask in ((2, None), (1, (3, 4)), (1, None)):
        passes, programs = schedule(count, count - 1, mask, 8, world, True)
        heads = [(passes[op.pass_id].output, r) for r, p in enumerate(programs) for op in p if op.kind == "head"]
        assert sorted(o for o, _ in heads) == list(range(len(passes)))
        if len(passes) == 2:  # two passes: one each on two ranks, never both on one
            assert len({r for _, r in heads}) == 2
        sends = [(r, op.peer) for r, p in enumerate(programs) for op in p if op.kind == "send"]
        assert all(src != dst for src, dst in sends)


def test_without_a_process_group_wrap_refuses_and_changes_nothing():
    assert not dist.is_initialized()
    pipe = tiny.sd3_pipeline(with_vae=False)
    for config in (S2Config(branch_parallel=True), SGGConfig(branch_parallel=True)):
        with pytest.raises(ValueError, match="no(ne is)? initialised|none is initialised"):
            s2fast.wrap(pipe, config)
        assert s2fast.config_of(pipe) is None and "forward" not in pipe.transformer.__dict__


def test_a_group_of_one_and_unsupported_settings_are_refused_by_name(tmp_path):
    pipe = tiny.sd3_pipeline(with_vae=False)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        with pytest.raises(ValueError, match="2 or 3 ranks.*has 1"):
            s2fast.wrap(pipe, S2Config(branch_parallel=True))
        assert s2fast.config_of(pipe) is None
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="own predictor"):
        s2fast.wrap(pipe, S2Config(branch_parallel=True), _predictor=lambda *a: None)
    with pytest.raises(ValueError, match="branch_parallel is not supported by the guiders"):
        s2fast.S2Guidance(config=S2Config(branch_parallel=True))
    with pytest.raises(ValueError, match="branch_parallel must be a bool"):
        S2Config(branch_parallel="yes")


def test_refusals_name_the_setting():
    from s2fast.branch_parallel import refusal

    for config, words in ((S2Config(num_masks=2, branch_parallel=True), "one sub-network"),
                          (S2Config(cuda_graphs=True, branch_parallel=True), "eagerly"),
                          (S2Config(attention="fastest", branch_parallel=True), "measured per process")):
        reason = _refusal_with_group(refusal, config)
        assert words in reason


def _refusal_with_group(refusal, config):
    """refusal() as it reads on a group of 2 (the group's checks replaced, the config's kept)."""
    import s2fast.branch_parallel as bp

    saved = (bp.dist.is_initialized, bp.dist.get_world_size)
    bp.dist.is_initialized, bp.dist.get_world_size = (lambda: True), (lambda: 2)
    try:
        return refusal(config)
    finally:
        bp.dist.is_initialized, bp.dist.get_world_size = saved


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn 3 ranks (then 2 of them in a second group) running tests/branch_parallel_cases.py; their results."""
    base = tmp_path_factory.mktemp("branch_parallel")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "branch_parallel_cases.py"), str(r), "3",
                               str(base), str(base)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(3)]
    deadline = time.monotonic() + HARD_TIMEOUT_S
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the branch-parallel ranks did not finish in {HARD_TIMEOUT_S} s (a hang)")
    failed = [(r, p.returncode, out[-3000:]) for r, (p, out) in enumerate(zip(procs, outputs)) if p.returncode]
    assert not failed, failed
    return [json.loads((base / f"rank{r}.json").read_text()) for r in range(3)]


@pytest.mark.parametrize("world", ["3", "2"])
def test_every_rank_equals_one_process_with_batch_branches_off_bit_for_bit(ranks, world):
    members = ranks[: int(world)]
    names = list(members[0][world])
    assert names == ["sd3-s2-seedless", "sd3-s2-recompute", "sd3-sgg", "flux-true-cfg", "wan22"]
    for name in names:
        per_rank = [m[world][name] for m in members]
        # every pass runs at batch B on both sides, the same ops in the same order: no rounding can differ
        assert all(r["max_diff"] == 0.0 and r["finite"] for r in per_rank), (name, per_rank)
        assert len({r["digest"] for r in per_rank}) == 1, name  # every rank holds the same output
        assert len({json.dumps(r["trace"]) for r in per_rank}) == 1, name  # and ran the same masks


def test_a_seedless_config_ran_s2_where_its_interval_says(ranks):
    trace = ranks[0]["3"]["sd3-s2-seedless"]["trace"]
    assert trace[0] == [] and all(trace[1:])  # interval (0.25, 1): no S² at step 0 of 4, one mask at each other
    sgg = ranks[0]["2"]["sd3-sgg"]["trace"]
    assert sgg == [[], [2, 3], [2, 3], [2, 3]]


def test_the_command_refuses_parallel_branch_without_2_or_3_processes(tmp_path, capsys):
    from s2fast.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "digits", "--prompt", "3", "--steps", "2", "--parallel", "branch", "--out", str(tmp_path)])
    assert exit_.value.code != 0
    assert "--parallel branch shares every step between 2 or 3 processes" in capsys.readouterr().err


def test_the_command_under_torchrun_with_parallel_branch_writes_the_image_of_one_process(tmp_path):
    """The embedded digits DiT, 3 steps, seeded masks: ``torchrun --nproc_per_node 2 -m s2fast generate ...
    --parallel branch`` against the same command in one process (whose S² batches [cond, uncond] rows: the parallel
    run computes each at batch 1, so the predictions may differ by batch-size rounding, ~1e-6 relative; the 8-bit
    images are compared exactly, and the masks too)."""
    import numpy as np
    from PIL import Image

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    common = ["-m", "s2fast", "generate", "digits", "--prompt", "3", "--steps", "3", "--seed", "5", "--device", "cpu"]
    runs = {"one": [sys.executable, *common],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                    "--parallel", "branch"]}
    for name, argv in runs.items():
        try:
            done = subprocess.run([*argv, "--out", str(tmp_path / name)], env=env, capture_output=True, text=True,
                                  timeout=HARD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: the command did not finish in {HARD_TIMEOUT_S} s")
        assert done.returncode == 0, done.stderr[-3000:]
    records = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in runs}
    assert records["two"]["finished"] == 1 and records["two"]["device"]["processes"] == 2
    assert records["one"]["images"][0]["runs"]["s2"]["trace"] == records["two"]["images"][0]["runs"]["s2"]["trace"]
    images = {name: np.asarray(Image.open(tmp_path / name / records[name]["images"][0]["files"]["s2"]))
              for name in runs}
    np.testing.assert_array_equal(images["one"], images["two"])
