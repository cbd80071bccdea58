"""Atomic folder writes: write under a temporary name, rename when complete.

A kill at any moment leaves either the old folder or the new one, never a half-written folder under the final name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def replace_folder(tmp_dir: Path, final_dir: Path) -> None:
    """Move a completely written `tmp_dir` to `final_dir`, replacing an older folder there."""
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def save_atomically(save_fn: Callable[[Path], None], final_dir: str | Path) -> Path:
    """Call `save_fn(tmp_dir)`, then rename the temporary folder to `final_dir` (replacing an older one)."""
    final_dir = Path(final_dir)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        save_fn(tmp_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    replace_folder(tmp_dir, final_dir)
    return final_dir


def check_new_folder(out_dir: str | os.PathLike, arg: str = "out") -> Path:
    """Refuse an existing non-empty path, so that nothing the user had is overwritten."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"`{arg}` {str(out_dir)!r} already exists and is not an empty folder; choose a new path."
        )
    return out_dir
