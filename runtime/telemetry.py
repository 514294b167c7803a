"""OpenTelemetry tracing: on when its packages are installed (``requirements-otel.txt``) and
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the SDK's own variables configure the rest:
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_SCHEDULE_DELAY``…).

The web instruments Flask (a span per request, continuing the caller's
``traceparent``) and Celery's publishing; each worker pool process instruments
Celery (a span per task, continuing the context the message carries). So a
job's spans share the trace id its ``traceparent`` and log lines show.
Without the packages or the endpoint nothing happens, and the service needs
neither.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
_started = False


def _start(service_name: str) -> bool:
    """Set up the tracer provider of this process, once; False when tracing is off or not installed."""
    global _started
    if _started:
        return True
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):  # OpenTelemetry's own variable, not a maskq setting
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s): "
            "pip install -r requirements-otel.txt",
            exc,
        )
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # the endpoint from the environment
    trace.set_tracer_provider(provider)
    _started = True
    log.info("OpenTelemetry: %s sends spans to %s", service_name, os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return True


def instrument_web(app) -> None:
    """Flask requests and Celery publishing (the context goes into each job's message)."""
    if not _start("maskq-web"):
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor().instrument_app(app)
    if not CeleryInstrumentor().is_instrumented_by_opentelemetry:
        CeleryInstrumentor().instrument()


def instrument_worker_process() -> None:
    """Celery tasks, in a pool process (after the fork: the exporter's thread is this process's own)."""
    if not _start("maskq-worker"):
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    if not CeleryInstrumentor().is_instrumented_by_opentelemetry:
        CeleryInstrumentor().instrument()


def flush() -> None:
    """Send what is buffered (a process about to end)."""
    if _started:
        from opentelemetry import trace

        trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]  # the SDK's provider (start())
