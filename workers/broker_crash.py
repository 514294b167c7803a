"""A worker outlives its broker's crash: kombu's Redis transport, closing a channel whose connection is gone.

When Redis dies under a worker that holds unacknowledged messages (the
webhooks worker holds every delivery waiting for its retry), Celery closes
the lost connection, and kombu's Redis QoS then tries to put those messages
back through a client built from the connection's parameters, which are gone
by then: ``AttributeError: 'NoneType' object has no attribute 'hostname'``.
Celery calls that an unrecoverable error and the worker exits (found by the
soak run; only a supervisor brought it back).

Nothing is lost by not restoring there: kombu wrote each message to the
broker's ``unacked`` hash when it delivered it, and restores it from there
once it is older than the visibility timeout, exactly as when the restore
fails because Redis is unreachable, which kombu already ignores.
:func:`install` makes the failed restore that case too: logged, not fatal.
"""

from __future__ import annotations

import functools
import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


def install() -> None:
    """Wrap kombu's Redis ``QoS.restore_unacked`` once (idempotent)."""
    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "maskq_guarded", False):
        return

    @functools.wraps(original)
    def restore_unacked(self, client=None):
        try:
            return original(self, client)
        except AttributeError:
            connection = getattr(self.channel, "connection", None)
            if connection is not None and getattr(connection, "client", None) is not None:
                raise  # not the lost connection's case: a real bug, let it show
            log.warning(
                "broker connection lost with %d unacknowledged message(s); they stay in the broker's unacked "
                "hash and come back after the visibility timeout",
                len(self._delivered),
            )
            return None

    restore_unacked.maskq_guarded = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]
