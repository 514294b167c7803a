"""The Celery configuration: what the workers and the web send besides the jobs themselves."""

from __future__ import annotations

from config.celery import celery_config
from config.settings import Settings


def test_no_task_events_are_sent_unless_a_monitor_turns_them_on():
    # Flower turns them on at run time (`enable_events`); without a monitor they were PUBLISHes nobody read.
    config = celery_config(Settings())
    assert config["worker_send_task_events"] is False
    assert config["task_send_sent_event"] is False
