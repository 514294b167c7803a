"""maskq's Python client: ``from maskq import Client`` (maskq/client.py)."""

from maskq.client import ApiError, Batch, Client, Job, WebhookVerificationError, build_request, verify_webhook

__all__ = ["ApiError", "Batch", "Client", "Job", "WebhookVerificationError", "build_request", "verify_webhook"]
