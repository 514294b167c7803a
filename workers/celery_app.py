"""The worker's entry point: ``celery -A workers.celery_app worker -Q interactive,default,batch``."""

from celery.signals import worker_init

from config.settings import load_settings
from runtime import logs
from workers import metrics

settings = load_settings()
metrics.prepare(settings)  # before prometheus_client is imported: the pool processes share its folder

import workers.process  # noqa: E402,F401  (connects the per-process start-up signals)
from config.celery import WORKER_CLIENT_NAME, create_celery  # noqa: E402
from models.catalog import ModelCatalog  # noqa: E402
from workers import broker_crash  # noqa: E402
from workers.scheduler import SchedulingStep  # noqa: E402

logs.configure(settings)  # text, or JSON lines with the job's fields (MASKQ_LOG_FORMAT)
# Refuse at start-up a manifest whose time limits outlast the visibility timeout.
ModelCatalog.from_settings(settings).check_time_limits(settings)
app = create_celery(settings)
broker_crash.install()  # a broker that dies under the worker is not an unrecoverable error (workers/broker_crash.py)
# Named, so that `make run`'s Redis can tell when the last worker has let go of it (config/celery.py).
app.conf.broker_transport_options = {**app.conf.broker_transport_options, "client_name": WORKER_CLIENT_NAME}
app.steps["consumer"].add(SchedulingStep)


@worker_init.connect
def _serve_metrics(**_) -> None:
    metrics.serve(settings)  # the main process, once: every pool process's series and the GPUs'
