"""strata_trainer.data: datasets from directories and S3 become standardised, stratified splits."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from strata.families import input_shape_for  # noqa: E402
from strata.spec import Dataset, StudySpec, Training  # noqa: E402
from strata_trainer import data  # noqa: E402
from strata_trainer.data import DatasetError, load_dataset  # noqa: E402

FASHION_DIR = Path(data.FASHION_MNIST_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


def training(name: str = "fashion-mnist", path: str | None = None, **settings) -> Training:
    return Training(dataset=Dataset(name=name, path=path), **settings)


def pixels(split, splits) -> np.ndarray:
    """A split's images back in [0, 1] pixels (undoing the standardisation)."""
    mean = torch.tensor(splits.channel_mean)[:, None, None]
    std = torch.tensor(splits.channel_std)[:, None, None]
    return (split.x * std + mean).numpy()


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch) -> Path:
    """Every test caches fetched and extracted files under its own tmp_path, never in ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(cache))
    return cache


# --- idx files --------------------------------------------------------------------------------


def read_idx_independently(path: Path) -> np.ndarray:
    """The test's own reading of an idx file: a 4-byte magic whose last byte is ndim, then dims."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_pair(folder: Path, images: np.ndarray, labels: np.ndarray, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        blob = idx_bytes(array)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)
    return folder


@pytest.fixture(scope="module")
def fashion_raw() -> tuple[np.ndarray, np.ndarray]:
    if not FASHION_DIR.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    images = read_idx_independently(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx_independently(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    return images, labels


@pytest.fixture
def small_fashion(fashion_raw) -> tuple[np.ndarray, np.ndarray]:
    """The first 600 real Fashion-MNIST images: enough for every class, quick to write."""
    images, labels = fashion_raw
    return images[:600], labels[:600]


# --- Fashion-MNIST from the Debian files -----------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_subset_has_the_model_input_shape_dtype_and_classes():
    settings = training(subset_size=1500, input_size=32, validation_split=0.2)
    splits = load_dataset(settings)

    spec = StudySpec(search_space={"filters": {"type": "int", "low": 8, "high": 8}}, trials={"max": 1}, training=settings)
    assert splits.input_shape == input_shape_for(spec) == (1, 32, 32)
    assert splits.train.x.shape == (1200, 1, 32, 32) and splits.val.x.shape == (300, 1, 32, 32)
    assert splits.train.x.dtype == splits.val.x.dtype == torch.float32
    assert splits.train.y.dtype == splits.val.y.dtype == torch.int64
    assert splits.num_classes == 10
    assert set(splits.train.y.tolist()) == set(splits.val.y.tolist()) == set(range(10))
    assert str(FASHION_DIR) in splits.source


@needs_fashion_mnist
def test_padding_to_32_puts_the_raw_image_in_the_centre_with_black_borders(fashion_raw):
    images, _ = fashion_raw
    splits = load_dataset(training(subset_size=200, input_size=32))
    restored = pixels(splits.train, splits)

    np.testing.assert_allclose(restored[:, 0, 2:30, 2:30], images[splits.train.source_index] / 255, atol=1e-5)
    border = np.ones((32, 32), dtype=bool)
    border[2:30, 2:30] = False
    np.testing.assert_allclose(restored[:, 0][:, border], 0.0, atol=1e-5)


@needs_fashion_mnist
def test_downscaling_averages_pixel_blocks(fashion_raw):
    images, _ = fashion_raw
    splits = load_dataset(training(subset_size=100, input_size=14))
    chosen = images[splits.train.source_index].astype(np.float64) / 255

    assert splits.train.x.shape[1:] == (1, 14, 14)
    expected = chosen.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(pixels(splits.train, splits)[:, 0], expected, atol=1e-5)


@needs_fashion_mnist
def test_without_input_size_images_keep_their_native_size(fashion_raw):
    images, _ = fashion_raw
    splits = load_dataset(training(subset_size=100))

    assert splits.input_shape == (1, 28, 28) and splits.val.x.shape[1:] == (1, 28, 28)
    np.testing.assert_allclose(pixels(splits.val, splits)[:, 0], images[splits.val.source_index] / 255, atol=1e-5)


@needs_fashion_mnist
def test_both_splits_are_standardised_with_the_train_split_statistics(fashion_raw):
    images, _ = fashion_raw
    splits = load_dataset(training(subset_size=500))
    train_pixels = images[splits.train.source_index] / 255

    assert splits.channel_mean[0] == pytest.approx(train_pixels.mean(), abs=1e-5)
    assert splits.channel_std[0] == pytest.approx(train_pixels.std(ddof=1), abs=1e-5)
    assert splits.train.x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert splits.train.x.std().item() == pytest.approx(1.0, abs=1e-5)
    # The validation split reuses the train statistics rather than its own.
    expected_val = (images[splits.val.source_index] / 255 - splits.channel_mean[0]) / splits.channel_std[0]
    np.testing.assert_allclose(splits.val.x[:, 0].numpy(), expected_val, atol=1e-4)


@needs_fashion_mnist
def test_the_same_seed_selects_the_same_images_and_another_seed_others():
    first = load_dataset(training(subset_size=300, seed=7))
    again = load_dataset(training(subset_size=300, seed=7))
    other = load_dataset(training(subset_size=300, seed=8))

    np.testing.assert_array_equal(first.train.source_index, again.train.source_index)
    np.testing.assert_array_equal(first.val.source_index, again.val.source_index)
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.val.y, again.val.y)
    assert not np.array_equal(first.train.source_index, other.train.source_index)
    assert not np.array_equal(first.val.source_index, other.val.source_index)


@needs_fashion_mnist
def test_subset_and_validation_split_keep_class_proportions_within_one(fashion_raw):
    _, labels = fashion_raw
    size, fraction = 1234, 0.25
    splits = load_dataset(training(subset_size=size, validation_split=fraction, seed=3))

    subset = np.concatenate([splits.train.source_index, splits.val.source_index])
    population, picked = Counter(labels.tolist()), Counter(labels[subset].tolist())
    val_counts = Counter(splits.val.y.tolist())
    assert len(subset) == size and len(splits.val) == round(size * fraction)
    for cls in range(10):
        assert abs(picked[cls] - size * population[cls] / len(labels)) <= 1
        assert abs(val_counts[cls] - len(splits.val) * picked[cls] / size) <= 1
    np.testing.assert_array_equal(labels[splits.train.source_index], splits.train.y.numpy())


@needs_fashion_mnist
def test_train_and_validation_images_are_disjoint_and_make_up_the_subset():
    splits = load_dataset(training(subset_size=1000, validation_split=0.3))
    train, val = set(splits.train.source_index.tolist()), set(splits.val.source_index.tolist())

    assert not train & val
    assert len(train) == 700 and len(val) == 300 and len(train | val) == 1000


@needs_fashion_mnist
def test_parsing_60000_images_and_taking_a_1500_subset_takes_under_two_seconds():
    data.parse_dataset_files.cache_clear()
    started = time.perf_counter()
    load_dataset(training(subset_size=1500, input_size=32))
    cold = time.perf_counter() - started
    started = time.perf_counter()
    load_dataset(training(subset_size=1500, input_size=32, seed=1))
    warm = time.perf_counter() - started

    assert cold < 2.0
    assert data.parse_dataset_files.cache_info().hits >= 1  # a second trial reuses the parsed arrays
    assert warm < cold


@needs_fashion_mnist
def test_subset_larger_than_the_training_set_is_an_error_naming_the_size():
    with pytest.raises(DatasetError, match=r"subsetSize 60001 exceeds the 60000 training images"):
        load_dataset(training(subset_size=60001))


# --- idx files written by the test ---------------------------------------------------------------


def test_raw_and_gzipped_idx_files_load_the_same_images(tmp_path, small_fashion):
    images, labels = small_fashion
    raw_dir = write_idx_pair(tmp_path / "raw", images, labels, gz=False)
    gz_dir = write_idx_pair(tmp_path / "gz", images, labels, gz=True)

    from_raw = load_dataset(training(path=str(raw_dir), input_size=32))
    from_gz = load_dataset(training(path=str(gz_dir), input_size=32))

    assert torch.equal(from_raw.train.x, from_gz.train.x) and torch.equal(from_raw.val.y, from_gz.val.y)
    assert len(from_raw.train) + len(from_raw.val) == 600
    np.testing.assert_array_equal(from_raw.train.y.numpy(), labels[from_raw.train.source_index])


def test_gzipped_content_under_a_raw_name_is_still_read(tmp_path, small_fashion):
    images, labels = small_fashion
    folder = write_idx_pair(tmp_path / "gz", images, labels, gz=True)
    for gz_file in folder.iterdir():
        gz_file.rename(gz_file.with_suffix(""))

    splits = load_dataset(training(path=str(folder)))
    np.testing.assert_allclose(pixels(splits.train, splits)[:, 0], images[splits.train.source_index] / 255, atol=1e-5)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda blob: blob[: len(blob) - 100], id="truncated"),
        pytest.param(lambda blob: blob + b"\0", id="trailing-bytes"),
        pytest.param(lambda blob: b"\x00\x00\x0d\x03" + blob[4:], id="float-magic"),
        pytest.param(lambda blob: os.urandom(4000), id="garbage"),
        pytest.param(lambda blob: b"", id="empty"),
        pytest.param(lambda blob: gzip.compress(blob)[:-50], id="truncated-gzip"),
    ],
)
def test_a_damaged_idx_file_is_an_error_naming_its_path(tmp_path, small_fashion, damage):
    folder = write_idx_pair(tmp_path / "damaged", *small_fashion, gz=False)
    images_file = folder / "train-images-idx3-ubyte"
    images_file.write_bytes(damage(images_file.read_bytes()))

    with pytest.raises(DatasetError, match=str(images_file)):
        load_dataset(training(path=str(folder)))


def test_images_of_the_wrong_size_are_an_error(tmp_path):
    folder = write_idx_pair(tmp_path / "wrong", np.zeros((50, 32, 32), np.uint8), np.zeros(50, np.uint8), gz=False)
    with pytest.raises(DatasetError, match=r"shape \(1, 32, 32\), fashion-mnist needs \(1, 28, 28\)"):
        load_dataset(training(path=str(folder)))


def test_more_labels_than_images_is_an_error_naming_the_labels_file(tmp_path, small_fashion):
    images, labels = small_fashion
    folder = write_idx_pair(tmp_path / "mismatch", images[:100], labels[:101], gz=False)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte: 101 labels for the 100 images"):
        load_dataset(training(path=str(folder)))


def test_labels_beyond_the_dataset_classes_are_an_error(tmp_path):
    labels = np.arange(50, dtype=np.uint8) % 11
    folder = write_idx_pair(tmp_path / "eleven", np.zeros((50, 28, 28), np.uint8), labels, gz=False)
    with pytest.raises(DatasetError, match=r"labels outside 0\.\.9"):
        load_dataset(training(path=str(folder)))


def test_a_missing_directory_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=f"dataset directory {missing} does not exist"):
        load_dataset(training(path=str(missing)))


def test_a_directory_without_idx_files_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"no train-images-idx3-ubyte or train-images-idx3-ubyte\.gz"):
        load_dataset(training(path=str(tmp_path)))


def test_mnist_without_a_path_needs_STRATA_MNIST_DIR(monkeypatch):
    monkeypatch.delenv(data.MNIST_DIR_ENV, raising=False)
    with pytest.raises(DatasetError, match=data.MNIST_DIR_ENV):
        load_dataset(training(name="mnist"))


def test_mnist_is_read_from_STRATA_MNIST_DIR(tmp_path, monkeypatch, small_fashion):
    folder = write_idx_pair(tmp_path / "mnist", *small_fashion, gz=False)
    monkeypatch.setenv(data.MNIST_DIR_ENV, str(folder))

    splits = load_dataset(training(name="mnist", input_size=32))
    assert splits.train.x.shape[1:] == (1, 32, 32) and str(folder) in splits.source


def test_cifar10_without_a_path_is_an_error():
    with pytest.raises(DatasetError, match=r"cifar10 .*spec\.training\.dataset\.path"):
        load_dataset(training(name="cifar10"))


# --- CIFAR-10 in torchvision's format ------------------------------------------------------------

CIFAR_IMAGES = 100


@pytest.fixture(scope="module")
def cifar_images() -> tuple[np.ndarray, np.ndarray]:
    """100 random images in CIFAR's row layout (uint8 [N, 3072]) with 10 labels of each class."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (CIFAR_IMAGES, 3072), dtype=np.uint8), rng.permutation(np.arange(CIFAR_IMAGES) % 10)


def write_cifar_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """cifar-10-batches-py/ with data_batch_1..2, a test_batch the loader must skip, and batches.meta."""
    folder = root / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    for number, rows in enumerate(np.array_split(np.arange(len(labels)), 2), start=1):
        batch = {b"batch_label": f"training batch {number} of 2".encode(), b"labels": labels[rows].tolist(),
                 b"data": images[rows], b"filenames": [f"img{i}.png".encode() for i in rows]}
        (folder / f"data_batch_{number}").write_bytes(pickle.dumps(batch, protocol=2))
    test_batch = {b"labels": [0] * 10, b"data": np.zeros((10, 3072), np.uint8)}
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=2))
    meta = {b"num_cases_per_batch": len(labels) // 2, b"label_names": [f"class{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_cifar_tarball(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    folder = write_cifar_folder(root / "unpacked", images, labels)
    tarball = root / data.CIFAR_TARBALL
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder, arcname=data.CIFAR_FOLDER)
    return tarball


def assert_matches_cifar_rows(splits, images: np.ndarray, labels: np.ndarray) -> None:
    for split in (splits.train, splits.val):
        expected = images[split.source_index].reshape(-1, 3, 32, 32) / 255  # red plane, green, blue
        np.testing.assert_allclose(pixels(split, splits), expected, atol=1e-5)
        np.testing.assert_array_equal(split.y.numpy(), labels[split.source_index])


@pytest.mark.parametrize("point_at", ["root", "batches-folder"])
def test_cifar_folder_loads_3x32x32_images_with_their_labels(tmp_path, cifar_images, point_at):
    folder = write_cifar_folder(tmp_path, *cifar_images)
    path = tmp_path if point_at == "root" else folder

    splits = load_dataset(training(name="cifar10", path=str(path), validation_split=0.2))

    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert splits.train.x.shape == (80, 3, 32, 32) and splits.val.x.shape == (20, 3, 32, 32)
    assert len(splits.channel_mean) == 3
    assert set(splits.train.y.tolist()) == set(splits.val.y.tolist()) == set(range(10))
    assert_matches_cifar_rows(splits, *cifar_images)


def test_cifar_selection_is_deterministic_per_seed(tmp_path, cifar_images):
    write_cifar_folder(tmp_path, *cifar_images)
    first, again, other = (load_dataset(training(name="cifar10", path=str(tmp_path), subset_size=60, seed=s))
                           for s in (1, 1, 2))

    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.val.y, again.val.y)
    assert not np.array_equal(first.train.source_index, other.train.source_index)
    assert Counter(first.train.y.tolist() + first.val.y.tolist()) == {cls: 6 for cls in range(10)}


def test_cifar_tarball_is_extracted_into_the_cache_and_loads_the_same_images(tmp_path, cifar_images, dataset_cache):
    tarball = write_cifar_tarball(tmp_path / "archive", *cifar_images)
    folder = write_cifar_folder(tmp_path / "plain", *cifar_images)

    from_tarball = load_dataset(training(name="cifar10", path=str(tarball.parent)))
    from_folder = load_dataset(training(name="cifar10", path=str(folder)))

    assert torch.equal(from_tarball.train.x, from_folder.train.x)
    assert torch.equal(from_tarball.val.y, from_folder.val.y)
    assert sorted(p.name for p in dataset_cache.rglob("data_batch_*")) == ["data_batch_1", "data_batch_2"]


def test_cifar_tarball_members_outside_the_batches_folder_are_not_extracted(tmp_path, cifar_images, dataset_cache):
    tarball = write_cifar_tarball(tmp_path / "archive", *cifar_images)
    with tarfile.open(tarball, "r:gz") as archive:
        members = [(member, archive.extractfile(member).read() if member.isfile() else None)
                   for member in archive.getmembers()]
    with tarfile.open(tarball, "w:gz") as archive:
        for member, content in members:
            archive.addfile(member, io.BytesIO(content) if content is not None else None)
        for hostile in ("../evil.txt", f"{data.CIFAR_FOLDER}/../../evil.txt", "/tmp/evil-absolute.txt"):
            archive.addfile(tarfile.TarInfo(hostile), io.BytesIO(b""))
        link = tarfile.TarInfo(f"{data.CIFAR_FOLDER}/evil-link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)

    splits = load_dataset(training(name="cifar10", path=str(tarball.parent)))

    assert len(splits.train) + len(splits.val) == CIFAR_IMAGES
    assert not list(tmp_path.rglob("evil*")) and not Path("/tmp/evil-absolute.txt").exists()


def test_a_corrupt_cifar_tarball_is_an_error_naming_it(tmp_path):
    tarball = tmp_path / data.CIFAR_TARBALL
    tarball.write_bytes(gzip.compress(b"not a tar archive")[:-8])
    with pytest.raises(DatasetError, match=str(tarball)):
        load_dataset(training(name="cifar10", path=str(tmp_path)))


def test_a_cifar_batch_that_is_not_a_pickle_is_an_error_naming_it(tmp_path, cifar_images):
    folder = write_cifar_folder(tmp_path, *cifar_images)
    (folder / "data_batch_2").write_bytes(os.urandom(3000))
    with pytest.raises(DatasetError, match=f"{folder / 'data_batch_2'}: not a CIFAR-10 batch"):
        load_dataset(training(name="cifar10", path=str(tmp_path)))


def test_a_cifar_batch_with_the_wrong_image_size_is_an_error(tmp_path, cifar_images):
    folder = write_cifar_folder(tmp_path, *cifar_images)
    small = {b"labels": [1, 2], b"data": np.zeros((2, 1024), np.uint8)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(small, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_1: 'data' must be uint8 \[N, 3072\]"):
        load_dataset(training(name="cifar10", path=str(tmp_path)))


class OpensAFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_cifar_pickle_that_names_other_code_is_refused_without_running_it(tmp_path, cifar_images):
    folder = write_cifar_folder(tmp_path, *cifar_images)
    marker = tmp_path / "code-ran"
    hostile = {b"labels": [0], b"data": OpensAFileWhenUnpickled(marker)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(hostile, protocol=2))

    with pytest.raises(DatasetError, match=r"refusing to load (builtins|io)\.open"):
        load_dataset(training(name="cifar10", path=str(tmp_path)))
    assert not marker.exists()


def test_a_folder_without_cifar_batches_is_an_error_naming_it(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path}: no cifar-10-batches-py/data_batch_N files"):
        load_dataset(training(name="cifar10", path=str(tmp_path)))


# --- S3 (a real S3-compatible server over HTTP) --------------------------------------------------

BUCKET = "datasets"


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_client(s3_endpoint, monkeypatch):
    from minio import Minio

    monkeypatch.setenv("STRATA_S3_ACCESS_KEY", "test")  # the server accepts any credentials
    monkeypatch.setenv("STRATA_S3_SECRET_KEY", "test")
    client = Minio(s3_endpoint.removeprefix("http://"), access_key="test", secret_key="test", secure=False,
                   region="us-east-1")
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    return client


def upload_folder(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.fput_object(BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}", str(path))


def test_fashion_mnist_idx_files_load_from_an_s3_prefix(tmp_path, s3_client, s3_endpoint, small_fashion):
    folder = write_idx_pair(tmp_path / "fashion", *small_fashion, gz=True)
    upload_folder(s3_client, folder, "fashion-subset")
    settings = dict(input_size=32, subset_size=300, seed=5)

    from_s3 = load_dataset(training(path=f"s3://{BUCKET}/fashion-subset", **settings), store_endpoint=s3_endpoint)
    from_folder = load_dataset(training(path=str(folder), **settings))

    assert torch.equal(from_s3.train.x, from_folder.train.x) and torch.equal(from_s3.val.y, from_folder.val.y)
    assert f"s3://{BUCKET}/fashion-subset" in from_s3.source


@pytest.mark.parametrize("layout", ["root", "batches-folder"])
def test_cifar_batches_load_from_an_s3_prefix(tmp_path, s3_client, s3_endpoint, cifar_images, layout):
    folder = write_cifar_folder(tmp_path / "cifar", *cifar_images)
    prefix = f"cifar-{layout}"
    upload_folder(s3_client, tmp_path / "cifar" if layout == "root" else folder, prefix)

    splits = load_dataset(training(name="cifar10", path=f"s3://{BUCKET}/{prefix}"), store_endpoint=s3_endpoint)

    assert splits.train.x.shape == (80, 3, 32, 32)
    assert_matches_cifar_rows(splits, *cifar_images)


def test_cifar_tarball_loads_from_an_s3_prefix(tmp_path, s3_client, s3_endpoint, cifar_images):
    tarball = write_cifar_tarball(tmp_path / "archive", *cifar_images)
    s3_client.fput_object(BUCKET, f"cifar-tarball/{tarball.name}", str(tarball))

    splits = load_dataset(training(name="cifar10", path=f"s3://{BUCKET}/cifar-tarball"), store_endpoint=s3_endpoint)

    assert_matches_cifar_rows(splits, *cifar_images)


def test_objects_already_in_the_cache_are_not_fetched_again(tmp_path, s3_client, s3_endpoint, cifar_images,
                                                            dataset_cache):
    write_cifar_folder(tmp_path / "cifar", *cifar_images)
    upload_folder(s3_client, tmp_path / "cifar", "cached")
    settings = training(name="cifar10", path=f"s3://{BUCKET}/cached")

    load_dataset(settings, store_endpoint=s3_endpoint)
    cached = sorted(dataset_cache.rglob("data_batch_*"))
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in cached]
    load_dataset(settings, store_endpoint=s3_endpoint)

    assert len(cached) == 2 and not list(dataset_cache.rglob(".tmp-*"))
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in cached] == before


def test_an_s3_prefix_without_dataset_files_is_an_error_naming_the_url(s3_client, s3_endpoint):
    s3_client.put_object(BUCKET, "unrelated/readme.txt", io.BytesIO(b"hello"), 5)
    with pytest.raises(DatasetError, match=rf"s3://{BUCKET}/unrelated: holds none of the fashion-mnist training files"):
        load_dataset(training(path=f"s3://{BUCKET}/unrelated"), store_endpoint=s3_endpoint)


def test_a_missing_bucket_is_an_error_naming_the_url(s3_client, s3_endpoint):
    with pytest.raises(DatasetError, match=r"s3://no-such-bucket/x: "):
        load_dataset(training(path="s3://no-such-bucket/x"), store_endpoint=s3_endpoint)
