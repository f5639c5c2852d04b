"""The model's code as MLflow logs it ("models from code"): loading the model runs this file, which names the
pyfunc class, instead of unpickling an object. `ferdist.track.registry.log_model` logs it with the ferdist package."""

from mlflow.models import set_model

from ferdist.serve.serving import FerModel

set_model(FerModel())
