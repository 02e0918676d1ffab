"""The avatar bundle's content digest: what ``prepare`` hashed, and a cheap check that it holds.

A render's fingerprint (:mod:`lipsync_ray.workdir.fingerprint`) must change when the avatar's
pixels change, but hashing a 5-minute 720p bundle (7,500 frames, ~27.6 GB of arrays) costs
~16 s of CPU at SHA-256's 1.7 GB/s on a 2-vCPU VM (SHA-NI), more when the files are not in
the page cache: too much for every render. So::

    avatar.json          "content_sha256": {"frames": hex, "crops": hex, "visual_inputs": hex}
                         SHA-256 of each array's rows (the bytes after the .npy header, whose
                         shape and dtype avatar.json fixes), hashed by the bundle writer as the
                         rows stream to disk (no second read)
    .content-stamp.json  per array: size, mtime_ns, ctime_ns and inode as they were when the
                         digest was last known to hold, and the digest

:func:`content_digests` stats the three files (microseconds) and trusts the stamp where all
four values match; otherwise (a copied or touched bundle) it hashes the array again, refuses a
digest that differs from ``avatar.json``'s (the bundle was changed after ``prepare``), and
rewrites the stamp. ``ctime`` cannot be set back by a user, so an array rewritten in place
within the same mtime tick still fails the check.

A bundle prepared before digests existed has no ``content_sha256``: its arrays are hashed on
its first render and the stamp records them (later renders trust it as above). Where the
bundle cannot be written the arrays are hashed on every render, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lipsync_ray.errors import InputError
from lipsync_ray.fileio import write_json

__all__ = ["CONTENT_KEY", "STAMP_NAME", "array_sha256", "content_digests", "write_stamp"]

log = logging.getLogger(__name__)

CONTENT_KEY = "content_sha256"  # in avatar.json: array name -> hex SHA-256 of its rows
STAMP_NAME = ".content-stamp.json"  # a dot name: never staged, uploaded or listed
_BLOCK = 8 << 20  # hashing buffer, bytes
_HEX64 = re.compile(r"[0-9a-f]{64}")


def array_sha256(path: Path) -> str:
    """Hex SHA-256 of an ``.npy`` file's rows: every byte after its header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def write_stamp(root: Path, files: Mapping[str, str], digests: Mapping[str, str]) -> bool:
    """Record that the arrays ``files`` (name -> path relative to ``root``) hold ``digests``
    now. Returns False (and writes nothing) where the bundle cannot be written."""
    entries = {
        name: {"file": rel, "stat": _stat_key(root / rel), "sha256": digests[name]}
        for name, rel in files.items()
    }
    try:
        write_json(root / STAMP_NAME, {"version": 1, "files": entries}, indent=1)
    except OSError as exc:
        log.warning("%s: cannot record the avatar's content digest (%s): its arrays are "
                    "hashed again on every render", root, exc)  # fmt: skip
        return False
    return True


def _read_stamp(root: Path) -> dict:
    try:
        data = json.loads((root / STAMP_NAME).read_text())
        files = data["files"] if data.get("version") == 1 else {}
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # none, or unreadable: the arrays are hashed again


def _recorded(meta: Mapping, meta_path: Path) -> dict[str, str]:
    """``avatar.json``'s content digests (empty for a bundle prepared before them)."""
    recorded = meta.get(CONTENT_KEY, {})
    if not (
        isinstance(recorded, dict)
        and all(isinstance(v, str) and _HEX64.fullmatch(v) for v in recorded.values())
    ):
        raise InputError(
            f"{CONTENT_KEY} must map array names to hex SHA-256 digests", path=meta_path
        )
    return recorded


def content_digests(root: Path, meta: Mapping, meta_path: Path) -> dict[str, str]:
    """The content SHA-256 of each array of the bundle at ``root`` (name -> hex), from the
    stamp where the files are unchanged since it was written, else hashed again.

    Args:
        root: the bundle directory.
        meta: its parsed ``avatar.json`` (already validated by ``Avatar.open``).
        meta_path: the ``avatar.json`` path, for errors.

    Raises:
        InputError: an array no longer holds the rows ``avatar.json`` records a digest for.
    """
    recorded = _recorded(meta, meta_path)
    files: dict[str, str] = dict(meta["files"])
    stamp = _read_stamp(root)
    digests, hashed = {}, []
    for name, rel in sorted(files.items()):
        path = root / rel
        entry = stamp.get(name)
        expected = recorded.get(name)
        if (
            isinstance(entry, dict)
            and entry.get("file") == rel
            and entry.get("stat") == _stat_key(path)
            and entry.get("sha256") == (expected or entry.get("sha256"))
        ):
            digests[name] = entry["sha256"]
            continue
        t0 = time.perf_counter()
        digests[name] = array_sha256(path)
        hashed.append(name)
        log.info("%s: hashed %.1f GB in %.1f s (its stamp did not match)", path,
                 path.stat().st_size / 1e9, time.perf_counter() - t0)  # fmt: skip
        if expected is not None and digests[name] != expected:
            raise InputError(
                f"the array no longer holds what prepare wrote (content SHA-256 "
                f"{digests[name][:12]}..., {meta_path.name} records {expected[:12]}...); "
                "prepare the avatar again",
                path=path,
            )
    if hashed:
        write_stamp(root, files, digests)
    return digests
