"""Container records and ownership (flock on the container dir), and listing output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime import containers
from shim.errors import LazyshimError
from shim.output import emit


def _record(cid: str, tmp_path: Path) -> containers.Record:
    return containers.Record(id=cid, image="img", image_id="sha256:00", command=["true"], created=0.0, rm=True,
                             delegate="/bin/false", delegate_root=str(tmp_path / "droot"),
                             state_dir=str(tmp_path / "run" / cid))


def test_a_container_is_owned_until_released(tmp_path: Path) -> None:
    top = tmp_path / "containers"
    owned = containers.create(top, _record("c1", tmp_path))
    assert owned.cdir == top / "c1" and containers.load(owned.cdir).id == "c1"
    assert [p.name for p in containers.list_dirs(top)] == ["c1"]
    assert containers.is_owned(owned.cdir) and containers.try_own(owned.cdir) is None
    with pytest.raises(LazyshimError, match="already exists"):
        containers.create(top, _record("c1", tmp_path))
    owned.release()
    assert not containers.is_owned(owned.cdir)
    fd = containers.try_own(owned.cdir)
    assert fd is not None and containers.is_owned(owned.cdir)
    os.close(fd)


def test_claims_and_bad_names_are_not_listed(tmp_path: Path) -> None:
    top = tmp_path / "containers"
    (top / f"{containers.CLAIM_PREFIX}123.x").mkdir(parents=True)
    (top / "oci").mkdir()
    assert containers.list_dirs(top) == []
    for bad in ("../x", "a/b", "oci", ""):
        with pytest.raises(LazyshimError):
            containers.create(top, _record(bad, tmp_path))


def test_emit_table_json_and_template(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"ID": "abc", "Size": 3, "Names": ["n1"]}, {"ID": "defg", "Size": 10, "Names": ["n2"]}]
    emit(rows, None, [("ID", "ID"), ("SIZE", "Size")])
    assert capsys.readouterr().out == "ID    SIZE\nabc   3\ndefg  10\n"
    emit(rows, "json", [])
    assert json.loads(capsys.readouterr().out) == rows
    emit(rows, "{{.ID}}\\t{{ .names }}", [])
    assert capsys.readouterr().out == "abc\tn1\ndefg\tn2\n"
    with pytest.raises(LazyshimError, match="no field"):
        emit(rows, "{{.Nope}}", [])
    with pytest.raises(LazyshimError, match="template"):
        emit(rows, "yaml", [])
