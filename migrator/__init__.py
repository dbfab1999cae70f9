"""migrator: move a live Redis deployment to Valkey without losing a write."""

__version__ = "0.1.0"
