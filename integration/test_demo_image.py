"""The demo image's shape: big where a full pull pays, small where start-up reads, few files."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from integration import demo_image
from integration.images import python_spec


def test_default_model_makes_a_big_image_of_moderate_file_count() -> None:
    plan = demo_image.shard_plan()
    runtime_files = sum(1 for layer in python_spec().layers for e in layer if e.kind == "file")
    assert sum(s.size for s in plan) >= 100 << 20
    assert runtime_files + len(plan) + 2 < 1000  # the pull creates one inode per file
    assert len({s.file for s in plan}) == len(plan)


def test_shards_are_deterministic_and_compress_like_weights() -> None:
    a, b = demo_image.shard_bytes(0, 1 << 20), demo_image.shard_bytes(0, 1 << 20)
    assert a == b and a != demo_image.shard_bytes(1, 1 << 20)
    ratio = len(zlib.compress(a, 6)) / len(a)
    assert 0.75 < ratio < 0.97, ratio  # neither random noise nor trivially compressible


def test_spec_holds_server_index_and_shards(tmp_path: Path) -> None:
    plan = demo_image.shard_plan(shards=3, size=4096)
    spec = demo_image.demo_spec(tmp_path, plan)
    app = {e.path: e for e in spec.layers[-1]}
    assert app["app/serve.py"].mode == 0o755 and spec.cmd[0] == "/app/serve.py"
    index = json.loads((tmp_path / "config.json").read_text())
    assert [s["file"] for s in index["shards"]] == [s.file for s in plan]
    assert all(f"model/{s.file}" in app for s in plan)
    shape = demo_image.shape(spec)
    assert (shape.model_files, shape.model_bytes) == (len(plan) + 2, 3 * 4096 + len(demo_image.SERVE_PY)
                                                      + (tmp_path / "config.json").stat().st_size)
    assert shape.runtime_files > 100 and shape.runtime_bytes > 1 << 20
    before = (tmp_path / plan[0].file).stat().st_mtime_ns
    demo_image.ensure_model(tmp_path, plan)  # idempotent: nothing rewritten, cache key unchanged
    assert (tmp_path / plan[0].file).stat().st_mtime_ns == before
    assert spec.cache_key() == demo_image.demo_spec(tmp_path, plan).cache_key()
