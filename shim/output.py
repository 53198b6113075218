"""Listing output as podman prints it: a table, `--format json`, or a Go-template-like
`--format '{{.ID}} {{.Size}}'` (field names only, one line per row)."""

from __future__ import annotations

import json
import re
import sys

from .errors import LazyshimError

_FIELD = re.compile(r"\{\{\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def emit(rows: list[dict], fmt: str | None, columns: list[tuple[str, str]]) -> None:
    """`columns` are (header, key) for the table; json dumps `rows` whole."""
    if fmt == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
        return
    if fmt and fmt != "table":
        if "{{" not in fmt:
            raise LazyshimError(f"--format {fmt!r}: expected json, table or a template like '{{{{.ID}}}}'")
        template = fmt.replace("\\t", "\t").replace("\\n", "\n")
        for row in rows:
            print(_FIELD.sub(lambda m, row=row: _field(row, m.group(1)), template))
        return
    table = [[h for h, _ in columns]] + [[str(row.get(k, "")) for _, k in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _field(row: dict, name: str) -> str:
    keys = [name] if name in row else [k for k in row if k.lower() == name.lower()]
    if keys:
        v = row[keys[0]]
        return " ".join(map(str, v)) if isinstance(v, list) else str(v)
    raise LazyshimError(f"--format: no field {name!r} (fields: {', '.join(row)})")
