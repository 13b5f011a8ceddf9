"""Object stores behind one small interface: a local folder (the embedded default) or S3/MinIO.

Both make a written object visible only once it is complete: the folder writes a temporary file
and renames it; S3 PUTs are atomic by the protocol.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol
from urllib.parse import urlparse


_UMASK = os.umask(0)
os.umask(_UMASK)


class ObjectStoreError(RuntimeError):
    """The store could not be reached or refused an operation."""


class ObjectNotFound(ObjectStoreError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ObjectStore(Protocol):
    url: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def ping(self) -> None: ...  # raises ObjectStoreError when the store cannot be reached
    def check_writable(self) -> None: ...  # raises ObjectStoreError unless an object can be written


PROBE_KEY = ".strata-write-probe"


class LocalFolderStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)

    def ping(self) -> None:
        if not self.root.is_dir():
            raise ObjectStoreError(f"{self.root}: not a directory")

    def check_writable(self) -> None:
        """A probe file in an existing folder; for a new one, that it could be made (nothing is created)."""
        if self.root.is_dir():
            self.put_bytes(PROBE_KEY, b"")
            self.delete(PROBE_KEY)
            return
        ancestor = self.root.absolute()
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ObjectStoreError(f"{ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ObjectStoreError(f"cannot create folders in {ancestor} (permission denied)")

    def _path(self, key: str) -> Path:
        if not key.strip("/"):
            raise ObjectStoreError("empty object key")
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents and path != self.root.resolve():
            raise ObjectStoreError(f"key escapes the store: {key}")
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        except OSError as error:
            raise ObjectStoreError(f"{key}: {error}") from error
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # readable by other pods sharing the volume, as open() would
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as error:
            Path(tmp).unlink(missing_ok=True)
            raise ObjectStoreError(f"{key}: {error}") from error
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as error:
            raise ObjectStoreError(f"{key}: {error}") from error

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root / prefix if prefix.endswith("/") else self.root
        if not base.exists():
            return
        try:
            paths = sorted(base.rglob("*"))
        except OSError as error:
            raise ObjectStoreError(f"list {prefix}: {error}") from error
        for path in paths:
            if path.name.startswith(".tmp-"):
                continue
            key = path.relative_to(self.root).as_posix()
            if not key.startswith(prefix):
                continue
            try:
                if path.is_file():
                    yield ObjectInfo(key, path.stat().st_size)
            except FileNotFoundError:
                continue  # removed while listing

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as error:
            raise ObjectStoreError(f"delete {key}: {error}") from error


class S3Store:
    """An S3-compatible bucket (MinIO in production) through the minio SDK."""

    def __init__(self, bucket: str, prefix: str, endpoint: str, access_key: str | None, secret_key: str | None,
                 create_bucket: bool = True):
        import certifi
        import urllib3
        from minio import Minio

        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # Bounded timeouts and retries: an unreachable store must fail a lookup in seconds, not minutes.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=float(os.environ.get("STRATA_S3_CONNECT_TIMEOUT", "3")),
                                    read=float(os.environ.get("STRATA_S3_READ_TIMEOUT", "60"))),
            retries=urllib3.Retry(total=2, connect=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=10, cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(),
        )
        # Static keys when given (a Secret); else the usual chain (credential_chain), so pod identity
        # (EKS IRSA or Pod Identity, an instance role, an STS that takes a web identity token) works.
        provider = None if access_key and secret_key else credential_chain()
        self.client = Minio(parsed.netloc, access_key=access_key, secret_key=secret_key,
                            secure=parsed.scheme == "https", region=os.environ.get("STRATA_S3_REGION"),
                            http_client=http, credentials=provider)
        try:
            if create_bucket and not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        except Exception as error:  # urllib3 and S3 errors alike: the store is unusable
            raise ObjectStoreError(f"object store {endpoint} bucket {bucket}: {error}") from error

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def ping(self) -> None:
        try:
            found = self.client.bucket_exists(self.bucket)
        except Exception as error:
            raise ObjectStoreError(f"object store {self.url}: {error}") from error
        if not found:
            raise ObjectStoreError(f"object store {self.url}: bucket {self.bucket} does not exist")

    def check_writable(self) -> None:
        self.ping()
        self.put_bytes(PROBE_KEY, b"")
        self.delete(PROBE_KEY)

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))
        except Exception as error:
            raise ObjectStoreError(f"put {key}: {error}") from error

    def get_bytes(self, key: str) -> bytes:
        from minio.error import S3Error

        response = None
        try:
            response = self.client.get_object(self.bucket, self._key(key))
            return response.read()
        except S3Error as error:
            if error.code == "NoSuchKey":
                raise ObjectNotFound(key) from None
            raise ObjectStoreError(f"get {key}: {error}") from error
        except Exception as error:
            raise ObjectStoreError(f"get {key}: {error}") from error
        finally:
            if response is not None:
                response.close()
                response.release_conn()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for obj in self.client.list_objects(self.bucket, prefix=self._key(prefix), recursive=True):
                yield ObjectInfo(obj.object_name[strip:], obj.size or 0)
        except Exception as error:
            raise ObjectStoreError(f"list {prefix}: {error}") from error

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._key(key))
        except Exception as error:
            raise ObjectStoreError(f"delete {key}: {error}") from error


def credential_chain(env: dict[str, str] | None = None):
    """The credentials S3 clients find without static keys, in the order AWS tools look (the minio
    SDK's providers): AWS_ACCESS_KEY_ID/..., MINIO_ACCESS_KEY/..., the shared credentials file
    (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE), then IAM: a web identity token (EKS IRSA:
    AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN), the container endpoint (EKS Pod Identity, ECS:
    AWS_CONTAINER_CREDENTIALS_FULL_URI / _RELATIVE_URI) or the instance role. STRATA_S3_STS_ENDPOINT
    with STRATA_S3_WEB_IDENTITY_TOKEN_FILE (a projected ServiceAccount token: GKE, any OIDC issuer)
    asks that STS (MinIO's, or another AssumeRoleWithWebIdentity one) first.

    None when nothing points at any of them (anonymous, as before): the instance-metadata lookup is
    only tried on a signal (AWS_* identity variables, a credentials file, or STRATA_S3_CREDENTIALS=iam),
    so a laptop never waits for 169.254.169.254."""
    from minio.credentials import (AWSConfigProvider, ChainedProvider, EnvAWSProvider, EnvMinioProvider,
                                   IamAwsProvider, WebIdentityProvider)

    env = os.environ if env is None else env
    providers: list[Any] = []
    sts, token_file = env.get("STRATA_S3_STS_ENDPOINT"), env.get("STRATA_S3_WEB_IDENTITY_TOKEN_FILE")
    if sts and token_file:
        def token() -> dict[str, str]:
            return {"access_token": Path(token_file).read_text().strip()}  # read each time: it rotates
        providers.append(WebIdentityProvider(jwt_provider_func=token, sts_endpoint=sts,
                                             role_arn=env.get("STRATA_S3_ROLE_ARN") or None,
                                             duration_seconds=int(env.get("STRATA_S3_STS_SECONDS") or 3600)))
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY"):
        providers.append(EnvAWSProvider())
    if env.get("MINIO_ACCESS_KEY"):
        providers.append(EnvMinioProvider())
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path(env.get("HOME", "~")).expanduser() / ".aws/credentials")
    if Path(shared).is_file():
        providers.append(AWSConfigProvider(filename=shared, profile=env.get("AWS_PROFILE") or None))
    if any(env.get(name) for name in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                                      "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")) \
            or env.get("STRATA_S3_CREDENTIALS", "").lower() == "iam":
        providers.append(IamAwsProvider())
    return ChainedProvider(providers) if providers else None


def s3_credentials_from_env() -> tuple[str | None, str | None]:
    """Static keys (STRATA_S3_ACCESS_KEY/SECRET_KEY, from a Secret in a cluster). AWS_* keys, with
    their session token, are the credential chain's."""
    return os.environ.get("STRATA_S3_ACCESS_KEY"), os.environ.get("STRATA_S3_SECRET_KEY")


def open_object_store(location: str, endpoint: str | None = None, create: bool = True,
                      credentials: tuple[str | None, str | None] | None = None) -> ObjectStore:
    """A folder path, file:///path or s3://bucket/prefix (endpoint from the spec or STRATA_S3_ENDPOINT)."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        endpoint = endpoint or os.environ.get("STRATA_S3_ENDPOINT")
        if not endpoint:
            raise ObjectStoreError(f"{location}: no S3 endpoint (set spec.storage.s3Endpoint or STRATA_S3_ENDPOINT)")
        access, secret = credentials or s3_credentials_from_env()
        return S3Store(bucket, prefix, endpoint, access, secret, create_bucket=create)
    if location.startswith("file://"):
        location = urlparse(location).path
    return LocalFolderStore(location)
