"""Content identity of files: sha256 of the bytes, hashed once per process per (size, mtime)
and, for multi-gigabyte bases, remembered across runs in a small JSON store."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sdlora.io import atomic_write_text

# A pure cache: keyed by (real path, size, mtime), it returns what _sha256 would compute for an
# unchanged file, so nothing but speed depends on it (a changed file has a new key).
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, hashed once per process while its size and mtime stay the same
    (`sdlora run` asks for every image in the builder, the up-to-date check and the trainer)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(path)
    return _DIGESTS[key]


def stored_digest(path: Path, store: Path) -> str:
    """`file_digest`, remembered across runs in the JSON file `store` by (path, size, mtime), so
    the identity of a multi-gigabyte base costs one hash per change, not one per run."""
    st = os.stat(path)
    key, stamp = os.path.realpath(path), [st.st_size, st.st_mtime_ns]
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
        entry = known.get(key)
    except (OSError, ValueError, AttributeError):  # none yet, or damaged: it is only a cache
        known, entry = {}, None
    if isinstance(entry, list) and entry[:2] == stamp and isinstance(entry[-1], str):
        _DIGESTS.setdefault((key, *stamp), entry[-1])
        return entry[-1]
    digest = file_digest(path)
    known = known if isinstance(known, dict) else {}
    known[key] = [*stamp, digest]
    atomic_write_text(store, json.dumps(known, indent=1))
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
