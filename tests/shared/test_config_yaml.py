"""Config files mean what they show: what YAML would read otherwise than it looks (a key written twice, yes/no/on/off
as booleans, 010 as 8, a merge key, a second document, a tab, bytes that are not UTF-8, ...) is refused in one
sentence that names the file and the line(s) and says what to write instead; what YAML reads plainly still loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import train as train_job

from ferdist.config import PretrainConfig, load_config, to_flat_dict, to_yaml
from ferdist.errors import FerdistError

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"

# (YAML text, the sentence with FILE for the file's path)
REFUSED = {
    "section-twice": (
        "name: x\nseed: 0\nloop:\n  epochs: 10\n  global_batch_size: 64\noptim:\n  lr: 1.0e-3\n  warmup_epochs: 1\n"
        "loop:\n  log_every: 5\n",
        "FILE: loop appears twice (lines 3 and 9); keep one",
    ),
    "key-twice-in-a-section": (
        "optim:\n  lr: 1.0e-3\n  weight_decay: 0.1\n  lr: 3.0e-4\n",
        "FILE: optim.lr appears twice (lines 2 and 4); keep one",
    ),
    "quoted-and-plain-spelling-of-one-key": (
        "loop:\n  epochs: 3\n  'epochs': 5\n",
        "FILE: loop.epochs appears twice (lines 2 and 3); keep one",
    ),
    "dotted-and-nested-spelling-of-one-key": (
        "optim.lr: 1.0e-3\noptim:\n  lr: 3.0e-4\n",
        "FILE: optim.lr appears twice (lines 1 and 3); keep one",
    ),
    "key-twice-in-sweep-section": (
        "sweep:\n  samples: 4\n  grace_period: 2\n  samples: 8\n",
        "FILE: sweep.samples appears twice (lines 2 and 4); keep one",
    ),
    "key-twice-in-search-section": (
        "search:\n  optim.lr: {choice: [1.0e-3]}\n  optim.lr: {choice: [3.0e-4]}\n",
        "FILE: search.optim.lr appears twice (lines 2 and 3); keep one",
    ),
    "merge-key": (
        "base: &base\n  lr: 1.0e-3\noptim:\n  <<: *base\n  weight_decay: 0.1\n",
        "FILE: line 4: merge keys (<<) are not read in config files (the mapping's own keys would silently win); "
        "write each setting out in full",
    ),
    "second-document": (
        "name: a\n---\nname: b\n",
        "FILE: line 2 starts a second YAML document; a config file is one document, so delete the --- (or ...) "
        "before it and keep each section once",
    ),
    "document-after-end-marker": (
        "name: a\n...\nseed: 1\n",
        "FILE: line 3 starts a second YAML document; a config file is one document, so delete the --- (or ...) "
        "before it and keep each section once",
    ),
    "norway-in-a-string-field": (
        "name: no\n",
        "FILE: line 1: name: no is read by YAML as the boolean false, not text; quote it: 'no'",
    ),
    "off-as-a-checkpoint": (
        "model:\n  pretrained: off\n",
        "FILE: line 2: model.pretrained: off is read by YAML as the boolean false, not text; quote it: 'off'",
    ),
    "off-as-a-choice": (
        "loop:\n  compile: off\n",
        "FILE: line 2: loop.compile: off is read by YAML as the boolean false, not text; quote it: 'off'",
    ),
    "date-in-a-string-field": (
        "tracking:\n  experiment: 2024-05-01\n",
        "FILE: line 2: tracking.experiment: 2024-05-01 is read by YAML as the date 2024-05-01, not text; "
        "quote it: '2024-05-01'",
    ),
    "number-in-a-string-field": (
        "tracking:\n  registered_model: 1.5\n",
        "FILE: line 2: tracking.registered_model: 1.5 is read by YAML as the number 1.5, not text; quote it: '1.5'",
    ),
    "octal": (
        "seed: 010\n",
        "FILE: line 1: seed: 010 starts with 0, so YAML reads it as the octal number 8; write 10, "
        "or quote it ('010') if it is text",
    ),
    "sexagesimal": (
        "loop:\n  epochs: 1:30\n",
        "FILE: line 2: loop.epochs: 1:30 is a base-60 number to YAML (90); quote it ('1:30') if it is text, "
        "or write 90",
    ),
    "section-given-a-value": (
        "loop: 5\n",
        "FILE: line 1: loop is a section, not a value; put its settings on the lines below it, indented "
        "('  epochs: 80')",
    ),
    "section-given-a-list": (
        "name: x\noptim: [1.0e-3]\n",
        "FILE: line 2: optim is a section, not a value; put its settings on the lines below it, indented "
        "('  lr: 3e-05')",
    ),
    "setting-without-a-value": (
        "loop:\n  epochs:\n",
        "FILE: line 2: loop.epochs has no value; write one, or delete the line to keep the default (80)",
    ),
    "list-without-a-value": (
        "distill:\n  teacher:\n",
        "FILE: line 2: distill.teacher has no value; write one, or delete the line to keep the default ([])",
    ),
    "tab-indentation": (
        "optim:\n\tlr: 1.0e-3\n",
        "FILE: line 2 holds a tab, which YAML does not allow outside quotes; indent and separate with spaces",
    ),
    "not-utf8": (
        b"name: x\ntracking:\n  experiment: caf\xe9\n",
        "FILE: line 3 is not UTF-8 text (byte 0xe9); save the file as UTF-8",
    ),
    "control-character": (
        "name: x\nseed: 1\x07\n",
        "FILE: line 2 holds the character U+0007, which YAML does not allow; delete it",
    ),
    "number-as-key": (
        "1: 2\n",
        "FILE: line 1: the key 1 is read by YAML as a number, not as a name; keys are setting names such as loop or lr",
    ),
    "null-as-key": (
        "loop:\n  null: x\n",
        "FILE: line 2: the key null is read by YAML as null (no value), not as a name; keys are setting names such "
        "as loop or lr",
    ),
    "boolean-as-key": (
        "true: y\n",
        "FILE: line 1: the key true is read by YAML as a boolean, not as a name; keys are setting names such as "
        "loop or lr",
    ),
}


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(("text", "sentence"), REFUSED.values(), ids=REFUSED.keys())
def test_what_yaml_would_misread_is_one_sentence_naming_file_and_lines(
    tmp_path: Path, text: str | bytes, sentence: str
) -> None:
    """Catches each surprise going through: a repeated section or key (PyYAML keeps the last, so the first one's
    settings are silently dropped), YAML 1.1's booleans, dates, octal and base-60 numbers where text or a number was
    written, a merge key, a second document, a section given a value, a setting given none, and the sentences that
    named neither the line nor the fix (tabs, a second document, non-string keys) or were a traceback (non-UTF-8)."""
    path = write(tmp_path / "run.yaml", text)
    with pytest.raises(FerdistError) as err:
        load_config(path)
    assert str(err.value) == sentence.replace("FILE", str(path))


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("sweep:\n  samples: 4\n  samples: 8\n", "FILE: sweep.samples appears twice (lines 2 and 3); keep one"),
        ("search:\n  optim.lr: {choice: [1.0e-3]}\n  optim:\n    lr: {grid: [3.0e-4]}\n",
         "FILE: search.optim.lr appears twice (lines 2 and 4); keep one"),
        ("search:\n  loop.compile: {choice: [off, default]}\n",
         "FILE: search.loop.compile must be one of 'off', 'default', 'max-autotune', got False; YAML reads an "
         "unquoted yes, no, on or off as a boolean, so quote the text: 'off'"),
    ],
    ids=["sweep-key-twice", "search-key-dotted-and-nested", "search-off-as-a-choice"],
)  # fmt: skip
def test_sweep_files_are_read_as_strictly(tmp_path: Path, text: str, sentence: str) -> None:
    """Catches ferdist.tune.sweep reading its sections without the strict reader: a sweep: setting or a search:
    dimension written twice was silently the last one, and off in a search: choice was refused as 'got False'
    without saying to quote it."""
    from ferdist.tune.sweep import load_sweep

    path = write(tmp_path / "sweep.yaml", text)
    with pytest.raises(FerdistError) as err:
        load_sweep(path)
    assert str(err.value) == sentence.replace("FILE", str(path))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_file_loads_and_refuses_its_loop_section_twice(path: Path, tmp_path: Path) -> None:
    """Catches a reader too strict for the shipped files (each loads as its job reads it: run, pretraining or sweep),
    and one that lets a shipped file with its loop: section written again at the end through (the old reader took the
    second, dropping the first one's epochs and batch size)."""
    from ferdist.tune.sweep import load_sweep

    def read(file: Path) -> object:
        if path.stem.startswith("pretrain-"):
            return load_config(file, root=PretrainConfig)
        return load_sweep(file).base if "sweep" in path.stem else load_config(file)

    assert read(path).name == path.stem  # type: ignore[attr-defined]
    text = path.read_text()
    first = text.splitlines().index("loop:") + 1
    repeated = write(tmp_path / path.name, text + "loop:\n  epochs: 1\n")
    with pytest.raises(FerdistError) as err:
        read(repeated)
    last = len(text.splitlines()) + 1
    assert str(err.value) == f"{repeated}: loop appears twice (lines {first} and {last}); keep one"


def test_what_yaml_reads_plainly_still_loads(tmp_path: Path) -> None:
    """Catches a reader stricter than the surprises: 1e-3 (text to PyYAML) for a float, a quoted 'off', yes for a
    switch, a leading zero that reads the same (07), colons in a URI, null for an optional setting, anchors and
    aliases, a byte-order mark, a leading ---, and to_yaml's own output of names YAML would misread unquoted. On the
    old reader the empty section failed: loop: with nothing under it was refused as an unknown key 'loop'; it now
    means the section's defaults, as if it were absent."""
    cases = [
        ("optim:\n  lr: 1e-3\n", {"optim.lr": 1e-3}),
        ("loop:\n  compile: 'off'\n", {"loop.compile": "off"}),
        ("workers:\n  use_gpu: yes\n", {"workers.use_gpu": True}),
        ("seed: 07\n", {"seed": 7}),
        ("tracking:\n  tracking_uri: http://127.0.0.1:5000\n", {"tracking.tracking_uri": "http://127.0.0.1:5000"}),
        ("data:\n  endpoint_url: null\n", {"data.endpoint_url": None}),
        ("optim:\n  lr: &lr 1.0e-3\n  warmup_epochs: 1\n  weight_decay: *lr\n",
         {"optim.lr": 1e-3, "optim.weight_decay": 1e-3}),
        ("\ufeffname: bom\n", {"name": "bom"}),
        ("---\nname: dashes\n", {"name": "dashes"}),
        ("name: x\nloop:\n# epochs: 3\noptim:\n  lr: 1.0e-3\n", {"loop.epochs": 80, "optim.lr": 1e-3}),
    ]  # fmt: skip
    for i, (text, expected) in enumerate(cases):
        flat = to_flat_dict(load_config(write(tmp_path / f"{i}.yaml", text)))
        assert {key: flat[key] for key in expected} == expected, text
    tricky = load_config(None, ["name='no'", "model.pretrained=random:tiny", "tracking.experiment='010'",
                                "tracking.registered_model='1:30'", "loop.compile='off'"])  # fmt: skip
    assert load_config(write(tmp_path / "dumped.yaml", to_yaml(tricky))) == tricky


def test_the_train_job_refuses_a_repeated_section_in_one_line_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches the job training with the second loop: section's settings only: jobs/train.py must exit 2 with the
    one sentence on stderr, no traceback, and nothing written (no runs/, no mlflow.db) in its working folder."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "jobs" / "configs" / "x.yaml"
    config.parent.mkdir(parents=True)
    write(config, REFUSED["section-twice"][0])
    assert train_job.main(["--config", "jobs/configs/x.yaml", "--cpu"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["error: jobs/configs/x.yaml: loop appears twice (lines 3 and 9); keep one"], err
    assert "Traceback" not in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "jobs", "jobs/configs", "jobs/configs/x.yaml"]  # fmt: skip


def test_a_text_setting_on_the_command_line_takes_what_was_typed() -> None:
    """Catches --set reading a text setting's value as YAML: `--set loop.compile=off` was refused as the boolean false
    (quoting it in a shell does not reach YAML), a name of digits became a number and a dated name a date."""
    cfg = load_config(None, ["loop.compile=off", "name=2024-05-01", "tracking.registered_model=1.5",
                             "model.pretrained=no", "tracking.tracking_uri=null", "loop.epochs=3"])  # fmt: skip
    assert (cfg.loop.compile, cfg.name, cfg.tracking.registered_model) == ("off", "2024-05-01", "1.5")
    assert cfg.model.pretrained == "no" and cfg.tracking.tracking_uri is None and cfg.loop.epochs == 3
    with pytest.raises(FerdistError, match=r"loop.compile must be one of 'off', 'default', 'max-autotune', got 'on'"):
        load_config(None, ["loop.compile=on"])


def test_a_list_of_text_on_the_command_line_keeps_its_items_as_typed() -> None:
    """Catches --set reading a list's items as YAML: `--set model.unfreeze=[5:2,10:0]` became the base-60 numbers
    [302, 600] and one step `5:2` the number 302, refused, and shell quotes never reached YAML."""
    steps = ["model.freeze_blocks=4", "loop.epochs=20"]
    assert load_config(None, [*steps, "model.unfreeze=[5:2,10:0]"]).model.unfreeze == ("5:2", "10:0")
    assert load_config(None, [*steps, "model.unfreeze=5:2"]).model.unfreeze == ("5:2",)
    assert load_config(None, [*steps, "model.unfreeze=['5:2', '10:0']"]).model.unfreeze == ("5:2", "10:0")
    assert load_config(None, ["distill.teacher=[peer:fer, models:/big@1]"]).distill.teacher == ("peer:fer",
                                                                                                "models:/big@1")
    with pytest.raises(FerdistError, match=r"distill.teacher must be a list"):  # not a teacher named 'null'
        load_config(None, ["distill.teacher=null"])
    # An empty item is refused, not dropped (YAML drops a trailing one), with an example for that setting.
    for override, example in [("distill.teacher=[peer:fer, ]", "[models:/fer-vitmae@champion, peer:fer]"),
                              ("model.unfreeze=[3:2,,6:0]", "[5:2, 10:0]"), ("distill.teacher=[, x]", "")]:  # fmt: skip
        key, _, value = override.partition("=")
        with pytest.raises(FerdistError, match=re.escape(f"command line: {key} must be a list without empty items, "
                                                         f"such as {example}")):  # fmt: skip
            load_config(None, [*steps, override])
    assert load_config(None, ["distill.teacher=[ ]"]).distill.teacher == ()


def test_a_number_on_the_command_line_is_read_as_typed_in_decimal() -> None:
    """Catches --set reading numbers as YAML 1.1 does: `loop.epochs=017` ran 15 epochs (octal), `optim.lr=1:30` was
    90 (base-60) and `optim.lr=1_0` was 10, silently; a file refuses each with its line. A non-ASCII digit (int("٣")
    is 3) is refused as well."""
    assert load_config(None, ["loop.epochs=017"]).loop.epochs == 17
    assert load_config(None, ["optim.lr=3e-4", "seed=+5"]).optim.lr == 3e-4
    for override, expected in [("optim.lr=1:30", "a finite number"), ("optim.lr=1_0", "a finite number"),
                               ("loop.epochs=1_000", "an integer"), ("loop.epochs=٣", "an integer"),
                               ("optim.lr=٣", "a finite number"), ("optim.lr=0x10", "a finite number")]:  # fmt: skip
        key, _, value = override.partition("=")
        with pytest.raises(FerdistError, match=re.escape(f"command line: {key} must be {expected}, got '{value}'")):
            load_config(None, [override])
