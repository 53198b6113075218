"""`shim.api.fill_image`, the one door for filling a whole image: real registry, real store."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.test_lazy_run import lazyshim
from shim import api
from shim.errors import LazyshimError
from shim.lazyroot import layers_complete


def test_fill_image_reports_progress_and_completes(tmp_path: Path, images: dict[str, str]) -> None:
    store_root = tmp_path / "store"
    ref = images["busybox:esgz"]
    lazyshim(store_root, "pull", ref)
    store = api.open_store(store_root)
    image = api.ensure_image(store, ref, pull=False)
    calls: list[tuple[int, int, int]] = []
    res = api.fill_image(store, image, progress=lambda *a: calls.append(a))
    assert layers_complete(store, image.layers)
    total = calls[0][1]
    assert total > 0 and all(c[1] == total for c in calls)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls), "files done never goes back"
    assert calls[-1][0] == total == res.files_filled and calls[-1][2] == res.bytes_fetched > 0
    again = api.fill_image(store, list(image.layers))  # by layer digests: nothing left to do
    assert (again.files_filled, again.bytes_fetched) == (0, 0)


def test_fill_image_of_layers_not_in_the_store_is_one_error(tmp_path: Path) -> None:
    store = api.open_store(tmp_path / "store")
    with pytest.raises(LazyshimError, match="not in the store"):
        api.fill_image(store, ["sha256:" + "0" * 64])
