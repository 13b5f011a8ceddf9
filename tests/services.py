"""Real services for the tests: a throwaway PostgreSQL 15 cluster and an S3 server over HTTP.

Nothing here is mocked in-process: PostgreSQL is the Debian server started on a free loopback
port, and S3 is moto's server spoken to over HTTP with the minio SDK, as production speaks to
MinIO. tests/conftest.py re-exports the fixtures below to every test.

Note: moto's server keeps its buckets in moto's process-wide backends, so a test that uses
moto's in-process `mock_aws` (which resets those backends) would empty this server too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import pytest

if TYPE_CHECKING:
    from minio import Minio

    from strata.objectstore import ObjectStore

__all__ = [
    "RestartableS3Server",
    "pause_postgres",
    "private_postgres",
    "private_s3",
    "resume_postgres",
    "PostgresServer",
    "S3Server",
    "free_port",
    "object_store",
    "postgres_server",
    "postgres_url",
    "s3_bucket",
    "s3_env",
    "s3_server",
    "store_location",
    "wait_for",
]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
             message: str = "condition", ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll predicate until it returns something truthy and return that; TimeoutError after timeout.

    Exceptions of the types in `ignore` count as "not yet" (e.g. a server still starting); the last
    one is named in the timeout message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as error:
            last_error, result = error, None
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {message}{detail}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- PostgreSQL --------------------------------------------------------------------------------


def _postgres_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl; STRATA_TEST_PG_BIN overrides the Debian default."""
    candidates = [os.environ.get("STRATA_TEST_PG_BIN"), "/usr/lib/postgresql/15/bin"]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in filter(None, candidates):
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    pytest.fail(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/15/bin or on PATH: "
        "install them (apt-get install -y postgresql-15) or set STRATA_TEST_PG_BIN to their directory",
        pytrace=False,
    )


@dataclass
class PostgresServer:
    """A running throwaway cluster; the superuser `postgres` connects without a password."""

    host: str
    port: int
    directory: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@{self.host}:{self.port}/{database}"

    def _admin(self, statement: str, name: str) -> None:
        import psycopg2
        from psycopg2 import sql

        connection = psycopg2.connect(host=self.host, port=self.port, user="postgres", dbname="postgres")
        try:
            connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(sql.SQL(statement).format(sql.Identifier(name)))
        finally:
            connection.close()

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL (psycopg2 dialect)."""
        self._admin("CREATE DATABASE {}", name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)  # FORCE: tests may leave pools open


def _as_postgres_user(command: list[str]) -> list[str]:
    # initdb refuses to run as root; as anyone else it runs as that user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], directory: Path, what: str) -> None:
    # Output goes to a file, not a pipe: pg_ctl's server child must not hold our pipe open.
    with open(directory / f"{what}.out", "w+") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=directory, timeout=60)
        if result.returncode != 0:
            output.seek(0)
            server_log = directory / "log"
            log_tail = server_log.read_text()[-2000:] if server_log.exists() else ""
            raise RuntimeError(f"{what} failed ({result.returncode}): {output.read()[-2000:]}\n{log_tail}")


def _pg_ctl_start(bin_dir: Path, directory: Path) -> PostgresServer:
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off"
    _run(_as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(directory / "data"), "-l", str(directory / "log"),
                            "-w", "-o", options, "start"]), directory, "pg_ctl-start")
    return PostgresServer("127.0.0.1", port, directory)


def start_postgres() -> PostgresServer:
    bin_dir = _postgres_bin_dir()
    directory = Path(tempfile.mkdtemp(prefix="strata-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
        _run(_as_postgres_user([str(bin_dir / "initdb"), "-D", str(directory / "data"), "-U", "postgres",
                                "-A", "trust", "-E", "UTF8", "--no-sync", "-N"]), directory, "initdb")
        for _ in range(2):
            try:
                return _pg_ctl_start(bin_dir, directory)
            except RuntimeError:
                pass  # the free port was taken between choosing and binding it: choose another
        return _pg_ctl_start(bin_dir, directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def stop_postgres(server: PostgresServer) -> None:
    try:
        _run(_as_postgres_user([str(_postgres_bin_dir() / "pg_ctl"), "-D", str(server.directory / "data"),
                                "-m", "fast", "stop"]), server.directory, "pg_ctl-stop")
    finally:
        shutil.rmtree(server.directory, ignore_errors=True)


def pause_postgres(server: PostgresServer) -> None:
    """Stop the server but keep its data and port (an outage or a restart of the database)."""
    _run(_as_postgres_user([str(_postgres_bin_dir() / "pg_ctl"), "-D", str(server.directory / "data"),
                            "-m", "fast", "stop"]), server.directory, "pg_ctl-pause")


def resume_postgres(server: PostgresServer) -> None:
    options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {server.directory} -c fsync=off"
    _run(_as_postgres_user([str(_postgres_bin_dir() / "pg_ctl"), "-D", str(server.directory / "data"), "-l",
                            str(server.directory / "log"), "-w", "-o", options, "start"]), server.directory,
         "pg_ctl-resume")


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own, which it may stop and start (pause_postgres/resume_postgres)."""
    server = start_postgres()
    try:
        yield server
    finally:
        try:
            stop_postgres(server)
        except RuntimeError:  # the test left it stopped
            shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 cluster on 127.0.0.1 for the whole session (about 2 s to start)."""
    server = start_postgres()
    try:
        yield server
    finally:
        stop_postgres(server)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test: its postgresql+psycopg2:// URL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


# --- S3 (moto's server over HTTP) --------------------------------------------------------------


@dataclass
class S3Server:
    """An S3-compatible endpoint that accepts any credentials."""

    host: str
    port: int
    access_key: str = "test"
    secret_key: str = "test"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self) -> "Minio":
        from minio import Minio

        return Minio(f"{self.host}:{self.port}", access_key=self.access_key, secret_key=self.secret_key,
                     secure=False, region="us-east-1")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()  # port=0: the OS chose the port
        yield S3Server(host, port)
    finally:
        server.stop()


class RestartableS3Server(S3Server):
    """moto's server on a fixed port that a test may stop and start again; moto keeps the buckets
    in this process, so what was stored is there again after start()."""

    def start(self) -> "RestartableS3Server":
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        wait_for(lambda: _accepts(self.host, self.port), timeout=10, message="the S3 server to listen")
        return self

    def stop(self) -> None:
        self._server.stop()


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def private_s3() -> Iterator[RestartableS3Server]:
    server = RestartableS3Server("127.0.0.1", free_port()).start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except Exception:
            pass


@pytest.fixture(scope="session")
def sts_endpoint() -> Iterator[str]:
    """An AWS STS (moto's) over HTTP that answers AssumeRoleWithWebIdentity as MinIO's STS does, with
    the parameters in the URL (how the minio SDK's WebIdentityProvider sends them): moto's dispatcher
    finds the service from a form body, so the query is handed on as one."""
    import io
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    moto = DomainDispatcherApplication(create_backend_app)

    def sts(environ: dict[str, Any], start_response: Any) -> Any:
        body = environ.get("QUERY_STRING", "").encode()
        environ.update({"CONTENT_TYPE": "application/x-www-form-urlencoded", "CONTENT_LENGTH": str(len(body)),
                        "wsgi.input": io.BytesIO(body)})
        return moto(environ, start_response)

    server = make_server("127.0.0.1", 0, sts, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point STRATA_S3_* at the test server for this test (restored afterwards)."""
    monkeypatch.setenv("STRATA_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("STRATA_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("STRATA_S3_SECRET_KEY", s3_server.secret_key)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> Iterator[str]:
    """A fresh bucket on the test server, as an "s3://NAME/prefix" location (STRATA_S3_* set)."""
    name = f"strata-test-{uuid.uuid4().hex[:12]}"
    client = s3_env.client()
    client.make_bucket(name)
    yield f"s3://{name}/prefix"
    for obj in client.list_objects(name, recursive=True):
        client.remove_object(name, obj.object_name)
    client.remove_bucket(name)


# --- either backend ----------------------------------------------------------------------------


@pytest.fixture(params=["folder", "s3"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty object store location: a folder under tmp_path, or a fresh bucket on the S3 server."""
    if request.param == "folder":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
def object_store(store_location: str) -> "ObjectStore":
    """The store at store_location, opened as the operator and trainer open it."""
    from strata.objectstore import open_object_store

    return open_object_store(store_location)


# --- Prometheus (Debian package), scraping targets on loopback -----------------------------------------


class PrometheusServer:
    """A real Prometheus with a scrape config written by the test; queried over its HTTP API."""

    def __init__(self, directory: Path, targets: list[str], scrape_interval: str = "1s"):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: %s, evaluation_interval: %s}\n"
            "scrape_configs:\n"
            "  - job_name: strata\n"
            "    honor_labels: true\n"
            "    static_configs: [{targets: [%s]}]\n"
            % (scrape_interval, scrape_interval, ", ".join(f"'{t}'" for t in targets)))
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(binary).exists():
            pytest.fail("prometheus is not installed: apt-get install -y --no-install-recommends prometheus "
                        "(scripts/setup.sh does this)")
        self._log = open(directory / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._ready(), timeout=30, message="Prometheus to be ready")

    def _ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict]:
        import json
        import urllib.parse
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}),
                                    timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's label_values(match, label) shows: Prometheus's label values API."""
        import json
        import urllib.parse
        import urllib.request

        query = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/label/{label}/values?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def scrapes(self) -> int:
        """Successful scrapes so far (samples of `up` == 1 in the last 10 minutes)."""
        result = self.query('count_over_time(up{job="strata"}[10m])')
        return int(float(result[0]["value"][1])) if result else 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
