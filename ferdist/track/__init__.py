"""Track: MLflow.

The tracker each run's rank 0 logs to, run finalisation (reports, model card, confusion matrix), and the model
registry (`fer-vitmae@champion`): registering a trained checkpoint as a servable model and fetching it back.

May import: `ferdist.serve` (the served model's code), `ferdist.train`, `ferdist.data` and the shared ground.
"""
