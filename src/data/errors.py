"""The one error every loader raises for bad or missing data (the message names the file or folder)."""
from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file."""


def missing_root(root: Path, what: str) -> DataError:
    """The error for a dataset that is not where the config looks: which one, the exact path, both fixes."""
    return DataError(f"{what} not found at {Path(root).resolve()}: put it there, or point data.root=/path/to/it "
                     "(datasets live under paths.data_dir: <repo>/data by default, or $NEURAL3D_DATA)")
