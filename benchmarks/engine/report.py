"""How the engine benchmarks report: each row printed as one JSON line when it is measured, and all
rows written to --out as one JSON list (after each part where a run may be cut short).
Imported by its sibling scripts, which run with this folder on sys.path (as scripts, or loaded by
path through `gemforge bench` and the tests)."""
from __future__ import annotations

import json
from pathlib import Path


def emit(rows: list[dict], row: dict) -> dict:
    """Append `row` and print it."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    return row


def save(rows: list[dict], out: str | None) -> list[dict]:
    """Write `rows` to `out` (if given); return them."""
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
    return rows
