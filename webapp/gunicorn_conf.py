"""gunicorn's settings, from maskq's: ``gunicorn -c webapp/gunicorn_conf.py "webapp.app:create_app()"``.

Also the web tier's logging (``runtime/logs.py``) and Prometheus's multiprocess mode: each gunicorn
process writes its HTTP series to a folder of this server's, and a scrape of any one reads them all.
"""

import os
import shutil

from config.settings import load_settings
from runtime import logs

_settings = load_settings()
logs.configure(_settings)

# Before prometheus_client is imported anywhere (the app is imported in each worker, after the fork).
_metrics_dir = _settings.data_dir / "metrics" / f"web-{_settings.port}"
shutil.rmtree(_metrics_dir, ignore_errors=True)  # the last run's processes are gone
_metrics_dir.mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.web_workers
# Threads, because a long-poll (?wait=N) holds its thread while it waits.
worker_class = "gthread"
threads = _settings.web_threads
timeout = _settings.max_wait_s + 30
graceful_timeout = 10
accesslog = "-"
# Every gunicorn on a machine would share ~/.gunicorn/gunicorn.ctl; maskq does not use it.
control_socket_disable = True
loglevel = _settings.log_level.lower()


def when_ready(server):
    # Once, in the master: on a loopback host with the embedded Redis, print the development API key.
    from stores.dev_key import announce_dev_key

    announce_dev_key(_settings)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # its live gauges go; its counters stay counted
