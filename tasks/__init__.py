"""Every Celery task maskq has, and the only place one is defined: the one entry from a queue message into
the worker runtime.

- ``run_job.py``: ``maskq.run_job`` (a job, from its lane) → ``workers/job_runner.py``;
- ``deliver_webhook.py``: ``maskq.deliver_webhook`` (one attempt, from the ``webhooks`` queue)
  → ``workers/webhook_delivery.py``;
- ``retention.py``: ``maskq.apply_retention`` (beat, ``webhooks`` queue) → ``workers/retention.py``;
- ``warm_image.py``: ``maskq.warm_image`` (a stored image's encoder run ahead of its jobs, from a lane)
  → ``workers/image_encoding.py``.

Their names and queues are written once, in ``config/task_names.py``; ``config/celery.py`` includes exactly
these modules. Why a package of its own rather than folded into the runtime: a reader finds every message a
worker can receive in one folder of a few lines each, and the runtime in ``workers/`` stays plain functions
that the tests call without Celery's task machinery. A new task goes here, and nowhere else.
"""
