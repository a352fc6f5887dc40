"""fieldgate: the daemon core (config, scheduler, store, uplink); never imports protocol libraries."""

__version__ = "0.1.0"  # the one definition: pyproject.toml reads it (dynamic version)
