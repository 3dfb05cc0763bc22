"""Atomic output directories for the converters.

Everything goes into a sibling temp directory that is renamed onto the target only after the
last file is written: an interrupted conversion never leaves a directory that looks loadable.
(The safetensors shards themselves are written by ``megatron_cpt.safetensors_io``.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from megatron_cpt.errors import UserError
from megatron_cpt.output_paths import check_output_dir
from megatron_cpt.temp_dirs import remove_stale_temporaries, temp_prefix


class AtomicDirectory:
    """A temp directory beside ``target`` that replaces it on success and vanishes on failure."""

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = check_output_dir(target, "--out")  # before minutes of reading weights
        if self.target.exists() and not overwrite and any(self.target.iterdir()):
            raise UserError(f"--out {self.target}: exists and is not empty (pass --overwrite)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path: Path | None = None

    def __enter__(self) -> Path:
        remove_stale_temporaries(self.target)  # left by a killed earlier run to this --out
        self.path = Path(tempfile.mkdtemp(prefix=temp_prefix(self.target), dir=self.target.parent))
        return self.path

    def __exit__(self, exc_type, exc, tb):
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        os.chmod(self.path, 0o755)  # mkdtemp's 0700 would make the export private
        for file in self.path.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o644)
        if self.target.exists():
            shutil.rmtree(self.target)
        os.replace(self.path, self.target)
        return False
