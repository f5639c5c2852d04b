"""The trained classifier as an MLflow model, registered as ``fer-vitmae`` with the ``champion`` alias.

The logged model carries the checkpoint folder (weights, backbone.json, config.yaml) and this package's code, and is
logged from code (`ferdist.serve.mlflow_model`), so loading it runs that file rather than unpickling an object. Its
``predict`` takes photos or face crops and returns a row per face (`ferdist.serve.serving`).

A new version is registered for every published run; the alias moves only when the version's val accuracy beats
the current champion's (kept as the version tag ``val_acc``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc

from ferdist.errors import FerdistError

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODEL_NAME = "model"
ACC_TAG = "val_acc"
F1_TAG = "val_macro_f1"
SELECT_TAG = "select_by"
SCORE_TAGS = {"val/acc": ACC_TAG, "val/macro_f1": F1_TAG}
"""Version tag holding each selection metric's value (checkpoint.select_by → tag)."""
SYNTHETIC_TAG = "synthetic"
"""Version tag: "true" for a model trained on the SYNTHETIC set (its @champion rule differs)."""


def __getattr__(name: str) -> Any:
    """``ferdist.track.registry.FerModel``, which models logged before models-from-code pickled, resolves to today's
    class;
    imported on that demand only, because defining a PythonModel makes MLflow print a warning in every job."""
    if name == "FerModel":
        from ferdist.serve.serving import FerModel

        return FerModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _requirements() -> list[str]:
    """Pinned to this environment's versions, so the served model runs what was trained and tested."""
    from importlib.metadata import version

    packages = ("torch", "transformers", "numpy", "pandas", "pillow", "pyyaml", "opencv-python-headless")
    return [f"{pkg}=={version(pkg)}" for pkg in packages]


@contextmanager
def using_store(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``tracking_uri`` for a block.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI to this process's environment, which every later
    subprocess (a `jobs/train.py` started from here, Ray workers) would inherit; it is put back afterwards.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def log_model(run_id: str, checkpoint_dir: Path, *, tracking_uri: str) -> str:
    """Logs the checkpoint as a pyfunc model under ``run_id``; returns the model URI."""
    import ferdist
    from ferdist.serve.serving import MODEL_CODE, signature_and_example

    signature, example = signature_and_example()
    with using_store(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint_dir)},
            code_paths=[str(Path(ferdist.__file__).parent)],
            signature=signature,
            input_example=example,
            # Explicit requirements: inferring them would load the model in a subprocess just to list imports.
            pip_requirements=_requirements(),
        )
    return info.model_uri


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    val_acc: float
    champion: bool
    """Whether this version now holds the ``champion`` alias."""
    previous_champion: tuple[str, float] | None
    """(version, val_acc) of the champion before this registration, if there was one."""
    synthetic: bool = False
    """Whether this version was trained on the SYNTHETIC set."""
    select_by: str = "val/acc"
    """The metric ``val_acc`` holds and @champion was decided on (checkpoint.select_by)."""
    existing: bool = False
    """Whether this version was registered before, for the same run and epoch (a finished run re-submitted)."""

    def describe(self) -> str:
        if self.existing:
            where = f"it is @{CHAMPION}" if self.champion else f"@{CHAMPION} is v{(self.previous_champion or '?')[0]}"
            return (f"{self.name} v{self.version} ({self.metric} {self.val_acc:.4f}) already holds this run's best "
                    f"checkpoint, so nothing new was registered; {where}")
        if self.champion:
            verdict = "now @" + CHAMPION
        else:
            version, acc = self.previous_champion or ("?", float("nan"))
            verdict = f"not @{CHAMPION}: v{version} stays, with {self.metric} {acc:.4f}"
            if self.synthetic and acc < self.val_acc:
                verdict += " on real faces (a SYNTHETIC-trained model never replaces a real one)"
        return f"registered {self.name} v{self.version} ({self.metric} {self.val_acc:.4f}), {verdict}"

    @property
    def metric(self) -> str:
        return {"val/acc": "val acc", "val/macro_f1": "val macro-F1"}.get(self.select_by, self.select_by)


def register(
    model_uri: str,
    *,
    name: str,
    val_acc: float,
    tags: dict[str, str],
    tracking_uri: str,
    synthetic: bool = False,
    val_macro_f1: float | None = None,
    select_by: str = "val/acc",
) -> Registration:
    """A new version of ``name``; it becomes ``champion`` only if it beats the current champion.

    A model trained on the SYNTHETIC set (``synthetic``) never takes ``champion`` from one trained on real faces,
    whatever its val accuracy (the drawn faces are far easier), and any real-data model takes it from a SYNTHETIC one.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    with using_store(tracking_uri):
        version_tags = {ACC_TAG: f"{val_acc:.6f}", SYNTHETIC_TAG: str(synthetic).lower(), SELECT_TAG: select_by,
                        **({F1_TAG: f"{val_macro_f1:.6f}"} if val_macro_f1 is not None else {}), **tags}  # fmt: skip
        version = mlflow.register_model(model_uri, name, tags=version_tags).version
    score = val_acc if select_by == "val/acc" else float(val_macro_f1 if val_macro_f1 is not None else "nan")
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        # The champion is compared on the new version's metric (every version is tagged with both).
        previous = (str(current.version), float(current.tags.get(SCORE_TAGS[select_by], "-inf")))
        # Versions from before the tag existed count as real data: a SYNTHETIC model never displaces them.
        previous_synthetic = current.tags.get(SYNTHETIC_TAG) == "true"
    except MlflowException:
        previous, previous_synthetic = None, False
    champion = previous is None or (not synthetic, score) > (not previous_synthetic, previous[1])
    if champion:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return Registration(name, str(version), score, champion, previous, synthetic, select_by)


def find_registered(name: str, *, run_id: str, epoch: int, select_by: str, tracking_uri: str) -> Registration | None:
    """The version of ``name`` already registered from ``run_id``'s epoch ``epoch`` (chosen by ``select_by``), if any:
    re-submitting a finished run must not register its best checkpoint again."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:  # no such registered model yet
        return None
    same = [v for v in versions if v.tags.get("epoch") == str(epoch) and v.tags.get(SELECT_TAG, "val/acc") == select_by]
    if not same:
        return None
    version = max(same, key=lambda v: int(v.version))
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        previous = (str(champion.version), float(champion.tags.get(SCORE_TAGS[select_by], "nan")))
    except MlflowException:
        previous = None
    score = float(version.tags.get(SCORE_TAGS[select_by], "nan"))
    return Registration(name, str(version.version), score, previous is not None and previous[0] == str(version.version),
                        previous, version.tags.get(SYNTHETIC_TAG) == "true", select_by, existing=True)  # fmt: skip


@dataclass(frozen=True)
class ModelRef:
    """Where a model came from: the URI given and, for registry URIs, the version it resolved to."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


def fetch_checkpoint(
    uri: str, dest: Path, *, tracking_uri: str | None = None, endpoint_url: str | None = None
) -> tuple[Path, ModelRef]:
    """The checkpoint folder behind ``uri``, copied under ``dest`` where it is remote.

    ``uri``: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the registry), ``runs:/RUN_ID/model``, a logged
    model folder (with ``MLmodel``), a checkpoint folder (with ``model.pt``), an ``s3://`` checkpoint prefix, or a
    model bundled with ferdist: ``bundled:NAME``, or a bare NAME where no file or folder has that name (its folder,
    used in place: `ferdist.serve.bundled`).

    Raises:
        FerdistError: the URI names no model, or the folder holds neither a checkpoint nor an MLflow model.
    """
    from ferdist.serve import bundled
    from ferdist.train.checkpoint import MODEL_FILE, TRAINED_FILE

    if not uri.strip():
        raise FerdistError(f"the model to load is named by an empty text; give a model URI (models:/NAME@champion), a "
                           f"model folder, or a bundled model's name ({', '.join(bundled.names()) or 'none here'})")
    if uri.startswith(bundled.PREFIX):
        return bundled.folder(uri.removeprefix(bundled.PREFIX)), ModelRef(uri)
    if uri.startswith(("models:/", "runs:/")):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from ferdist.config import TrackingConfig
        from ferdist.track.store import check_server, explained_refusal, missing_sqlite_file
        from ferdist.track.store import tracking_uri as configured_uri

        # The same rule as runs: MLFLOW_TRACKING_URI, else ./mlflow.db.
        tracking_uri = tracking_uri or configured_uri(TrackingConfig())
        if (absent := missing_sqlite_file(tracking_uri)) is not None:
            raise FerdistError(f"cannot load the model {uri}: there is no tracking store at {absent} (nothing has been "
                               "tracked there); run from the directory that trained it, or set MLFLOW_TRACKING_URI "
                               "to the store that holds it")  # fmt: skip
        try:
            check_server(tracking_uri, fix="start it, or set MLFLOW_TRACKING_URI to the store that holds the model")
        except FerdistError as exn:
            raise FerdistError(f"cannot load the model {uri}: {exn}") from None
        ref = ModelRef(uri)
        try:
            if uri.startswith("models:/"):
                name, _, which = uri[len("models:/") :].partition("@")
                client = MlflowClient(tracking_uri)
                if which:
                    version = client.get_model_version_by_alias(name, which)
                else:
                    name, _, number = name.partition("/")
                    version = client.get_model_version(name, number)
                ref = ModelRef(uri, name=name, version=str(version.version), run_id=version.run_id)
            with using_store(tracking_uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
        except MlflowException as exn:
            if exn.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                what = f"registered model '{ref.name or uri[len('models:/'):].split('/')[0].split('@')[0]}'" if (
                    uri.startswith("models:/")) else "the experiment of that run"  # fmt: skip
                with explained_refusal(tracking_uri, action=f"read {uri}", permission=f"READ on {what}"):
                    raise
            first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
            raise FerdistError(f"cannot load the model {uri} from the tracking store {tracking_uri} ({first}); "
                               f"check the name, version or alias in {browse(tracking_uri)}, and that this is the "
                               "store that holds it") from None
        return _checkpoint_in(local, uri), ref
    if uri.startswith("s3://"):
        from ferdist import storage
        from ferdist.train import runs

        fs, path = runs.filesystem_for(uri, endpoint_url=endpoint_url)
        storage.check_reachable(uri, endpoint_url=endpoint_url)
        stored = runs.StoredCheckpoint(path, {}, fs)
        if all(fs.get_file_info(f"{path}/{name}").type != runs.pyarrow.fs.FileType.File
               for name in (MODEL_FILE, TRAINED_FILE)):  # fmt: skip
            raise FerdistError(f"{uri} holds no {MODEL_FILE}; point --model at a model_epoch_* folder of a run")
        return runs.download(stored, dest / "checkpoint"), ModelRef(uri)
    local = Path(uri).expanduser()
    if not local.exists():
        if uri in (known := bundled.names()):
            return bundled.folder(uri), ModelRef(uri)
        raise FerdistError(f"no model at {uri}; pass models:/fer-vitmae@champion, runs:/RUN_ID/model, a "
                           "checkpoint folder, an s3:// checkpoint or a bundled model's name "
                           f"({', '.join(known) or 'none bundled yet'})")  # fmt: skip
    return _checkpoint_in(local, uri), ModelRef(uri)


@dataclass(frozen=True)
class LoadedModel:
    """A classifier read from a model URI, on the CPU in eval mode."""

    model: Any
    """The `ferdist.train.model.FerClassifier`."""
    cfg: Any
    """The `ferdist.config.RunConfig` it was trained with."""
    summary: dict[str, Any] | None
    """Its checkpoint's summary.json (epoch, scores, classes), where it has one."""
    ref: ModelRef


def load_model(uri: str, *, endpoint_url: str | None = None, tracking_uri: str | None = None) -> LoadedModel:
    """The classifier behind ``uri``, resolved as `fetch_checkpoint` resolves it: what every job that takes
    ``--model`` (evaluate, predict, export, a distillation teacher, the benchmarks) loads, the one way.

    Raises:
        FerdistError: as `fetch_checkpoint`, or the weights do not fit a ferdist classifier of FER2013's classes
            (a head of another size is another set of classes).
    """
    import json
    import pickle
    import re
    import tempfile

    from safetensors import SafetensorError

    from ferdist.constants import FER_CLASSES
    from ferdist.train.checkpoint import BACKBONE_FILE, CONFIG_FILE, MODEL_FILE, SAFE_MODEL_FILE, load_classifier
    from ferdist.train.runs import SUMMARY_FILE

    with tempfile.TemporaryDirectory(prefix="ferdist-model-") as tmp:
        folder, ref = fetch_checkpoint(uri, Path(tmp), tracking_uri=tracking_uri, endpoint_url=endpoint_url)
        weights = any((folder / name).is_file() for name in (MODEL_FILE, SAFE_MODEL_FILE))
        if missing := [n for n in (CONFIG_FILE, *([BACKBONE_FILE] if weights else [])) if not (folder / n).is_file()]:
            raise FerdistError(f"{uri} is an incomplete model folder (no {' or '.join(missing)} beside its weights); "
                               "copy the whole folder again: a model folder holds its weights, backbone.json and "
                               "config.yaml")  # fmt: skip
        summary_file = folder / SUMMARY_FILE
        try:
            summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
            model, cfg = load_classifier(folder)
        except (OSError, ValueError, EOFError, IndexError, KeyError, RuntimeError, pickle.UnpicklingError,
                SafetensorError) as exn:  # a file cut short or overwritten fails in whichever reader reads it
            if not weights and not isinstance(exn, RuntimeError):
                raise  # resume state: its frozen weights come from model.pretrained, whose errors are its own
            if not (isinstance(exn, RuntimeError) and "state_dict" in str(exn)):
                said = re.split(r"(?<=\.)\s", str(exn).strip())[0][:200] if str(exn).strip() else type(exn).__name__
                raise FerdistError(f"{uri} holds a damaged model file ({said}); copy the model folder again, or "
                                   "export it again") from None  # fmt: skip
            # load_state_dict's mismatches: weights of another shape
            found = re.search(r"head\.weight: copying a param with shape torch\.Size\(\[(\d+)", str(exn))
            if found is None:
                raise FerdistError(f"{uri} is not a ferdist classifier of the FER2013 classes "
                                   f"({str(exn).splitlines()[0]}); give a model trained by jobs/train.py") from None
            raise FerdistError(f"{uri} answers {found.group(1)} classes, not FER2013's {list(FER_CLASSES)}; give a "
                               "model trained on the same classes") from None  # fmt: skip
    # Every job labels a model's answers in FER_CLASSES order: a model recorded with another order would be
    # mislabelled without a word (checkpoints from before the list was recorded have none: FER's order).
    classes = (summary or {}).get("classes")
    if classes is not None and list(classes) != list(FER_CLASSES):
        raise FerdistError(f"{uri} answers classes {classes}, not FER2013's {list(FER_CLASSES)} in that order; "
                           "ferdist labels every answer in that order, so give a model trained on it")  # fmt: skip
    return LoadedModel(model=model, cfg=cfg, summary=summary, ref=ref)


def browse(tracking_uri: str) -> str:
    """How to look at the models in ``tracking_uri``: its web UI, or `mlflow ui` on that store (a bare `mlflow ui`
    opens ./mlflow.db, which need not be it)."""
    if tracking_uri.startswith(("http://", "https://")):
        from ferdist.config import redact_uri

        return f"the server's web UI ({redact_uri(tracking_uri)})"
    return f"`mlflow ui --backend-store-uri {tracking_uri}`"


def _checkpoint_in(folder: Path, uri: str) -> Path:
    from ferdist.train.checkpoint import MODEL_FILE, SAFE_MODEL_FILE, TRAINED_FILE

    for candidate in (folder, folder / "artifacts" / "checkpoint"):
        # A model checkpoint or a bundle, or resume state (its frozen weights come from model.pretrained again).
        if any((candidate / name).is_file() for name in (MODEL_FILE, SAFE_MODEL_FILE, TRAINED_FILE)):
            return candidate
    raise FerdistError(f"{uri} is neither a ferdist checkpoint (no {MODEL_FILE}) nor a ferdist MLflow model; point at "
                       "a model_epoch_* folder of a run, or pass a models:/ or runs:/ URI")
