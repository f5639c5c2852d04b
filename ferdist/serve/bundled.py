"""Bundled models: a trained classifier shipped inside the package, usable right after ``pip install`` with no
training, no tracking store and no registry.

    python jobs/predict.py photo.jpg --model fer2013-vitmae-small        # or --model bundled:fer2013-vitmae-small

    from ferdist.serve import bundled
    from ferdist.serve.inference import classify
    rows = classify(bundled.predictor("fer2013-vitmae-small"), [open("photo.jpg", "rb").read()])  # a row per face

A bundle is the folder ``ferdist/models/<NAME>/`` (package data: a non-editable install carries it), written by
``jobs/export.py --format bundle`` (`write_bundle`) from any model ``--model`` takes. It holds:

* ``model.safetensors``: every weight of the classifier. safetensors, not a pickle: loading it reads tensors and can
  run no code, so a bundle is safe to load from a copy of the repository one did not write;
* ``backbone.json``, ``config.yaml``, ``summary.json``: as in a model checkpoint, so
  `ferdist.train.checkpoint.load_classifier` and every job's ``--model`` take the folder as they take a checkpoint;
* ``MODEL_CARD.md``: what the model is, the data it learnt from and that data's terms, how well it does, and what it
  is not for (`ferdist.track.model_card.bundle_card`);
* ``expected.json``: its probabilities on `CHECK_FACES` fixed faces (`ferdist.serve.export.check_faces`), computed
  from the written files when the bundle was made, and the versions that computed them. `check` reproduces them in
  any process: a bundle that loads differently from how it was made (a damaged file, a changed loader, another torch)
  is caught instead of silently answering otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferdist.constants import FER_CLASSES
from ferdist.errors import FerdistError
from ferdist.files import check_writable
from ferdist.train.checkpoint import BACKBONE_FILE, CONFIG_FILE, SAFE_MODEL_FILE
from ferdist.train.runs import SUMMARY_FILE

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ferdist.config import RunConfig
    from ferdist.serve.inference import Predictor, TTAMode
    from ferdist.train.model import FerClassifier

ROOT = Path(__file__).resolve().parents[1] / "models"
"""Where bundles live: ``ferdist/models``, beside the code, so an installed package finds its own."""
PREFIX = "bundled:"
"""``--model bundled:NAME`` names a bundle explicitly; a bare NAME does too where no file or folder has that name."""
CARD_FILE, EXPECTED_FILE = "MODEL_CARD.md", "expected.json"
CHECK_FACES, CHECK_SEED = 16, 0
SAME_VERSIONS_ATOL = 1e-6
"""The largest |probability difference| to expected.json a bundle may show under the torch and transformers it was
recorded with (CPU float32: only the order of a few sums may differ between machines)."""
OTHER_VERSIONS_ATOL = 1e-4
"""... and under other versions, whose kernels may sum in another order (the ONNX export's limit, for the same
reason)."""
NAME_RULE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def names() -> list[str]:
    """The bundled models' names, sorted: the folders of `ROOT` that hold a ``model.safetensors`` (not the hidden
    ones a write in progress uses)."""
    if not ROOT.is_dir():
        return []
    return sorted(p.name for p in ROOT.iterdir() if NAME_RULE.fullmatch(p.name) and (p / SAFE_MODEL_FILE).is_file())


def folder(name: str) -> Path:
    """The folder of bundled model ``name``.

    Raises:
        FerdistError: no bundle has that name (the sentence lists the ones there are).
    """
    known = names()
    if name not in known:
        raise FerdistError(f"there is no bundled model named {name!r} (bundled: {', '.join(known) or 'none yet'}); "
                           "pass one of those, or a models:/, runs:/, checkpoint folder or s3:// --model")  # fmt: skip
    return ROOT / name


def check_name(name: str) -> str:
    """``name`` if it can name a bundle: a folder name with no path in it, the same on every file system."""
    if not NAME_RULE.fullmatch(name):
        raise FerdistError(f"{name!r} cannot name a bundle; use up to 64 lower-case letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit (e.g. --name fer2013-vitmae-small)")  # fmt: skip
    return name


def check_destination(
    out: Path, *, force: bool, holds: str = "bundle", marker: str = SAFE_MODEL_FILE, fmt: str = "bundle"
) -> None:
    """Refuses an ``out`` that is a file, or a folder holding files that ``force`` does not allow to be replaced: only
    an earlier export of the same kind (``holds``, known by its ``marker`` file; written by ``--format fmt``) is ever
    replaced, never a folder of something else."""
    if out.exists() and not out.is_dir():
        raise FerdistError(f"--out {out} is a file; --format {fmt} writes a folder, so give a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FerdistError(f"{out} already exists; pass --force to replace it, or choose another --out")
        if not (out / marker).is_file():
            raise FerdistError(f"{out} holds files but no {holds} (no {marker}); --force replaces only an earlier "
                               f"{holds}, so choose another --out")  # fmt: skip
    check_writable(out, what="--out", folder=True)  # e.g. a file where a folder of its path should be


# --------------------------------------------------------------------------- using one


@dataclass(frozen=True)
class Bundle:
    """A bundled model, loaded."""

    name: str
    folder: Path
    model: FerClassifier
    """In eval mode."""
    cfg: RunConfig
    """The config of the run that trained it (``cfg.model.image_size`` is what the model sees)."""

    def predictor(self, *, batch_size: int = 256, tta: TTAMode = "none") -> Predictor:
        """A `Predictor` of the model: ``probabilities(faces)``, or pass it to `ferdist.serve.inference.classify`."""
        from ferdist.serve.inference import Predictor

        return Predictor.of(self.model, self.cfg.model, batch_size=batch_size, tta=tta)


def load(name: str, *, device: str | torch.device = "cpu") -> Bundle:
    """Bundled model ``name`` (see `names`) on ``device``."""
    from ferdist.train.checkpoint import load_classifier

    where = folder(name)
    model, cfg = load_classifier(where, map_location=device)
    return Bundle(name=name, folder=where, model=model, cfg=cfg)


def predictor(name: str, *, device: str | None = None, batch_size: int = 256, tta: TTAMode = "none") -> Predictor:
    """A `Predictor` of bundled model ``name``, on CUDA when there is one (as jobs/predict.py; bf16 autocast there,
    so its probabilities differ from expected.json's CPU ones in the third decimal) unless ``device`` says."""
    import torch

    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(name, device=chosen).predictor(batch_size=batch_size, tta=tta)


# --------------------------------------------------------------------------- making one


def write_bundle(
    model: FerClassifier, cfg: RunConfig, out: Path, *, summary: dict[str, Any] | None, card: str, force: bool = False
) -> Path:
    """Writes ``model`` (trained by ``cfg``; ``summary``: its checkpoint's summary.json) as a bundle folder ``out``
    with the model card ``card``, and records its expected probabilities from the written files.

    Everything goes into a hidden folder beside ``out`` first and is renamed into place only when complete, so a
    failure leaves nothing and never damages the bundle it would replace.

    Raises:
        FerdistError: ``out`` cannot be written (see `check_destination`), or ``summary`` orders the classes
            otherwise than `FER_CLASSES`.
    """
    from safetensors.torch import save_file

    from ferdist import __version__
    from ferdist.config import to_yaml

    check_destination(out, force=force)
    classes = (summary or {}).get("classes", list(FER_CLASSES))
    if list(classes) != list(FER_CLASSES):
        raise FerdistError(f"the model's classes are {classes}, not ferdist's {list(FER_CLASSES)}; a bundle answers "
                           "in FER_CLASSES order, so bundle a model trained with it")  # fmt: skip
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exn:
        raise FerdistError(f"cannot write beside --out {out} ({exn.strerror}); choose another --out") from None
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(partial / SAFE_MODEL_FILE), metadata={"format": "pt", "ferdist": __version__})
        # Without "_name_or_path": the folder the backbone was loaded from on the machine that trained it.
        backbone = {k: v for k, v in model.backbone.config.to_dict().items() if k != "_name_or_path"}
        (partial / BACKBONE_FILE).write_text(json.dumps(backbone, indent=1, sort_keys=True))
        (partial / CONFIG_FILE).write_text(to_yaml(cfg))
        if summary is not None:
            (partial / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        (partial / EXPECTED_FILE).write_text(json.dumps(record_expected(partial), indent=1) + "\n")
        (partial / CARD_FILE).write_text(card)
        # mkdtemp's folder is private (0700), and so may the weights file be: a bundle is read by whoever installs it.
        partial.chmod(0o755)
        for file in partial.iterdir():
            file.chmod(0o644)
        put_in_place(partial, out)
    except OSError as exn:  # a full disk, a read-only folder: said as one sentence, and nothing is left behind
        raise FerdistError(f"cannot write the bundle beside {out} ({exn.strerror or exn}); nothing was written, "
                           "choose another --out or free space") from None  # fmt: skip
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def put_in_place(partial: Path, out: Path) -> None:
    """Renames the complete folder ``partial`` to ``out``; an earlier ``out`` is moved aside first and removed only
    once the new one is there (put back if the rename fails)."""
    old = out.with_name(f".{out.name}.old") if out.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        partial.rename(out)
    except OSError as exn:
        if old is not None:
            old.rename(out)
        raise FerdistError(f"cannot move the new bundle to {out} ({exn.strerror}); nothing was replaced") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def versions() -> dict[str, str]:
    """The versions that compute a bundle's probabilities: another torch or transformers may sum in another order."""
    import numpy
    import safetensors
    import torch
    import transformers

    from ferdist import __version__

    return {"ferdist": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": numpy.__version__}  # fmt: skip


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _probabilities(bundle_folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(check faces, the bundle's CPU probabilities on them), loaded as any user loads the folder."""
    from ferdist.serve.export import check_faces
    from ferdist.serve.inference import Predictor
    from ferdist.train.checkpoint import load_classifier

    model, cfg = load_classifier(bundle_folder)
    faces = check_faces(CHECK_FACES, seed=CHECK_SEED)
    return faces, Predictor.of(model, cfg.model, batch_size=CHECK_FACES).probabilities(faces)


def record_expected(bundle_folder: Path) -> dict[str, Any]:
    """expected.json's contents: the probabilities of the model in ``bundle_folder`` on the check faces, the sha256 of
    the faces and of the weights file, and `versions`."""
    faces, probabilities = _probabilities(bundle_folder)
    return {
        "faces": {"source": "ferdist.serve.export.check_faces", "count": CHECK_FACES, "seed": CHECK_SEED,
                  "sha256": _sha256(faces.tobytes())},
        "classes": list(FER_CLASSES),
        "probabilities": probabilities.tolist(),  # float32 values, exact as JSON numbers
        "weights_sha256": _sha256((bundle_folder / SAFE_MODEL_FILE).read_bytes()),
        "recorded_with": versions(),
    }  # fmt: skip


@dataclass(frozen=True)
class Check:
    """A bundle's probabilities now against the ones recorded when it was made."""

    max_abs_diff: float
    atol: float
    """`SAME_VERSIONS_ATOL`, or `OTHER_VERSIONS_ATOL` when torch or transformers differ from the recorded ones."""
    recorded_with: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol  # False for NaN too


def check(bundle_folder: Path) -> Check:
    """Loads the bundle in ``bundle_folder`` on the CPU and measures its probabilities on the check faces against
    its expected.json.

    Raises:
        FerdistError: expected.json is missing or unreadable, the check faces are not the ones it was recorded on,
            or the weights file is not the one it was recorded with.
    """
    path = bundle_folder / EXPECTED_FILE
    try:
        expected = json.loads(path.read_text())
        faces_record, weights_sha, recorded = expected["faces"], expected["weights_sha256"], expected["recorded_with"]
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise FerdistError(f"cannot read {path} ({exn}); re-export the bundle with jobs/export.py --format "
                           "bundle") from None  # fmt: skip
    if _sha256((bundle_folder / SAFE_MODEL_FILE).read_bytes()) != weights_sha:
        raise FerdistError(f"{bundle_folder / SAFE_MODEL_FILE} is not the file {path} was recorded with (its sha256 "
                           "differs); restore it from git, or re-export the bundle")  # fmt: skip
    faces, probabilities = _probabilities(bundle_folder)
    if (faces_record["count"], faces_record["seed"]) != (CHECK_FACES, CHECK_SEED) or (
            _sha256(faces.tobytes()) != faces_record["sha256"]):  # fmt: skip
        raise FerdistError(f"the check faces of this ferdist differ from the ones {path} was recorded on "
                           "(ferdist.data.synth changed); re-export the bundle to record them again")  # fmt: skip
    import numpy as np
    import torch
    import transformers

    diff = float(np.abs(probabilities - np.asarray(expected["probabilities"], dtype=np.float32)).max())
    same = (recorded.get("torch"), recorded.get("transformers")) == (torch.__version__, transformers.__version__)
    return Check(max_abs_diff=diff, atol=SAME_VERSIONS_ATOL if same else OTHER_VERSIONS_ATOL, recorded_with=recorded)
