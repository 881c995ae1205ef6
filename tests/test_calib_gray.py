"""Grayscale images through a one-channel image processor (the digits ViT's): they stay one
channel; a three-channel processor still gets them expanded to RGB."""

from __future__ import annotations

import numpy as np
import pytest

from squeeze.compress.calibration import processed_pixels


@pytest.mark.parametrize("mean,channels", [([0.5], 1), ([0.5, 0.5, 0.5], 3)])
def test_gray_images_take_the_processors_channel_count(mean, channels):
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=mean, image_std=[0.5] * len(mean))
    gray = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)  # in [0, 1], as sklearn digits / 16
    px = processed_pixels(proc, gray)
    assert px.shape == (3, channels, 8, 8)
    want = (np.round(gray * 255 / gray.max()) / 255 - 0.5) / 0.5  # stretched to 0..255 codes, then normalised
    for c in range(channels):
        assert np.allclose(px[:, c].numpy(), want, atol=1e-5)
