"""One upload as the viewer keeps it: its files in upload order and a digest that keys every cached answer."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePath

from ui.client import Files


@dataclass(frozen=True)
class Upload:
    files: Files = field(repr=False)
    digest: str

    @classmethod
    def of(cls, files: Iterable[tuple[str, bytes]]) -> Upload:
        files = tuple((str(name), bytes(data)) for name, data in files)
        sha = hashlib.sha256()
        for name, data in files:
            sha.update(f"{name}\0{len(data)}\0".encode())
            sha.update(data)
        return cls(files, sha.hexdigest())

    @property
    def stem(self) -> str:
        """The first file's name without folders or suffixes, to name what the user downloads."""
        name = PurePath(self.files[0][0]).name
        return name.split(".")[0] or "upload"

    @property
    def label(self) -> str:
        name = PurePath(self.files[0][0]).name
        return name if len(self.files) == 1 else f"{name} and {len(self.files) - 1} more file(s)"
