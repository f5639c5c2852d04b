"""Typed run configuration: one frozen dataclass per component, validated on construction.

Each component receives only its own sub-config (``build_loader(..., cfg.data)``), never the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    manifest: str = "shards/synthetic"
    """Dataset location: a folder, file:// URL or s3://bucket/prefix holding manifest.json (or the manifest itself)."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph); None uses AWS_ENDPOINT_URL or AWS."""
    loader_workers: int = 2
    """DataLoader worker processes per training worker (each decodes ~40k faces/s)."""
    shuffle_buffer: int = 2048
    """Samples held in the per-loader shuffle buffer (shards are also shuffled per epoch)."""
    max_bad_samples: int = 64
    """Unreadable samples one loader process tolerates per epoch before it stops, naming the shard."""

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("data.manifest must name a dataset folder or manifest.json")
        if self.loader_workers < 0:
            raise ValueError(f"data.loader_workers must be >= 0, got {self.loader_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.max_bad_samples < 0:
            raise ValueError(f"data.max_bad_samples must be >= 0, got {self.max_bad_samples}")
