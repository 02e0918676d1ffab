"""The models' contract: the shapes the audio encoder and the UNet-328 generator are trained for,
said once (docs/model-and-audio.md §2, §3). Every module that builds, checks, feeds or reads
a model takes its numbers from here.
"""

from __future__ import annotations

__all__ = [
    "AUDIO_CHANNELS",
    "AUDIO_CONTEXT",
    "AUDIO_SIZE",
    "CROP_SIZE",
    "FEATURE_CONTEXT",
    "FEATURE_DIM",
    "FRAME_SIZE",
    "MEL_SHAPE",
    "VISUAL_CHANNELS",
]

# Audio encoder: one window of 80 mel bands x 16 mel frames (200 ms) in, 512 features out.
MEL_SHAPE = (1, 80, 16)
FEATURE_DIM = 512
# Generator audio input: output frame i sees feature rows [i - 8, i + 8), 16 x 512 = 8192
# values, reshaped to 32 x 16 x 16 (AUDIO_CHANNELS x AUDIO_SIZE x AUDIO_SIZE).
AUDIO_CONTEXT = 8
FEATURE_CONTEXT = 2 * AUDIO_CONTEXT
AUDIO_SIZE = 16
AUDIO_CHANNELS = FEATURE_CONTEXT * FEATURE_DIM // (AUDIO_SIZE * AUDIO_SIZE)
# Generator visual input and output: a 320x320 ROI (the centre of a 328x328 face crop),
# input ROI + masked ROI, BGR each.
CROP_SIZE = 328
FRAME_SIZE = 320
VISUAL_CHANNELS = 6
