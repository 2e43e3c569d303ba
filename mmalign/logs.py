"""Logging set-up for the command-line entry points (library code only creates loggers)."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """Log mmalign's INFO messages with timestamps; other libraries only at WARNING and above.

    Every process writes its own warnings; INFO messages from mmalign's training and
    evaluation go through Accelerate's logger, which keeps them to the main process.
    """
    rank = os.environ.get("RANK")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # under a multi-process launcher every line names its process, and INFO comes from rank 0 only
    tag = f"[rank {rank}] " if rank is not None and world > 1 else ""
    logging.basicConfig(format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.WARNING)
    level = os.environ.get("MMALIGN_LOG_LEVEL", "INFO") if rank in (None, "0") else "WARNING"
    logging.getLogger("mmalign").setLevel(level)
