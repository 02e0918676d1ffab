"""Entry point for `ray job submit`: the same arguments as `lipsync-ray render`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/render_job.py AVATAR_DIR speech.wav -o out.mp4 \
        --model unet328.onnx --audio-encoder audio_encoder.onnx --gpus-per-actor 0.25

Inside a job, Ray sets RAY_ADDRESS, so the render joins the cluster the job runs on. Paths are
read on the nodes where they are used: on a multi-node cluster put the avatar, the models and
the output's directory on storage every node mounts at the same path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lipsync_ray.cli import add_render_args, config_from_args
from lipsync_ray.errors import LipsyncError
from lipsync_ray.pipeline import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_render_args(parser)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = render(args.avatar, args.audio, args.output, config_from_args(args))
    except LipsyncError as exc:
        if args.debug:
            raise
        print(f"render_job: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(report.summary())
    print(json.dumps({"fps": report.fps, "frames": report.frames, "output": report.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
