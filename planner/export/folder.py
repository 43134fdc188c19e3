"""The output folder of an export: written into a temp folder next to it, then renamed into place,
so an error never leaves a half-written export; only an earlier podplan export is ever replaced."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from costmodels.errors import InputError

if TYPE_CHECKING:
    from planner.export.build import Export

MANIFEST = "manifest.json"
SCHEMA = "podplan.export/1"


def write_export(export: Export, out_dir: str | os.PathLike[str]) -> None:
    """Write into a temp folder next to `out_dir`, then rename it into place.

    An existing `out_dir` is replaced only when it is empty or an earlier podplan export."""
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise InputError(f"export: {target} is a file; pass a folder path for -o")
    if target.is_dir() and any(target.iterdir()) and not _is_export(target):
        raise InputError(f"export: {target} exists and is not a podplan export; pass a new folder or empty it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for rel, data in export.files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if rel.endswith(".sh"):
                path.chmod(0o755)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; give the folder a plain mkdir's mode
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False
