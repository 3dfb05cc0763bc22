"""``python -m megatron_cpt.evaluation.lm_eval_main ...``: lm-eval's own CLI, with our model.

lm-eval discovers models by import-time registration, so its CLI cannot see ``megatron-cpt``
unless something imports the adapter first; this entry point does exactly that and puts our
task folder on the include path, then hands over every flag unchanged.
"""

from __future__ import annotations

import sys

import megatron_cpt.evaluation.lm_eval_adapter  # noqa: F401  (registers "megatron-cpt")
from megatron_cpt.cli import run
from megatron_cpt.evaluation.tasks_runner import TASKS_DIR


def main() -> None:
    """lm-eval's CLI; our refusals (unsafe or broken checkpoints, bad flags) are one line."""
    run(lambda _argv: _main())


def _main() -> None:
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:]
    if argv and argv[0].startswith("--"):
        argv = ["run", *argv]  # lm-eval's own backward-compatible reading of bare flags
    if argv[:1] in (["run"], ["ls"]) and "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
