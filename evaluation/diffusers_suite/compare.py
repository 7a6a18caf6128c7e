"""Compare the junit files of the three ways: counts per way, and per wrapped way every test that passes stock
but not wrapped, with the first line of its failure.

    PYTHONPATH=evaluation python -m diffusers_suite.compare /tmp/suite-out
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Tuple

Outcome = Tuple[str, str]  # (passed | failed | error | skipped, first line of the message)


def outcomes(junit: Path) -> Dict[str, Outcome]:
    """test id (file::class::name) -> outcome, from a junit file."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed"}.get(tag, tag)
                text = node.get("message") or (node.text or "")
                message = next((line.strip() for line in text.splitlines() if line.strip()), "")
                break
        found[test_id] = (status, message)
    return found


def compare(out: Path) -> dict:
    ways = {p.stem: outcomes(p) for p in sorted(out.glob("*.xml"))}
    stock = ways.get("stock", {})
    counts = {name: {s: sum(1 for o in res.values() if o[0] == s) for s in ("passed", "failed", "error", "skipped")}
              for name, res in ways.items()}
    regressions = {name: {t: res.get(t, ("missing", ""))[1] or res.get(t, ("missing", ""))[0]
                          for t, o in stock.items() if o[0] == "passed" and res.get(t, ("missing",))[0] != "passed"}
                   for name, res in ways.items() if name != "stock"}
    return {"counts": counts, "regressions": regressions, "total": {n: len(r) for n, r in ways.items()}}


def render(result: dict) -> str:
    lines = ["| way | tests | passed | failed | error | skipped |", "|---|---|---|---|---|---|"]
    for name, c in result["counts"].items():
        lines.append(f"| {name} | {result['total'][name]} | {c['passed']} | {c['failed']} | {c['error']} | "
                     f"{c['skipped']} |")
    for name, tests in result["regressions"].items():
        lines += ["", f"## {name}: {len(tests)} passing stock, not passing wrapped", ""]
        lines += [f"- `{t}`: {message[:200]}" for t, message in sorted(tests.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(compare(Path(sys.argv[1]))))
