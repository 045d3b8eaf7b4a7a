"""The one start method of the project's process pools (converters, file checks, record loading)."""

from __future__ import annotations

import multiprocessing
import sys


def process_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: a converter defined in a script loaded by path reaches the workers, and
    nothing is imported again per worker; spawn elsewhere (fork is unsafe on macOS), which needs
    every worker function importable by name."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
