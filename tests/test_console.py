"""The quiet console: one progress line per stage (rows done / total, rows/s, ETA)."""

from __future__ import annotations

import io

import pytest

from lambert_ray import console
from lambert_ray.console import progress, progress_line


def test_progress_line_shows_done_total_rate_and_eta():
    line = progress_line("annotate", 250, 1000, elapsed=10.0)
    assert line.split() == ["annotate", "250/1000", "rows", "25.0", "rows/s", "ETA", "30s"]
    done = progress_line("annotate", 1000, 1000, elapsed=75.0, finished=True)
    assert done.endswith("done in 1m15s")
    assert progress_line("bert/llm", 0, None, 42.0, detail="996 rows x 3 epochs") == \
        "bert/llm     996 rows x 3 epochs  running 42s"


def test_a_stage_is_one_final_line_off_a_terminal(monkeypatch):
    out = io.StringIO()  # not a TTY: no redrawing, only the final line
    monkeypatch.setitem(console._state, "stream", out)
    with progress("classify", 30, count=lambda: 30, every_s=60):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("classify     30/30 rows") and "done in" in lines[0]


def test_a_failed_stage_does_not_claim_to_be_done(monkeypatch):
    out = io.StringIO()
    monkeypatch.setitem(console._state, "stream", out)
    with pytest.raises(RuntimeError), progress("annotate", 10, count=lambda: 4, every_s=60):
        raise RuntimeError("actor died")
    assert "4/10 rows" in out.getvalue() and "done" not in out.getvalue()


def test_without_a_console_nothing_is_printed(monkeypatch, capsys):
    monkeypatch.setitem(console._state, "stream", None)
    with progress("annotate", 10, count=lambda: 10):
        pass
    assert capsys.readouterr() == ("", "")


def test_a_closed_console_is_ignored(monkeypatch):
    closed = io.StringIO()
    closed.close()  # e.g. the stderr capture of a CLI invocation that has returned
    monkeypatch.setitem(console._state, "stream", closed)
    with progress("annotate", 10, count=lambda: 10):
        pass
