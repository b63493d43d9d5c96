"""RecForge: recommender systems from raw interaction logs to evaluated models and live services."""

__version__ = "0.1.0"

from recforge.api import bench, compare, evaluate, recommend, resolve, train  # noqa: E402,F401
from recforge.errors import ConfigError, DataError, RecForgeError  # noqa: E402,F401
