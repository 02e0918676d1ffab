"""The render service (``lipsync-ray serve``): an HTTP API on Ray Serve over warm Renderers.

::

    settings   ServiceSettings and the bearer token
    avatars    avatar names -> bundles in AVATARS_DIR
    jobs       JobState, JobOptions, JobRecord: a job and its per-request options
    store      the job records (SQLite in the state directory)
    warm       warm Renderers per (avatar, settings), least recently used evicted
    manager    the job runner: queue, threads, cancel, drain, resume
    app        the FastAPI routes and the Serve deployment
    server     start Ray and Serve, wait for a signal, drain, stop

Only ``settings`` and ``server`` are imported by the CLI before Ray starts; ``app`` imports
FastAPI and Ray Serve.
"""
