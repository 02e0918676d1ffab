"""The work directory: everything a render keeps on disk between its chunks, and its resume.

::

    layout        every name in a work directory (manifest.json, report.json, shards/,
                  segments/, shards/.spare/), defined once
    manifest      Manifest: the fingerprint and every complete chunk (driver-only)
    fingerprint   the render's fingerprint, and the avatar's identity in it
    job           Job, check_job_paths, make_job, open_avatar: a render request's paths
    remote        WorkStore, RemoteWorkDir: a work directory off the local disk
    directory     WorkDir: the one object the driver talks to, from open to finish

This file imports nothing: import each name from the module that defines it
(``from lipsync_ray.workdir.directory import WorkDir``). The runtime's leaf modules
(``report``, ``shards``, ``actors``) import :mod:`.layout`, which runs this file first, while
:mod:`.directory` and :mod:`.manifest` import those leaves; re-exports here would close that
cycle.
"""
