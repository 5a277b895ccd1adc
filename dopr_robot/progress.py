"""Progress bars that stay readable in logs: redrawn live on a terminal, a line every 30 s otherwise."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(*args, enabled: bool = True, **kwargs) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(*args, disable=not enabled, mininterval=0.2 if interactive else 30.0, dynamic_ncols=True, **kwargs)
