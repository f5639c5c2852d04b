"""ferdist: distributed ViT-MAE fine-tuning on FER2013 (Ray Train/Tune, WebDataset, MLflow)."""

__version__ = "0.1.0"
