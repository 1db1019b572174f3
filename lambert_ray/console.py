"""What a run shows on the console: one progress line per stage, and whether Ray talks too.

    with progress("annotate", total=1000, count=rows_written) as p:   # polls count() itself
        ...                                                             # the long-running call
    # -> annotate   1000/1000 rows  14.9 rows/s  done in 67s

By default (`verbose()` False) a stage is one line: on a terminal it is redrawn in place with
rows done / total, rows/s and the ETA; elsewhere (CI logs, files) only its final line is
printed. Ray's own logs and progress bars are for `--verbose` (the CLI calls `set_verbose`).
Lines go to stderr; library users who never call `enable()` see nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

_state: dict = {"verbose": False, "stream": None}


def set_verbose(on: bool) -> None:
    _state["verbose"] = on


def verbose() -> bool:
    """Whether Ray's own logs, progress bars and Tune tables should show."""
    return bool(_state["verbose"])


def enable(stream: TextIO | None = None) -> None:
    """Print progress lines to `stream` (default: stderr)."""
    _state["stream"] = stream or sys.stderr


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(name: str, done: int, total: int | None, elapsed: float, unit: str = "rows",
                  finished: bool = False, detail: str | None = None) -> str:
    """`name  done/total unit  rate unit/s  ETA ...` (or `done in ...` once finished); with
    `detail` (work that reports no count, e.g. a Ray Train fit): `name  detail  running 42s`."""
    if detail is not None:
        return f"{name:<12} {detail}  {'done in' if finished else 'running'} {_fmt_s(elapsed)}"
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done}/{total}" if total else f"{done}"
    tail = f"done in {_fmt_s(elapsed)}" if finished else (
        f"ETA {_fmt_s((total - done) / rate)}" if total and rate > 0 and done < total else "")
    return f"{name:<12} {count} {unit}  {rate:.1f} {unit}/s  {tail}".rstrip()


@contextmanager
def progress(name: str, total: int | None = None, count: Callable[[], int] | None = None, *,
             unit: str = "rows", detail: str | None = None, every_s: float = 2.0) -> Iterator[dict]:
    """One progress line for a stage. `count()` (polled every `every_s` seconds in a thread)
    says how many are done; or set `p["done"]` (and `p["detail"]`) from the caller. Prints the
    final line on exit."""
    state: dict = {"done": 0, "detail": detail}
    stream = _state["stream"]
    t0 = time.perf_counter()
    try:
        tty = bool(stream is not None and stream.isatty())
    except (ValueError, OSError, AttributeError):  # closed (a finished test runner's capture)
        stream = tty = None
    stop = threading.Event()

    def draw(finished: bool = False, end: str = "") -> None:
        line = progress_line(name, state["done"], total, time.perf_counter() - t0, unit, finished,
                             state["detail"])
        try:
            if tty:
                stream.write("\r\x1b[2K" + line + ("\n" if finished else end))
            elif finished or end:
                stream.write(line + "\n")
            stream.flush()
        except (ValueError, OSError):  # the console went away (closed pipe, test runner)
            pass

    def poll() -> None:
        while not stop.wait(every_s):
            if count is not None:
                try:
                    state["done"] = count()
                except Exception:  # a shard being written: try again next time
                    continue
            draw()

    thread = None
    if stream is not None:
        thread = threading.Thread(target=poll, name=f"progress-{name}", daemon=True)
        thread.start()
    ok = False
    try:
        yield state
        ok = True
    finally:
        stop.set()
        if thread is not None:
            thread.join()
            if count is not None:
                try:
                    state["done"] = count()
                except Exception:
                    pass
            draw(finished=ok, end="" if ok else "\n")
