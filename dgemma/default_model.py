"""The model used when none is given: the small trained model shipped in the package, else a tiny random one."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

SHIPPED = "dgemma-mini"  # dgemma/assets/dgemma-mini, once trained and committed


def shipped_model_path() -> Path | None:
    path = Path(str(resources.files("dgemma") / "assets" / SHIPPED))
    return path if (path / "config.json").is_file() else None


def default_model_path() -> Path:
    """The shipped checkpoint, or a tiny random checkpoint written once to the user's cache directory."""
    shipped = shipped_model_path()
    if shipped is not None:
        return shipped
    from dgemma.checkpoint.random_init import InitScale, write_random_checkpoint

    cache = Path(os.environ.get("DGEMMA_CACHE", Path.home() / ".cache" / "dgemma"))
    path = cache / "tiny-random-v1"
    if not (path / "config.json").is_file():
        try:
            write_random_checkpoint(path, "tiny", seed=0, scale=InitScale(embed_std=1.0, perturb=0.1))
        except Exception:
            if not (path / "config.json").is_file():  # another process may have won the race
                raise
    return path
