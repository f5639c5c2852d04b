"""Launch: the driver side of a Ray Train run.

The checks that run on the driver before Ray starts (`preflight`), and the `TorchTrainer` that runs the loops on the
workers, handing each loop its MLflow tracker (`trainer`).

May import: `ferdist.track`, `ferdist.serve`, `ferdist.train`, `ferdist.data` and the shared ground.
"""
