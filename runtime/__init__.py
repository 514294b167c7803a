"""What every maskq process runs on, below the job domain and above the settings: the one way to connect
to Redis (Sentinel included), logging with the job's fields, optional OpenTelemetry, the embedded Redis.

``config/`` says what the settings are; this package does something with them. Its users are the web, the
workers, the ``maskq`` command and the benchmarks; the pure job domain imports none of it.
"""
