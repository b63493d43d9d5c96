"""RecForge: recommender systems from raw interaction logs to evaluated models and live services.

The verbs of the command line are functions here: :func:`train`, :func:`evaluate`,
:func:`recommend`, :func:`compare`, :func:`bench` (imported lazily, so that the command line
starts fast).
"""

from recforge.errors import ConfigError, DataError, RecForgeError  # noqa: F401

__version__ = "0.1.0"
_API = ("train", "evaluate", "recommend", "compare", "bench", "resolve")


def __getattr__(name):
    if name in _API:
        from recforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'recforge' has no attribute {name!r}")


__all__ = [*_API, "RecForgeError", "ConfigError", "DataError"]
