"""Atomic file writes and the layout of a run folder.

Every file is written to a temporary name in the same folder, flushed to disk and renamed over
the target, so an interrupted run never leaves a half-written ``summary.json`` or ``model.pt``
where a complete one used to be.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbabu.errors import UserError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_folder(folder: Path) -> None:
    """Make renames in a folder durable (a crash right after them must not resurrect the old files)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict without executing code (``weights_only``); damage gives a one-line error."""
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol warning would break the one-line error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable tensor file ({exc.__class__.__name__}); it may be truncated or "
                        "was not written by fedbabu") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return state


def write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def check_output_dir(path: Path, overwrite: bool = False, argument: str = "--out",
                     overwrite_flag: str = "--overwrite") -> None:
    """Refuse a path that is not a folder, or a non-empty folder unless the user said ``--overwrite``.

    ``argument`` and ``overwrite_flag`` name the option as the caller's user wrote it (the Python API
    says ``out=`` and ``overwrite=True``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{argument} {path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{argument} {path}: folder is not empty; pass {overwrite_flag} to replace its run, or "
                        "choose another folder")


def prepare_output_dir(path: Path, overwrite: bool = False) -> Path:
    """Create the run folder after :func:`check_output_dir`'s checks, and prove it is writable."""
    path = Path(path)
    check_output_dir(path, overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
    return path
