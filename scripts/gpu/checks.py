"""Run one GPU-kit check in this process and merge its result into OUT/results.json.

    python scripts/gpu/checks.py --list [--cpu]               # names and timeouts (run_all.sh)
    python scripts/gpu/checks.py NAME --out OUT [--cpu] [--tiny]
    python scripts/gpu/checks.py NAME --out OUT --mark timeout  # record a killed check

Every entry holds status (ok | failed | error | timeout | crashed | skipped), seconds (the check
itself), startup_s (the process's start and imports before it), process_cpu_s, the peak memory
of the check's process (GPU: torch.cuda.max_memory_allocated) and the modules from FORBIDDEN
(ray, deepspeed) found imported, which fails the check. Exit code 0 only on ok.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # before the imports: `startup_s` is what starting a check costs

import argparse  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]

import kit_results  # noqa: E402  (torch-free: --list, --start, --mark never import torch)

# name -> (module, function, kwargs, timeout on the GPU box in s, in the CPU rehearsal in s).
# The rehearsal's limits are for a smoke run (tiny shapes, a few rows and steps: seconds each on
# an idle 2-core box); rehearse.sh scales them for a loaded one (GPU_KIT_TIMEOUT_SCALE).
CHECKS = {
    "env": ("correctness", "check_env", {}, 60, 60),
    "annotator_7b_bf16": ("speed", "check_annotator_7b", {"precision": "bf16"}, 100, 60),
    "annotator_7b_nf4": ("speed", "check_annotator_7b", {"precision": "nf4"}, 130, 60),
    "student": ("speed", "check_student", {}, 45, 60),
    "train": ("speed", "check_train", {}, 120, 60),
    "nf4_agreement": ("correctness", "check_nf4_agreement", {}, 45, 60),
    "prefix_reuse": ("correctness", "check_prefix_reuse", {}, 40, 60),
    **{f"peft_{m}": ("correctness", "check_peft", {"method_name": m}, 35, 60)
       for m in ("lora", "dora", "prefix_tuning", "p_tuning", "prompt_tuning", "ia3")},
}


def check_fn(name: str):
    module, fn, kwargs = CHECKS[name][:3]
    return partial(getattr(importlib.import_module(module), fn), **kwargs)


def run_check(name: str, mode, out: Path) -> int:
    import kit  # torch: part of `startup_s` (transformers, peft: imported inside the checks)

    fn = check_fn(name)
    started = {"status": "running", "started": time.strftime("%H:%M:%S")}
    kit_results.update_results(out, name, started)
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
    # where a check's time goes (the CPU rehearsal is mostly imports): wall from process start to
    # the check, and this process's CPU seconds (both threads; on a loaded box, wall >> CPU)
    entry["startup_s"] = round(t0 - T_PROCESS, 2)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    entry["process_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    entry.update(kit.peak_memory())
    entry["forbidden_imports"] = kit.forbidden_imports()
    if entry["forbidden_imports"] and entry["status"] == "ok":
        entry["status"] = "failed"
    kit_results.update_results(out, name, entry)
    print(f"[{name}] {entry['status']} in {entry['seconds']} s (+{entry['startup_s']} s startup, "
          f"{entry['process_cpu_s']} s CPU)"
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
    ap.add_argument("--kit", type=Path,
                    default=Path(os.environ.get("GPU_KIT", kit_results.ROOT / ".gpu_kit")))
    ap.add_argument("--work", type=Path,
                    default=Path(os.environ.get("GPU_KIT_WORK", "/tmp/lambert_kit_work")))
    ap.add_argument("--mark", default=None, help="record this status for NAME without running it")
    ap.add_argument("--start", action="store_true", help="record the run's date, flags, commit")
    args = ap.parse_args()
    if args.list:
        scale = float(os.environ.get("GPU_KIT_TIMEOUT_SCALE", "1"))  # a loaded rehearsal box
        for name, (*_, gpu_s, cpu_s) in CHECKS.items():
            print(name, round((cpu_s if args.cpu else gpu_s) * scale))
        return 0
    if args.start and args.out is not None:
        kit_results.start_results(args.out, {
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "cpu": args.cpu, "tiny": args.tiny, "kit": str(args.kit)})
        return 0
    if args.name not in CHECKS or args.out is None:
        ap.error(f"NAME (one of {', '.join(CHECKS)}) and --out are required")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mark:  # only over an entry its own process left unfinished (killed, crashed)
        entry = kit_results.read_results(args.out).get(args.name, {})
        if entry.get("status", "running") == "running":
            kit_results.update_results(args.out, args.name, {"status": args.mark})
        return 0
    if args.tiny:
        # tiny shapes gain nothing from a second thread, and on a shared box OpenMP's spin-waits
        # for a starved sibling thread cost far more (set before torch is imported)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    import kit

    return run_check(args.name, kit.Mode(args.cpu, args.tiny, args.kit, args.work), args.out)


if __name__ == "__main__":
    sys.exit(main())
