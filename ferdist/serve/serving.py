"""The trained classifier as an MLflow pyfunc model: images in, a row per face out.

Input: a DataFrame whose ``image`` column holds encoded images (PNG, JPEG, … any size, grey or colour; base64 text in
JSON), a uint8 array ``[N, H, W]`` or ``[N, H, W, 3]``, or a list of either. Output:
`ferdist.serve.inference.classify`'s table, one row per face. The inference param ``detect`` (``auto`` by default,
``on``, ``off``) says whether images are searched for faces (`ferdist.serve.faces.DETECT_MODES`); ``tta`` (``none``
by default, ``flip``, ``crops``) averages each face's probabilities over test-time views
(`ferdist.serve.inference.TTAMode`).

The model declares no input schema on purpose: MLflow would enforce one column type and refuse arrays with a
message that prints the whole input. The input is checked here instead, row by row: an unreadable image gets its
own ``error`` in the output and the others are still classified; a request with nothing classifiable is refused
with ferdist's sentence (`RequestError`, HTTP 400 through ``mlflow models serve``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ferdist.constants import FACE_SIDE
from ferdist.errors import FerdistError

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
"""The file MLflow logs as the model's code (models from code), so loading the model unpickles nothing."""


class RequestError(MlflowException):
    """A request the model cannot answer, with ferdist's sentence as its whole message.

    MLflow's scoring server rewrites an `MlflowException`'s message to begin with the entire input ("Failed to
    predict data '…'"), and answers any other exception with a generic message plus the server's traceback. This
    one's message cannot be rewritten, so the HTTP 400 body is {"error_code": "INVALID_PARAMETER_VALUE", "message":
    <the sentence>} and nothing else.
    """

    def __init__(self, sentence: str) -> None:
        self._sentence = sentence
        super().__init__(sentence, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:  # type: ignore[override]
        return self._sentence

    @message.setter
    def message(self, value: str) -> None:
        pass  # the scoring server's rewrite (see the class docstring) is dropped


class FerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: images in, `ferdist.serve.inference.COLUMNS` out, a row per face."""

    def load_context(self, context: Any) -> None:
        from ferdist.serve.inference import Predictor
        from ferdist.train.checkpoint import load_classifier

        model, cfg = load_classifier(Path(context.artifacts["checkpoint"]))
        self.predictor = Predictor.of(model, cfg.model)
        self.with_tta: dict[str, Predictor] = {}  # the same model, per TTA mode asked for

    def predictor_for(self, tta: str) -> Any:
        from ferdist.serve.inference import Predictor, check_tta

        mode = check_tta(tta)
        if mode == "none":
            return self.predictor
        if mode not in self.with_tta:
            base = self.predictor
            self.with_tta[mode] = Predictor(base.model, image_size=base.image_size, eval_crop=base.eval_crop,
                                            batch_size=base.batch_size, tta=mode)  # fmt: skip
        return self.with_tta[mode]

    # No type hints here: MLflow would read them as a second, conflicting input schema.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from ferdist.serve.inference import classify, images_from_input

        detect = (params or {}).get("detect", "auto")
        try:
            predictor = self.predictor_for((params or {}).get("tta", "none"))
            images = images_from_input(model_input)
            if not images:
                raise FerdistError("the request holds no images; send at least one in 'image'")
            table = classify(predictor, images, detect=detect)
        except FerdistError as exn:
            raise RequestError(str(exn)) from None
        failed = table["error"] != ""
        if failed.all():  # nothing classifiable: refuse the request rather than answer only with errors
            more = f" (and {failed.sum() - 1} more images like it)" if failed.sum() > 1 else ""
            raise RequestError(table["error"].iloc[0] + more)
        # A row without a face has no probabilities: None, which JSON carries as null (NaN is not JSON). Only then:
        # a table of faces keeps float columns.
        columns = [c for c in table.columns if c.startswith("p_")]
        if table[columns].isna().any().any():
            table[columns] = table[columns].astype(object).where(table[columns].notna(), None)
        return table


def signature_and_example() -> tuple[Any, Any]:
    """No input schema (see the module docstring); the output columns, and ``detect`` and ``tta`` as inference
    params."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from PIL import Image

    from ferdist.serve.inference import COLUMNS

    types = {"image": "long", "face": "long", "x": "long", "y": "long", "w": "long", "h": "long", "label": "string",
             "error": "string"}  # fmt: skip
    outputs = Schema([ColSpec(types.get(c, "double"), c) for c in COLUMNS])
    params = ParamSchema([ParamSpec("detect", "string", "auto"), ParamSpec("tta", "string", "none")])
    face = np.tile(np.linspace(0, 255, FACE_SIDE, dtype=np.uint8), (FACE_SIDE, 1))  # a grey ramp, 48×48
    png = io.BytesIO()
    Image.fromarray(face).save(png, format="PNG")
    return ModelSignature(outputs=outputs, params=params), pd.DataFrame({"image": [png.getvalue()]})
