"""A sweep file: a run config plus ``sweep:`` (how many trials, early stopping) and ``search:`` (what varies).

    search:
      optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
      optim.label_smoothing: {choice: [0.0, 0.1]}
      model.freeze_blocks: {grid: [0, 4]}          # every value, each combined with `sweep.samples` draws

Pure parsing and validation: every dimension is checked against the run config's field types (and each bound or
choice is built into a full `RunConfig`), so a typo or an impossible value fails before Ray starts, naming the file.
`ferdist.tune.tuning` turns the parsed dimensions into Ray Tune domains.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ferdist.config import RunConfig, from_flat_dict, load_config, override_value, parse_value, read_yaml, to_flat_dict
from ferdist.errors import FerdistError

Kind = Literal["choice", "grid", "uniform", "loguniform", "randint"]
KINDS: tuple[str, ...] = typing.get_args(Kind)


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    samples: int = 4
    """Trials to draw from the search space (Ray Tune's num_samples; with grid dimensions, draws per grid point)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop trials whose val accuracy trails at a rung; fifo: run every trial to loop.epochs."""
    grace_period: int = 10
    """Epochs every trial runs before ASHA may stop it (left unset, at most loop.epochs)."""
    reduction_factor: float = 3.0
    """ASHA keeps the top 1/reduction_factor of trials at each rung (rungs at grace_period · rf^k epochs)."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0 fits it to the cluster (its GPUs, or CPUs on a CPU-only cluster)."""
    driver_cpus: float = 1.0
    """CPUs reserved for each trial's driver (the Tune function that launches and watches its TorchTrainer)."""
    seed: int | None = None
    """Seeds the search-space draws (None: a different set of trials each sweep)."""

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"sweep.samples must be >= 1, got {self.samples}")
        if self.grace_period < 1:
            raise ValueError(f"sweep.grace_period must be >= 1 epoch, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ValueError(f"sweep.reduction_factor must be > 1, got {self.reduction_factor}")
        if self.max_concurrent_trials < 0:
            raise ValueError(f"sweep.max_concurrent_trials must be >= 0 (0 = fit to the cluster), got "
                             f"{self.max_concurrent_trials}")  # fmt: skip
        if self.driver_cpus <= 0:  # Tune places every trial with a resource request; an empty one is refused
            raise ValueError(f"sweep.driver_cpus must be > 0 (a fraction such as 0.1 is fine), got {self.driver_cpus}")


@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``kind`` over ``values`` (the choices, or the [low, high] bounds)."""

    key: str
    kind: Kind
    values: tuple[Any, ...]

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.values))})"


@dataclass(frozen=True)
class Sweep:
    base: RunConfig
    """The run config every trial starts from (its name is the sweep's name)."""
    sweep: SweepConfig
    search: tuple[Dimension, ...]


def load_sweep(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """The sweep in YAML file ``path``; ``overrides`` (``key=value``) apply to the base run config or, for keys
    starting ``sweep.``, to the sweep settings.

    Raises:
        FerdistError: naming the file (or the command line) and the key, for any invalid setting or dimension.
    """
    doc: dict[str, Any] = {}
    origin = str(path) if path is not None else "command line"
    if path is not None:
        loaded = read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise FerdistError(f"{path}: the top level must be a mapping of sections (sweep:, search:, data:, ...)")
        doc = loaded or {}
    sweep_overrides = [o for o in overrides if o.startswith("sweep.")]
    run_overrides = [o for o in overrides if not o.startswith("sweep.")]
    base = load_config(path, run_overrides)
    sweep = _sweep_settings(doc.get("sweep") or {}, sweep_overrides, origin)
    search = parse_search(doc.get("search") or {}, base, origin=origin)
    typed = any(o.partition("=")[0].strip() == "sweep.grace_period" for o in overrides)
    set_here = typed or "grace_period" in (doc.get("sweep") or {})
    if not set_here and sweep.grace_period > base.loop.epochs:  # the default, for runs of fewer epochs than it
        sweep = dataclasses.replace(sweep, grace_period=base.loop.epochs)
    if sweep.scheduler == "asha" and sweep.grace_period > base.loop.epochs:  # ASHA's own check fails after Ray starts
        said = "command line" if typed else origin
        raise FerdistError(f"{said}: sweep.grace_period={sweep.grace_period} epochs is past loop.epochs="
                           f"{base.loop.epochs}, so ASHA could never compare trials; use at most {base.loop.epochs}, "
                           "or sweep.scheduler=fifo")  # fmt: skip
    if base.loop.eval_every != 1:
        # Tune needs the metric in every report, and stale values would let ASHA compare trials at other epochs.
        raise FerdistError(f"{origin}: loop.eval_every must be 1 in a sweep (ASHA reads "
                           f"{base.checkpoint.select_by} every epoch), got {base.loop.eval_every}")  # fmt: skip
    return Sweep(base=base, sweep=sweep, search=search)


def _sweep_settings(section: Any, overrides: list[str], origin: str) -> SweepConfig:
    if not isinstance(section, dict):
        raise FerdistError(f"{origin}: 'sweep' must be a mapping (samples:, grace_period:, ...)")
    values = dict(section)
    where = dict.fromkeys(values, origin)  # each setting's source, for the sentence that refuses it
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip().removeprefix("sweep.")
        values[key], where[key] = override_value(value), "command line"
    hints = typing.get_type_hints(SweepConfig)
    known = [f.name for f in dataclasses.fields(SweepConfig)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean 'sweep.{close[0]}'?)" if close else f"; known: {', '.join(known)}"
            raise FerdistError(f"{where[key]}: unknown key 'sweep.{key}'{hint}")
        kwargs[key] = parse_value(value, hints[key], key=f"sweep.{key}", origin=where[key])
    try:
        return SweepConfig(**kwargs)
    except ValueError as exn:
        named = re.match(r"sweep\.(\w+)", str(exn))
        raise FerdistError(f"{where.get(named.group(1), origin) if named else origin}: {exn}") from None


def parse_search(section: Any, base: RunConfig, *, origin: str) -> tuple[Dimension, ...]:
    """The ``search:`` mapping as dimensions, each value typed like its config field and checked in a full config."""
    if not isinstance(section, dict):
        raise FerdistError(f"{origin}: 'search' must map config keys to {{kind: values}}, e.g. "
                           "optim.lr: {loguniform: [1.0e-4, 1.0e-3]}")  # fmt: skip
    base_flat = to_flat_dict(base)
    hints = _leaf_types()
    dims = []
    for key, spec in _flatten_search(section).items():
        where = f"{origin}: search.{key}"
        if key not in base_flat:
            close = difflib.get_close_matches(key, list(base_flat), n=1)
            raise FerdistError(f"{where}: unknown config key" + (f" (did you mean '{close[0]}'?)" if close else ""))
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
            raise FerdistError(f"{where}: write one of {', '.join(KINDS)} with its values, e.g. {{choice: [a, b]}}")
        ((kind, raw),) = spec.items()
        if not isinstance(raw, list) or not raw:
            raise FerdistError(f"{where}: {kind} needs a list of values, got {raw!r}")
        tp = hints[key]
        values = tuple(parse_value(v, tp, key=f"search.{key}", origin=origin) for v in raw)
        if kind in ("uniform", "loguniform", "randint"):
            numeric = int if kind == "randint" else float
            # An optional number (optim.ema_decay: float | None, off by default) is searched as the number.
            options = typing.get_args(tp)
            present = [a for a in options if a is not type(None)] if type(None) in options else [tp]
            if present != [numeric]:
                raise FerdistError(f"{where}: {kind} needs a{'n integer' if numeric is int else ' float'} setting; "
                                   "use choice for this key")  # fmt: skip
            if len(values) != 2 or not values[0] < values[1]:
                raise FerdistError(f"{where}: {kind} takes [low, high] with low < high, got {list(raw)}")
            if kind == "loguniform" and values[0] <= 0:
                raise FerdistError(f"{where}: loguniform bounds must be > 0, got {list(raw)}")
        for value in values:  # each bound / choice must make a valid run on its own
            from_flat_dict({**base_flat, key: value}, origin=f"{where} = {value!r}")
        dims.append(Dimension(key, kind, values))
    check_combinations(tuple(dims), base_flat, origin=origin)
    return tuple(dims)


MAX_COMBINATIONS = 4096
"""Above this many combinations of searched values, only every pair of dimensions is built and checked."""


def combinations(dims: tuple[Dimension, ...], *, every_int: int = 0) -> list[tuple[tuple[str, Any], ...]]:
    """The (key, value) combinations a trial can draw, as far as they can be listed: every choice, and each range's
    two ends (a randint's every value, where it has at most ``every_int``); all of them up to `MAX_COMBINATIONS`, else
    every pair of dimensions."""

    def values(d: Dimension) -> tuple[Any, ...]:
        if d.kind == "randint" and d.values[1] - d.values[0] < every_int:
            return tuple(range(d.values[0], d.values[1] + 1))
        return d.values

    options = [[(d.key, v) for v in values(d)] for d in dims]
    if math.prod(len(o) for o in options) <= MAX_COMBINATIONS:
        return list(itertools.product(*options))
    return [pair for a, b in itertools.combinations(options, 2) for pair in itertools.product(a, b)]


def check_combinations(dims: tuple[Dimension, ...], base_flat: dict[str, Any], *, origin: str) -> None:
    """Every searched value was checked alone; a trial draws one of each dimension together, and some settings only
    fail together (loop.epochs 5 with model.unfreeze ['10:0'], model.freeze_blocks 2 with model.unfreeze ['3:2']).

    Raises:
        FerdistError: the first combination that makes no valid run, naming its values.
    """
    if len(dims) < 2:
        return
    for combo in combinations(dims):
        from_flat_dict({**base_flat, **dict(combo)}, origin=f"{origin}: {described(combo)}")


def described(combo: tuple[tuple[str, Any], ...]) -> str:
    """A combination as a refusal names it: ``search.optim.lr = 0.1 with search.loop.epochs = 5``."""
    return " with ".join(f"search.{k} = {v!r}" for k, v in combo)


def _flatten_search(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{optim: {lr: {choice: [...]}}}`` and ``{optim.lr: {choice: [...]}}`` both give ``{"optim.lr": {...}}``."""
    flat: dict[str, Any] = {}
    for key, value in section.items():
        # A spec is {kind: [values]}; any other mapping is a section (optim: {lr: …}).
        if isinstance(value, dict) and not (len(value) == 1 and not isinstance(next(iter(value.values())), dict)):
            flat.update(_flatten_search(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _leaf_types() -> dict[str, Any]:
    types: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                types[prefix + f.name] = hints[f.name]

    walk(RunConfig, "")
    return types


def trial_epochs_budget(sweep: Sweep) -> int:
    """Trials × epochs if no trial were stopped early (grid dimensions multiply the samples)."""
    grid = 1
    for dim in sweep.search:
        if dim.kind == "grid":
            grid *= len(dim.values)
    return sweep.sweep.samples * grid * sweep.base.loop.epochs

