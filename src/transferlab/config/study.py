"""StudySpec: a grid of runs (with variants, replicates and an optional search), validated at the edge."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .metrics import DEFAULT_METRIC, METRICS
from .run import RunConfig, suggest
from .search import SearchSpec
from .toml import load_toml, parse_override, set_dotted

# ---------------------------------------------------------------------------- studies
STUDY_KEYS = {
    "name": "study name (default: the spec file's stem)",
    "metric": "selection metric: val_accuracy (default), val_loss, val_balanced_accuracy or val_macro_f1",
    "storage": "Optuna storage URL (default: SQLite file in the study directory); keep passwords out of it",
    "storage_password_env": "name of an environment variable holding the storage's password (never saved or shown)",
    "run": "table of RunConfig keys shared by every trial",
    "grid": "table of axes: RunConfig key -> list of values; every combination is one trial",
    "variants": "named bundles of RunConfig keys; the grid axis `variant` picks one (ablations: one change at a time)",
    "repeat": "seeds per grid point: K runs every grid point with seeds seed, seed + 1, ... (1 = once, the default)",
    "folds": "cross-validation: K stratified folds, every grid point run once per fold (0 = off, the default)",
    "search": "an Optuna search per grid point: sampler, n_trials and/or timeout, pruner, and [search.space]",
}

# Grid axes whose values are replicates of one configuration rather than configurations of their own: a study
# selects by the mean over them, and the report pairs configurations on them.
REPLICATE_AXES = ("seed", "fold")


def replicate_axes(grid) -> list[str]:
    """The axes of a grid (its keys, in order) that are replicates: `seed` and `fold` (from `repeat`, `folds` or
    given as grid axes)."""
    return [axis for axis in grid if axis in REPLICATE_AXES]


def configuration_of(point: dict[str, Any], replicates) -> dict[str, Any]:
    """A grid point's configuration: the point without its replicate axes."""
    return {k: v for k, v in point.items() if k not in replicates}


def _setter_of(tree: dict, key: str) -> tuple[str, str] | None:
    """Which part of a spec tree sets run option `key` above [run] ([grid], a variant, [search.space]), and the --set
    that changes it there; None when only [run] does."""
    key = key.replace("-", "_")

    def keys(table) -> set[str]:
        return {k.replace("-", "_") for k in table} if isinstance(table, dict) else set()

    if key in keys(tree.get("grid")):
        return f"the [grid] axis {key}", f"--set grid.{key}=[...]"
    for name, bundle in (tree.get("variants") or {}).items() if isinstance(tree.get("variants"), dict) else ():
        if key in keys(bundle):
            return f"[variants.{name}]", f"--set variants.{name}.{key}=..."
    search = tree.get("search")
    if isinstance(search, dict) and key in keys(search.get("space")):
        return "[search.space]", f"--set search.space.{key}=..."
    return None


def _refuse_shadowed(tree: dict, where: str) -> None:
    """A run option given in two places of which one silently wins is refused in one line: [run] beside a [grid]
    axis (the axis sets it for every trial) and a variant beside a [grid] axis (the axis wins). [run] beside a
    variant is the ablation pattern (the variant changes one thing) and stays allowed."""
    grid = {k.replace("-", "_"): k for k in tree.get("grid", {}) if k != "variant"}
    for key in tree.get("run", {}):
        if key.replace("-", "_") in grid:
            raise ConfigError(
                f"{where}[run] {key} and the [grid] axis {grid[key.replace('-', '_')]}: the axis sets it for every "
                "trial, so [run]'s value would be ignored; give it in one of the two"
            )
    for name, bundle in tree.get("variants", {}).items():
        for key in bundle if isinstance(bundle, dict) else ():
            if key.replace("-", "_") in grid:
                raise ConfigError(
                    f"{where}[variants.{name}] {key} and the [grid] axis {grid[key.replace('-', '_')]}: the axis "
                    "wins, so the variant's value would be ignored; give it in one of the two"
                )


def _whole(tree: dict, key: str, default: int, where: str) -> int:
    value = tree.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}{key} = {value!r}: expected a whole number")
    return value


# lr = "find" in a study spec ([run], a [grid] lr value or a variant): the learning-rate range test (engine/lr_find.py)
# chooses the rate of each configuration before it trains; RunConfig.lr itself is always a number
LR_FIND = "find"


def _without_find(values: dict[str, Any], where: str) -> tuple[dict[str, Any], bool]:
    """A spec table's run keys without lr = "find", and whether it was there; any other lr that is no number is
    refused in one line."""
    lr = values.get("lr")
    if lr == LR_FIND:
        return {k: v for k, v in values.items() if k != "lr"}, True
    if isinstance(lr, str):
        try:
            float(lr)
        except ValueError:
            raise ConfigError(f'{where}lr = {lr!r}: expected a number or "{LR_FIND}" (the lr range test)') from None
    return values, False


def point_key(point: dict[str, Any]) -> str:
    """A grid point (or a configuration: a point without its replicate axes) as text, values as the grid compares
    them (epochs 2 and "2" are one point): the key of trials, run folders and the report's groups."""
    return ",".join(f"{k}={point[k]}" for k in sorted(point))


@dataclass
class StudySpec:
    name: str
    base: RunConfig
    grid: dict[str, list]
    metric: str = DEFAULT_METRIC
    storage: str | None = None
    storage_password_env: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    repeat: int = 1
    folds: int = 0
    # lr = "find": the rate found for each such grid point (its JSON text), filled by the study before it plans
    found_lr: dict[str, float] = field(default_factory=dict)
    search: SearchSpec | None = None  # the [search] table: an Optuna search per grid point instead of one trial

    @classmethod
    def from_dict(cls, tree: dict[str, Any], *, name: str = "study", where: str = "") -> StudySpec:
        for key in tree:
            if key not in STUDY_KEYS:
                raise ConfigError(f"{where}unknown key {key!r}{suggest(key, STUDY_KEYS)}")
        for key in ("run", "grid", "variants"):
            if not isinstance(tree.get(key, {}), dict):
                raise ConfigError(f"{where}{key} = {tree[key]!r}: expected a table ([{key}])")
        name = tree.get("name", name)
        if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"{where}name = {name!r}: expected a study name (not empty, no '/')")
        tables = [tree.get("run", {}), tree.get("grid", {}), *tree.get("variants", {}).values()]
        if any(isinstance(t, dict) and "metric" in t for t in tables):
            raise ConfigError(
                f"{where}metric picks the study's best trial and each trial's best epoch alike: "
                'set it once at the top level (metric = "val_loss")'
            )
        repeat, folds = _whole(tree, "repeat", 1, where), _whole(tree, "folds", 0, where)
        if repeat < 1:
            raise ConfigError(f"{where}repeat = {repeat}: expected 1 or more runs per grid point (1 = once)")
        if folds == 1 or folds < 0:
            raise ConfigError(f"{where}folds = {folds}: cross-validation needs 2 or more folds (0 turns it off)")
        if "repeat" in tree and "seed" in tree.get("grid", {}):
            raise ConfigError(f"{where}repeat = {repeat} and a [grid] seed axis: give the seeds one way, not both")
        if folds and any(isinstance(t, dict) and ("folds" in t or "fold" in t) for t in tables):
            raise ConfigError(
                f"{where}folds = {folds} makes the fold axis itself: leave folds and fold out of [run], [grid] and "
                "[variants]"
            )
        if repeat > 1 and any(isinstance(v, dict) and "seed" in v for v in tree.get("variants", {}).values()):
            raise ConfigError(f"{where}repeat = {repeat} sets each trial's seed: leave seed out of [variants]")
        run = _without_find(tree.get("run", {}), f"{where}[run] ")[0]
        base = RunConfig.from_dict({**run, **({"folds": folds} if folds else {})}, where=f"{where}[run] ")
        variants = tree.get("variants", {})
        for vname, values in variants.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{where}[variants] {vname}: expected a table of run keys")
            if "preset" in values:  # its recipe would silently override [run]'s settings of the same options
                raise ConfigError(f"{where}[variants.{vname}] preset: a preset goes in [run]; a variant spells out "
                                  "the options it changes")  # fmt: skip
            inside = f"{where}[variants.{vname}] "
            RunConfig.from_dict(_without_find(values, inside)[0], base=base, where=inside)
        grid = tree.get("grid", {})
        if variants and "variant" not in grid:
            raise ConfigError(f"{where}[variants] given but [grid] has no 'variant' axis")
        checked: dict[str, list] = {}
        for axis, values in grid.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise ConfigError(f"{where}[grid] {axis}: empty list")
            key = axis.replace("-", "_")
            if key == "preset":  # each preset would silently override [run]'s settings of the same options
                raise ConfigError(f"{where}[grid] preset: a preset goes in [run]; compare recipes with [variants] "
                                  "that spell out their options")  # fmt: skip
            if key in checked:
                raise ConfigError(f"{where}[grid] {axis}: the axis {key!r} is given twice")
            resolved = []  # each value as the trial will see it: 0.1 and "0.1" are one point
            for value in values:  # validates axis name and each value
                if axis == "variant":
                    if value not in variants:
                        raise ConfigError(
                            f"{where}[grid] variant {value!r} is not defined under [variants]"
                            f"{suggest(str(value), variants)}"
                        )
                    resolved.append(value)
                    continue
                if key == "lr" and _without_find({"lr": value}, f"{where}[grid] ")[1]:  # lr = "find"
                    resolved.append(value)
                    continue
                config = RunConfig.from_dict({axis: value}, base=base, where=f"{where}[grid] ")
                resolved.append(getattr(config, key))
            for i, value in enumerate(resolved):  # a repeated point would never be complete (1 and 1.0 are equal)
                if value in resolved[:i]:
                    raise ConfigError(f"{where}[grid] {axis}: value {values[i]!r} is given twice")
            checked[key] = values
        _refuse_shadowed(tree, where)  # after each axis and value was checked on its own
        if repeat > 1:  # the replicate axes go last: the points of one configuration are neighbours
            seeds = [base.seed + i for i in range(repeat)]
            RunConfig.from_dict({"seed": seeds[-1]}, base=base, where=f"{where}repeat = {repeat} from [run] ")
            checked["seed"] = seeds
        if folds:
            checked["fold"] = list(range(folds))
        metric = tree.get("metric", DEFAULT_METRIC)
        if metric not in METRICS:
            raise ConfigError(f"{where}metric = {metric!r}: expected one of {', '.join(METRICS)}")
        if not isinstance(tree.get("storage", ""), str) or tree.get("storage") == "":
            raise ConfigError(f"{where}storage = {tree['storage']!r}: expected a storage URL")
        password_env = tree.get("storage_password_env")
        if password_env is not None and (not isinstance(password_env, str) or not password_env):
            raise ConfigError(f"{where}storage_password_env = {password_env!r}: expected an environment variable name")
        spec = cls(
            name=name,
            base=base,
            grid=checked,
            metric=metric,
            storage=tree.get("storage"),
            storage_password_env=password_env,
            source=tree,
            variants=variants,
            repeat=repeat,
            folds=folds,
        )
        if "search" in tree:
            if repeat > 1 or folds or "seed" in checked:
                raise ConfigError(
                    f"{where}[search] with repeated seeds or folds: a search trial is one training, and its sampler "
                    "would read each replicate as a trial of its own; search first, then repeat the chosen settings"
                )
            spec.search = SearchSpec.from_dict(tree["search"], spec.checked_value, grid=checked, variants=variants,
                                               where=where)  # fmt: skip
            if "lr" in spec.search.space and any(spec.finds_lr(p) for p in spec.points()):
                raise ConfigError(f'{where}[search.space] lr and lr = "{LR_FIND}": give the learning rate one way')
        return spec

    def checked_value(self, values: dict[str, Any], where: str) -> Any:
        """One run option's value (`values`: {key: value}) validated at every grid point; as the trials see it."""
        (key,) = values
        for point in self.points():
            point = dict(point)
            bundle = self.variants.get(point.pop("variant", None), {})
            run = _without_find({**bundle, **point}, where)[0]  # lr = "find": the rate is chosen later
            config = RunConfig.from_dict({**run, **values}, base=self.base, where=where)
        return getattr(config, key.replace("-", "_"))

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> StudySpec:
        tree = load_toml(path)
        for text in overrides:
            key, value = parse_override(text)
            if "." not in key:  # a bare run key is the common case: --set data=...
                key = key if key in STUDY_KEYS else f"run.{key}"
            if key.startswith("run."):
                option = key.removeprefix("run.")
                setter = _setter_of(tree, option)
                if setter is not None:
                    where_set, fix = setter
                    raise ConfigError(
                        f"--set {text}: {option} is set by {where_set} in {path}, which wins over [run]: the override "
                        f"would be ignored; change it there ({fix})"
                    )
            set_dotted(tree, key, value)
        return cls.from_dict(tree, name=Path(path).stem, where=f"{path}: ")

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid axes, in a stable order."""
        axes = list(self.grid)
        return [dict(zip(axes, combo)) for combo in itertools.product(*(self.grid[a] for a in axes))]

    @property
    def replicates(self) -> list[str]:
        """The grid's replicate axes (seed, fold): a configuration is a grid point without them."""
        return replicate_axes(self.grid)

    def finds_lr(self, point: dict[str, Any]) -> bool:
        """Is this grid point's lr "find"? Its own lr axis, else its variant's lr, else [run]'s decides."""
        point = dict(point)
        variant = self.variants.get(point.pop("variant", None), {})
        for values in ({k.replace("-", "_"): v for k, v in point.items()}, variant, self.source.get("run", {})):
            if "lr" in values:
                return values["lr"] == LR_FIND
        return False

    @staticmethod
    def point_id(point: dict[str, Any]) -> str:
        """A grid point as text, the key of `found_lr`: values as strings, as the grid compares them (epochs 2 and
        "2" are one point)."""
        return json.dumps({k: str(v) for k, v in point.items()}, sort_keys=True)

    def config_for(self, point: dict[str, Any], *, lr_unused: bool = False) -> RunConfig:
        """The grid point's run config: [run], then its variant, then its other axes. Where its lr is "find", the
        rate found for it (`found_lr`); asked before that rate is found, it is an error, unless `lr_unused`: the
        caller reads nothing lr decides (the range test itself, the data settings), and lr is left a placeholder."""
        finds, found = self.finds_lr(point), self.found_lr.get(self.point_id(point))
        values = dict(point)
        variant = self.variants.get(values.pop("variant", None), {})
        values = {**variant, **values, "metric": self.metric}
        if finds:
            values.pop("lr", None)
            if found is not None:
                values["lr"] = found
            elif not lr_unused:
                raise ConfigError(f'lr = "{LR_FIND}" at {point}: the range test has not chosen its rate yet')
        return RunConfig.from_dict(values, base=self.base)
