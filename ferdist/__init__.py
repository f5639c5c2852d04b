"""ferdist: distributed ViT-MAE fine-tuning on FER2013 (Ray Train/Tune, WebDataset, MLflow).

One subpackage per pipeline stage, each importing only the ones below it (``lint-imports`` checks the contracts in
pyproject.toml): `ferdist.data` → `ferdist.train` → `ferdist.serve` → `ferdist.track` → `ferdist.launch` →
`ferdist.tune` → `ferdist.bench`, on a shared ground of small modules (`config`, `errors`, `console`, `constants`,
`metrics`, `storage`, `outage`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

MOVED = {
    **{m: f"data.{m}" for m in ("images", "shards", "sources", "synth", "sharding", "transforms")},
    **{m: f"train.{m}" for m in ("model", "mae", "optim", "loop", "pretraining", "checkpoint", "runs", "dist",
                                 "backbone_output")},  # fmt: skip
    **{m: f"serve.{m}" for m in ("inference", "faces", "photos", "annotate", "serving", "mlflow_model", "export",
                                 "evaluation", "peers")},  # fmt: skip
    **{m: f"track.{m}" for m in ("tracking", "registry", "model_card", "reports")},
    **{m: f"tune.{m}" for m in ("sweep", "tuning")},
}
"""Modules of the flat layout (before the stage subpackages) → where they live now. Models registered before the move
name the old paths: a pickled ``ferdist.registry.FerModel``, or a logged code file doing ``from ferdist.serving import
FerModel``; they keep loading through `_MovedModules`. (The old ``ferdist.data`` and ``ferdist.launch`` are packages
now;
no registered model names them.)"""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``ferdist.<old>`` as the module it became, the same module object (not a copy)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        old = fullname.removeprefix(f"{__name__}.")
        if old == fullname or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.removeprefix(f'{__name__}.')]}")

    def exec_module(self, module) -> None:  # noqa: ANN001 - already executed under its new name
        pass


# Appended: a module that exists under the name asked for (ferdist.data, the package) is always found first.
sys.meta_path.append(_MovedModules())
