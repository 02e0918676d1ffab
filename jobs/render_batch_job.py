"""Entry point for `ray job submit` of a batch: the same arguments as `lipsync-ray render-batch`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/render_batch_job.py AVATAR_DIR jobs.jsonl \
        --model unet328.onnx --audio-encoder audio_encoder.onnx --gpus-per-actor 0.25

The actors start once and render every line of the jobs file; the exit code is 0 when every
job succeeded (see `lipsync_ray.batch`).
"""

from __future__ import annotations

import sys

from lipsync_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["render-batch", *sys.argv[1:]]))
