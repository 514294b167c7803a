"""Every Celery task's and queue's name: written here once, imported by whoever sends, runs or routes them.

The lanes are the queues jobs wait on, consumed in this order (``interactive``
first); webhook deliveries and housekeeping have a queue of their own,
consumed after every lane. A Lua script that must recognise a task's messages
is handed the name as an argument (``ARGV``), never a copy of it.
"""

from __future__ import annotations

LANES = ("interactive", "default", "batch")
# Webhook deliveries and housekeeping: their own queue, consumed after every lane,
# so a slow receiver never holds a lane's place in line.
WEBHOOK_QUEUE = "webhooks"

RUN_JOB = "maskq.run_job"  # runs one job (tasks/run_job.py)
DELIVER_WEBHOOK = "maskq.deliver_webhook"  # makes one webhook delivery attempt (tasks/deliver_webhook.py)
APPLY_RETENTION = "maskq.apply_retention"  # deletes what outlived its retention (tasks/retention.py)
# Runs a stored image's encoder ahead of its jobs, on a lane (tasks/warm_image.py; POST /v1/images)
WARM_IMAGE = "maskq.warm_image"
