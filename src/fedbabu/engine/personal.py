"""Every client's personal state, in memory up to a budget and in files beyond it.

A client's personal state (Ditto's personal model, FedPer's head) never leaves the client, so a
simulated federation holds one per client at once: 10,000 Ditto clients of a ResNet-50 are about
900 GiB, far more than any machine's memory. :class:`PersonalStore` is the mapping the engine keeps
them in: the most recently used states stay in memory up to ``personal_memory`` bytes (the
arrays' bytes; Python's own overhead is not counted), the others live in files, one per client,
in the run folder's ``personal/`` (a temporary folder, removed with the store, for a run without
a folder). A read gives back the arrays it was given, bit for bit (dtype, shape and values), so
where a state lives never changes a result.

The same files are what a checkpoint keeps of the states (:mod:`fedbabu.engine.checkpoint`): a
state file is named after its client and the SHA-256 of its bytes, written once (atomically, with
:func:`fedbabu.files.atomic_write_bytes`) and never changed, and a changed state gets a new file.
So a checkpoint writes only the states that changed since the previous one (the others' files are
already there), and no file that the previous checkpoint references is touched before the new
checkpoint is complete; only then are the files that no checkpoint references any more removed.

The file format is this module's own, rather than ``torch.save``: its bytes are a function of the
arrays alone (no timestamps, no pickle), which the names and checksums above rely on; it holds
any fixed-size numpy dtype; and reading it never runs code. A file is one line
``fedbabu-personal-state 1``, one line of JSON listing each array (name, dtype, shape, where its
bytes start), then the arrays' C-order bytes, each starting at a multiple of 64 bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbabu.errors import UserError
from fedbabu.files import atomic_write_bytes, fsync_folder

Personal = dict[str, np.ndarray]

PERSONAL_FOLDER = "personal"
"""The folder of a run that holds its clients' state files."""

MAGIC = b"fedbabu-personal-state 1\n"
ALIGN = 64
FILE_NAME = re.compile(r"client-(\d+)-([0-9a-f]{16})\.state")
TEMPORARY_NAME = re.compile(r"\.client-\d+-[0-9a-f]{16}\.state\..+")
"""What :func:`~fedbabu.files.atomic_write_bytes` leaves of a state file when the process dies during the write."""


class PersonalStateError(UserError):
    """A personal state file that is missing, damaged or not one this module wrote."""


@dataclass(frozen=True)
class StateFile:
    """Where one client's state lies on disk: a file name in the store's folder, its SHA-256 and size."""

    name: str
    sha256: str
    size: int


def state_bytes(state: Personal) -> int:
    """The memory a state's arrays take, which is what the budget counts."""
    return sum(np.asarray(array).nbytes for array in state.values())


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def encode_state(state: Personal) -> bytes:
    """A state as the bytes of its file; equal states give equal bytes."""
    entries, blocks, offset = [], [], 0
    for name, value in state.items():
        array = np.asarray(value)
        if not isinstance(name, str) or array.dtype.hasobject or array.dtype.fields is not None or \
                array.dtype.itemsize == 0:
            raise TypeError(f"personal state {name!r}: expected a str name and an array of a fixed-size, "
                            f"unstructured dtype, got {array.dtype}")
        data = array.tobytes(order="C")
        entries.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "offset": offset,
                        "bytes": len(data)})
        blocks.append(data + bytes(_aligned(len(data)) - len(data)))
        offset += _aligned(len(data))
    head = MAGIC + json.dumps({"arrays": entries}, separators=(",", ":")).encode() + b"\n"
    return head + bytes(_aligned(len(head)) - len(head)) + b"".join(blocks)


def decode_state(data: bytearray, source: Path) -> Personal:
    """The arrays of a state file's bytes; they are views of ``data`` (writable, as a bytearray is)."""
    if not data.startswith(MAGIC):
        raise PersonalStateError(f"{source}: not a fedbabu personal state file")
    try:
        end = data.index(b"\n", len(MAGIC))
        header = json.loads(bytes(data[len(MAGIC):end]))
        start = _aligned(end + 1)
        state: Personal = {}
        for entry in header["arrays"]:
            dtype, shape = np.dtype(entry["dtype"]), tuple(int(n) for n in entry["shape"])
            count, offset = math.prod(shape), start + int(entry["offset"])
            if count * dtype.itemsize != entry["bytes"] or offset + entry["bytes"] > len(data):
                raise ValueError("array outside the file")
            state[str(entry["name"])] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    except (ValueError, TypeError, KeyError) as exc:
        raise PersonalStateError(f"{source}: damaged personal state file ({exc.__class__.__name__})") from None
    return state


def describe_state(client: int, data: bytes) -> StateFile:
    """The file a state's bytes go to: named after the client and the bytes' SHA-256."""
    digest = hashlib.sha256(data).hexdigest()
    return StateFile(f"client-{int(client):06d}-{digest[:16]}.state", digest, len(data))


def verify_state_file(folder: Path, client: int, file: StateFile) -> None:
    """Check that a referenced state file is there and holds what was written (read in chunks, not kept)."""
    match = FILE_NAME.fullmatch(file.name)
    if match is None or int(match.group(1)) != client:
        raise PersonalStateError(f"{folder / file.name}: not the name of client {client}'s personal state file")
    path = folder / file.name
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise PersonalStateError(f"{path}: client {client}'s personal state file is missing") from None
    except OSError as exc:
        raise PersonalStateError(f"{path}: cannot read client {client}'s personal state ({exc.strerror})") from None
    if digest.hexdigest() != file.sha256:
        raise PersonalStateError(f"{path}: client {client}'s personal state file is damaged (checksum mismatch)")


def _remove_temporary_folder(folder: str, owner: int) -> None:
    # a worker forked from the owner inherits the store, but the folder is its parent's to remove
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _Entry:
    """A client's state: in memory (``state``), in a file (``file``), or both (then they hold the same)."""

    state: Personal | None = None
    file: StateFile | None = None
    size: int = 0


class PersonalStore(MutableMapping[int, Personal]):
    """client -> personal state, used like a dict, holding at most ``memory_budget`` bytes of it in memory.

    When the states in memory exceed the budget, the least recently used ones go to files in
    ``folder`` (created when first needed; without one, a temporary folder removed when the store
    is). The store also knows what a checkpoint needs: which clients changed since the last one
    (:attr:`changed`), every state's file (:meth:`files_for_checkpoint`, which writes only the
    changed states that have none yet), and which files the last checkpoint references
    (:meth:`checkpointed`), which it never deletes.
    """

    def __init__(self, memory_budget: int, folder: Path | None = None) -> None:
        self.memory_budget = int(memory_budget)
        self._folder = Path(folder) if folder is not None else None
        self._entries: dict[int, _Entry] = {}
        self._in_memory: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._memory_bytes = 0
        self._changed: set[int] = set()
        self._checkpointed: set[str] = set()
        self._temporary: weakref.finalize | None = None

    @classmethod
    def open(cls, folder: Path, files: Mapping[int, StateFile], memory_budget: int) -> PersonalStore:
        """The states a checkpoint references, each read from its file when first asked for."""
        store = cls(memory_budget, folder)
        for client, file in sorted(files.items()):
            store._entries[int(client)] = _Entry(file=file)
        store._checkpointed = {file.name for file in files.values()}
        return store

    @property
    def folder(self) -> Path | None:
        """Where the state files go: the run's ``personal/``, a temporary folder, or None before a first spill."""
        return self._folder

    @property
    def memory_bytes(self) -> int:
        """Bytes of state held in memory now (at most the budget once a call returns)."""
        return self._memory_bytes

    @property
    def changed(self) -> frozenset[int]:
        """Clients whose state was set or deleted since the last checkpoint."""
        return frozenset(self._changed)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __contains__(self, client: object) -> bool:
        return client in self._entries

    def __getitem__(self, client: int) -> Personal:
        entry = self._entries[client]
        if entry.state is not None:
            self._in_memory.move_to_end(client)
            return entry.state
        state = self._read(client, entry.file)
        self._keep_in_memory(client, entry, state)
        return state

    def __setitem__(self, client: int, state: Personal) -> None:
        client = int(client)
        old = self._entries.get(client)
        if old is not None:
            self._forget(client, old)
        entry = _Entry()
        self._entries[client] = entry  # a client keeps its place in the order, as in a dict
        self._changed.add(client)
        self._keep_in_memory(client, entry, state)

    def __delitem__(self, client: int) -> None:
        entry = self._entries.pop(client)
        self._forget(client, entry)
        self._changed.add(client)

    def clear(self) -> None:
        """Forget every state without reading any back from its file (as the inherited one would)."""
        for client, entry in self._entries.items():
            self._forget(client, entry)
            self._changed.add(client)
        self._entries.clear()

    def restore(self, saved: Mapping[int, Personal]) -> None:
        """Fill an empty store with a checkpoint's states, as the states of that checkpoint.

        A store of a checkpoint in this store's own folder hands over its files without reading
        them; any other mapping (a version-1 checkpoint embeds its states) is copied state by state.
        Files the checkpoint does not reference (left by a run killed after it) are removed.
        """
        if isinstance(saved, PersonalStore) and saved.folder is not None and self._folder is not None \
                and saved.folder.resolve() == self._folder.resolve():
            for client, entry in saved._entries.items():
                if entry.file is None:
                    self[client] = entry.state
                else:
                    self._entries[client] = _Entry(file=entry.file)
            self._checkpointed = set(saved._checkpointed)
        else:
            for client, state in saved.items():
                self[client] = state
        self.remove_unreferenced()

    def files_for_checkpoint(self) -> dict[int, StateFile]:
        """Every client's file, for a checkpoint to reference; states that have none yet are written first.

        Those are the states changed since the last checkpoint and still in memory: a checkpoint
        writes only them. The folder is fsynced, so the new files outlive a crash that the
        checkpoint referencing them outlives.
        """
        for client, entry in self._entries.items():
            if entry.file is None:
                entry.file = self._write(client, entry.state)
        if self._folder is not None and self._folder.is_dir():
            fsync_folder(self._folder)
        return {client: entry.file for client, entry in sorted(self._entries.items())}

    def checkpointed(self, files: Mapping[int, StateFile]) -> None:
        """A checkpoint referencing ``files`` is complete: nothing has changed since, and older files can go."""
        self._checkpointed = {file.name for file in files.values()}
        self._changed.clear()
        self.remove_unreferenced()

    def remove_unreferenced(self) -> None:
        """Delete the state files that neither the last checkpoint nor a current state needs.

        They are states superseded since, and what a run killed during a checkpoint left behind
        (temporary files of an interrupted write included). Only this module's files are touched;
        the folder itself goes when it is left empty.
        """
        if self._folder is None or not self._folder.is_dir():
            return
        keep = self._checkpointed | {entry.file.name for entry in self._entries.values() if entry.file is not None}
        for path in self._folder.iterdir():
            if path.name not in keep and (FILE_NAME.fullmatch(path.name) or TEMPORARY_NAME.fullmatch(path.name)):
                path.unlink(missing_ok=True)
        if not keep and self._temporary is None:
            with contextlib.suppress(OSError):  # something else lives there: the folder stays
                self._folder.rmdir()

    def close(self) -> None:
        """Remove the temporary folder of a store without a run folder (also done when the store is collected)."""
        if self._temporary is not None:
            self._temporary()

    def _keep_in_memory(self, client: int, entry: _Entry, state: Personal) -> None:
        entry.state, entry.size = state, state_bytes(state)
        self._in_memory[client] = None
        self._memory_bytes += entry.size
        while self._memory_bytes > self.memory_budget and self._in_memory:
            oldest, _ = self._in_memory.popitem(last=False)
            spilled = self._entries[oldest]
            if spilled.file is None:
                spilled.file = self._write(oldest, spilled.state)
            self._memory_bytes -= spilled.size
            spilled.state = None

    def _forget(self, client: int, entry: _Entry) -> None:
        """Drop a replaced or deleted state: its memory, and its file unless the last checkpoint references it."""
        if entry.state is not None:
            del self._in_memory[client]
            self._memory_bytes -= entry.size
        if entry.file is not None and entry.file.name not in self._checkpointed:
            (self._folder / entry.file.name).unlink(missing_ok=True)

    def _write(self, client: int, state: Personal) -> StateFile:
        data = encode_state(state)
        file = describe_state(client, data)
        path = self._ensure_folder() / file.name
        if not path.exists():  # a file's name says what it holds, and files are never changed
            atomic_write_bytes(path, data)
        return file

    def _read(self, client: int, file: StateFile) -> Personal:
        path = self._folder / file.name
        try:
            with open(path, "rb") as source:
                data = bytearray(os.fstat(source.fileno()).st_size)
                source.readinto(data)
        except FileNotFoundError:
            raise PersonalStateError(f"{path}: client {client}'s personal state file is missing") from None
        if len(data) != file.size or hashlib.sha256(data).hexdigest() != file.sha256:
            raise PersonalStateError(f"{path}: client {client}'s personal state file is damaged (checksum mismatch)")
        return decode_state(data, path)

    def _ensure_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="fedbabu-personal-"))
            self._temporary = weakref.finalize(self, _remove_temporary_folder, str(self._folder), os.getpid())
        else:
            self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder
