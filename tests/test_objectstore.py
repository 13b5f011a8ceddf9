"""The object store contract, on a local folder and on S3 over HTTP, plus self-checks of the service fixtures."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

import strata.objectstore as objectstore
from strata.objectstore import LocalFolderStore, ObjectNotFound, ObjectStoreError, S3Store, open_object_store
from tests.services import free_port, sts_endpoint, wait_for  # noqa: F401

MiB = 1024 * 1024


# --- the contract both backends keep ------------------------------------------------------------


def test_put_then_get_returns_the_same_bytes(object_store):
    data = bytes(range(256)) * 4
    object_store.put_bytes("layers/d1-abc/study-t0/weights.pt", data)

    assert object_store.get_bytes("layers/d1-abc/study-t0/weights.pt") == data


def test_an_empty_object_round_trips(object_store):
    object_store.put_bytes("empty", b"")

    assert object_store.get_bytes("empty") == b""
    assert [(i.key, i.size) for i in object_store.list()] == [("empty", 0)]


def test_an_object_larger_than_one_multipart_part_round_trips(object_store):
    data = os.urandom(6 * MiB)  # minio uploads more than 5 MiB in parts
    object_store.put_bytes("big.bin", data)

    assert object_store.get_bytes("big.bin") == data


def test_put_replaces_an_existing_object(object_store):
    object_store.put_bytes("key", b"first version, longer")
    object_store.put_bytes("key", b"second")

    assert object_store.get_bytes("key") == b"second"
    assert [(i.key, i.size) for i in object_store.list()] == [("key", 6)]


def test_list_returns_keys_under_a_prefix_with_their_sizes(object_store):
    for key, size in [("a/1", 1), ("a/2/x", 2), ("ab/3", 3), ("b/4", 4)]:
        object_store.put_bytes(key, b"x" * size)

    def listed(prefix: str = "") -> list[tuple[str, int]]:
        return sorted((info.key, info.size) for info in object_store.list(prefix))

    assert listed("a/") == [("a/1", 1), ("a/2/x", 2)]
    assert listed("a") == [("a/1", 1), ("a/2/x", 2), ("ab/3", 3)]  # a plain string prefix, as in S3
    assert listed() == [("a/1", 1), ("a/2/x", 2), ("ab/3", 3), ("b/4", 4)]
    assert listed("missing/") == []


def test_get_of_a_missing_key_raises_object_not_found(object_store):
    with pytest.raises(ObjectNotFound):
        object_store.get_bytes("layers/nothing/here")


def test_delete_removes_the_object_and_deleting_a_missing_key_is_a_no_op(object_store):
    object_store.put_bytes("dir/keep", b"1")
    object_store.put_bytes("dir/gone", b"2")

    object_store.delete("dir/gone")
    object_store.delete("dir/never-existed")

    with pytest.raises(ObjectNotFound):
        object_store.get_bytes("dir/gone")
    assert [info.key for info in object_store.list("dir/")] == ["dir/keep"]


def test_two_stores_on_one_location_see_each_others_objects(store_location, object_store):
    object_store.put_bytes("shared", b"written by one")

    assert open_object_store(store_location).get_bytes("shared") == b"written by one"


# --- opening a store from a location --------------------------------------------------------------


def test_open_object_store_understands_folders_file_urls_and_s3_locations(tmp_path, s3_bucket):
    assert isinstance(open_object_store(str(tmp_path / "a")), LocalFolderStore)
    from_url = open_object_store(f"file://{tmp_path}/b")
    assert isinstance(from_url, LocalFolderStore) and from_url.root == tmp_path / "b"

    s3 = open_object_store(s3_bucket)
    assert isinstance(s3, S3Store) and s3.url == s3_bucket


def test_s3_store_creates_its_bucket_unless_told_not_to(s3_env):
    created, absent_name = (f"strata-{word}-{uuid.uuid4().hex[:8]}" for word in ("created", "absent"))
    open_object_store(f"s3://{created}/prefix").put_bytes("k", b"v")
    assert s3_env.client().bucket_exists(created)

    absent = open_object_store(f"s3://{absent_name}/prefix", create=False)
    assert not s3_env.client().bucket_exists(absent_name)
    with pytest.raises(ObjectStoreError):
        absent.put_bytes("k", b"v")


def test_s3_location_without_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("STRATA_S3_ENDPOINT", raising=False)

    with pytest.raises(ObjectStoreError, match="STRATA_S3_ENDPOINT"):
        open_object_store("s3://bucket/prefix")


# Bug (reported): S3Store builds its Minio client with the SDK's default urllib3 pool (5 retries
# with backoff, 300 s timeouts), so a refused connection takes ~6 s and a silent host minutes.
def test_an_unreachable_s3_endpoint_raises_object_store_error_quickly(monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("STRATA_S3_ENDPOINT", closed)

    started = time.monotonic()
    with pytest.raises(ObjectStoreError, match="127.0.0.1") as raised:
        open_object_store("s3://strata-unreachable/prefix")
    elapsed = time.monotonic() - started

    assert not isinstance(raised.value, ObjectNotFound)
    assert elapsed < 2.0, f"took {elapsed:.1f}s to report an unreachable endpoint"


# --- the folder store's atomic writes -------------------------------------------------------------


def _files_on_disk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _crash_on_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(objectstore.os, "replace", crash)


def test_a_crash_during_a_write_leaves_no_object_and_no_temporary_file(tmp_path, monkeypatch):
    store = LocalFolderStore(tmp_path)
    _crash_on_rename(monkeypatch)

    with pytest.raises(ObjectStoreError, match="simulated crash"):
        store.put_bytes("layers/d1-abc/study-t0/weights.pt", b"weights")

    with pytest.raises(ObjectNotFound):
        store.get_bytes("layers/d1-abc/study-t0/weights.pt")
    assert list(store.list()) == []
    assert _files_on_disk(tmp_path) == []


def test_a_crash_while_overwriting_keeps_the_previous_object_whole(tmp_path, monkeypatch):
    store = LocalFolderStore(tmp_path)
    store.put_bytes("meta.json", b'{"version": 1}')
    _crash_on_rename(monkeypatch)

    with pytest.raises(ObjectStoreError, match="simulated crash"):
        store.put_bytes("meta.json", b'{"version": 2, "and": "much longer"}')

    assert store.get_bytes("meta.json") == b'{"version": 1}'
    assert _files_on_disk(tmp_path) == ["meta.json"]


def test_temporary_files_of_a_killed_writer_are_never_listed(tmp_path):
    store = LocalFolderStore(tmp_path)
    store.put_bytes("dir/done", b"complete")
    (tmp_path / "dir" / ".tmp-abc123.part").write_bytes(b"half writ")  # left by kill -9 before the rename

    assert [(i.key, i.size) for i in store.list()] == [("dir/done", 8)]
    assert [i.key for i in store.list("dir/")] == ["dir/done"]


def test_a_key_cannot_escape_the_folder(tmp_path):
    store = LocalFolderStore(tmp_path / "store")

    with pytest.raises(ObjectStoreError, match="escapes"):
        store.put_bytes("../outside", b"x")
    assert not (tmp_path / "outside").exists()


# Bug (reported): LocalFolderStore lets OSError escape (disk full, read-only volume, a file in the
# way) while S3Store wraps every failure, so callers that catch ObjectStoreError crash on folders.
def test_a_folder_store_that_cannot_be_written_raises_object_store_error(tmp_path):
    (tmp_path / "in-the-way").write_text("a file where the store's folder should be")
    store = LocalFolderStore(tmp_path / "in-the-way")

    with pytest.raises(ObjectStoreError):
        store.put_bytes("layers/key", b"x")


# --- the service fixtures themselves ----------------------------------------------------------------


def test_postgres_url_serves_an_optuna_study_over_psycopg2(postgres_url):
    import optuna

    assert postgres_url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="check", storage=postgres_url,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", -1.0, 1.0) ** 2)

    reloaded = optuna.load_study(study_name="check", storage=postgres_url)
    assert len(reloaded.trials) == 3
    assert reloaded.best_value == min(t.value for t in study.trials)


def test_each_test_gets_an_empty_database(postgres_url):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_s3_bucket_is_a_fresh_bucket_on_the_server_named_in_the_environment(s3_bucket, s3_server):
    bucket = s3_bucket.removeprefix("s3://").partition("/")[0]

    assert os.environ["STRATA_S3_ENDPOINT"] == s3_server.endpoint
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    assert s3_server.client().bucket_exists(bucket)
    assert list(s3_server.client().list_objects(bucket, recursive=True)) == []


def test_wait_for_returns_the_first_truthy_value_and_retries_ignored_errors():
    answers = iter([ConnectionError("starting"), None, 0, "ready"])

    def poll():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for(poll, timeout=5, interval=0.001, ignore=(ConnectionError,)) == "ready"


def test_wait_for_names_what_it_waited_for_and_the_last_error_when_it_times_out():
    def never():
        raise ConnectionError("refused")

    with pytest.raises(TimeoutError, match=r"waiting for the server .*refused"):
        wait_for(never, timeout=0.05, interval=0.01, message="the server", ignore=(ConnectionError,))


# --- credentials without static keys: the usual chain ----------------------------------------------


def _keys(store: S3Store) -> tuple[str, str | None]:
    credentials = store.client._provider.retrieve()
    return credentials.access_key, credentials.session_token


def test_without_static_keys_the_shared_credentials_file_signs_the_requests(s3_server, tmp_path, monkeypatch):
    for name in ("STRATA_S3_ACCESS_KEY", "STRATA_S3_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "credentials").write_text("[ml]\naws_access_key_id = FROMFILE\naws_secret_access_key = s3cr3t\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "ml")

    store = open_object_store(f"s3://chain-{uuid.uuid4().hex[:8]}/p", s3_server.endpoint)
    store.put_bytes("k", b"v")

    assert store.get_bytes("k") == b"v" and _keys(store) == ("FROMFILE", None)


def test_a_web_identity_token_is_exchanged_at_the_sts_for_session_credentials(s3_server, sts_endpoint, tmp_path,
                                                                             monkeypatch):
    # GKE or any OIDC issuer: a projected ServiceAccount token, traded at an STS
    # (AssumeRoleWithWebIdentity; moto's server answers it over HTTP as MinIO's or AWS's would).
    for name in ("STRATA_S3_ACCESS_KEY", "STRATA_S3_SECRET_KEY", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws here
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bWw6dHJhaW5lciJ9.c2ln\n")
    monkeypatch.setenv("STRATA_S3_STS_ENDPOINT", sts_endpoint)
    monkeypatch.setenv("STRATA_S3_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("STRATA_S3_ROLE_ARN", "arn:aws:iam::123456789012:role/strata-trainer")

    store = open_object_store(f"s3://sts-{uuid.uuid4().hex[:8]}/p", s3_server.endpoint)
    store.put_bytes("k", b"v")

    access, session = _keys(store)
    assert store.get_bytes("k") == b"v"
    assert access.startswith("ASIA") and session  # temporary credentials, with their session token


def test_with_no_credentials_anywhere_the_client_is_anonymous_and_never_asks_instance_metadata(tmp_path, monkeypatch):
    from strata.objectstore import credential_chain

    assert credential_chain({"HOME": str(tmp_path)}) is None
    assert credential_chain({"HOME": str(tmp_path), "STRATA_S3_CREDENTIALS": "iam"}) is not None
    assert credential_chain({"HOME": str(tmp_path), "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/t",
                             "AWS_ROLE_ARN": "arn:aws:iam::1:role/r"}) is not None
