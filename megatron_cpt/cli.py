"""Shared entry-point wrapper so every tool reports user errors the same way."""

from __future__ import annotations

import sys
from collections.abc import Callable

from megatron_cpt.errors import UserError


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit 2."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
