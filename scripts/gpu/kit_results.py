"""OUT/results.json of a GPU-kit run: started once, merged into after every check.

Torch-free, so run_all.sh's bookkeeping calls (`checks.py --start / --list / --mark`) start in
well under a second instead of paying torch's import each time.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def read_results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()).get("checks", {}) if path.exists() else {}


def start_results(out: Path, run: dict) -> None:
    """A fresh out/results.json: {"run": run + the commit, "checks": {}}."""
    try:
        run["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                       capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        run["commit"] = None
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"run": run, "checks": {}}, indent=1))


def update_results(out: Path, name: str, entry: dict) -> None:
    """Merge `entry` under checks[name] of out/results.json (atomic replace, written per check)."""
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {"checks": {}}
    data.setdefault("checks", {})[name] = entry
    tmp = path.with_name(f".results.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
