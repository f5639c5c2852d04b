"""The model card registered with every `fer-vitmae` version: what it was trained on, how well it does per class
(the weak classes named), what it is for, and the risks of facial-expression recognition.

Written at registration from the run's config and its best checkpoint's validation confusion matrix;
``jobs/evaluate.py`` appends the test results when it evaluates the version. A bundled model
(`ferdist.serve.bundled`) gets the same sections in its ``MODEL_CARD.md`` (`bundle_card`), with the terms of the data
it learnt from: the card travels with the weights where no registry does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferdist.config import RunConfig
from ferdist.constants import FER_CLASSES, SPLITS
from ferdist.data.shards import Manifest
from ferdist.metrics import report_from_confusion


def results_section(confusion: Any, *, heading: str) -> str:
    """A Markdown section: accuracy, macro-F1, a per-class table and the weakest classes by F1, named."""
    report = report_from_confusion(np.asarray(confusion))
    rows = ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for i, name in enumerate(FER_CLASSES):
        rows.append(f"| {name} | {report.precision[i]:.3f} | {report.recall[i]:.3f} | {report.f1[i]:.3f} | "
                    f"{report.support[i]} |")  # fmt: skip
    weakest = sorted(range(len(FER_CLASSES)), key=lambda i: report.f1[i])[:2]
    weak = " and ".join(f"{FER_CLASSES[i]} (F1 {report.f1[i]:.3f}, recall {report.recall[i]:.3f})" for i in weakest)
    return "\n".join([
        f"## {heading}", "",
        f"Accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} on {sum(report.support)} faces.", "",
        *rows, "",
        f"Weakest classes: {weak}. Expect these to be confused most; do not rely on them alone.", "",
    ])  # fmt: skip


SYNTHETIC_WARNING = (
    "**Trained on SYNTHETIC faces, not FER2013.** The shards hold ferdist's generated drawings (`jobs/shard.py "
    "--source synthetic`), whose mouth, brows and eyes differ by class so the pipeline can be tested without a "
    "download. The accuracy below says nothing about real faces: do not use this model on people."
)


def data_section(manifest_uri: str, manifest: Manifest | None) -> list[str]:
    """What the model was trained and selected on, from the shards' own manifest (never assumed to be FER2013)."""
    if manifest is None:
        return [f"Shards `{manifest_uri}` (their manifest could not be read when this card was written).", ""]
    source = manifest.source
    order = sorted(manifest.splits, key=lambda name: (SPLITS.index(name) if name in SPLITS else len(SPLITS), name))
    counts = ", ".join(f"{name} {manifest.splits[name].samples:,}" for name in order)
    lines = [f"Shards `{manifest_uri}` from `{source.name}` ({source.kind}, sha256 {source.sha256[:16]}…): {counts}.",
             ""]  # fmt: skip
    if source.synthetic:
        return lines
    if source.kind == "kaggle-csv":
        lines += [
            "FER2013 (Goodfellow et al. 2013, web-scraped 48×48 grey faces): train = Training, val = PublicTest "
            "(used to pick the epoch and the sweep's best trial), test = PrivateTest (reported by jobs/evaluate.py "
            "only). Labels are crowd-annotated and noisy (human accuracy is about 65 %); Disgust is 1.5 % of the "
            "training faces.", "",
        ]  # fmt: skip
    else:
        lines += ["val picks the epoch and the sweep's best trial; test is reported by jobs/evaluate.py only.", ""]
    return lines


def model_card(
    cfg: RunConfig, *, best: dict[str, Any], version: str | None = None, manifest: Manifest | None = None
) -> str:
    """The card for a model trained by ``cfg`` whose best checkpoint's summary.json is ``best``, on the shards whose
    manifest is ``manifest``."""
    pretrained = cfg.model.pretrained
    if pretrained.startswith("random:"):
        init = (f"**randomly initialised** (`{pretrained}`): not pretrained, so these numbers say nothing about what "
                "the pretrained recipe reaches")  # fmt: skip
    elif pretrained.startswith("facebook/vit-mae"):
        init = f"fine-tuned from `{pretrained}` (ImageNet-pretrained ViT-MAE)"
    else:  # e.g. a backbone jobs/pretrain.py wrote: its images are whatever that run read, not ImageNet's
        init = f"fine-tuned from `{pretrained}`"
    title = f"# {cfg.tracking.registered_model}" + (f" v{version}" if version else "")
    if manifest is not None and manifest.source.synthetic:
        title += " (SYNTHETIC data)"
    blocks = cfg.model.freeze_blocks
    frozen = f"embeddings and blocks 0–{blocks - 1} frozen" if blocks else "every block trained"
    synthetic = [SYNTHETIC_WARNING, ""] if manifest is not None and manifest.source.synthetic else []
    return "\n".join([
        title, "",
        *synthetic,
        f"A facial-expression classifier (7 classes: {', '.join(FER_CLASSES)}) for cropped, roughly frontal face "
        f"images. Backbone: ViT-MAE, {init}; {frozen}; input resized to {cfg.model.image_size}×"
        f"{cfg.model.image_size} from 48×48 grey.", "",
        "## Data and splits", "",
        *data_section(cfg.data.manifest, manifest),
        f"Training: {cfg.loop.epochs} epochs max, AdamW lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}, "
        f"label smoothing {cfg.optim.label_smoothing:g}, class weights {cfg.optim.class_weights}, global batch "
        f"{cfg.loop.global_batch_size}, seed {cfg.seed}. Best epoch: {best['epoch']}.", "",
        *(teacher_lines(cfg) + [""] if cfg.distill.on else []),
        results_section(best["confusion"], heading=f"Validation results (epoch {best['epoch']})"),
        *use_sections(),
    ])  # fmt: skip


def use_sections() -> list[str]:
    """Intended use, what the model is not for, and the bias and misuse risks: the same for every FER model."""
    return [
        "## Intended use", "",
        "Research and prototyping on expression recognition: aggregate statistics over many faces, human-computer "
        "interaction studies with consenting participants, benchmarking. Input: one cropped face per image; the "
        "model has no face detector and classifies whatever it is given.", "",
        "## Not for", "",
        "Decisions about individuals: hiring, admission, insurance, credit, policing, border control, lie or "
        "threat detection, medical or psychiatric diagnosis, or monitoring people without their informed consent. "
        "A facial expression is not an emotion: people show the same feeling differently, and posed faces differ "
        "from spontaneous ones.", "",
        "## Bias and risks", "",
        "- FER2013 was collected by web image search; its demographics (age, skin tone, gender presentation, "
        "culture) are unrecorded and unbalanced, so error rates likely differ between groups. This model has not "
        "been evaluated per group: measure on your population before use.",
        "- Expression norms differ across cultures; labels reflect the annotators' reading.",
        "- Low resolution (48×48 grey) and occlusion (glasses, masks, hands) degrade accuracy.",
        "- Misuse risk: covert emotion surveillance of employees, students or the public. The EU AI Act prohibits "
        "emotion recognition in workplaces and schools (except for medical or safety reasons).", "",
    ]  # fmt: skip


# --------------------------------------------------------------------------- bundled models (ferdist.serve.bundled)

FER2013 = "FER2013 (Goodfellow et al. 2013, ICML 2013 Challenges in Representation Learning, Kaggle)"


def terms_section(manifest: Manifest | None, *, pretrained: str) -> list[str]:
    """Whose terms the weights come under: the data's (they are learnt from it), and the pretrained backbone's."""
    if manifest is None:
        data = ("The shards' manifest could not be read when this card was written, so the data these weights learnt "
                "from, and its terms, are not stated here: find them out before using or sharing the weights.")
    elif manifest.source.synthetic:
        data = ("The faces are ferdist's own SYNTHETIC drawings (`ferdist/data/synth.py`): no third-party images, so "
                "no data terms beyond ferdist's licence (Apache-2.0).")
    elif manifest.source.kind == "kaggle-csv":
        data = (f"{FER2013}. FER2013 is distributed for research, through the Kaggle challenge; its faces were "
                "collected by Google image search and belong to their rights holders, not to the dataset's makers "
                "or to ferdist. The terms these weights come under are therefore the dataset's, not ferdist's "
                "licence (Apache-2.0 covers the code only): use them for research, and check FER2013's terms before "
                "any other use or before passing the weights on.")
    else:
        data = (f"The faces come from `{manifest.source.name}` ({manifest.source.kind}): the terms are those of "
                "whoever holds those images; check them before using or sharing these weights.")
    backbone = [] if pretrained.startswith("random:") else [
        f"The backbone started from `{pretrained}`: its own licence, and the terms of the data it was pretrained on, "
        "apply as well.", ""]  # fmt: skip
    return ["## Data terms", "", data, "", *backbone]


def scores_section(summary: dict[str, Any] | None) -> list[str]:
    """The scores the model's checkpoint recorded (validation, and test where evaluated), per class where known."""
    summary = summary or {}
    metrics = summary.get("metrics", {})
    named = {"val/acc": "val accuracy", "val/macro_f1": "val macro-F1", "test/acc": "test accuracy",
             "test/macro_f1": "test macro-F1"}  # fmt: skip
    scores = [f"{label} {float(metrics[key]):.4f}" for key, label in named.items() if key in metrics]
    if not scores:
        return ["## Results", "", "No scores were recorded with this model (its checkpoint has no summary.json).", ""]
    lines = ["## Results", "", f"{', '.join(scores)} (epoch {summary.get('epoch', '?')}; val picked the epoch).", ""]
    if "confusion" in summary:
        lines.append(results_section(summary["confusion"], heading="Validation results per class"))
    return lines


def teacher_lines(cfg: RunConfig) -> list[str]:
    """The card's line on the teachers the model was distilled from, and what they saw (none: no line)."""
    if not cfg.distill.on:
        return []
    from ferdist.config import PEER_TEACHER

    teachers = ", ".join(f"`{t}`" for t in cfg.distill.teacher)
    saw = (" The fer peer's checkpoint was picked by its authors on PublicTest + PrivateTest loss, so this model has "
           "learnt, through it, from the test split: its test score is not a clean measurement."
           if PEER_TEACHER in cfg.distill.teacher else "")  # fmt: skip
    return [f"- Distilled from: {teachers} ({cfg.distill.kind} targets, weight {cfg.distill.weight:g}"
            f"{f', temperature {cfg.distill.temperature:g}' if cfg.distill.kind == 'soft' else ''}); the teachers "
            f"are not part of this model.{saw}"]  # fmt: skip


def view_words(eval_crop: float, *, bare: bool = False) -> str:
    """What of a face the model sees (`ferdist.config.ModelConfig.eval_crop`), as the card says it."""
    if eval_crop == 1.0:
        return "the whole face" if bare else ""
    words = f"the centre {eval_crop:g} of the face's side"
    return words if bare else f"{words} (the model's view), "


def bundle_card(
    name: str,
    *,
    cfg: RunConfig,
    summary: dict[str, Any] | None,
    source: str,
    backbone: dict[str, Any],
    parameters: int,
    manifest: Manifest | None,
    trained_crop: float | None = None,
) -> str:
    """MODEL_CARD.md of bundled model ``name``: the classifier of ``source`` (the URI it was exported from), trained
    by ``cfg`` (``summary``: its checkpoint's summary.json) on the shards whose manifest is ``manifest``; ``backbone``
    is the ViTMAEConfig dict and ``parameters`` the parameter count. ``trained_crop``: the view its training's scores
    saw, where the export changed ``cfg.model.eval_crop``."""
    synthetic = manifest is not None and manifest.source.synthetic
    size, pretrained = cfg.model.image_size, cfg.model.pretrained
    init = (f"randomly initialised (`{pretrained}`), not pretrained" if pretrained.startswith("random:")
            else f"fine-tuned from `{pretrained}`")  # fmt: skip
    geometry = (f"ViT-MAE encoder, {backbone.get('num_hidden_layers')} layers of width {backbone.get('hidden_size')} "
                f"({backbone.get('num_attention_heads')} heads, MLP {backbone.get('intermediate_size')}, patch "
                f"{backbone.get('patch_size')}), {cfg.model.pooling} pooling, a linear head over 7 classes; "
                f"{parameters:,} parameters ({parameters / 1e6:.2f} M)")  # fmt: skip
    return "\n".join([
        f"# {name}" + (" (SYNTHETIC data)" if synthetic else ""), "",
        *([SYNTHETIC_WARNING, ""] if synthetic else []),
        "A facial-expression classifier bundled with ferdist: usable right after install, with no training and no "
        f"tracking store (`python jobs/predict.py photo.jpg --model {name}`, or "
        f"`ferdist.serve.bundled.predictor(\"{name}\")` in Python).", "",
        "## Model", "",
        f"- Architecture: {geometry}.",
        f"- Origin: exported from `{source}` (run `{cfg.name}`, epoch {(summary or {}).get('epoch', '?')}); {init}.",
        *teacher_lines(cfg),
        f"- Input: one face, a 48×48 grey crop as in FER2013 (uint8, 0 = black), {view_words(cfg.model.eval_crop)}"
        f"resized to {size}×{size} and normalised by ferdist; `jobs/predict.py` finds and crops the faces of a photo "
        "first.",
        *([f"- View: `model.eval_crop` {cfg.model.eval_crop:g} was set at export (`jobs/export.py --eval-crop`); the "
           f"scores its training recorded (Results, below) saw {view_words(trained_crop, bare=True)}."]
          if trained_crop is not None and trained_crop != cfg.model.eval_crop else []),
        f"- Output: 7 probabilities in the order {', '.join(FER_CLASSES)} (`ferdist.constants.FER_CLASSES`).",
        "- Files: `model.safetensors` (every weight), `backbone.json`, `config.yaml` (the run's config), "
        "`summary.json` (its scores), `expected.json` (its probabilities on 16 check faces, which a fresh install "
        "must reproduce).", "",
        "## Data it learnt from", "",
        *data_section(cfg.data.manifest, manifest),
        *terms_section(manifest, pretrained=pretrained),
        *scores_section(summary),
        *use_sections(),
    ])  # fmt: skip
