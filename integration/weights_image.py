"""The "weights" image: Debian's python3 and numpy plus one 256 MiB weights file, mapped sparsely.

Why: model servers map their weights (`numpy.load(..., mmap_mode="r")`, safetensors) and a
request touches a sliver; whole-file fills pay for all of it.  Built from host files as the
``python`` image is (Debian's python3.11 and python3-numpy), plus a layer holding only
``/model/weights.npy``: deterministic random float32 values saved with numpy (so incompressible:
the registry serves what it stores).

The workload maps the array, sums a strided sample (one element every STRIDE_BYTES from
START_BYTES, so one page in each touched 4 MiB chunk), and prints the sum and the sha256 of PROBE bytes read at
each sampled offset: both can be computed from the host copy and compared.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

from integration.images import Entry, ImageSpec, _finish, _LayerBuilder, _ldd_paths, python_spec, register_spec

NAME = "weights"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "weights-model"
WEIGHTS_BYTES = 256 << 20
SEED = 20261203
STRIDE_BYTES = 32 << 20  # 8 samples in 256 MiB: 8 of 64 4-MiB chunks touched (the first holds the header)
#: Samples start mid-chunk: the kernel reads around a faulting page, and a page at a chunk's
#: start would touch the previous chunk too.
START_BYTES = 2 << 20
PROBE = 4096
NUMPY_DIR = "/usr/lib/python3/dist-packages/numpy"
NUMPY_EXCLUDE = {"tests", "__pycache__", "f2py", "distutils", "testing", "typing", "doc"}

WORKLOAD = f'''#!/usr/bin/python3
"""Map the weights, sum a strided sample, hash the bytes read at each sample."""
import hashlib
import mmap
import numpy as np

START, STRIDE, PROBE = {START_BYTES}, {STRIDE_BYTES}, {PROBE}
a = np.load("/model/weights.npy", mmap_mode="r")
print("sum", repr(float(a[START // a.itemsize::STRIDE // a.itemsize].astype(np.float64).sum())))
raw = a.view(np.uint8).reshape(-1)
h = hashlib.sha256()
for off in range(START, raw.size, STRIDE):
    h.update(raw[off:off + PROBE].tobytes())
print("sha256", h.hexdigest())
'''


def weights_file(cache: Path = CACHE) -> Path:
    """The weights (written once with Debian's numpy, as a model export would)."""
    path = cache / "weights.npy"
    if path.is_file() and path.stat().st_size > WEIGHTS_BYTES:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    raw = cache / "weights.raw"
    rng = random.Random(SEED)
    with open(raw, "wb") as f:
        for _ in range(WEIGHTS_BYTES // (16 << 20)):
            block = bytearray(rng.randbytes(16 << 20))
            block[3::4] = bytes(b & 0x3F for b in block[3::4])  # finite float32 values (no NaN/inf)
            f.write(block)
    tmp = cache / "weights.tmp.npy"
    subprocess.run(["/usr/bin/python3", "-c", "import numpy as np, sys; "
                    "np.save(sys.argv[2], np.fromfile(sys.argv[1], dtype='<f4'))", str(raw), str(tmp)],
                   check=True, timeout=600)
    os.replace(tmp, path)
    raw.unlink()
    return path


def expected_output(path: Path) -> str:
    """What the workload prints, computed on the host copy (numpy's header precedes the data)."""
    data = path.read_bytes()
    header = len(data) - WEIGHTS_BYTES
    out = subprocess.run(["/usr/bin/python3", "-c", WORKLOAD.replace('"/model/weights.npy"', repr(str(path)))],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    h = hashlib.sha256()
    for off in range(START_BYTES, WEIGHTS_BYTES, STRIDE_BYTES):
        h.update(data[header + off: header + off + PROBE])
    assert f"sha256 {h.hexdigest()}" in out
    return out


def weights_spec(cache: Path = CACHE) -> ImageSpec:
    base = python_spec()
    libs = _LayerBuilder()
    for so in sorted(Path(NUMPY_DIR).rglob("*.so")):
        if not NUMPY_EXCLUDE & set(so.relative_to(NUMPY_DIR).parts):
            for lib in _ldd_paths(str(so)):
                libs.host(lib)
    libs.tree(NUMPY_DIR, NUMPY_EXCLUDE)
    libs.file("app/sample.py", WORKLOAD.encode(), 0o755)
    model = _LayerBuilder()
    # Resolved: a checkout whose .cache links to another's shares its built images (same key).
    model.add(Entry("model/weights.npy", "file", 0o644, source=weights_file(cache).resolve()))
    return ImageSpec(NAME, [*base.layers, _finish(libs), _finish(model)], cmd=["/app/sample.py"])


def register() -> None:
    """Make ``weights`` buildable by ``integration.images.build_and_push``."""
    register_spec(NAME, lambda: weights_spec())
