"""S3 object storage as a Backend: the only importer of botocore (boto3's core: boto3 itself
would add its transfer manager, which nbdbackup does not use, to every start).

Keys of the repository are object keys below the prefix (s3://BUCKET/PREFIX/<key>).

- PUT is atomic (readers see the old or the new object, never a part); replace
  needs nothing more.  exclusive=True sends `If-None-Match: *` (HTTP 412: the
  object exists -> FileExistsError).  A store that answers 501 to it gets a
  HEAD-then-PUT instead (atomic_exclusive turns False); a store that silently
  ignores the header cannot be detected: docs/FORMAT.md says what that risks.
- An acknowledged PUT is durable.  Plain writes (neither durable nor exclusive:
  chunks, indexes) are uploaded in the background, UPLOADS at a time with at most
  QUEUED waiting (write() blocks beyond that: memory stays bounded); sync() waits
  for all of them and raises the first failure (then forgets it), with the same
  error a synchronous PUT would have raised; until then plain writes raise it too.  Reading,
  sizing, listing or deleting a key waits for its pending upload first.
  durable/exclusive writes (manifests, records, locks) are PUT at once.
- Transient failures (connection errors, HTTP 500/502/503/504, SlowDown,
  RequestTimeout) are retried by botocore's "standard" retry mode: exponential
  backoff with full jitter, at most [s3] retries attempts, then reported.
- Credentials come from a 0600 credentials file named in the config, else from
  botocore's chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the
  shared files, ...).  They never reach a message: errors are rebuilt here from
  the S3 error code, and botocore's own (debug) logging is kept off.
"""

from __future__ import annotations

import builtins
import concurrent.futures as cf
import configparser
import datetime
import email.utils
import gzip
import json
import logging
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import (
    NbdBackupError,
    RepositoryUnusable,
    S3AccessDenied,
    S3BucketMissing,
    S3CredentialsRefused,
    S3Unreachable,
    UsageError,
)
from .backend import Buffers
from .location import S3Location, S3Settings

# botocore.httpsession takes urllib3's SSLContext through urllib3.contrib.pyopenssl when it imports:
# that imports pyOpenSSL and cryptography's X.509 modules (~40 ms at every start) to hand back the
# class urllib3.util.ssl_ has anyway (nbdbackup never injects pyOpenSSL).  Its fallback takes that one.
sys.modules.setdefault("urllib3.contrib.pyopenssl", None)  # type: ignore[arg-type]

import botocore.config  # noqa: E402
import botocore.exceptions as bex  # noqa: E402
import botocore.handlers  # noqa: E402
import botocore.loaders  # noqa: E402
import botocore.session  # noqa: E402
import botocore.utils  # noqa: E402

# botocore logs request headers (the access key id among them) at DEBUG: keep it quiet even with --debug.
for _name in ("boto3", "botocore", "urllib3", "s3transfer"):
    logging.getLogger(_name).setLevel(logging.WARNING)
log = logging.getLogger(__name__)

CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
                    "AuthorizationHeaderMalformed", "InvalidSecurity", "InvalidClientTokenId", "MissingSecurityHeader"}
DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem"}
TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "ThrottlingException"}
UPLOADS = 8  # background PUTs in flight
QUEUED = 8  # background PUTs waiting for a slot (each holds its object: QUEUED + UPLOADS objects at most)
POOL = 32  # HTTP connections: UPLOADS + the pipelines' workers (restore, verify, copy) fit


class S3Backend:
    atomic_exclusive = True

    def __init__(self, where: S3Location, settings: S3Settings) -> None:
        self.where = where
        self.settings = settings
        self.location = str(where)
        self.bucket = where.bucket
        self.root = f"{where.prefix}/" if where.prefix else ""
        self.client = _client(settings, self.location)
        self._uploads: cf.ThreadPoolExecutor | None = None  # started by the first background write
        self._slots = threading.BoundedSemaphore(UPLOADS + QUEUED)
        self._pending: dict[str, cf.Future] = {}
        self._mutex = threading.Lock()
        self._failed: BaseException | None = None
        self._checking: cf.Future | None = None  # start_check(): the opening check, running alongside the first request

    # -- the Backend calls --------------------------------------------------

    def read(self, key: str) -> bytes:
        got = self._get(key)
        assert got is not None
        return got[1]

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            self._head(key)  # FileNotFoundError as for any read
            return b""
        got = self._get(key, Range=f"bytes={offset}-{offset + length - 1}")
        if got is None:  # the range starts at or past the object's end
            return b""
        resp, body = got
        if "ContentRange" not in resp:  # a server that ignores Range sends the whole object
            return body[offset:offset + length]
        return body

    def _get(self, key: str, **args: Any) -> tuple[dict, bytes] | None:
        """GET key: (the response, the body); None for HTTP 416 (a range past the object's end)."""
        self._settle(key)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **args)
            body = resp["Body"].read()
        except bex.ClientError as exc:
            self._checked()  # the opening check's error first: it tells the causes apart
            if _code(exc) in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from None
            if "Range" in args and (_code(exc) == "InvalidRange" or _status(exc) == 416):
                return None
            raise self._error(exc, f"read {key}") from None
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised when not a client error
            self._checked()
            raise self._error(exc, f"read {key}") from None
        self._checked()  # an answer counts only from a server that passed the check
        return resp, body

    def write(self, key: str, data: Buffers, *, durable: bool = False, exclusive: bool = False) -> None:
        blob = data if isinstance(data, bytes) else bytes(data) if isinstance(data, (bytearray, memoryview)) else b"".join(data)
        if durable or exclusive:
            self._settle(key)
            self._put(key, blob, exclusive=exclusive)
        else:
            self._queue(key, blob)

    def _put(self, key: str, blob: bytes, *, exclusive: bool) -> None:
        self._checked()
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": blob}
        if exclusive and not self.atomic_exclusive:
            if self.exists(key):
                raise FileExistsError(key)
        elif exclusive:
            args["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**args)
        except bex.ClientError as exc:
            code = _code(exc)
            if exclusive and (code in ("PreconditionFailed", "412") or _status(exc) == 412):
                raise FileExistsError(key) from None
            if exclusive and code == "NotImplemented" and self.atomic_exclusive:
                self.atomic_exclusive = False  # the store does not do conditional writes
                return self._put(key, blob, exclusive=True)
            raise self._error(exc, f"write {key}") from None
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"write {key}") from None

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> Iterator[str]:
        folder = self._listing(prefix)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            keys = [obj["Key"][len(self.root):] for page in pages for obj in page.get("Contents", ())]
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"list {prefix or 'the repository'}") from None
        yield from keys

    def list_first(self, prefix: str) -> tuple[builtins.list[str], bool]:
        """The keys of list(prefix) that one request returns (up to 1000), and whether that was all."""
        folder = self._listing(prefix)
        try:
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=folder)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"list {prefix or 'the repository'}") from None
        return [obj["Key"][len(self.root):] for obj in resp.get("Contents", ())], not resp.get("IsTruncated")

    def _listing(self, prefix: str) -> str:
        """The object-key prefix to list for the repository folder prefix, once the uploads below it
        have landed and the opening check has passed."""
        folder = prefix.rstrip("/") + "/" if prefix else ""
        self._settle_below(folder)
        self._checked()
        return self.root + folder

    def delete(self, key: str) -> None:
        self._settle(key)
        self._checked()
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except bex.ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return
            raise self._error(exc, f"delete {key}") from None
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"delete {key}") from None

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def age(self, key: str) -> float:
        """LastModified against the server's own Date header: both by the store's clock."""
        head = self._head(key)
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date) if date else None
        if now is None:
            import datetime

            now = datetime.datetime.now(datetime.UTC)
        return max(0.0, (now - head["LastModified"]).total_seconds())

    def remove_folder(self, prefix: str) -> None:
        pass  # an object store has no folders

    def delete_partial_writes(self) -> None:
        pass  # a PUT is all or nothing; nbdbackup does not use multipart uploads

    def sync(self) -> None:
        """Wait for every background upload; an acknowledged PUT is durable."""
        self._settle_below("")
        with self._mutex:
            failed, self._failed = self._failed, None
            uploads, self._uploads = self._uploads, None
        if uploads is not None:  # idle now: its threads end, so the program can leave at once (cli.leave)
            uploads.shutdown()
        if failed is not None:
            raise failed

    # -- background uploads ------------------------------------------------------

    def _queue(self, key: str, blob: bytes) -> None:
        if self._failed is not None:  # stop early: the backup fails with the first upload's error
            raise self._failed
        self._key(key)  # a bad key fails here, not in the background
        self._settle(key)  # two writes of one key land in order
        self._slots.acquire()  # blocks while UPLOADS + QUEUED are pending: bounded memory
        try:
            with self._mutex:
                if self._uploads is None:
                    self._uploads = cf.ThreadPoolExecutor(UPLOADS, "s3-upload")
                fut = self._uploads.submit(self._put, key, blob, exclusive=False)
                self._pending[key] = fut
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda f: self._finished(key, f))

    def _finished(self, key: str, fut: cf.Future) -> None:
        with self._mutex:
            if self._pending.get(key) is fut:
                del self._pending[key]
            exc = fut.exception()
            if exc is not None and self._failed is None:
                self._failed = exc
        self._slots.release()

    def _settle(self, key: str) -> None:
        with self._mutex:
            fut = self._pending.get(key)
        if fut is not None:
            cf.wait([fut])

    def _settle_below(self, prefix: str) -> None:
        with self._mutex:
            futs = [f for k, f in self._pending.items() if k.startswith(prefix)]
        cf.wait(futs)

    # -- opening ---------------------------------------------------------------

    def check(self) -> None:
        """One request that tells the credentials, the bucket and the endpoint apart."""
        try:
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.root, MaxKeys=1)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "list the bucket") from None
        if resp.get("Name") != self.bucket:
            raise S3Unreachable(f"{self._endpoint()} does not answer like an S3 server", hint="check [s3] endpoint in the config file")

    def start_check(self) -> None:
        """check() in a thread: the first request (config.json) goes out alongside it, one round
        trip instead of two.  Every call waits for the check and raises its error before its own,
        and no answer is returned before the check has passed."""
        fut: cf.Future = cf.Future()

        def run() -> None:
            try:
                self.check()
                fut.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

        self._checking = fut
        threading.Thread(target=run, name="s3-check", daemon=True).start()

    def _checked(self) -> None:
        fut = self._checking
        if fut is not None:
            fut.result()
            self._checking = None

    # -- helpers ---------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad repository key {key!r}")
        return self.root + key

    def _head(self, key: str) -> dict[str, Any]:
        self._settle(key)
        self._checked()
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except bex.ClientError as exc:
            if _status(exc) == 404 and _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(key) from None
            raise self._error(exc, f"read {key}") from None
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"read {key}") from None

    def _endpoint(self) -> str:
        return self.settings.endpoint or "the AWS S3 endpoint"

    def _error(self, exc: BaseException, what: str) -> NbdBackupError:
        """A one-line NbdBackupError for exc; built from codes only, so no credential leaks into it."""
        if isinstance(exc, NbdBackupError):
            return exc
        where = self.location
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return S3CredentialsRefused(f"no S3 credentials found for {where}",
                                        hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or credentials_file in the config file's [s3] table")
        if isinstance(exc, bex.ClientError):
            code, status = _code(exc), _status(exc)
            if code in CREDENTIAL_CODES:
                return S3CredentialsRefused(f"{self._endpoint()} refused the S3 credentials ({code}) for {where}",
                                            hint="check the access key and secret")
            if code == "NoSuchBucket":
                return S3BucketMissing(f"bucket {self.bucket!r} does not exist at {self._endpoint()}",
                                       hint="create it first; nbdbackup never creates buckets")
            if code in DENIED_CODES or status == 403:
                return S3AccessDenied(f"access denied to {where} ({code or status}): the bucket belongs to another account "
                                      "or these credentials may not use it", hint="check the bucket name and its policy")
            if code in TRANSIENT_CODES or (status or 0) >= 500:
                return S3Unreachable(f"the S3 server failed to {what} in {where} ({code or status}) after {self.settings.retries} attempts",
                                     hint="try again later; older backups are untouched")
            if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed"):
                return RepositoryUnusable(f"bucket {self.bucket!r} is in another region", hint="set [s3] region")
            return RepositoryUnusable(f"S3 refused to {what} in {where} ({code or status})")
        if isinstance(exc, bex.SSLError):
            return S3Unreachable(f"TLS with {self._endpoint()} failed", hint="check [s3] endpoint, ca_bundle or verify_tls")
        if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ConnectTimeoutError,
                            bex.ReadTimeoutError, bex.HTTPClientError)):
            return S3Unreachable(f"cannot reach the S3 endpoint {self._endpoint()} to {what} in {where} "
                                 f"(after {self.settings.retries} attempts)", hint="check [s3] endpoint and the network; older backups are untouched")
        if isinstance(exc, bex.ResponseParserError):
            return S3Unreachable(f"{self._endpoint()} does not answer like an S3 server", hint="check [s3] endpoint in the config file")
        if isinstance(exc, bex.BotoCoreError):
            return RepositoryUnusable(f"cannot {what} in {where}: {type(exc).__name__}")
        raise exc


def _code(exc: bex.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: bex.ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _credentials(settings: S3Settings) -> dict[str, str]:
    """Keys from [s3] credentials_file (AWS shared-credentials format, mode 0600 or stricter)."""
    path = settings.credentials_file
    if path is None:
        return {}
    try:
        st = os.stat(path)
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the S3 credentials file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"the S3 credentials file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o})", hint=f"chmod 600 {path}")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        raise UsageError(f"the S3 credentials file {path} is not in the AWS credentials format") from None
    section = settings.profile or "default"
    if not parser.has_section(section):
        raise UsageError(f"the S3 credentials file {path} has no [{section}] section")
    sec = parser[section]
    if "aws_access_key_id" not in sec or "aws_secret_access_key" not in sec:
        raise UsageError(f"[{section}] of {path} needs aws_access_key_id and aws_secret_access_key")
    keys = {"aws_access_key_id": sec["aws_access_key_id"], "aws_secret_access_key": sec["aws_secret_access_key"]}
    if "aws_session_token" in sec:
        keys["aws_session_token"] = sec["aws_session_token"]
    return keys


class _JSONFiles(botocore.loaders.JSONFileLoader):
    """botocore's data files (FILE.json, else FILE.json.gz, as botocore looks for them) decoded into
    plain dicts, which keep the files' order as the OrderedDicts botocore asks json for do, at a
    third of the cost: ~35 ms less for every S3 client (endpoints.json alone is 1.2 MB)."""

    def load_file(self, file_path: str) -> Any:
        for ext, opener in ((".json", open), (".json.gz", gzip.open)):
            try:
                with opener(file_path + ext, "rb") as fp:
                    payload = fp.read()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            return json.loads(payload)
        return None


class _S3Loader(botocore.loaders.Loader):
    """botocore's loader (same search path, same files, cached the same way) for a process that
    only makes S3 clients: it does not list the folders of the ~450 services botocore knows
    (thousands of stat calls, tens of ms of CPU, twice per client) to learn that S3 is one."""

    FILE_LOADER_CLASS = _JSONFiles

    def list_available_services(self, type_name: str) -> list[str]:
        return ["s3"]


def _loader(data_path: str | None) -> botocore.loaders.Loader:
    """botocore.loaders.create_loader, with _S3Loader."""
    if data_path is None:
        return _S3Loader()
    return _S3Loader(extra_search_paths=[os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)])


def _timestamp(value: Any) -> datetime.datetime:
    """botocore's timestamp parser, fast for the two forms S3 answers with: ISO 8601 in XML bodies
    (`2026-11-30T10:53:48.000Z`: every key of a listing has one) and HTTP dates in headers
    (`Last-Modified: Mon, 30 Nov 2026 10:53:48 GMT`).  botocore's own goes through dateutil at
    ~0.1 ms each (60-110 ms of CPU to list 600 chunks); these take microseconds.  The same instants,
    timezone-aware; anything else is left to botocore's."""
    if isinstance(value, str):
        try:
            if value.endswith("Z") and "T" in value:
                return datetime.datetime.fromisoformat(value)
            if value.endswith(" GMT"):
                parsed = email.utils.parsedate_to_datetime(value)
                if parsed.tzinfo is not None:
                    return parsed
        except (TypeError, ValueError):
            pass
    return botocore.utils.parse_timestamp(value)


def _client(settings: S3Settings, where: str) -> Any:
    keys = _credentials(settings)
    session = botocore.session.Session(profile=None if keys else settings.profile)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
    if keys:
        session.set_credentials(keys["aws_access_key_id"], keys["aws_secret_access_key"], keys.get("aws_session_token"))
    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": settings.retries},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=POOL,
        s3={"addressing_style": settings.addressing},
        # Servers other than AWS do not all know the newer default checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    verify: bool | str = settings.ca_bundle or settings.verify_tls
    try:
        session.register_component("data_loader", _loader(session.get_config_variable("data_path")))
        client = session.create_client("s3", endpoint_url=settings.endpoint, config=config, verify=verify,
                                     region_name=settings.region or "us-east-1")
    except bex.ProfileNotFound:
        raise UsageError(f"S3 profile {settings.profile!r} is not in the AWS config or credentials files") from None
    except ValueError as exc:  # a malformed endpoint URL
        raise UsageError(f"[s3] endpoint {settings.endpoint!r} is not a URL ({exc})") from None
    # botocore wraps a PutObject body that is bytes in a BytesIO: http.client then sends it 8 KiB per
    # system call (512 per 4 MiB chunk), after an `Expect: 100-continue` round trip to the server.
    # Left as bytes, headers and body go out in one send (the request is the same bytes on the wire).
    client.meta.events.unregister("before-parameter-build.s3.PutObject", botocore.handlers.convert_body_to_file_like_object)
    if log.isEnabledFor(logging.DEBUG):
        client.meta.events.register("before-parameter-build.s3", _trace)
    return client


def _trace(model: Any, params: dict, **_: Any) -> None:
    """--debug: one line per S3 request (operation and key: never a header, so no credential)."""
    log.debug("S3 %s %s", model.name, params.get("Key", params.get("Prefix", "")))
