"""Logging set-up for the command-line entry points (library code only creates loggers)."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """Log mmalign's INFO messages with timestamps; other libraries only at WARNING and above.

    Every process writes its own warnings; INFO messages from mmalign's training and
    evaluation go through Accelerate's logger, which keeps them to the main process.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("mmalign").setLevel(os.environ.get("MMALIGN_LOG_LEVEL", "INFO"))
