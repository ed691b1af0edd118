"""Several JSONL data files as one: the records of each in turn, their image paths still pointing
at the same images (a path in a record is relative to the file that names it, so a record moved
into another directory has its relative paths rewritten). A sweep's `--retrain-full` trains the
winner on the training and held-out files together through it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorafleet.data.records import image_fields, read_jsonl_lines, write_atomically


def join_jsonl(sources: list[Path], out: Path) -> Path:
    """Write the records of `sources`, in order, to `out`; a line that is not JSON is kept as it is
    (the trainer reports or skips it as it would in its own file)."""
    lines = [relocated(line, source.parent, out.parent) for source in sources for _, line in read_jsonl_lines(source)]
    write_atomically(out, "".join(line + "\n" for line in lines))
    return out


def relocated(line: str, source_root: Path, out_root: Path) -> str:
    """The line with its image paths made relative to OUT's directory (a path in a record is
    relative to the file that names it)."""
    if source_root.resolve() == out_root.resolve():
        return line
    try:
        raw = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not isinstance(raw, dict):
        return line
    moved = False
    for container, key in image_fields(raw):
        ref = container[key]
        name = ref.removeprefix("file://")
        if not ref.startswith("data:") and not Path(name).is_absolute():
            container[key] = os.path.relpath((source_root / name).resolve(), out_root.resolve())
            moved = True
    return json.dumps(raw, ensure_ascii=False) if moved else line
