"""Entry point for `ray job submit`: the same arguments as `lipsync-ray render`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/render_job.py AVATAR_DIR speech.wav -o out.mp4 \
        --model unet328.onnx --audio-encoder audio_encoder.onnx --gpus-per-actor 0.25

Inside a job, Ray sets RAY_ADDRESS, so the render joins the cluster the job runs on. Paths are
read on the nodes where they are used: on a multi-node cluster put the avatar, the models and
the output's directory on storage every node mounts at the same path.
"""

from __future__ import annotations

import sys

from lipsync_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["render", *sys.argv[1:]]))
