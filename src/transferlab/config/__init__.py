"""Configuration: RunConfig (one run), StudySpec (a grid of runs), SearchSpec, validated at the edge.

Imports nothing of the rest of transferlab but its errors: every other package reads its config from here.
"""

from ..errors import ConfigError
from .identity import SECTIONS, fingerprint, identity
from .metrics import METRICS, Metric, higher_is_better, metric
from .run import TRACKERS, RunConfig, default_cache_dir, option, suggest
from .search import SearchRange, SearchSpec
from .study import LR_FIND, REPLICATE_AXES, StudySpec, configuration_of, replicate_axes
from .toml import load_toml, parse_override, set_dotted

__all__ = [
    "LR_FIND", "METRICS", "REPLICATE_AXES", "SECTIONS", "TRACKERS", "ConfigError", "Metric", "RunConfig",
    "SearchRange", "SearchSpec", "StudySpec", "configuration_of", "default_cache_dir", "fingerprint",
    "higher_is_better", "identity", "load_toml", "metric", "option", "parse_override", "replicate_axes",
    "set_dotted", "suggest",
]  # fmt: skip
