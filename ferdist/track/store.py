"""Where the tracking store is: the one rule for its URI, shared by the tracker and the registry."""

from __future__ import annotations

import os
from pathlib import Path

from ferdist.config import TrackingConfig

DEFAULT_URI = "sqlite:///mlflow.db"
"""The embedded store when nothing is configured: a SQLite file in the working directory."""


def tracking_uri(cfg: TrackingConfig) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute: Ray workers do not run in the driver's directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri
