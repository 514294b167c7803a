"""Where the job domain is kept: the Redis stores, the lane sender and the fleet's records.

``domain/`` is the job model with no I/O (records, requests, batches,
webhook events and signatures); this layer keeps it in Redis and sends it on
(``jobs.py``: the job store and its one transition script; ``lanes.py``: lane
depths, aging and ``send_job``; ``batches.py``; ``outbox.py``,
``delivery_log.py`` and ``webhooks.py``: webhook messages and queuing their
deliveries; ``result_cache.py``; ``job_metrics.py``; ``fleet.py``: workers'
heartbeats and gates; ``tenants.py``: API keys). It imports ``domain/`` and
``config/``, never the layers above.
"""
