"""The globals (classes, functions) a checkpoint's pickles reference, read without unpickling.

A weights-only torch.load refuses a file that references any global outside torch's allowlist,
but its error does not always name it (`os.system` is "module posix is blocked", builtins lose
their module, and a plain `pickle.dump` file fails at its first opcode); this names them all as
`module.name`, the way `pickle.load` would import them.
"""
from __future__ import annotations

import _compat_pickle
import pickletools
import re
import zipfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# torch.save's legacy (non-zip) format: magic, protocol, sys info, the object, storage keys.
MAX_PICKLES = 5
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
            "BINUNICODE", "BINUNICODE8"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NAME = re.compile(r"[A-Za-z_][\w.]*")


def referenced_globals(path: str | Path) -> list[str]:
    """Every `module.name` the file's pickles reference, in order, once each (those read before
    any unreadable part: a torn file gives what precedes the tear)."""
    found: list[str] = []
    try:
        with _pickle_stream(Path(path)) as stream:
            for _ in range(MAX_PICKLES):
                _scan(stream, found)
    except Exception:  # noqa: BLE001 - end of the file, or bytes that are no (more) pickle
        pass
    return list(dict.fromkeys(found))


def disallowed_globals(path: str | Path) -> list[str]:
    """The globals of `path` that a weights-only torch.load does not allow: code, or classes."""
    allowed = _weights_only_allowed()
    return [name for name in referenced_globals(path) if name not in allowed]


def _weights_only_allowed() -> set[str]:
    # torch has no public accessor for its default allowlist (torch.serialization's own
    # get_unsafe_globals_in_checkpoint reads these two, and handles zip files only)
    from torch import _weights_only_unpickler as unpickler

    return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())


@contextmanager
def _pickle_stream(path: Path) -> Iterator[IO[bytes]]:
    """torch.save's zip: its data.pkl; any other file but a torn zip: the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if name is None:
                raise ValueError(f"{path}: a zip archive without the data.pkl of torch.save")
            with archive.open(name) as stream:
                yield stream
        return
    with open(path, "rb") as stream:
        if stream.read(2) == b"PK":  # a zip without its directory: no pickle at offset 0
            raise ValueError(f"{path}: a torn zip archive")
        stream.seek(0)
        yield stream


def _scan(stream: IO[bytes], found: list[str]) -> None:
    """Append the globals of the pickle at the stream's position to `found`; read up to STOP."""
    proto, memo = 0, {}
    pushed: deque = deque(maxlen=2)  # the last two pushes: a str, or None for anything else
    for op, arg, _ in pickletools.genops(stream):
        if op.name == "PROTO":
            proto = arg
        elif op.name in ("GLOBAL", "INST"):
            _add(found, *arg.split(" ", 1), proto)
        elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
            _add(found, pushed[-2], pushed[-1], proto)
        if op.name in _PUTS or op.name == "MEMOIZE":
            memo[len(memo) if arg is None else arg] = pushed[-1] if pushed else None
        elif op.name not in ("FRAME", "PROTO"):
            pushed.append(arg if op.name in _STRINGS else memo.get(arg) if op.name in _GETS
                          else None)


def _add(found: list[str], module: object, name: object, proto: int) -> None:
    if not (isinstance(module, str) and isinstance(name, str)
            and _NAME.fullmatch(module) and _NAME.fullmatch(name)):
        return  # not a global's name: bytes that only look like an opcode
    if proto < 3:  # protocol 2 (torch.save's) writes Python 2 names; pickle.load maps them back
        module, name = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
    found.append(f"{module}.{name}")
