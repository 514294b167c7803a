"""S3 and any S3-compatible store (MinIO, Ceph, ...) as object storage, with boto3.

The key layout is the local backend's (``tenants/{tenant}/jobs/{job_id}/...``).
Large objects go up in parts (boto3's managed transfer); :meth:`S3Storage.url`
hands out presigned GET URLs so clients fetch masks and inputs from the store
itself. Every failure to reach the store, and every answer that says the store
is unusable right now (no such bucket, 5xx, throttling, bad credentials), is a
:class:`~domain.errors.StorageUnavailable`; a missing key is a ``KeyError``.

Run ``python -m storage.s3`` to check the configured bucket and credentials.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import TYPE_CHECKING

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from domain.errors import StorageUnavailable
from storage.base import Storage

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_MISSING_BUCKET = {"NoSuchBucket"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "403",
}
# S3 allows a presigned (SigV4) URL to live 7 days at most.
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600
_DELETE_BATCH = 1000


class StorageMisconfigured(RuntimeError):
    """The store answers, but the configured bucket or credentials cannot work: fix the settings."""


class S3Storage(Storage):
    """Objects in one S3 bucket; ``endpoint_url`` and ``path_style`` point it at MinIO and friends."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        path_style: bool = False,
        presign_expiry_s: int = 3600,
        multipart_threshold_bytes: int = 8 * 1024 * 1024,
        timeout_s: float = 5.0,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.presign_expiry_s = min(presign_expiry_s, MAX_PRESIGN_EXPIRY_S)
        config = Config(
            region_name=region,
            signature_version="s3v4",
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            # Few quick retries here: the caller (a worker) retries with its own, longer backoff.
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=32,
            s3={"addressing_style": "path" if path_style else "auto"},
            # Checksums only where S3 requires them: older MinIO and Ceph reject the newer default trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # Unset credentials mean boto3's own chain (environment, profile, instance role).
        session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key)
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # multipart_chunksize: S3 requires parts of at least 5 MiB (all but the last).
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold_bytes,
            multipart_chunksize=max(multipart_threshold_bytes, 5 * 1024 * 1024),
            max_concurrency=4,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        if not settings.s3_bucket:
            raise StorageMisconfigured("MASKQ_S3_BUCKET is not set: there is no bucket to use")
        secret = settings.s3_secret_access_key
        return cls(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            path_style=settings.s3_path_style,
            presign_expiry_s=settings.s3_presign_expiry_s,
            multipart_threshold_bytes=settings.s3_multipart_threshold_bytes,
            timeout_s=settings.s3_timeout_s,
        )

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, key, ExtraArgs={"ContentType": content_type}, Config=self.transfer
            )
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise self._unavailable("write", key, exc) from exc

    def get(self, key: str) -> bytes:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return body
        except ClientError as exc:
            if _code(exc) in _MISSING_KEY:
                raise KeyError(key) from None
            raise self._unavailable("read", key, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("read", key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if _code(exc) in _MISSING_KEY:
                return False
            raise self._unavailable("look up", key, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("look up", key, exc) from exc

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", ()))
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable("list", prefix, exc) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable("delete", key, exc) from exc

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + _DELETE_BATCH]]
            try:
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except (BotoCoreError, ClientError) as exc:
                raise self._unavailable("delete under", prefix, exc) from exc
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageUnavailable(
                    f"cannot delete {len(answer['Errors'])} object(s) under {prefix} in bucket {self.bucket}: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def url(self, key: str) -> str:
        # Signing is local computation: no request goes to the store here.
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_expiry_s
        )
        return url

    def identity(self) -> str:
        # The bucket alone: the web and a worker may reach one store by different endpoints (a cluster's
        # internal name and a public one), and must not be told they are on two.
        return f"s3:{self.bucket}"

    def check(self) -> None:
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable("reach", f"bucket {self.bucket}", exc) from exc

    def startup_check(self) -> None:
        """Raise :class:`StorageMisconfigured` if the bucket is missing or the credentials are refused.

        A store that cannot be reached at all is only logged: it may come up
        after maskq does, and workers retry while it is away.
        """
        try:
            # ListObjectsV2 rather than HeadBucket: a HEAD answer has no body, so no error code to tell causes apart.
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except ClientError as exc:
            code = _code(exc)
            where = f" at {self.endpoint_url}" if self.endpoint_url else ""
            if code in _MISSING_BUCKET:
                raise StorageMisconfigured(
                    f"S3 bucket {self.bucket!r} does not exist{where}: create it, or set MASKQ_S3_BUCKET "
                    "to an existing bucket"
                ) from None
            if code in _BAD_CREDENTIALS:
                raise StorageMisconfigured(
                    f"S3{where} refused the credentials for bucket {self.bucket!r} ({code}: {_message(exc)}): "
                    "check MASKQ_S3_ACCESS_KEY_ID and MASKQ_S3_SECRET_ACCESS_KEY and the bucket's policy"
                ) from None
            log.warning("S3 bucket %s: %s; starting anyway", self.bucket, _message(exc))
        except BotoCoreError as exc:
            log.warning(
                "S3 store %s cannot be reached (%s); starting anyway, jobs wait for it",
                self.endpoint_url or "(AWS)",
                exc,
            )

    def _unavailable(self, action: str, key: str, exc: Exception) -> StorageUnavailable:
        cause = exc
        inner = exc.__cause__ or exc.__context__
        if isinstance(exc, S3UploadFailedError) and isinstance(inner, ClientError):
            cause = inner
        detail = f"{_code(cause)}: {_message(cause)}" if isinstance(cause, ClientError) else str(cause)
        return StorageUnavailable(f"cannot {action} {key} in S3 bucket {self.bucket}: {detail}")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return error.get("Message") or error.get("Code") or str(exc)


def main() -> int:
    """``python -m storage.s3``: say whether the configured bucket is usable."""
    from config.settings import load_settings

    settings = load_settings()
    if not settings.s3_bucket:
        print("MASKQ_S3_BUCKET is not set: maskq uses the local folder", settings.storage_root)
        return 0
    storage = S3Storage.from_settings(settings)
    try:
        storage.startup_check()
        storage.check()
    except (StorageMisconfigured, StorageUnavailable) as exc:
        print(f"not usable: {exc}", file=sys.stderr)
        return 1
    print(f"S3 bucket {settings.s3_bucket} is usable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
