"""Where a repository is: a local directory or an S3 bucket and prefix, parsed from
--repo / $NBDBACKUP_REPO / `repository =`, plus the [s3] settings of the config file.

Pure data: no client library is imported here (see s3.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

# Bucket names as S3 allows them (3-63 characters, lower case, digits, dots, hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_PART = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing slash)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class S3Settings:
    """The [s3] table of the config file.  Credentials are never held here, only where to find them."""

    endpoint: str | None = None  # e.g. "https://s3.example.net:9000"; None: AWS
    region: str | None = None
    addressing: str = "auto"  # "auto", "path" or "virtual"
    verify_tls: bool = True
    ca_bundle: str | None = None
    profile: str | None = None  # a profile of the AWS shared credentials/config files
    credentials_file: Path | None = None  # an AWS-style credentials file, mode 0600
    retries: int = 5  # attempts per request for transient errors (backoff with jitter)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


Location = Path | S3Location


def parse_location(text: str) -> Location:
    """A local path, or s3://BUCKET[/PREFIX]; UsageError for a malformed s3:// URL."""
    if not text.lower().startswith("s3:"):
        return Path(text)
    if not text.startswith("s3://"):
        raise UsageError(f"repository {text!r} is not an s3:// URL", hint="write s3://BUCKET/PREFIX")
    rest = text[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UsageError(f"repository {text!r} names no bucket", hint="write s3://BUCKET/PREFIX")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(f"repository {text!r}: {bucket!r} is not a valid bucket name",
                         hint="3 to 63 lower-case letters, digits, dots and hyphens")
    parts = [p for p in prefix.split("/") if p]
    for p in parts:
        if p in (".", "..") or not _PREFIX_PART.match(p):
            raise UsageError(f"repository {text!r}: prefix part {p!r} is not allowed",
                             hint="letters, digits, dots, hyphens and underscores, separated by /")
    return S3Location(bucket, "/".join(parts))


def backend_for(where: Location | str, s3: S3Settings | None = None):
    """The Backend for a location; an S3 one is checked with one request (credentials, bucket, endpoint)."""
    if isinstance(where, str):
        where = parse_location(where)
    if isinstance(where, S3Location):
        from .s3 import S3Backend  # botocore is imported only for S3 repositories

        backend = S3Backend(where, s3 or S3Settings())
        backend.check()
        return backend
    from .backend import LocalBackend

    return LocalBackend(Path(where))
