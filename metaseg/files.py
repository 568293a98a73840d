"""Atomic file writes: a report or datalist is either complete on disk or not there at all. And paths relative to a
checkout: what the repository commits names no folder of the machine that wrote it."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from metaseg.errors import UserError


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, then rename over the target (atomic on POSIX)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def relative_paths(text: str, root: Path) -> str:
    """`text` with the absolute paths under the checkout `root` and under its parent written relative to `root`
    (`/w/repo/runs/x` -> `runs/x`, `/w/shared/data` -> `../shared/data`), as a command run in `root` reads them."""
    prefixes = [(root, "")] + ([(root.parent, "../")] if root.parent != root.parent.parent else [])  # not all of /
    for prefix, relative in prefixes:
        found = r"(?<![\w./-])" + re.escape(str(prefix))  # the whole path, not a folder of that name inside another
        text = re.sub(found + "/", relative, text)
        text = re.sub(found + r"(?![\w.-])", relative.rstrip("/") or ".", text)
    return text
