"""Start-up marks: off unless asked for; one file orders the marks of several processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import trace


def test_marks_go_nowhere_unless_a_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trace, "_path", None)
    trace.mark("runtime", "main")
    assert not trace.enabled() and list(tmp_path.iterdir()) == []


def test_marks_are_appended_and_reported_in_clock_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = tmp_path / "trace"
    monkeypatch.setattr(trace, "_path", str(out))
    trace.mark("runtime", "main")
    trace.mark("supervisor", "first notify fd")
    lines = out.read_text().splitlines()
    assert [line.split(None, 3)[2:] for line in lines] == [["runtime", "main"], ["supervisor", "first notify fd"]]
    table = trace.report(list(reversed(lines)) + ["garbage"]).splitlines()
    assert [row.split(None, 2)[2] for row in table] == ["runtime    main", "supervisor first notify fd"]
    assert table[0].split()[0] == "0.0"
