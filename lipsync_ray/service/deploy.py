"""The service as a Serve application for ``serve run`` (or a Serve config file), on a cluster
that is already up::

    serve run lipsync_ray.service.deploy:app_builder \\
        argv="AVATARS_DIR --model M --audio-encoder E --state-dir /srv/lipsync [render flags]"

``argv`` takes `lipsync-ray serve`'s arguments, parsed by the same parser and checked the same
way (models, AVATARS_DIR, the token). The HTTP host and port are Serve's (``serve run``'s own
options or the config file), not ``--host``/``--port``; signals are ``serve run``'s: a job cut
off by it stays resumable, but there is no drain. The state directory must be on the node
where the replica runs (a path every node shares, or a one-node cluster).
"""

from __future__ import annotations

import shlex

__all__ = ["app_builder"]


def app_builder(args: dict[str, str]):
    """The Serve application (``RenderService`` bound to its settings) of ``args["argv"]``."""
    from lipsync_ray.cli import build_parser, service_settings_from_args
    from lipsync_ray.service.app import RenderService

    parsed = build_parser().parse_args(["serve", *shlex.split(args.get("argv", ""))])
    return RenderService.bind(service_settings_from_args(parsed))
