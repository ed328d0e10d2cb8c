"""When to show progress, decided in one place, and the bars themselves (tqdm).

Progress shows when standard error is a terminal, and not in logs piped to a file or in tests.
`balancebeam --quiet` sets BALANCEBEAM_PROGRESS=0 and `balancebeam --progress` sets it to 1, so the
choice reaches every command (and a command it starts) without a flag on each.
"""
from __future__ import annotations

import os
import sys

ENV = "BALANCEBEAM_PROGRESS"


def enabled(requested: bool | None = None) -> bool:
    """requested (a command's own --progress/--no-progress) wins; then the environment; then the
    terminal."""
    if requested is not None:
        return bool(requested)
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        return setting in ("1", "true", "yes", "on")
    return sys.stderr.isatty()


def bar(show: bool, total: int | None, desc: str, unit: str = "it", **options):
    """A tqdm bar on standard error, or None when progress is not shown (callers test for None).

    The bar goes when closed (leave=False): a solver that converges early stops short of `total`."""
    if not show:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415  (tqdm only when a bar is shown)

    return tqdm(total=total, desc=desc, unit=unit, **{"leave": False, **options})
