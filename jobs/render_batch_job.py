"""Entry point for `ray job submit` of a batch: the same arguments as `lipsync-ray render-batch`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/render_batch_job.py AVATAR_DIR jobs.jsonl \
        --model unet328.onnx --audio-encoder audio_encoder.onnx --gpus-per-actor 0.25

The actors start once and render every line of the jobs file; the exit code is 0 when every
job succeeded (see `lipsync_ray.batch`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lipsync_ray.batch import load_jobs, render_batch
from lipsync_ray.cli import add_render_args, config_from_args
from lipsync_ray.errors import LipsyncError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_render_args(parser, batch=True)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        jobs = load_jobs(args.jobs)
        summary = args.summary or args.jobs.with_name(f"{args.jobs.stem}.summary.json")
        report = render_batch(args.avatar, jobs, config_from_args(args), summary_path=summary)
    except LipsyncError as exc:
        if args.debug:
            raise
        print(f"render_batch_job: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(report.summary())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
