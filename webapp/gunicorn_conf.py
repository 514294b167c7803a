"""gunicorn's settings, from maskq's: ``gunicorn -c webapp/gunicorn_conf.py "webapp.app:create_app()"``."""
from config.settings import load_settings

_settings = load_settings()

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
    from webapp.cli import announce_dev_key

    announce_dev_key(_settings)
