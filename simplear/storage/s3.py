"""A run dir on S3 (`s3://bucket/prefix`), or on any store that speaks S3's API with conditional writes
(MinIO, Ceph RGW, R2 and moto answer `If-None-Match` / `If-Match` on PutObject).

Control plane through boto3: create-only is `PutObject(IfNoneMatch="*")`, compare-and-swap is
`PutObject(IfMatch=<ETag>)`, a conditional delete is `DeleteObject(IfMatch=...)`; a failed condition answers
412 (409 when two conditional writes of one key overlap, which loses the same way). Endpoint, region and
credentials come from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...), as
for every AWS tool. The data plane (Ray Data, Ray Train) gets a `pyarrow.fs.S3FileSystem` from the same settings.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from simplear.storage.base import Blob, Listed, Store, StoreError

LOST = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409"}


def parse_s3(uri: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{uri!r}: give the endpoint and credentials in the environment (AWS_ENDPOINT_URL, "
                         "AWS_ACCESS_KEY_ID, AWS_PROFILE ...), not in the URI")
    return parsed.netloc, parsed.path.strip("/")


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


class S3Store(Store):
    def __init__(self, uri: str):
        self.bucket, self.prefix = parse_s3(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __getstate__(self) -> dict:  # a boto3 client does not pickle: each process makes its own
        return {"bucket": self.bucket, "prefix": self.prefix, "uri": self.uri}

    @cached_property
    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", config=Config(retries={"max_attempts": 8, "mode": "standard"}))

    def filesystem(self):
        from pyarrow import fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs = {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return fs.S3FileSystem(**kwargs), f"{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except ClientError:
            raise
        except BotoCoreError as e:
            raise StoreError(f"{what} {self.child(key)}: {e}") from e

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("looking up", key, self.client.head_object)
            return True
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StoreError(f"looking up {self.child(key)}: {e}") from e

    def read(self, key: str) -> Blob | None:
        from botocore.exceptions import ClientError

        try:
            r = self._call("reading", key, self.client.get_object)
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise StoreError(f"reading {self.child(key)}: {e}") from e
        return Blob(r["Body"].read(), r["ETag"])

    def write(self, key: str, data: bytes) -> str:
        return self._put(key, data)

    def _put(self, key: str, data: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self._call("writing", key, self.client.put_object, Body=data, **condition)["ETag"]
        except ClientError as e:
            if condition and _code(e) in LOST:
                return None
            raise StoreError(f"writing {self.child(key)}: {e}") from e

    def create(self, key: str, data: bytes) -> str | None:
        return self._put(key, data, IfNoneMatch="*")

    def swap(self, key: str, data: bytes, version: str) -> str | None:
        return self._put(key, data, IfMatch=version)

    def delete(self, key: str, version: str | None = None) -> bool:
        from botocore.exceptions import ClientError

        if version is None and self.read(key) is None:
            return False
        try:
            self._call("deleting", key, self.client.delete_object, **({"IfMatch": version} if version else {}))
            return True
        except ClientError as e:
            if version and _code(e) in LOST:
                return False
            raise StoreError(f"deleting {self.child(key)}: {e}") from e

    def list(self, prefix: str = "") -> Iterator[Listed]:
        from botocore.exceptions import ClientError

        full = self._key(prefix.strip("/")) if prefix else self.prefix
        root = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if full and key != full and not key.startswith(full.rstrip("/") + "/"):
                        continue  # `a/b` lists `a/b` and `a/b/...`, not `a/bc`
                    yield Listed(key[len(root):], int(obj["Size"]), obj.get("ETag", ""))
        except ClientError as e:
            raise StoreError(f"listing {self.child(prefix)}: {e}") from e

    def upload(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key))  # multipart above 8 MiB: whole at completion

    def download(self, key: str, local: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(local))
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                raise FileNotFoundError(self.child(key)) from None
            raise

    def move(self, src: str, dst: str) -> None:
        items = list(self.list(src))
        for item in items:
            target = dst + item.key[len(src.rstrip("/")):]
            self.client.copy({"Bucket": self.bucket, "Key": self._key(item.key)}, self.bucket, self._key(target))
        for item in items:
            self.delete(item.key)

    def describe(self) -> str:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        return f"bucket {self.bucket} at {endpoint}"

    def check(self) -> None:
        """Fail before any work when the bucket cannot be reached or written (a clear error, not a stage failure)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise StoreError(f"{self.uri}: cannot reach {self.describe()}: {e}. Set AWS_ENDPOINT_URL and credentials "
                             "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) in the environment") from None
