"""Run one GPU-kit check in this process and merge its result into OUT/results.json.

    python scripts/gpu/checks.py --list [--cpu]               # names and timeouts (run_all.sh)
    python scripts/gpu/checks.py NAME --out OUT [--cpu] [--tiny]
    python scripts/gpu/checks.py NAME --out OUT --mark timeout  # record a killed check

Every entry holds status (ok | failed | error | timeout | crashed | skipped), seconds, the peak
memory of the check's process (GPU: torch.cuda.max_memory_allocated) and the modules from
FORBIDDEN (ray, deepspeed) found imported, which fails the check. Exit code 0 only on ok.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]

import correctness  # noqa: E402
import kit  # noqa: E402
import speed  # noqa: E402

# name -> (function, timeout on the GPU box in s, timeout in the CPU rehearsal in s)
CHECKS = {
    "env": (correctness.check_env, 60, 60),
    "annotator_7b_bf16": (partial(speed.check_annotator_7b, precision="bf16"), 100, 90),
    "annotator_7b_nf4": (partial(speed.check_annotator_7b, precision="nf4"), 130, 90),
    "student": (speed.check_student, 45, 60),
    "nf4_agreement": (correctness.check_nf4_agreement, 45, 60),
    "prefix_reuse": (correctness.check_prefix_reuse, 40, 60),
    **{f"peft_{m}": (partial(correctness.check_peft, method_name=m), 35, 90)
       for m in ("lora", "dora", "prefix_tuning", "p_tuning", "prompt_tuning", "ia3")},
}


def run_check(name: str, mode: kit.Mode, out: Path) -> int:
    fn = CHECKS[name][0]
    kit.update_results(out, name, {"status": "running", "started": time.strftime("%H:%M:%S")})
    if torch_cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        entry = fn(mode)
        entry["status"] = "ok" if entry.pop("ok") else "failed"
    except Exception as e:  # recorded, never silent: the check fails and the next one runs
        entry = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}",
                 "traceback": traceback.format_exc()[-3000:]}
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    entry.update(kit.peak_memory())
    entry["forbidden_imports"] = kit.forbidden_imports()
    if entry["forbidden_imports"] and entry["status"] == "ok":
        entry["status"] = "failed"
    kit.update_results(out, name, entry)
    print(f"[{name}] {entry['status']} in {entry['seconds']} s"
          + (f": {entry.get('error', '')}" if entry["status"] == "error" else ""), flush=True)
    return 0 if entry["status"] == "ok" else 1


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cpu", action="store_true", help="the CPU rehearsal (no CUDA)")
    ap.add_argument("--tiny", action="store_true", help="every shape shrunk to a few layers")
    ap.add_argument("--kit", type=Path, default=Path(os.environ.get("GPU_KIT", kit.ROOT / ".gpu_kit")))
    ap.add_argument("--work", type=Path,
                    default=Path(os.environ.get("GPU_KIT_WORK", "/tmp/lambert_kit_work")))
    ap.add_argument("--mark", default=None, help="record this status for NAME without running it")
    ap.add_argument("--start", action="store_true", help="record the run's date, flags, commit")
    args = ap.parse_args()
    if args.list:
        scale = float(os.environ.get("GPU_KIT_TIMEOUT_SCALE", "1"))  # a loaded rehearsal box
        for name, (_, gpu_s, cpu_s) in CHECKS.items():
            print(name, round((cpu_s if args.cpu else gpu_s) * scale))
        return 0
    if args.start and args.out is not None:
        kit.start_results(args.out, {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                                     "cpu": args.cpu, "tiny": args.tiny, "kit": str(args.kit)})
        return 0
    if args.name not in CHECKS or args.out is None:
        ap.error(f"NAME (one of {', '.join(CHECKS)}) and --out are required")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mark:  # only over an entry its own process left unfinished (killed, crashed)
        if kit.read_results(args.out).get(args.name, {}).get("status", "running") == "running":
            kit.update_results(args.out, args.name, {"status": args.mark})
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    return run_check(args.name, kit.Mode(args.cpu, args.tiny, args.kit, args.work), args.out)


if __name__ == "__main__":
    sys.exit(main())
