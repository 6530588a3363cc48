"""Image preprocessing without torch: a raw image becomes a uint8 (3, S, S) array, a batch float32 in [0, 1].

    pre = ImagePreprocessor(image_size=224)
    x = pre.load("a.png")                     # uint8 (3, 224, 224); DuoclassError naming the input if unusable
    batch = pre.collate([x, ...])             # {"pixel_values": float32 (B, 3, 224, 224) in [0, 1]}

Mean/std normalisation is not done here: it lives inside the model, so inputs stay in [0, 1] pixel space.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from duoclass.data.clean import DEFAULT_MAX_PIXELS, BadImage, decode_image
from duoclass.data.sources import ByteReader, display
from duoclass.errors import DuoclassError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # for data too large to measure, and pretrained models without their own
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- images ---------------------------------------------------------------------------------
def to_unit(pixels: Any) -> Any:
    """uint8 pixels -> float32 in [0, 1], for a numpy array or a torch tensor on any device: the one place
    duoclass scales pixels (the model's own normalisation comes after, inside the model)."""
    if isinstance(pixels, np.ndarray):
        return pixels.astype(np.float32) / np.float32(255.0)
    return pixels.float() / 255.0


def to_uint8(im: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 (3, S, S), bilinear square resize."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class ImagePreprocessor:
    """Turns raw images (paths, `zip::member` refs, bytes, PIL images, arrays) into model inputs."""

    task = "image"

    def __init__(self, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, path_column: str = "path",
                 label_column: str = "label", max_decode_bytes: int | None = None):
        self.image_size = int(image_size)
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes  # refuse images costlier to decode (a server's limit); None: no limit
        self.path_column, self.label_column = path_column, label_column  # a CSV manifest's columns, as trained
        self._read = ByteReader()

    def __repr__(self) -> str:
        return f"ImagePreprocessor(image_size={self.image_size})"

    def to_config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "resize": "bilinear-square", "scale": "0-1", "channels": "RGB",
                "path_column": self.path_column, "label_column": self.label_column}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], folder: Path | None = None) -> "ImagePreprocessor":
        return cls(int(cfg["image_size"]), path_column=str(cfg.get("path_column", "path")),
                   label_column=str(cfg.get("label_column", "label")))

    def inputs(self) -> dict[str, dict[str, Any]]:
        """The model's input tensors: name -> dtype and shape ("batch" is a dynamic axis)."""
        s = self.image_size
        return {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, s, s], "range": [0.0, 1.0]}}

    def load(self, item: Any) -> np.ndarray:
        """One raw input -> uint8 (3, S, S). Raises DuoclassError naming the input when unusable."""
        if isinstance(item, Image.Image):
            im = self._decode(_png_bytes(item))
        elif isinstance(item, np.ndarray):
            try:
                pil = Image.fromarray(item)
            except (TypeError, ValueError) as e:
                raise DuoclassError(f"array of shape {item.shape} and dtype {item.dtype}: not an image ({e}); "
                                    "pass uint8 (H, W) or (H, W, 3)") from None
            im = self._decode(_png_bytes(pil))
        else:
            ref = item if isinstance(item, str) else os.fspath(item) if isinstance(item, os.PathLike) else None
            if ref is None and not isinstance(item, (bytes, bytearray)):
                raise DuoclassError(f"cannot use {type(item).__name__} as an image; pass a path, bytes or PIL image")
            try:
                data = item if ref is None else self._read(ref)
            except (OSError, KeyError) as e:
                raise DuoclassError(f"{display(str(ref))}: cannot read ({getattr(e, 'strerror', None) or e})") from None
            try:
                im = self._decode(bytes(data))
            except BadImage as e:
                raise DuoclassError(f"{display(ref) if ref else 'image bytes'}: {e}") from None
        return to_uint8(im, self.image_size)

    def _decode(self, data: bytes) -> Image.Image:
        return decode_image(data, self.max_pixels, size=self.image_size, max_bytes=self.max_decode_bytes)

    def warning(self, item: Any, encoded: np.ndarray) -> str | None:
        return None

    def collate(self, items: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """uint8 (3, S, S) images -> {"pixel_values": float32 (B, 3, S, S) in [0, 1]}."""
        return {"pixel_values": to_unit(np.stack(items))}
