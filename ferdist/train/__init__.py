"""Train: the model and the per-worker loops.

The ViT-MAE classifier and the MAE pretraining model, the optimiser and its schedule, the fine-tuning and pretraining
loops that Ray Train runs on every worker, checkpoints (best models and resume state), the layout of a run's folder,
and the pretrained backbone's output folder.

May import: `ferdist.data` and the shared ground. It knows nothing of MLflow or of Ray's driver side: the loop is
handed a `tracker.Tracker` factory by `ferdist.launch`.
"""
