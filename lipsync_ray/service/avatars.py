"""Avatar names → bundles: the folders of AVATARS_DIR (a local folder or a storage URI) that
hold an ``avatar.json``.

A request's avatar name never becomes a path: it is looked up in the listing, and only the
listing's own entry is opened. A name that is not listed (``../x``, ``a/b``, a file) is
unknown.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pyarrow.fs as pafs

from lipsync_ray.avatar import META_NAME
from lipsync_ray.errors import InputError
from lipsync_ray.storage import Location, resolve, storage_errors

__all__ = ["AvatarCatalog", "UnknownAvatarError"]

log = logging.getLogger(__name__)

LISTING_TTL_S = 5.0  # a new bundle copied into AVATARS_DIR is seen within this many seconds


class UnknownAvatarError(InputError):
    """No avatar of that name in AVATARS_DIR."""


class AvatarCatalog:
    """The avatar bundles in one folder, listed (and cached for LISTING_TTL_S)."""

    def __init__(self, root: str | Location) -> None:
        self.root = resolve(root)
        self._lock = threading.Lock()
        self._listed: dict[str, Location] = {}
        self._listed_at = float("-inf")
        with storage_errors(self.root, InputError, "cannot list AVATARS_DIR"):
            info = self.root.info()
        if info.type != pafs.FileType.Directory:
            raise InputError("AVATARS_DIR is not a directory", path=self.root)

    def names(self) -> list[str]:
        """The avatars' names, sorted."""
        return sorted(self._listing())

    def location(self, name: str) -> Location:
        """The bundle named ``name``; raises UnknownAvatarError when it is not listed."""
        found = self._listing().get(name)
        if found is None:
            found = self._listing(refresh=True).get(name)
        if found is None:
            raise UnknownAvatarError(f"unknown avatar {name!r}")
        return found

    def frame_count(self, name: str) -> int:
        """The bundle's frame count, from its ``avatar.json``."""
        meta = self.location(name).join(META_NAME)
        with (
            storage_errors(meta, InputError, "reading"),
            meta.filesystem.open_input_stream(meta.path) as f,
        ):
            data = json.loads(f.read().decode())
        return int(data["frame_count"])

    def _listing(self, *, refresh: bool = False) -> dict[str, Location]:
        with self._lock:
            now = time.monotonic()
            if refresh or now - self._listed_at > LISTING_TTL_S:
                self._listed, self._listed_at = self._list(), now
            return self._listed

    def _list(self) -> dict[str, Location]:
        fs, root = self.root.filesystem, self.root
        with storage_errors(root, InputError, "listing"):
            entries = fs.get_file_info(pafs.FileSelector(root.path, recursive=False))
            dirs = [e for e in entries if e.type == pafs.FileType.Directory]
            metas = fs.get_file_info([f"{e.path.rstrip('/')}/{META_NAME}" for e in dirs])
        found = {}
        for entry, meta in zip(dirs, metas, strict=True):
            if meta.type == pafs.FileType.File and not entry.base_name.startswith("."):
                found[entry.base_name] = root.join(entry.base_name)
        return found
