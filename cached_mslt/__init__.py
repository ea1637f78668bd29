"""cached-mslt: multi-stage layerwise BERT pretraining with a cached frozen bottom."""

from importlib import metadata

try:
    __version__ = metadata.version("cached-mslt")  # pyproject.toml holds the one number
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "unknown"
