"""The work directory: everything a render keeps on disk between its chunks, and its resume.

::

    layout        every name in a work directory (manifest.json, report.json, shards/,
                  segments/, shards/.spare/), defined once
    manifest      Manifest: the fingerprint and every complete chunk (driver-only)
    fingerprint   the render's fingerprint, and the avatar's identity in it
    job           Job, check_job_paths, make_job, open_avatar: a render request's paths
    remote        WorkStore, RemoteWorkDir: a work directory off the local disk
    directory     WorkDir: the one object the driver talks to, from open to finish

The names are imported on first use (PEP 562), because the runtime's leaf modules import
:mod:`.layout` (``report``, ``shards``, ``actors``: the names of the files they write) while
this package's driver parts import them (:mod:`.directory` needs ``report`` and ``shards``,
:mod:`.manifest` needs ``shards``). Importing ``lipsync_ray.workdir.layout`` runs this file
first: with plain imports here, ``import lipsync_ray.shards`` would load :mod:`.directory`
before ``shards`` has defined what it needs.
"""

from __future__ import annotations

import importlib

__all__ = [
    "Job",
    "Joined",
    "Manifest",
    "RemoteWorkDir",
    "WorkDir",
    "WorkStore",
    "avatar_identity",
    "check_job_paths",
    "keep_spare",
    "make_job",
    "open_avatar",
    "render_fingerprint",
    "segment_path",
    "shard_path",
    "spare_dir",
]

_WHERE = {
    "Job": "job",
    "check_job_paths": "job",
    "make_job": "job",
    "open_avatar": "job",
    "Joined": "directory",
    "WorkDir": "directory",
    "Manifest": "manifest",
    "keep_spare": "manifest",
    "RemoteWorkDir": "remote",
    "WorkStore": "remote",
    "avatar_identity": "fingerprint",
    "render_fingerprint": "fingerprint",
    "segment_path": "layout",
    "shard_path": "layout",
    "spare_dir": "layout",
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
