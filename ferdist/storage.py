"""Read and write whole objects on a local folder or an S3-compatible store, by URI.

URIs are plain paths, ``file://`` URLs or ``s3://bucket/key``. S3 goes through boto3 with bounded timeouts and
botocore's standard retry mode, so a flaky connection is retried and an unreachable endpoint fails in seconds
rather than hanging; checks that run before a job starts (`check_reachable`, `check_writable`) use a shorter
timeout still, so a server that accepts connections but never answers is named within seconds. Inside a training
run, reads ride out an outage of up to ``outage_s`` (see `ferdist.outage`). The endpoint comes from the caller
(``--endpoint-url``, ``data.endpoint_url``) or boto3's own ``AWS_ENDPOINT_URL``, which is how MinIO, SeaweedFS and
other S3-compatible stores are reached. Every boto3 error is turned into one `FerdistError` sentence; credentials
never appear in messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ferdist.errors import FerdistError, MissingError
from ferdist.outage import endpoint_base, retried

# Objects above this size go up in parts, so a lost connection costs one part, not the object.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
READ_ATTEMPTS = 3


@dataclass(frozen=True)
class Location:
    """A parsed storage URI: either a local path or an S3 bucket and key."""

    uri: str
    bucket: str | None = None
    key: str = ""
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def join(self, name: str) -> Location:
        """The location of ``name`` inside this one (a folder or key prefix)."""
        if self.is_s3:
            key = f"{self.key.rstrip('/')}/{name}" if self.key.strip("/") else name
            return Location(uri=f"s3://{self.bucket}/{key}", bucket=self.bucket, key=key)
        assert self.path is not None
        return Location(uri=str(self.path / name), path=self.path / name)


def parse_uri(uri: str) -> Location:
    """Parses a local path, ``file://`` URL or ``s3://bucket/prefix`` into a `Location`."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise FerdistError(f"'{uri}' names no bucket; write it as s3://BUCKET/PREFIX")
        if "@" in parsed.netloc:  # s3://user:secret@bucket: a bucket name holds no @, and no S3 client reads one
            from ferdist.config import redact_uri

            raise FerdistError(f"'{redact_uri(uri)}' holds credentials before its bucket; write s3://BUCKET/PREFIX and "
                               "give the keys as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)")
        return Location(uri=uri, bucket=parsed.netloc, key=parsed.path.lstrip("/"))
    if parsed.scheme == "file":
        return Location(uri=uri, path=Path(parsed.path))
    if parsed.scheme in ("", "c", "d") or len(parsed.scheme) == 1:  # "c:" is a Windows drive, not a scheme
        return Location(uri=uri, path=Path(uri))
    raise FerdistError(f"unsupported storage URI '{uri}'; use a local path, file://PATH or s3://BUCKET/PREFIX")


def names_local_path(text: str) -> bool:
    """Whether ``text`` is a plain local path, not a scheme's URI or name (``s3://``, ``file://``, ``models:/``,
    ``random:tiny``, ``peer:fer``): its first path segment holds no colon."""
    return ":" not in text.split("/", 1)[0]


def resolve_endpoint(endpoint_url: str | None) -> str | None:
    """The S3 endpoint a client will use: ``endpoint_url``, else boto3's AWS_ENDPOINT_URL(_S3), else None (AWS)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, pid: int, quick: bool = False) -> Any:
    # One client per process: boto3 clients are thread-safe but must not cross a fork, hence the pid in the key.
    import boto3
    from botocore.config import Config

    del pid
    config = Config(
        # A read timeout bounds the wait between bytes, not a whole transfer. The quick client is for checks before a
        # job starts: a server that accepts connections but never answers is named in ~10 s instead of minutes.
        connect_timeout=3 if quick else 5,
        read_timeout=5 if quick else 20,
        retries={"max_attempts": 2 if quick else 3, "mode": "standard"},
        # Path-style addressing works with every S3-compatible server (MinIO, moto, Ceph) as well as AWS.
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def s3_client(endpoint_url: str | None = None, *, quick: bool = False) -> Any:
    """The boto3 S3 client for this process (``endpoint_url=None`` lets boto3 read ``AWS_ENDPOINT_URL``); ``quick``:
    short timeouts, for checks before a job starts."""
    return _s3_client(endpoint_url, os.getpid(), quick)


@contextlib.contextmanager
def explained_s3_errors(loc: Location, endpoint_url: str | None) -> Iterator[None]:
    """Turns boto3's exceptions into one sentence naming the URI and the fix."""
    from botocore import exceptions as bx

    endpoint = resolve_endpoint(endpoint_url)
    where = f"'{loc.uri}'" + (f" at {endpoint_base(endpoint)}" if endpoint else "")
    try:
        yield
    except bx.NoCredentialsError:
        raise FerdistError(
            f"no S3 credentials found for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or run where an instance role grants access"
        ) from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as exn:
        base = endpoint_base(getattr(exn, "kwargs", {}).get("endpoint_url") or endpoint)
        problem = (f"the S3 endpoint {base} accepts connections but does not answer" if isinstance(
            exn, bx.ReadTimeoutError) else f"cannot reach the S3 endpoint {base}")  # fmt: skip
        raise FerdistError(
            f"{problem} (for '{loc.uri}'); check the endpoint setting (--endpoint-url, data.endpoint_url, "
            "checkpoint.endpoint_url or AWS_ENDPOINT_URL) and that the server is running"
        ) from None
    except (bx.IncompleteReadError, bx.ResponseStreamingError):
        raise FerdistError(
            f"the connection dropped while reading {where}, {READ_ATTEMPTS} times; check the network to the S3 endpoint"
        ) from None
    except bx.ClientError as exn:
        code = str(exn.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            raise FerdistError(
                f"bucket '{loc.bucket}' does not exist for {where}; create it (aws s3 mb s3://{loc.bucket}) "
                "or fix the URI"
            ) from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise MissingError(f"{where} does not exist") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            raise FerdistError(
                f"S3 refused access to {where} ({code}); check the credentials and the bucket policy"
            ) from None
        raise FerdistError(f"S3 request for {where} failed: {code or exn}") from None


def read_bytes(uri: str, *, endpoint_url: str | None = None, outage_s: float = 0.0) -> bytes:
    """Reads a whole object or file (shards are small; reading whole makes retries simple).

    ``outage_s`` > 0 (inside a run): an unreachable store is waited for that long (see `ferdist.outage`).
    """
    loc = parse_uri(uri)
    if not loc.is_s3:
        assert loc.path is not None
        try:
            return loc.path.read_bytes()
        except FileNotFoundError:
            raise MissingError(f"'{uri}' does not exist") from None
        except IsADirectoryError:
            raise FerdistError(f"'{uri}' is a folder, not a file") from None
        except NotADirectoryError:
            file = next((p for p in loc.path.parents if p.exists() and not p.is_dir()), None)
            raise FerdistError(f"'{uri}' cannot exist: {file or 'a folder in its path'} is not a folder") from None
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    client = s3_client(endpoint_url)

    def get() -> bytes:
        # botocore retries the request; a connection dropped while the body streams is retried here.
        for attempt in range(READ_ATTEMPTS):
            try:
                return client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
            except (IncompleteReadError, ResponseStreamingError):
                if attempt == READ_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    with explained_s3_errors(loc, endpoint_url):
        if outage_s > 0:
            return retried(get, budget_s=outage_s, what=f"reading {uri}")
        return get()


def object_sha256(uri: str, *, endpoint_url: str | None = None) -> str | None:
    """The sha256 recorded for an object when ferdist wrote it, or None if it is absent or was written otherwise."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        assert loc.path is not None
        if not loc.path.is_file():
            return None
        return hashlib.sha256(loc.path.read_bytes()).hexdigest()
    from botocore.exceptions import ClientError

    client = s3_client(endpoint_url)
    with explained_s3_errors(loc, endpoint_url):
        try:
            head = client.head_object(Bucket=loc.bucket, Key=loc.key)
        except ClientError as exn:
            if str(exn.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
    return head.get("Metadata", {}).get("sha256")


def write_bytes(uri: str, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Writes a whole object atomically: readers see the old object or the new one, never a prefix of it."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        assert loc.path is not None
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=loc.path.parent, prefix=f".{loc.path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    from boto3.s3.transfer import TransferConfig

    client = s3_client(endpoint_url)
    transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
    extra = {"Metadata": {"sha256": hashlib.sha256(data).hexdigest()}}
    with explained_s3_errors(loc, endpoint_url):
        client.upload_fileobj(io.BytesIO(data), loc.bucket, loc.key, ExtraArgs=extra, Config=transfer)


def delete(uri: str, *, endpoint_url: str | None = None) -> None:
    """Deletes a file or object if it exists."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        assert loc.path is not None
        with contextlib.suppress(FileNotFoundError):
            loc.path.unlink()
        return
    client = s3_client(endpoint_url)
    with explained_s3_errors(loc, endpoint_url):
        client.delete_object(Bucket=loc.bucket, Key=loc.key)


def check_writable(uri: str, *, endpoint_url: str | None = None) -> None:
    """Fails early, before any work, if the destination bucket or folder cannot be written; leaves nothing behind.

    A local folder that does not exist yet is not created here (a job that then stops on bad input must leave no
    empty folder behind): its nearest existing parent must be a writable folder. On S3 the bucket must exist and a
    probe object under the prefix is written and deleted, so read-only credentials are caught now, not mid-run.
    """
    loc = parse_uri(uri)
    if not loc.is_s3:
        assert loc.path is not None
        existing = loc.path.expanduser().absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise FerdistError(f"cannot create the folder '{uri}': {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "folder" if existing == loc.path.expanduser().absolute() else f"parent folder {existing}"
            raise FerdistError(f"the {what} of '{uri}' is not writable; choose another destination") from None
        return
    client = s3_client(endpoint_url, quick=True)
    with explained_s3_errors(loc, endpoint_url):
        _head_bucket(client, loc)
        probe = loc.join(".ferdist-write-check").key
        client.put_object(Bucket=loc.bucket, Key=probe, Body=b"")
        client.delete_object(Bucket=loc.bucket, Key=probe)


def check_reachable(uri: str, *, endpoint_url: str | None = None) -> None:
    """For s3:// URIs: the endpoint answers in seconds, the credentials are accepted and the bucket exists.

    Raises:
        FerdistError: one sentence naming the endpoint, the bucket or the credentials problem.
    """
    loc = parse_uri(uri)
    if loc.is_s3:
        with explained_s3_errors(loc, endpoint_url):
            _head_bucket(s3_client(endpoint_url, quick=True), loc)


def _head_bucket(client: Any, loc: Location) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=loc.bucket)
    except ClientError as exn:
        if str(exn.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
            # HEAD responses have no body, so a missing bucket arrives as a bare 404.
            exn.response["Error"]["Code"] = "NoSuchBucket"
        elif str(exn.response.get("Error", {}).get("Code")) in ("403", "Forbidden"):
            exn.response["Error"]["Code"] = "AccessDenied"
        raise


def list_prefix(uri: str, *, endpoint_url: str | None = None, limit: int = 1000) -> list[str]:
    """Names (relative to ``uri``) of up to ``limit`` files in a local folder or objects under an S3 prefix; [] when
    there is nothing there."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        assert loc.path is not None
        root = loc.path.expanduser()
        if not root.is_dir():
            return [root.name] if root.exists() else []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())[:limit]
    client = s3_client(endpoint_url, quick=True)
    prefix = loc.key.rstrip("/") + "/" if loc.key.strip("/") else ""
    with explained_s3_errors(loc, endpoint_url):
        listed = client.list_objects_v2(Bucket=loc.bucket, Prefix=prefix, MaxKeys=limit)
    return [obj["Key"][len(prefix) :] for obj in listed.get("Contents", [])]


def download_prefix(uri: str, dest: Path, *, endpoint_url: str | None = None) -> int:
    """Copies every object under the S3 prefix ``uri`` into folder ``dest`` (keeping relative names); returns the count.

    Files already in ``dest`` with the same size are kept, so a second call on a warm cache is a listing only.
    """
    loc = parse_uri(uri)
    if not loc.is_s3:
        raise FerdistError(f"'{uri}' is not an s3:// prefix")
    client = s3_client(endpoint_url)
    prefix = loc.key.rstrip("/") + "/" if loc.key.strip("/") else ""
    count = 0
    with explained_s3_errors(loc, endpoint_url):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                target = dest / obj["Key"][len(prefix) :]
                if not (target.is_file() and target.stat().st_size == obj["Size"]):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".part")
                    client.download_file(loc.bucket, obj["Key"], str(tmp))
                    tmp.replace(target)
                count += 1
    if not count:
        endpoint = resolve_endpoint(endpoint_url)
        raise FerdistError(f"nothing under '{uri}'" + (f" at {endpoint_base(endpoint)}" if endpoint else ""))
    return count
