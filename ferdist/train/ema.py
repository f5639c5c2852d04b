"""An exponential moving average of the weights (Polyak & Juditsky 1992; timm's ``ModelEmaV2``, DeiT's optional
EMA): after every optimizer step, ``ema ← decay · ema + (1 − decay) · weights``.

The average is a whole classifier (`ema_copy`), so it is evaluated, snapshotted and saved exactly as the trained one.
It averages every parameter the optimizer holds, including ones the unfreezing schedule still keeps frozen: those
never change, and ``lerp`` leaves an average that equals its parameter bit-for-bit unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ferdist.train.model import FerClassifier


def ema_copy(raw_model: FerClassifier) -> FerClassifier:
    """A copy of ``raw_model`` to average into, in eval mode (it is only ever scored), frozen as ``raw_model`` is."""
    return copy.deepcopy(raw_model).eval()


def averaged(ema: nn.Module, raw_model: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """``ema``'s parameters that average ``params`` of ``raw_model``, in the same order."""
    names = {id(p): name for name, p in raw_model.named_parameters()}
    mine = dict(ema.named_parameters())
    return [mine[names[id(p)]] for p in params]


@torch.no_grad()
def update_ema(ema_params: list[nn.Parameter], params: list[nn.Parameter], *, decay: float) -> None:
    """One EMA step: ``ema += (1 − decay) · (param − ema)`` for each pair, in one fused kernel per device."""
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
