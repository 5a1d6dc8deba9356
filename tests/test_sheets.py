"""The image sheets logged to MLflow: small samples enlarged without inventing pixels, large ones
shrunk, each image captioned, and a caption per image required."""

import numpy as np
import pytest
from PIL import Image

from selfperceptual.pipeline.sheets import sheet


def _images(count, side, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def test_small_images_are_enlarged_by_a_whole_factor_with_no_pixel_invented():
    images = _images(6, 32)
    made = np.asarray(sheet(images, [f"seed {i}: a red circle" for i in range(6)], "a title", columns=4))
    assert made.shape[1] == 6 + 4 * (128 + 6)  # four to a row, 128 px each
    first = np.asarray(images[0])
    y, x = np.argwhere(np.all(made == first[0, 0], axis=-1))[0]  # where the first image's top-left pixel landed
    cell = made[y : y + 128, x : x + 128]
    assert np.array_equal(cell[::4, ::4], first) and np.array_equal(cell[3::4, 3::4], first)  # each pixel a 4 x 4 block


def test_large_images_are_shrunk_and_long_captions_cut_to_their_cell():
    made = sheet(_images(2, 512), ["a caption " * 40, "short"], "a title " * 30, columns=4)
    assert made.width == 6 + 2 * (256 + 6) and made.height < 256 + 200


def test_every_image_needs_its_caption():
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        sheet(_images(3, 32), ["a", "b"], "title")
