"""Distillation teachers (`distill.teacher`), loaded from wherever evaluate.py loads a model, or the `fer` peer.

The driver calls `check_teachers` before Ray starts (a teacher that does not exist, cannot be reached, or answers other
classes is one sentence then, with nothing written); each worker calls `make_teacher`, bound into its entry point by
`ferdist.launch.trainer`, to load the same models onto its device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ferdist.config import PEER_TEACHER, RunConfig
from ferdist.errors import FerdistError
from ferdist.train.distill import Member, Teacher, grey_unit, resized

PEER_CACHE = Path.home() / ".cache" / "ferdist" / "peers"


@dataclass(frozen=True)
class TeacherInfo:
    """What a row or a run records about one teacher: its URI and what it learnt from."""

    uri: str
    saw: str
    """The data the teacher was trained on (its manifest and split), or the peer's provenance."""


def load_member(uri: str, cfg: RunConfig) -> tuple[Member, TeacherInfo]:
    """One teacher, on the CPU, checked to answer FER2013's seven classes in FER2013's order.

    Raises:
        FerdistError: the URI names no model, cannot be reached, or its classes differ from ferdist's.
    """
    if uri == PEER_TEACHER:
        from ferdist.serve.peers import PEER_SAW, MiniXception, fer_weights

        try:
            model = MiniXception(fer_weights(PEER_CACHE))
        except FerdistError as exn:
            raise FerdistError(f"distill.teacher {uri}: {exn}") from None
        side = model.input_size

        def to_peer(inputs: torch.Tensor) -> torch.Tensor:
            # fer's own preprocessing, from the student's input: grey, resized to its 64 px, scaled to [-1, 1].
            x = F.interpolate(grey_unit(inputs), size=(side, side), mode="bilinear", align_corners=False)
            return (x - 0.5) * 2.0

        return Member(model, to_peer, name=uri, answers_probabilities=True), TeacherInfo(uri, PEER_SAW)
    from ferdist.track.registry import load_model
    from ferdist.track.store import tracking_uri

    try:
        loaded = load_model(uri, endpoint_url=cfg.data.endpoint_url, tracking_uri=tracking_uri(cfg.tracking))
    except FerdistError as exn:  # "URI answers 5 classes…" reads on as "distill.teacher URI answers 5 classes…"
        said = str(exn) if str(exn).startswith(uri) else f"{uri}: {exn}"
        raise FerdistError(f"distill.teacher {said}") from None
    # load_model refused a head of another size and a recorded class order other than FER2013's.
    model, teacher_cfg = loaded.model, loaded.cfg
    saw = f"{teacher_cfg.data.manifest} (train split; its epoch picked on val) from {teacher_cfg.model.pretrained}"
    return Member(model, resized(teacher_cfg.model.image_size), name=uri), TeacherInfo(uri, saw)


def check_teachers(cfg: RunConfig) -> list[TeacherInfo]:
    """On the driver, before Ray starts: every teacher loads and answers the right classes; what each one saw."""
    return [load_member(uri, cfg)[1] for uri in cfg.distill.teacher] if cfg.distill.on else []


def make_teacher(cfg: RunConfig, device: torch.device) -> Teacher:
    """The run's teacher ensemble on ``device`` (a worker's `ferdist.train.distill.TeacherFactory`)."""
    return Teacher([load_member(uri, cfg)[0] for uri in cfg.distill.teacher]).to(device)
