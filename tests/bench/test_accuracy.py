"""`jobs/benchmark.py accuracy` on the SYNTHETIC shards with a tiny plan: the jobs a user runs, each row's
best-by-PublicTest model scored on PrivateTest with TTA rows apart, headline rows chosen by PublicTest, no machine
paths in the JSON, the best row bundled at the view PublicTest picks, and --resume keeping what ran, running what
the plan added, running again (and checking) what a later row needs but is gone, refusing a changed row."""

from __future__ import annotations

import json
from pathlib import Path

import benchmark
import pytest
import yaml

# Ten jobs, each its own process starting Ray: about 7 minutes on a quiet 2-core machine, more beside other work.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
ONE_WORKER = ["tracking.backend=none", "workers.num_workers=1", "data.loader_workers=0"]
FINETUNE = {"config": "jobs/configs/quickstart.yaml", "set": ["loop.epochs=2", *ONE_WORKER]}
PRETRAIN = {"config": "jobs/configs/pretrain-quickstart.yaml", "set": ["loop.epochs=1", *ONE_WORKER]}
KEYS = {"name", "test_acc", "test_macro_f1", "val_acc", "epochs", "wall_s", "teacher", "tta", "params",
        "train_img_s", "infer_img_s"}  # fmt: skip


def write_plan(path: Path, rows: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"pretrain": PRETRAIN, "finetune": FINETUNE, "rows": rows}))
    return path


def test_accuracy_benchmark_rows_headlines_and_resume(
    synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the runs and results go here; the JSON names them relative to it
    plan = write_plan(tmp_path / "plan.yaml", [{"name": "base"}, {"name": "slow-lr", "set": ["optim.lr=1e-5"]}])
    args = ["accuracy", "--plan", str(plan), "--manifest", str(synth_shards), "--storage", "runs", "--name", "t",
            "--json", "acc.json", "--bundle", "models/acc-t"]  # fmt: skip
    assert benchmark.main(args) == 0
    text = (tmp_path / "acc.json").read_text()
    results = json.loads(text)
    assert str(tmp_path) not in text and str(Path(benchmark.__file__).parents[1]) not in text  # no machine paths
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["base", "base + flip TTA", "base + crops TTA",
                          "slow-lr", "slow-lr + flip TTA", "slow-lr + crops TTA"]  # fmt: skip
    for row in rows.values():
        assert KEYS <= set(row) and row["epochs"] == 2 and row["teacher"] is None and row["wall_s"] > 0
        assert 0 <= row["test_acc"] <= 1 and row["params"] > 0
    assert [r["tta"] for r in rows.values()] == [False, True, True] * 2
    assert rows["slow-lr"]["set"] == ["optim.lr=1e-5"]
    # PublicTest (val) picks the headline, never PrivateTest; the TTA rows are never it.
    plain = [r for r in rows.values() if not r["tta"]]
    best = max(plain, key=lambda r: r["val_acc"])
    assert results["best_no_teacher"] == {k: best[k] for k in ("name", "test_acc", "val_acc")}
    assert results["best_with_teacher"] is None and results["complete"] is True
    assert results["majority"]["test_acc"] == pytest.approx(5 / 35, abs=0.03)  # balanced synthetic test split
    assert results["peer"] is None or results["peer"]["test_acc"] > 0  # absent here: said in peer_skipped
    assert results["stages"]["pretrain"]["epochs"] == 1 and len(results["stages"]["pretrain"]["epoch_s"]) == 1
    curve = results["stages"]["row:base"]["curve"]  # what tells underfitting from overfitting, and a busy machine
    assert [p["epoch"] for p in curve] == [1, 2] and all(p["epoch_s"] > 0 and 0 <= p["train_acc"] <= 1 for p in curve)
    # The headline row is shipped as a bundle and scored through the URI a user gives predict.py and evaluate.py.
    # At the view of a face PublicTest picks for it (a tie goes to the larger view); on the whole face, its score
    # is the row's.
    bundled = results["bundled"]
    assert bundled["model_uri"] == "models/acc-t" and bundled["row"] == best["name"]
    views = {float(crop): acc for crop, acc in bundled["view_val_acc"].items()}
    assert len(views) == 7 and bundled["eval_crop"] == max(views, key=lambda crop: (views[crop], crop))
    assert f"--eval-crop {bundled['eval_crop']:g}" in bundled["command"]
    if bundled["eval_crop"] == 1.0:
        assert bundled["test_acc"] == pytest.approx(best["test_acc"], abs=1e-9)
    shipped = yaml.safe_load((tmp_path / "models" / "acc-t" / "config.yaml").read_text())
    assert shipped["model"]["eval_crop"] == bundled["eval_crop"]
    assert "Results on the test split of" in (tmp_path / "models" / "acc-t" / "MODEL_CARD.md").read_text()
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    # Beside the results file, a copy of what later stages learn from: here the backbone (no row teaches yet).
    assert sorted(p.name for p in (tmp_path / "acc-kept").iterdir()) == ["pretrained"]
    assert results["stages"]["pretrain"]["kept"]["path"] == "acc-kept/pretrained"

    # Resume: what ran is kept as it was (no job starts, nothing re-scored); a changed row is refused. (A row the
    # plan gained runs as any row does: only the stages the file holds are skipped.)
    capsys.readouterr()
    assert benchmark.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "pretraining: kept" in out and "base: kept" in out and "slow-lr: kept" in out and "running:" not in out
    assert json.loads((tmp_path / "acc.json").read_text())["rows"] == results["rows"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs

    # A fresh machine keeps the results file but not the runs, nor (here) the copies beside it: a row added since
    # learns from a kept row, so that row and the pretraining run again. The jobs are seeded, so here (one machine)
    # they give the very epochs the file holds and are kept; where they do not (`supersede`, tested on its own),
    # they replace what was kept.
    import shutil

    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(tmp_path / "acc-kept")
    rows_before = json.loads((tmp_path / "acc.json").read_text())["rows"]
    write_plan(plan, [{"name": "base"}, {"name": "slow-lr", "set": ["optim.lr=1e-5"]},
                      {"name": "taught", "teacher": "row:base", "set": ["loop.epochs=1"]}])  # fmt: skip
    capsys.readouterr()
    assert benchmark.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "pretraining: kept in the results file, but" in out and "is gone: running it again" in out
    assert "base: kept in the results file, but its run" in out
    again = json.loads((tmp_path / "acc.json").read_text())
    assert again["rows"][: len(rows_before)] == rows_before and "superseded" not in again, out
    assert again["rows"][-3]["name"] == "taught" and again["rows"][-3]["teacher"] == "row:base"
    assert again["best_with_teacher"]["name"] == "taught"
    for stage in ("pretrain", "row:base"):
        assert [r["reproduced"] for r in again["stages"][stage]["reruns"]] == [True]
    assert "reruns" not in again["stages"]["row:slow-lr"]  # nothing learns from it: not run again
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        {*runs, "acc-t-taught"} - {"acc-t-slow-lr"})  # fmt: skip

    # The copies are back (the backbone, and now the teaching row's best model): a fresh clone with the committed
    # results file and copies runs only the row the plan gained, learning from the copies.
    assert sorted(p.name for p in (tmp_path / "acc-kept").iterdir()) == ["pretrained", "row-base"]
    shutil.rmtree(tmp_path / "runs")
    write_plan(plan, [{"name": "base"}, {"name": "slow-lr", "set": ["optim.lr=1e-5"]},
                      {"name": "taught", "teacher": "row:base", "set": ["loop.epochs=1"]},
                      {"name": "taught-2", "teacher": "row:base", "set": ["loop.epochs=1", "seed=1"]}])  # fmt: skip
    capsys.readouterr()
    assert benchmark.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "the rows start from the copy kept in" in out and "base: its run is gone: its best model is the copy" in out
    assert out.count("running:") == 1 and "is gone: running it again" not in out, out
    last = json.loads((tmp_path / "acc.json").read_text())
    command = last["stages"]["row:taught-2"]["rows"][0]["command"]
    assert "model.pretrained=acc-kept/pretrained" in command and "acc-kept/row-base" in command, command
    assert last["stages"]["pretrain"]["reruns"] == again["stages"]["pretrain"]["reruns"]  # nothing ran again

    write_plan(plan, [{"name": "base", "set": ["optim.lr=1e-2"]}])
    assert benchmark.main([*args, "--resume"]) == 2
    assert "row 'base' of the plan changed since it ran ([] then, ['optim.lr=1e-2'] now)" in capsys.readouterr().out
