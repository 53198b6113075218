"""Image names the user pulled, mapped to image ids (manifest digests)."""

from __future__ import annotations

import cbor2

from ..errors import LazyshimError
from .layout import Store
from .metadata import ImageRecord, load_image, write_atomic


def load_refs(store: Store) -> dict[str, str]:
    try:
        data = store.refs_file.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        d = cbor2.loads(data)
    except cbor2.CBORDecodeError as e:
        raise LazyshimError(f"corrupt {store.refs_file}: {e}") from e
    return d if isinstance(d, dict) else {}


def set_ref(store: Store, name: str, image_id: str) -> None:
    with store.lock("refs"):
        d = load_refs(store)
        d[name] = image_id
        write_atomic(store.refs_file, cbor2.dumps(d))


def remove_ref(store: Store, name: str) -> str | None:
    with store.lock("refs"):
        d = load_refs(store)
        image_id = d.pop(name, None)
        write_atomic(store.refs_file, cbor2.dumps(d))
        return image_id


def resolve_image(store: Store, name_or_id: str) -> ImageRecord:
    """Find a pulled image by the name it was pulled as, its full id, or an id prefix."""
    d = load_refs(store)
    image_id = d.get(name_or_id)
    if image_id is None:
        try:
            from ..registry.reference import parse_reference

            image_id = d.get(str(parse_reference(name_or_id)))
        except ValueError:
            image_id = None
    if image_id is None:
        want = name_or_id.removeprefix("sha256:")
        if len(want) >= 6:
            matches = {v for v in d.values() if v.removeprefix("sha256:").startswith(want)}
            if len(matches) == 1:
                image_id = matches.pop()
    if image_id is None:
        raise LazyshimError(f"image {name_or_id!r} is not pulled (run: lazyshim pull {name_or_id})")
    try:
        return load_image(store.image_file(image_id).read_bytes())
    except FileNotFoundError as e:
        raise LazyshimError(f"image {name_or_id!r}: record missing; pull it again") from e


def image_references(store, image, asked: str | None = None) -> list[str]:
    """The names a pulled image is known by, where its fills may come from: the name the
    user asked for first (one manifest may have been pulled from several registries), then
    the one it was last pulled as, then the others."""
    from ..registry.reference import InvalidReference, parse_reference

    try:
        known = sorted(n for n, i in load_refs(store).items() if i == image.id)
    except LazyshimError:
        known = []
    first = []
    if asked:
        try:
            name = str(parse_reference(asked))
        except InvalidReference:
            name = ""
        if name in known:
            first.append(name)
    names = first + [image.name] + known
    return list(dict.fromkeys(names))
