"""The files of a ``tiny-imagenet-200/`` layout, from an unpacked folder or read from an archive.

Nothing is unpacked to disk: an archive's wanted members (``wnids.txt``, the
validation annotations, the train and validation images; not the unlabelled
test images) are read into memory.

Example:
    >>> is_wanted(("tiny-imagenet-200", "val", "images", "val_0.JPEG")), is_wanted(("test", "images", "t.JPEG"))
    (True, False)
"""

from __future__ import annotations

import gzip
import tarfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from nf_lightning.data.images import ImageSource, is_image_name

FOLDER_NAME = "tiny-imagenet-200"
WNIDS = "wnids.txt"
ANNOTATIONS = "val/val_annotations.txt"
VAL_IMAGES = "val/images"


class LayoutTree(ABC):
    """Files of a ``tiny-imagenet-200/`` layout, by posix path relative to its root."""

    where: str
    """The root, for messages."""

    def describe(self, name: str) -> str:
        return f"{self.where}/{name}"

    @abstractmethod
    def read_text(self, name: str) -> str:
        """The text of the file ``name``."""

    @abstractmethod
    def images_in(self, folder: str) -> list[str]:
        """Sorted names of the image files directly in ``folder`` (empty if there is none)."""

    @abstractmethod
    def source(self, name: str) -> ImageSource:
        """The image file ``name``, as a path or its bytes."""


class FolderTree(LayoutTree):
    def __init__(self, root: Path) -> None:
        self.root, self.where = root, str(root)

    def read_text(self, name: str) -> str:
        return (self.root / name).read_text()

    def images_in(self, folder: str) -> list[str]:
        directory = self.root / folder
        if not directory.is_dir():
            return []
        return sorted(f"{folder}/{path.name}" for path in directory.iterdir() if is_image_name(path.name))

    def source(self, name: str) -> ImageSource:
        return self.root / name


class ArchiveTree(LayoutTree):
    def __init__(self, members: Mapping[str, bytes], where: str) -> None:
        self.members, self.where = members, where
        self._folders: dict[str, list[str]] = defaultdict(list)
        for name in members:
            if is_image_name(name):
                self._folders[str(PurePosixPath(name).parent)].append(name)

    def read_text(self, name: str) -> str:
        if name not in self.members:
            raise ValueError(
                f"{self.describe(name)} is missing: expected {WNIDS}, train/<wnid>/images/*.JPEG, "
                f"{VAL_IMAGES}/*.JPEG and {ANNOTATIONS} in the archive"
            )
        return self.members[name].decode()

    def images_in(self, folder: str) -> list[str]:
        return sorted(self._folders.get(folder, []))

    def source(self, name: str) -> ImageSource:
        return self.members[name]


def is_wanted(parts: tuple[str, ...]) -> bool:
    """Whether an archive member is one the data module reads (the unlabelled test/ images are not)."""
    if parts[-1] in ("wnids.txt", "val_annotations.txt"):
        return True
    if not is_image_name(parts[-1]) or len(parts) < 3 or parts[-2] != "images":
        return False
    return parts[-3] == "val" or (len(parts) >= 4 and parts[-4] == "train")


def archive_members(archive: Path, stop_at_wnids: bool = False) -> dict[str, bytes]:
    """``{path in archive: bytes}`` of the members ``is_wanted`` keeps (zip or tar; nothing unpacked to disk).

    With ``stop_at_wnids``, only the first ``wnids.txt`` (a tar is read up to it).
    """
    keep = (lambda parts: parts[-1] == WNIDS) if stop_at_wnids else is_wanted
    members: dict[str, bytes] = {}
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():
                    name = PurePosixPath(info.filename).as_posix().removeprefix("./")
                    if not info.is_dir() and keep(PurePosixPath(name).parts):
                        members[name] = zipped.read(info)
                        if stop_at_wnids:
                            break
            return members
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).as_posix().removeprefix("./")
                if member.isfile() and keep(PurePosixPath(name).parts):
                    data = tar.extractfile(member)
                    assert data is not None  # regular files always have data
                    members[name] = data.read()
                    if stop_at_wnids:
                        break
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{archive}: cannot read the archive ({err})") from err
    return members


def archive_root(names: Iterable[str], archive: Path) -> str:
    """The folder of the archive's one ``wnids.txt`` (``""`` at the top), with a trailing slash."""
    roots = sorted(str(PurePosixPath(name).parent) for name in names if PurePosixPath(name).name == WNIDS)
    if len(roots) != 1:
        found = "no wnids.txt" if not roots else f"{len(roots)} wnids.txt files ({', '.join(roots)})"
        raise ValueError(
            f"{archive}: expected one {FOLDER_NAME}/{WNIDS} next to train/ and val/, found {found}"
        )
    return "" if roots[0] == "." else roots[0] + "/"


def archive_tree(archive: Path) -> ArchiveTree:
    members = archive_members(archive)
    root = archive_root(members, archive)
    inside = {name.removeprefix(root): data for name, data in members.items() if name.startswith(root)}
    return ArchiveTree(inside, f"{archive}:{root.rstrip('/') or '.'}")
