"""The worker's entry point: ``celery -A workers.celery_app worker -Q interactive,default,batch``."""
import logging

from config.celery import create_celery
from config.settings import load_settings

import workers.process  # noqa: F401  (connects the per-process start-up signals)
from models.catalog import ModelCatalog
from workers.scheduler import SchedulingStep

settings = load_settings()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
# Refuse at start-up a manifest whose time limits outlast the visibility timeout.
ModelCatalog.from_settings(settings).check_time_limits(settings)
app = create_celery(settings)
app.steps["consumer"].add(SchedulingStep)
