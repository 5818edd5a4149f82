"""The [search] table of a study spec: an Optuna search per grid point (sampler, pruner, end, space)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .run import RunConfig, suggest

SAMPLERS = ("tpe", "random", "grid", "qmc")
PRUNERS = ("median", "hyperband", "none")
SEARCH_KEYS = {
    "sampler": "tpe (default), random, grid or qmc: Optuna's samplers",
    "seed": "the sampler's seed (default 0): a search run again proposes the same trials",
    "n_trials": "finished trials (complete or pruned) each search runs to",
    "timeout": "seconds of trial time each search may spend (summed over its trials, across runs)",
    "pruner": "median (default), hyperband or none: stops a trial whose per-epoch metric falls behind",
    "startup_trials": "trials that complete before the pruner may stop one (default 5)",
    "warmup_epochs": "epochs every trial trains before the pruner may stop it (default 1)",
    "space": "table: run option -> {low, high, log, step} (a range) or a list of values",
}
RANGE_KEYS = ("low", "high", "log", "step")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SearchRange:
    """A numeric range of one run option: integers when the option is an int, else floats."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def values(self) -> list | None:
        """Every value of the range, when it has a step (integers: step 1); None for a continuous range."""
        if not self.integer and self.step is None:
            return None
        step = self.step or 1
        n = round((self.high - self.low) / step)
        if self.integer:
            return [int(self.low + i * step) for i in range(n + 1)]
        return [round(self.low + i * step, 12) for i in range(n + 1)]  # 0.1 + 2 * 0.1 is 0.30000000000000004


@dataclass
class SearchSpec:
    """The [search] table: how each search samples, stops trials early and ends."""

    space: dict[str, SearchRange | list]
    sampler: str = "tpe"
    seed: int = 0
    n_trials: int | None = None
    timeout: float | None = None
    pruner: str = "median"
    startup_trials: int = 5
    warmup_epochs: int = 1

    def grid_values(self) -> dict[str, list] | None:
        """The sampler 'grid''s combinations: every key's values (None when a range has no step)."""
        values = {k: v if isinstance(v, list) else v.values() for k, v in self.space.items()}
        return None if any(v is None for v in values.values()) else values

    def target(self) -> int | None:
        """The finished trials a search runs to: n_trials, and at most every combination under the grid sampler."""
        if self.sampler != "grid":
            return self.n_trials
        size = math.prod(len(v) for v in self.grid_values().values())
        return size if self.n_trials is None else min(self.n_trials, size)

    def candidates(self, key: str) -> list:
        """The values of `key` to check a setting that depends on it at (both bounds, or every listed value)."""
        dimension = self.space[key]
        return dimension if isinstance(dimension, list) else [dimension.low, dimension.high]

    @classmethod
    def from_dict(cls, tree: Any, check, *, grid: dict, variants: dict, where: str) -> SearchSpec:
        """`check(values, where)` validates run values at every grid point (raising ConfigError)."""
        at = f"{where}[search] "
        if not isinstance(tree, dict):
            raise ConfigError(f"{where}search = {tree!r}: expected a table ([search])")
        for key in tree:
            if key not in SEARCH_KEYS:
                raise ConfigError(f"{at}unknown key {key!r}{suggest(key, SEARCH_KEYS)}")
        values = {k: v for k, v in tree.items() if k != "space"}
        for key, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
            if key in values and values[key] not in choices:
                raise ConfigError(
                    f"{at}{key} = {values[key]!r}: expected one of {', '.join(choices)}"
                    f"{suggest(str(values[key]), choices)}"
                )
        for key, low in (("seed", 0), ("n_trials", 1), ("startup_trials", 0), ("warmup_epochs", 0)):
            value = values.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"{at}{key} = {value!r}: expected a whole number >= {low}")
        if values.get("seed", 0) > 2**32 - 1:
            raise ConfigError(f"{at}seed = {values['seed']!r}: must be <= {2**32 - 1}")
        timeout = values.get("timeout")
        if timeout is not None and not (_is_number(timeout) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"{at}timeout = {timeout!r}: expected seconds > 0")
        if values.get("n_trials") is None and timeout is None:
            raise ConfigError(f"{at}needs n_trials, timeout or both: when does each search end?")
        space = tree.get("space")
        if not isinstance(space, dict) or not space:
            raise ConfigError(f"{at}has no [search.space]: name the run options to search over")
        parsed: dict[str, SearchRange | list] = {}
        for raw_key, dimension in space.items():
            key = raw_key.replace("-", "_")
            parsed[key] = _dimension(key, raw_key, dimension, check, grid, variants, parsed, f"{where}[search.space] ")
        spec = cls(parsed, **values)
        if spec.sampler == "grid" and spec.grid_values() is None:
            key = next(k for k, v in parsed.items() if not isinstance(v, list) and v.values() is None)
            raise ConfigError(f"{at}sampler = 'grid' needs countable values: give {key} a step or a list of values")
        return spec


def _dimension(key, raw_key, dimension, check, grid, variants, parsed, at) -> SearchRange | list:
    """One [search.space] entry, validated: a RunConfig field, searched nowhere else, every value valid."""
    known = {f.name: f for f in dataclasses.fields(RunConfig)}
    if key not in known:
        raise ConfigError(f"{at}unknown key {raw_key!r}{suggest(key, known)}")
    if key in parsed:
        raise ConfigError(f"{at}{raw_key}: the option {key!r} is given twice")
    if key == "metric":
        raise ConfigError(f"{at}metric picks the study's best trial: it is set once at the top level, not searched")
    if known[key].metadata.get("role") != "result":  # where caches live, what is recorded: no trial's numbers
        raise ConfigError(f"{at}{raw_key}: {key} cannot change a trial's result; search over training options")
    if key in grid:
        raise ConfigError(f"{at}{raw_key}: {key} is also a [grid] axis; give it in one of the two")
    setting = next((name for name, bundle in variants.items() if key in bundle), None)
    if setting is not None:  # the sampled value would silently replace the variant's
        raise ConfigError(f"{at}{raw_key}: {key} is also set by [variants.{setting}]; give it in one of the two")
    if isinstance(dimension, list):
        if not dimension:
            raise ConfigError(f"{at}{raw_key}: empty list")
        seen = []
        for value in dimension:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"{at}{raw_key}: value {value!r} is not a plain value (number, string, boolean)")
            resolved = check({key: value}, at)
            if resolved in seen:
                raise ConfigError(f"{at}{raw_key}: value {value!r} is given twice")
            seen.append(resolved)
        return list(dimension)
    if not isinstance(dimension, dict):
        raise ConfigError(f"{at}{raw_key} = {dimension!r}: expected a range {{low, high}} or a list of values")
    for name in dimension:
        if name not in RANGE_KEYS:
            raise ConfigError(f"{at}{raw_key}: unknown key {name!r} in its range{suggest(name, RANGE_KEYS)}")
    hint = typing.get_type_hints(RunConfig)[key]
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if kind not in (int, float):
        raise ConfigError(f"{at}{raw_key}: a range needs a numeric option ({key} is not); give a list of values")
    integer = kind is int
    if "low" not in dimension or "high" not in dimension:
        raise ConfigError(f"{at}{raw_key}: a range needs both low and high")
    low, high, log, step = (dimension.get(k) for k in RANGE_KEYS)
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is None:
            continue
        if not _is_number(value) or not math.isfinite(value) or (integer and not isinstance(value, int)):
            expected = "a whole number" if integer else "a number"
            raise ConfigError(f"{at}{raw_key}: {name} = {value!r}: expected {expected} ({key} is {kind.__name__})")
    if not isinstance(log if log is not None else False, bool):
        raise ConfigError(f"{at}{raw_key}: log = {log!r}: expected true or false")
    if low >= high:
        raise ConfigError(f"{at}{raw_key}: low = {low!r} must be below high = {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{at}{raw_key}: log = true needs low > 0 (low = {low!r})")
    if step is not None:
        if step <= 0:
            raise ConfigError(f"{at}{raw_key}: step = {step!r}: must be > 0")
        if log and not (integer and step == 1):
            raise ConfigError(f"{at}{raw_key}: a log range takes no step (Optuna samples it continuously)")
        count = (high - low) / step
        if abs(count - round(count)) > 1e-9:
            raise ConfigError(f"{at}{raw_key}: high - low = {high - low!r} is not a multiple of step = {step!r}")
    for bound in (low, high):  # every value between lies within the option's range too
        check({key: bound}, at)
    return SearchRange(float(low) if not integer else low, float(high) if not integer else high, bool(log),
                       step if step is None or integer else float(step), integer)  # fmt: skip
