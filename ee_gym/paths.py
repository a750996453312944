"""Where ee_gym keeps its files and finds its data.

Two environment variables steer it:

- ``EE_GYM_HOME``: ee_gym's own cache (checkpoints, runs); default ``~/.cache/ee_gym``.
- ``EE_GYM_DATA``: a folder holding offline copies of the benchmark data (``glue/<TASK>/train.tsv``
  and ``dev.tsv``). When unset, the data comes from the Hugging Face hub.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EE_GYM_HOME"
OFFLINE_ENV = "HF_HUB_OFFLINE"
DATA_ENV = "EE_GYM_DATA"
DEFAULT_HOME = "~/.cache/ee_gym"


def home() -> Path:
    """ee_gym's cache folder: ``$EE_GYM_HOME``, else ``~/.cache/ee_gym``. It is not created here."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The offline data folder to read, or None to load from the Hugging Face hub.

    The explicit ``data_dir`` argument wins, then ``$EE_GYM_DATA``; an empty value counts as unset.
    The folder is returned absolute (a relative value is taken against the working directory), so
    errors name the folder actually tried. A folder that is named but does not exist raises
    :class:`FileNotFoundError`.
    """
    if data_dir is not None and str(data_dir) != "":
        raw, source = data_dir, "the data_dir argument"
    elif os.environ.get(DATA_ENV):
        raw, source = os.environ[DATA_ENV], f"${DATA_ENV}"
    else:
        return None
    given = Path(raw).expanduser()
    path = Path(os.path.abspath(given))  # a relative value: against the working directory
    if not given.is_absolute():
        source += f" = {str(raw)!r}, resolved against the working directory {os.getcwd()!r}"
    if not path.is_dir():
        raise FileNotFoundError(
            f"Data folder {str(path)!r} (from {source}) does not exist or is not a folder. Either set "
            f"{DATA_ENV} or pass data_dir= to a folder holding glue/<TASK>/train.tsv and dev.tsv "
            f"(e.g. glue/RTE/train.tsv), or leave both unset to download the data from the Hugging Face hub."
        )
    return path


def hub_offline() -> bool:
    """True when ``$HF_HUB_OFFLINE`` forbids the Hugging Face hub ("1", "true", "yes", "on")."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
