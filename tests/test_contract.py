"""The model contract (lipsync_ray.contract) matches the models the project builds, and its
numbers derive from each other."""

from __future__ import annotations

from lipsync_ray import contract
from lipsync_ray.dev.models import Arch, Size, build_model


def _shapes(model) -> list[tuple]:
    return [
        tuple(d.dim_value if d.dim_value else d.dim_param for d in v.type.tensor_type.shape.dim)
        for v in (*model.graph.input, *model.graph.output)
    ]


def test_the_generator_has_the_contract_shapes():
    visual, audio, out = _shapes(build_model(Arch.UNET328, Size.SMALL))
    size, channels = contract.FRAME_SIZE, contract.VISUAL_CHANNELS
    assert visual[1:] == (channels, size, size)
    assert audio[1:] == (contract.AUDIO_CHANNELS, contract.AUDIO_SIZE, contract.AUDIO_SIZE)
    assert out[1:] == (3, size, size)


def test_the_audio_encoder_has_the_contract_shapes():
    mel, features = _shapes(build_model(Arch.AUDIO_ENCODER, Size.SMALL))
    assert mel[1:] == contract.MEL_SHAPE
    assert features[1:] == (contract.FEATURE_DIM,)


def test_the_audio_window_fills_the_generator_audio_input():
    assert contract.FEATURE_CONTEXT == 2 * contract.AUDIO_CONTEXT
    audio_values = contract.AUDIO_CHANNELS * contract.AUDIO_SIZE**2
    assert audio_values == contract.FEATURE_CONTEXT * contract.FEATURE_DIM
    assert (contract.CROP_SIZE - contract.FRAME_SIZE) % 2 == 0  # the ROI is the crop's centre
