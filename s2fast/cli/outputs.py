"""Writing ``--out``: every file is created exclusively and atomically, and every write failure (a read-only or
full disk, a folder that vanished) is one UserError line, so what finished before it stays on disk and listed.

A file is written to a temporary name, then linked into place: a reader never sees half a file, and a second
writer of the same name fails instead of overwriting. The processes of one run never write the same name (each
prompt belongs to exactly one), so a name that appears meanwhile was written by another run.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

from .errors import UserError
from .runtime import device_record, versions


def check_writable(out: str) -> None:
    """Create ``out`` if missing and write and remove a probe file in it: a folder the run cannot write is one
    line before any weights load (permission bits alone do not tell, e.g. for root or a read-only mount)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}") from None
    probe = os.path.join(out, f".s2fast-probe.{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
    except OSError as e:
        raise UserError(f"cannot write in --out {out}: {e.strerror or e}") from None
    remove(probe)


def write_exclusive(path: str, data: bytes) -> None:
    """Write ``data`` to ``path``, which must not exist (temporary name, then a link into place)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} appeared while this run was writing it: another s2fast run is writing to the same "
                        "--out (give each run its own --out)") from None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        _discard(tmp)


def remove(path: str) -> None:
    """Remove ``path`` if it exists; UserError (one line) when it exists and cannot be removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UserError(f"cannot remove {path}: {e.strerror or e}") from None


def remove_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass  # not empty (outputs to keep), or already gone


def _discard(path: str) -> None:
    # a temporary file that may never have been created: a failure to remove it must not hide the error that
    # ended the write (the caller's UserError is the one line the user sees)
    try:
        os.unlink(path)
    except OSError:
        pass


def write_run_json(out: str, stems: List[str], settings: Dict, device, dtype, processes) -> None:
    """``run.json``: the settings, versions, device and every finished prompt's record, replaced atomically."""
    records = []
    for stem in stems:
        try:
            with open(os.path.join(out, f"{stem}.json"), encoding="utf-8") as f:
                records.append(json.load(f))
        except (OSError, ValueError):
            pass  # not finished (a process failed): run.json lists what is there
    run = {"settings": dict(settings), "prompts": len(stems), "finished": len(records),
           "versions": versions(), "device": device_record(device, dtype, processes),
           "total_time_s": sum(r["total_time_s"] for rec in records for r in rec["runs"].values()),
           "images": records}
    path = os.path.join(out, "run.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(run, f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
