"""Deterministic stand-in pictures for MuseQuest photos, which cannot be redistributed.

A photo name such as `1903-wright-flyer-1-aug9.jpg` names an exhibit (`1903-wright-flyer`), a
photo of it (1) and an augmentation (9). The exhibit fixes a palette, a stripe pattern and a set
of shapes, so each exhibit looks like itself; the photo index nudges shapes and tint, so photos
of one exhibit are similar variants; the augmentation flips, tilts and brightens like the
original data set's augmentation did.

Every number comes from SHA-256 of the name and every pixel from integer arithmetic: no RNG
library, trigonometry or anti-aliased drawing whose output could change between machines or
library versions, so a name gives byte-identical pixels everywhere.
"""

import functools
import hashlib
import re

import numpy as np
from PIL import Image

_NAME = re.compile(r"^(?P<item>.+?)-(?P<photo>\d+)(?:-aug(?P<aug>\d+))?(?:\.\w+)?$")
# Pythagorean triples (cos, sin, hypotenuse): small tilts (about 7.6 to 12.7 degrees) with exact
# rational cos/sin, so rotating needs integers only.
_TILTS = ((112, 15, 113), (84, 13, 85), (60, 11, 61), (40, 9, 41))


def standin_image(image_name: str, size: int = 224) -> Image.Image:
    """The stand-in RGB picture, `size` pixels square, for a photo name: a new image each call."""
    return Image.fromarray(_pixels(image_name, size), mode="RGB")  # a copy: RGB images keep 4 bytes a pixel


# A 224-pixel picture takes 6-20 ms of numpy to draw, and a run reads every row's picture again each epoch (the
# README's demo: 1,120 pictures of 30 names, most of its collation time). The last 128 drawn are kept, read-only:
# 19 MB at 224 pixels.
@functools.lru_cache(maxsize=128)
def _pixels(image_name: str, size: int) -> np.ndarray:
    match = _NAME.match(image_name)
    item, photo, aug = (match["item"], int(match["photo"]), match["aug"]) if match else (image_name, 0, None)
    pixels = _exhibit(item, photo, size)
    if aug is not None:
        pixels = _augment(pixels, _draws(f"aug:{aug}", 4))
    pixels.flags.writeable = False
    return pixels


def _draws(key: str, count: int) -> np.ndarray:
    """`count` bytes (0..255) that depend on `key` alone."""
    chunks = [hashlib.sha256(f"{key}:{i}".encode()).digest() for i in range(count // 32 + 1)]
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)[:count].astype(np.int64)


def _exhibit(item: str, photo: int, size: int) -> np.ndarray:
    own = _draws(f"item:{item}", 64)
    nudge = _draws(f"photo:{item}:{photo}", 32) - 128  # -128..127
    palette = own[:12].reshape(4, 3)
    y, x = np.mgrid[0:size, 0:size]

    # Vertical gradient between two palette colours: the bulk of the picture, so it carries identity.
    top, bottom = palette[0], palette[1]
    image = (top * (size - 1 - y[..., None]) + bottom * y[..., None]) // max(1, size - 1)

    # Diagonal stripes of the third colour over a band whose position the exhibit chooses.
    period = 8 + own[12] % 24
    slope = own[13] % 3 - 1
    band = (y * 4 >= size * (own[14] % 3)) & (y * 4 < size * (own[14] % 3 + 1))
    stripes = band & (((x + slope * y) // period) % 2 == 0)
    image[stripes] = (image[stripes] + palette[2]) // 2

    # Three to six discs and boxes in the fourth colour family; the photo moves them a little.
    for k in range(3 + own[15] % 4):
        cx = (own[16 + k] * size + nudge[k] * size // 12) // 256
        cy = (own[24 + k] * size + nudge[8 + k] * size // 12) // 256
        radius = size * (5 + own[32 + k] % 10) // 100
        colour = (palette[3] + own[40 + 3 * k : 43 + 3 * k] // 4) % 256
        if own[56 + k] % 2:
            shape = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
        else:
            shape = (abs(x - cx) < radius) & (abs(y - cy) < radius * 2 // 3)
        image[shape] = colour

    tint = nudge[16:19] // 16  # -8..7 per channel: another camera, another light
    return np.clip(image + tint, 0, 255).astype(np.uint8)


def _augment(pixels: np.ndarray, draws: np.ndarray) -> np.ndarray:
    if draws[0] % 2:
        pixels = pixels[:, ::-1]
    pixels = _tilt(pixels, _TILTS[draws[1] % len(_TILTS)], clockwise=bool(draws[2] % 2))
    percent = 85 + draws[3] % 31  # brightness 85%..115%
    return np.clip(pixels.astype(np.int64) * percent // 100, 0, 255).astype(np.uint8)


def _tilt(pixels: np.ndarray, triple: tuple[int, int, int], clockwise: bool) -> np.ndarray:
    """Rotate about the centre by nearest neighbour, repeating edge pixels into the corners."""
    cos, sin, hyp = triple
    sin = -sin if clockwise else sin
    size = pixels.shape[0]
    y, x = np.mgrid[0:size, 0:size] - size // 2
    source_x = (cos * x + sin * y) // hyp + size // 2
    source_y = (cos * y - sin * x) // hyp + size // 2
    return pixels[np.clip(source_y, 0, size - 1), np.clip(source_x, 0, size - 1)]
