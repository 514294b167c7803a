"""Configuration: the settings object and the Celery configuration derived from it."""

from config.settings import LANES, Settings, load_settings

__all__ = ["LANES", "Settings", "load_settings"]
