"""No committed file names a folder of the machine it was written on: records (run.json, reports, benchmark results)
keep paths relative to the checkout, so that they read the same in any clone."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from conftest import REPO
from metaseg.files import relative_paths


def test_absolute_paths_under_a_checkout_and_its_parent_become_relative():
    text = "python /w/repo/scripts/x.py --data /w/shared/Data --out '/w/repo' /w/repo2/y /data/w/z /w /etc/hosts"
    assert relative_paths(text, Path("/w/repo")) == (
        "python scripts/x.py --data ../shared/Data --out '.' ../repo2/y /data/w/z .. /etc/hosts")
    assert relative_paths("/repo/runs /runs", Path("/repo")) == "runs /runs"  # a checkout at / leaves the rest alone


def test_no_committed_file_holds_the_checkouts_absolute_path_or_its_parents():
    """Every tracked file, binary ones included, against this checkout's path and its parent folder (where the data
    lives beside it); `relative_paths` is how a writer avoids them."""
    # the parent only where it is the project's own (../shared beside it): under the system's temporary folder, a
    # clone's parent is /tmp, which scratch paths of scripts and tests name for their own reasons
    own_parent = REPO.parent not in (REPO.parent.parent, Path(tempfile.gettempdir()).resolve())
    machine = [str(REPO)] + ([f"{REPO.parent}/"] if own_parent else [])
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [REPO / name for name in tracked.decode().split("\0") if name and (REPO / name).is_file()]
    # an absolute path starts a word: `reports/tmp/` is no mention of a checkout under /tmp
    patterns = {path: re.compile(rb"(?<![\w./-])" + re.escape(path.encode())) for path in machine}
    found = [f"{file.relative_to(REPO)}: {path}" for file in files for text in [file.read_bytes()]
             for path, pattern in patterns.items() if pattern.search(text)]
    assert not found, "\n".join(found)
