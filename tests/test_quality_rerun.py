"""The rerun list of the quality claims (evaluation/s2fast_eval/rerun.py): it is the list of commands that made the
committed results, each command parses, and the check finds what differs and only that."""

import json
from pathlib import Path

import numpy as np
import pytest
from s2fast_eval import rerun
from s2fast_eval.digits import frontier

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_parses():
    for cmd in rerun.COMMANDS:
        argv = cmd.argv(Path("benchmarks/quality"))
        if cmd.module == rerun.FRONTIER:
            frontier.parse_args(argv[2:])


def test_the_list_is_what_made_the_committed_frontiers():
    """Each committed frontier record names the command that wrote it: the set of those commands must be the rerun
    list's, or a rerun would leave out a table (or run one nobody committed)."""
    recorded = set()
    for path in (ROOT / "benchmarks/quality/digits/paired").glob("step_*/*.json"):
        command = json.loads(path.read_text()).get("meta", {}).get("command")
        if command:
            recorded.add(command.removeprefix("PYTHONPATH=evaluation python "))
    listed = {" ".join(c.argv(Path("benchmarks/quality"))) for c in rerun.COMMANDS if c.module == rerun.FRONTIER}
    assert recorded == listed


def test_compare_folders_names_each_difference(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    record = {"meta": {"command": "x --out a"}, "rows": [{"name": "cfg", "seconds": 1.0, "fd": 10.5, "acc": 0.5}]}
    (a / "cfg.json").write_text(json.dumps(record))
    record["meta"]["command"], record["rows"][0]["seconds"] = "x --out b", 2.0  # a record and a time: not results
    (b / "cfg.json").write_text(json.dumps(record))
    np.savez(a / "cfg.npz", features=np.ones(3))
    np.savez(b / "cfg.npz", features=np.ones(3))
    assert rerun.compare_folders(a, b) == []

    record["rows"][0]["fd"] = 10.5 + 1e-12
    (b / "cfg.json").write_text(json.dumps(record))
    np.savez(b / "cfg.npz", features=np.array([1.0, 1.0, 2.0]))
    (a / "extra.json").write_text("{}")
    problems = rerun.compare_folders(a, b)
    assert sorted(problems) == sorted([f"{b / 'extra.json'}: not committed", "cfg.npz[features] differs",
                                       f"cfg.json.rows[0].fd: 10.5 against {10.5 + 1e-12!r}"])
    assert not [p for p in rerun.compare_folders(a, b, rtol=1e-9) if ".fd" in p]  # within a stated tolerance


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        rerun.parse_args(["--only", "step_301"])
    assert "step_301" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rerun.parse_args(["--jobs", "0"])


def test_run_times_each_command_and_keeps_its_log(tmp_path):
    """Two stand-in commands (Python's own modules), two at a time: each is run, reaped and timed once; a failing
    one reports its exit status instead of stopping the others."""
    ok = rerun.Command("toys/a", "this", ())
    bad = rerun.Command("toys/b", "s2fast_eval.no_such_module", ())
    records = rerun.run([ok, bad], tmp_path, jobs=2)
    assert [r["returncode"] for r in records] == [0, 1]
    assert all(r["wall_s"] >= 0 and r["cpu_s"] >= 0 for r in records)
    assert "Beautiful is better than ugly" in Path(records[0]["log"]).read_text()
    assert "No module named" in Path(records[1]["log"]).read_text()
    assert "| 0 |" in rerun.times_markdown(records, 2, 1.0)
