"""The demo's image: a model server whose start-up reads a few MB of a >100 MB image.

Why this shape: lazy pulling pays off when an image carries much more than its start-up reads, as
serving images do (interpreter, libraries, model weights read on first request). Built from local
inputs only: this machine's python3.11 and its standard library (the ``python`` test image's two
layers, :func:`integration.images.python_spec`), plus a third layer with a small server and a model
of generated weight shards. The shards are deterministic pseudo-random fp16-like values (random
sign and mantissa, exponents clustered as in trained weights), so they compress about as real
weights do (gzip ~0.8), and are written once under ``.cache/demo-model/``. Few files (about 720),
so the pull is not a test of inode creation.

The workload (``/app/serve.py --check``) does what a server does before it listens: imports
``http.server`` and ``logging``, reads the model's index, checks every shard's size; the weights
themselves are read later, on the first request.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from integration.images import Entry, ImageSpec, TarLayer, _finish, _LayerBuilder, python_spec, register_spec

NAME = "demo"
MODEL_DIR = Path(__file__).resolve().parent.parent / ".cache" / "demo-model"
SHARDS = 16
SHARD_BYTES = 8 << 20  # 16 x 8 MiB = 128 MiB of weights
SEED = 20261202
READY = "ready"
CMD = ["/app/serve.py", "--check"]

SERVE_PY = '''#!/usr/bin/python3
"""A model server's start-up check: load the index, check the shards, report ready.

The weights are mmapped on the first request, not here.
"""
import http.server
import json
import logging
import os
import sys

MODEL = "/model"
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
index = json.load(open(os.path.join(MODEL, "config.json")))
total = 0
for shard in index["shards"]:
    size = os.stat(os.path.join(MODEL, shard["file"])).st_size
    if size != shard["bytes"]:
        sys.exit(f"shard {shard['file']}: {size} bytes, index says {shard['bytes']}")
    total += size
logging.info("model %s: %d shards, %.0f MB of weights indexed, %s", index["name"], len(index["shards"]),
             total / 1e6, "ready" if "--check" in sys.argv else "serving")
'''


@dataclass(frozen=True)
class Shard:
    file: str
    size: int


def shard_plan(shards: int = SHARDS, size: int = SHARD_BYTES) -> list[Shard]:
    """The model's files, largest part of the image: names as model hubs write them."""
    return [Shard(f"weights-{i + 1:05d}-of-{shards:05d}.bin", size) for i in range(shards)]


# fp16 high byte from 8 uniform bits: bit 0 sign, bits 1-2 the top mantissa bits, bits 3-7 pick an
# exponent (half the values one exponent, a quarter the next, ...), as in weights of small magnitude.
_EXPONENTS = [12] * 16 + [11] * 8 + [10] * 4 + [9] * 2 + [8, 7]
_HIGH_BYTE = bytes(((u & 1) << 7) | (_EXPONENTS[u >> 3] << 2) | ((u >> 1) & 3) for u in range(256))


def shard_bytes(index: int, size: int, seed: int = SEED) -> bytes:
    """Deterministic weight-like bytes for shard ``index`` (little-endian fp16 pairs)."""
    rng = random.Random(seed * 1000 + index)
    half = size // 2
    out = bytearray(size)
    out[0 : 2 * half : 2] = rng.randbytes(half)  # low bytes: mantissa, uniform
    out[1 : 2 * half : 2] = rng.randbytes(half).translate(_HIGH_BYTE)
    return bytes(out)


def ensure_model(model_dir: Path = MODEL_DIR, plan: list[Shard] | None = None) -> Path:
    """Write the shards and their index once (atomically per file); later calls only check sizes."""
    plan = plan if plan is not None else shard_plan()
    model_dir.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(plan):
        path = model_dir / shard.file
        if path.is_file() and path.stat().st_size == shard.size:
            continue
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(shard_bytes(i, shard.size))
        os.replace(tmp, path)
    index = {"name": "demo-lm-64m", "dtype": "float16",
             "shards": [{"file": s.file, "bytes": s.size} for s in plan]}
    cfg = model_dir / "config.json"
    text = json.dumps(index, indent=1) + "\n"
    if not cfg.is_file() or cfg.read_text() != text:
        cfg.write_text(text)
    return model_dir


def demo_spec(model_dir: Path = MODEL_DIR, plan: list[Shard] | None = None) -> ImageSpec:
    """python's two layers plus the app-and-model layer (the model written first if missing)."""
    plan = plan if plan is not None else shard_plan()
    base = python_spec()
    ensure_model(model_dir, plan)
    app = _LayerBuilder()
    app.file("app/serve.py", SERVE_PY.encode(), 0o755)
    app.add(Entry("model/config.json", "file", 0o644, source=model_dir / "config.json"))
    for shard in plan:
        app.add(Entry(f"model/{shard.file}", "file", 0o644, source=model_dir / shard.file))
    return ImageSpec(NAME, [*base.layers, _finish(app)], cmd=CMD)


@dataclass(frozen=True)
class Shape:
    """What the demo says about its image: files and bytes per part."""

    runtime_files: int
    runtime_bytes: int
    model_files: int
    model_bytes: int


def shape(spec: ImageSpec) -> Shape:
    """Count regular files and their bytes: the python layers vs the app-and-model layer."""
    def files(layers: list[list[Entry] | TarLayer]) -> list[Entry]:
        return [e for layer in layers if not isinstance(layer, TarLayer) for e in layer if e.kind == "file"]

    def size(e: Entry) -> int:
        return len(e.data) if e.data is not None else Path(str(e.source)).stat().st_size

    runtime, model = files(spec.layers[:-1]), files(spec.layers[-1:])
    return Shape(len(runtime), sum(map(size, runtime)), len(model), sum(map(size, model)))


def register() -> None:
    """Make ``demo`` buildable by ``integration.images.build_and_push``."""
    register_spec(NAME, lambda: demo_spec())
