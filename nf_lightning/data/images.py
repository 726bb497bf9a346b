"""Reading image files (from folders or a tar archive) and decoding them with PIL into one uint8 array.

>>> import io, numpy as np
>>> from PIL import Image
>>> png = io.BytesIO(); Image.new("RGB", (64, 64), (255, 0, 0)).save(png, "PNG")
>>> decode_images([("red.png", png.getvalue())], size=32, resize=True)[0, :, 0, 0].tolist()
[255, 0, 0]
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

ImageSource = Path | bytes
"""An image file on disk, or its bytes (e.g. read from an archive)."""


def is_image_name(name: str) -> bool:
    """Whether ``name`` has an image file suffix (case-insensitive)."""
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def decode_images(items: Sequence[tuple[str, ImageSource]], size: int, *, resize: bool) -> np.ndarray:
    """Decode ``(name, source)`` pairs into a uint8 ``(N, 3, size, size)`` array, RGB.

    With ``resize`` every image is resized to ``size`` (bilinear with antialiasing,
    as torchvision's ``Resize`` on PIL images); without it, an image of another
    size is an error naming the file.
    """
    out = np.empty((len(items), 3, size, size), dtype=np.uint8)
    for i, (name, source) in enumerate(items):
        try:
            out[i] = _decode_one(name, source, size, resize)
        except OSError as err:
            raise ValueError(f"{name}: cannot decode the image ({err})") from err
    return out


def _decode_one(name: str, source: ImageSource, size: int, resize: bool) -> np.ndarray:
    with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            if not resize:
                width, height = image.size
                raise ValueError(f"{name}: expected a {size}x{size} image, got {width}x{height}")
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image).transpose(2, 0, 1)


def read_tar_images(archive: Path) -> dict[str, bytes]:
    """Bytes of every image file in a tar archive, keyed by path in the archive (nothing unpacked to disk)."""
    images = {}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            if member.isfile() and is_image_name(member.name):
                data = tar.extractfile(member)
                assert data is not None  # regular files always have data
                images[PurePosixPath(member.name).as_posix().removeprefix("./")] = data.read()
    return images


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def listing_key(files: Iterable[Path]) -> str:
    """Hex sha256 of each file's path, size and mtime: changes when a file is added, removed or rewritten."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
