"""The object store through boto3: any S3 endpoint (AWS, S3Proxy, MinIO...)."""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from urllib.parse import urlsplit

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError

from streams.config import Config
from streams.core.errors import (
    PipelineError, SourceNotFound, SourceTooLarge, StorageRejected, StorageUnavailable,
)
from streams.metrics import count_read, count_written

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
                    "InternalError", "RequestTimeTooSkewed", "503", "500", "502", "504"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
        raise SourceNotFound(f"not an s3://bucket/key location: {uri[:200]}")
    return parts.netloc, parts.path.lstrip("/")


def _classify(exc: Exception, what: str) -> PipelineError:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND_CODES or status == 404:
            return SourceNotFound(f"{what}: not found")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return StorageUnavailable(f"{what}: S3 answered {code or status}")
        return StorageRejected(f"{what}: S3 refused ({code or status})")
    if isinstance(exc, (BotoConnectionError, BotoCoreError, OSError)):
        return StorageUnavailable(f"{what}: S3 unreachable ({type(exc).__name__})")
    return StorageUnavailable(f"{what}: {type(exc).__name__}")


def _content_md5(request, **_):
    """DeleteObjects needs a body checksum. botocore >= 1.36 sends CRC32 headers, which S3-compatible
    servers such as S3Proxy answer with 501 NotImplemented; Content-MD5 is what every S3 accepts."""
    for name in [h for h in request.headers.keys()
                 if h.lower().startswith("x-amz-checksum-") or h.lower() == "x-amz-sdk-checksum-algorithm"]:
        del request.headers[name]
    body = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
    request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


class ObjectStore:
    """Set up once (client, bucket probe), then get and put."""

    def __init__(self, config: Config, *, connect_timeout: float | None = None, read_timeout: float | None = None):
        self.config = config
        self.bucket = config.bucket
        self._session = boto3.session.Session()
        self._presigner = None
        self.client = self._session.client(
            "s3",
            endpoint_url=config.s3_endpoint_url,
            region_name=config.s3_region,
            # None falls back to boto3's own chain (environment, profile, instance role)
            aws_access_key_id=config.aws_access_key_id,
            aws_secret_access_key=config.aws_secret_access_key,
            config=BotoConfig(
                # unsigned payload: boto3's own choice over HTTPS; over plain HTTP it halves the cost of a PUT
                s3={"addressing_style": "path", "payload_signing_enabled": False},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=connect_timeout or config.limits.connect_timeout_s,
                read_timeout=read_timeout or config.limits.read_timeout_s,
                # a resize process's compute slots and upload threads (two per slot and lane) share this client
                max_pool_connections=max(32, 5 * config.resize_slots),
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

        self.client.meta.events.register("before-sign.s3.DeleteObjects", _content_md5)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status not in (404, 400):
                raise _classify(exc, f"bucket {self.bucket}") from None
        except Exception as exc:
            raise _classify(exc, f"bucket {self.bucket}") from None
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _classify(exc, f"bucket {self.bucket}") from None

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def url(self, key: str) -> str:
        return self.config.object_url(key)

    def presigned_url(self, uri: str, ttl_s: int) -> str:
        """A GET URL for ``s3://bucket/key`` that anyone holding it can open for ``ttl_s`` seconds, signed
        here with this process's credentials for its own endpoint (``S3_ENDPOINT_URL``): no request is
        made. SigV4 query signing, which AWS and S3Proxy accept (botocore would sign an ``us-east-1``
        URL with the deprecated SigV2 unless told)."""
        bucket, key = parse_s3_uri(uri)
        if self._presigner is None:
            self._presigner = self._session.client(
                "s3", endpoint_url=self.config.s3_endpoint_url, region_name=self.config.s3_region,
                aws_access_key_id=self.config.aws_access_key_id,
                aws_secret_access_key=self.config.aws_secret_access_key,
                # path style on a given endpoint (S3Proxy, MinIO), the virtual-host style on AWS
                config=BotoConfig(signature_version="s3v4",
                                  s3={"addressing_style": "path" if self.config.s3_endpoint_url else "virtual"}))
        return self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(ttl_s))

    def download(self, uri: str, path: Path | str, chunk: int = 1 << 20) -> int:
        """Write the object ``s3://bucket/key`` to ``path`` (through ``path.part``, renamed when complete,
        so a failed download leaves no partial file under the final name); return its size."""
        bucket, key = parse_s3_uri(uri)
        path = Path(path)
        part = path.with_name(path.name + ".part")
        written = 0
        with open(part, "wb") as f:  # a local error (no such folder, a full disk) is an OSError of its own
            try:
                try:
                    obj = self.client.get_object(Bucket=bucket, Key=key)
                    body = obj["Body"]
                    while True:
                        block = body.read(chunk)
                        if not block:
                            break
                        f.write(block)
                        written += len(block)
                except (BotoCoreError, ClientError, ConnectionError, TimeoutError) as exc:
                    raise _classify(exc, uri) from None  # other OSErrors are the file's own (a full disk)
                length = obj.get("ContentLength")
                if length is not None and written != length:
                    raise StorageUnavailable(f"{uri}: {written} of {length} bytes arrived")
            except BaseException:
                f.close()
                part.unlink(missing_ok=True)
                raise
        os.replace(part, path)
        return written

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                                   Metadata=metadata or {})
        except Exception as exc:
            raise _classify(exc, f"upload s3://{self.bucket}/{key}") from None
        count_written("staging" if key.startswith(self.config.staging_prefix) else "output", len(data))

    def copy(self, source_key: str, key: str, content_type: str, metadata: dict[str, str]) -> None:
        """A server-side copy within the bucket, with its own content type and metadata."""
        try:
            self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": source_key},
                                    MetadataDirective="REPLACE", ContentType=content_type, Metadata=metadata)
        except Exception as exc:
            raise _classify(exc, f"copy s3://{self.bucket}/{source_key} to {key}") from None

    def get(self, uri: str, max_bytes: int) -> bytes:
        """Read an object, refusing it past ``max_bytes`` (size from HEAD, then a reader that stops)."""
        bucket, key = parse_s3_uri(uri)
        try:
            obj = self.client.get_object(Bucket=bucket, Key=key)
            length = obj.get("ContentLength")
            if length is not None and length > max_bytes:
                obj["Body"].close()
                raise SourceTooLarge(f"{uri} is {length} bytes, more than the limit of {max_bytes}")
            data = obj["Body"].read(max_bytes + 1)
        except PipelineError:
            raise
        except Exception as exc:
            raise _classify(exc, uri) from None
        if len(data) > max_bytes:
            raise SourceTooLarge(f"{uri} is more than the limit of {max_bytes} bytes")
        count_read("s3", len(data))
        return data

    def head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise _classify(exc, key) from None
        except Exception as exc:  # the endpoint away (a connection error, a timeout): transient, as get's
            raise _classify(exc, key) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise _classify(exc, key) from None

    def delete_many(self, keys: list[str]) -> list[str]:
        """Delete up to 1,000 keys in one request; return the keys that could not be deleted."""
        try:
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys], "Quiet": True})
        except Exception as exc:
            raise _classify(exc, f"delete {len(keys)} objects") from None
        return [e.get("Key", "") for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys
