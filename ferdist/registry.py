"""The trained classifier as an MLflow model, registered as ``fer-vitmae`` with the ``champion`` alias.

The logged model carries the checkpoint folder (weights, backbone.json, config.yaml) and this package's code, and
its ``predict`` takes raw face images: a DataFrame whose ``image`` column holds encoded image bytes (PNG, JPEG, …,
any size, grey or colour), or uint8 arrays. It returns the class name and the seven probabilities per image,
preprocessed exactly as in validation (`ferdist.inference`).

A new version is registered for every published run; the alias moves only when the version's val accuracy beats
the current champion's (kept as the version tag ``val_acc``).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from ferdist.constants import FACE_SIDE

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODEL_NAME = "model"
ACC_TAG = "val_acc"


class FerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: raw images in, ``label`` + ``p_<class>`` columns out."""

    def load_context(self, context: Any) -> None:
        from ferdist.checkpoint import load_classifier
        from ferdist.inference import Predictor

        model, cfg = load_classifier(Path(context.artifacts["checkpoint"]))
        self.predictor = Predictor(model, image_size=cfg.model.image_size)

    # No type hints here: MLflow would read them as a second, conflicting input schema.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from ferdist.inference import as_table, faces_from_input

        return as_table(self.predictor.probabilities(faces_from_input(model_input)))


def signature_and_example() -> tuple[Any, Any]:
    """Input: an ``image`` column of encoded bytes; output: ``label`` and one probability per class."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from PIL import Image

    from ferdist.inference import probability_columns

    inputs = Schema([ColSpec("binary", "image")])
    outputs = Schema([ColSpec("string", "label"), *[ColSpec("double", c) for c in probability_columns()]])
    face = np.tile(np.linspace(0, 255, FACE_SIDE, dtype=np.uint8), (FACE_SIDE, 1))  # a grey ramp, 48×48
    png = io.BytesIO()
    Image.fromarray(face).save(png, format="PNG")
    return ModelSignature(inputs=inputs, outputs=outputs), pd.DataFrame({"image": [png.getvalue()]})


def _requirements() -> list[str]:
    """Pinned to this environment's versions, so the served model runs what was trained and tested."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "numpy", "pandas", "pillow", "pyyaml")]


def log_model(run_id: str, checkpoint_dir: Path, *, tracking_uri: str) -> str:
    """Logs the checkpoint as a pyfunc model under ``run_id``; returns the model URI."""
    import ferdist

    mlflow.set_tracking_uri(tracking_uri)
    signature, example = signature_and_example()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=FerModel(),
            artifacts={"checkpoint": str(checkpoint_dir)},
            code_paths=[str(Path(ferdist.__file__).parent)],
            signature=signature,
            input_example=example,
            # Explicit requirements: inferring them would load the model in a subprocess just to list imports.
            pip_requirements=_requirements(),
        )
    return info.model_uri


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    val_acc: float
    champion: bool
    """Whether this version now holds the ``champion`` alias."""
    previous_champion: tuple[str, float] | None
    """(version, val_acc) of the champion before this registration, if there was one."""

    def describe(self) -> str:
        if self.champion:
            verdict = "now @" + CHAMPION
        else:
            version, acc = self.previous_champion or ("?", float("nan"))
            verdict = f"not @{CHAMPION}: v{version} stays, with val acc {acc:.4f}"
        return f"registered {self.name} v{self.version} (val acc {self.val_acc:.4f}), {verdict}"


def register(model_uri: str, *, name: str, val_acc: float, tags: dict[str, str], tracking_uri: str) -> Registration:
    """A new version of ``name``; it becomes ``champion`` only if ``val_acc`` beats the current champion's."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    version = mlflow.register_model(model_uri, name, tags={ACC_TAG: f"{val_acc:.6f}", **tags}).version
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        previous = (str(current.version), float(current.tags.get(ACC_TAG, "-inf")))
    except MlflowException:
        previous = None
    champion = previous is None or val_acc > previous[1]
    if champion:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return Registration(name, str(version), val_acc, champion, previous)
