"""Datasets become the normalised train/validation tensors one trial trains on.

Sources: a directory (idx files for Fashion-MNIST and MNIST; torchvision's cifar-10-batches-py
folder or its tarball for CIFAR-10), or s3://bucket/prefix, fetched once into a local cache.
Images stay uint8 until the stratified subset and the validation split are chosen; only the
chosen images are padded or downscaled to the study's input size and standardised with the
train split's per-channel statistics.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from strata.architecture import DATASET_CLASSES, DATASET_SHAPES
from strata.objectstore import ObjectInfo, ObjectStore, ObjectStoreError, open_object_store
from strata.spec import Training

IDX_IMAGES = "train-images-idx3-ubyte"
IDX_LABELS = "train-labels-idx1-ubyte"
IDX_UNSIGNED_BYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TARBALL = "cifar-10-python.tar.gz"
CIFAR_BATCH = re.compile(r"^data_batch_(\d+)$")
CIFAR_OBJECT = re.compile(rf"^({CIFAR_FOLDER}/)?(data_batch_\d+|batches\.meta)$")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
MNIST_DIR_ENV = "STRATA_MNIST_DIR"
CACHE_DIR_ENV = "STRATA_DATA_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/strata/datasets")


class DatasetError(RuntimeError):
    """The dataset is missing or malformed; the one-line message names the path or key."""


@dataclass
class Split:
    x: torch.Tensor  # float32 [N, C, H, W], standardised
    y: torch.Tensor  # int64 [N]
    source_index: np.ndarray | None = None  # each image's position in the dataset's training file

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DatasetSplits:
    train: Split
    val: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    source: str  # human-readable: where it came from
    channel_mean: tuple[float, ...] = ()  # of the train split in [0, 1] pixels, subtracted from both splits
    channel_std: tuple[float, ...] = ()


@dataclass(frozen=True)
class RawImages:
    images: np.ndarray  # uint8 [N, C, H, W], read-only (shared by the memo)
    labels: np.ndarray  # int64 [N], read-only


def load_dataset(training: Training, store_endpoint: str | None = None) -> DatasetSplits:
    """The train and validation splits a trial with these training settings uses."""
    name = training.dataset.name
    location = dataset_location(name, training.dataset.path)
    directory = local_directory(name, location, store_endpoint)
    raw = read_raw_images(name, directory)
    if training.subset_size is not None and training.subset_size > len(raw.labels):
        raise DatasetError(
            f"spec.training.subsetSize {training.subset_size} exceeds the {len(raw.labels)} training images in {location}"
        )
    rng = np.random.default_rng(training.seed)
    chosen = stratified_subset(raw.labels, training.subset_size, rng)
    train_index, val_index = stratified_validation_split(raw.labels, chosen, training.validation_split, rng)
    shape = model_input_shape(training)
    train_x = to_model_input(raw.images[train_index], shape)
    val_x = to_model_input(raw.images[val_index], shape)
    mean, std = channel_statistics(train_x)
    source = f"{name} from {location}" + (f" (cached in {directory})" if location.startswith("s3://") else "")
    return DatasetSplits(
        train=Split(standardise(train_x, mean, std), torch.from_numpy(raw.labels[train_index]), train_index),
        val=Split(standardise(val_x, mean, std), torch.from_numpy(raw.labels[val_index]), val_index),
        num_classes=DATASET_CLASSES[name],
        input_shape=shape,
        source=source,
        channel_mean=tuple(mean.tolist()),
        channel_std=tuple(std.tolist()),
    )


def model_input_shape(training: Training) -> tuple[int, int, int]:
    # The same rule as strata.architecture.input_shape_for, which takes a whole StudySpec.
    channels, height, width = DATASET_SHAPES[training.dataset.name]
    if training.input_size:
        return channels, training.input_size, training.input_size
    return channels, height, width


# --- where the files are ----------------------------------------------------------------------


def dataset_location(name: str, path: str | None) -> str:
    """The user's path, or the dataset's default location."""
    if path:
        return path
    if name == "fashion-mnist":
        return FASHION_MNIST_DIR
    if name == "mnist" and os.environ.get(MNIST_DIR_ENV):
        return os.environ[MNIST_DIR_ENV]
    if name == "mnist":
        raise DatasetError(f"mnist has no default location: set spec.training.dataset.path or {MNIST_DIR_ENV}")
    raise DatasetError(f"{name} cannot be downloaded at run time: set spec.training.dataset.path")


def local_directory(name: str, location: str, store_endpoint: str | None) -> Path:
    """A local directory holding the dataset's files (an object store prefix is fetched first)."""
    if location.startswith("s3://"):
        return fetch_from_store(name, location, store_endpoint)
    directory = Path(location.removeprefix("file://")).expanduser()
    if not directory.is_dir():
        hint = " (install the Debian package dataset-fashion-mnist)" if location == FASHION_MNIST_DIR else ""
        raise DatasetError(f"{name}: dataset directory {directory} does not exist{hint}")
    return directory


def cache_directory(key: str) -> Path:
    root = Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()
    return root / hashlib.sha256(key.encode()).hexdigest()[:24]


def fetch_from_store(name: str, url: str, store_endpoint: str | None) -> Path:
    """Copy the dataset's objects under an s3:// prefix into the local cache (once); returns the copy."""
    destination = cache_directory(f"{store_endpoint or ''} {url}")
    try:
        store = open_object_store(url, endpoint=store_endpoint, create=False)
        objects = dataset_objects(name, list(store.list("")))
        if not objects:
            raise DatasetError(f"{url}: holds none of the {name} training files ({expected_files(name)})")
        for info in objects:
            download_once(store, info, destination)
    except ObjectStoreError as error:
        raise DatasetError(f"{url}: {error}") from None
    return destination


def dataset_objects(name: str, objects: list[ObjectInfo]) -> list[ObjectInfo]:
    """The objects a dataset needs; a whitelist of keys, so no key can write outside the cache."""
    if name != "cifar10":
        names = {IDX_IMAGES, IDX_LABELS, f"{IDX_IMAGES}.gz", f"{IDX_LABELS}.gz"}
        return [info for info in objects if info.key in names]
    batches = [info for info in objects if CIFAR_OBJECT.match(info.key)]
    return batches or [info for info in objects if info.key == CIFAR_TARBALL]


def expected_files(name: str) -> str:
    if name == "cifar10":
        return f"{CIFAR_FOLDER}/data_batch_N or {CIFAR_TARBALL}"
    return f"{IDX_IMAGES}[.gz] and {IDX_LABELS}[.gz]"


def download_once(store: ObjectStore, info: ObjectInfo, destination: Path) -> None:
    target = destination / info.key
    if target.is_file() and target.stat().st_size == info.size:
        return
    write_atomically(target, store.get_bytes(info.key))


def write_atomically(target: Path, data: bytes) -> None:
    # Trials running side by side share the cache: a reader sees a whole file or none.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def dataset_files(name: str, directory: Path) -> tuple[Path, ...]:
    """The files to parse: (images, labels) idx files, or the CIFAR-10 training batches in order."""
    if name == "cifar10":
        return cifar_training_batches(cifar_batches_folder(directory))
    return find_idx_file(directory, IDX_IMAGES), find_idx_file(directory, IDX_LABELS)


def find_idx_file(directory: Path, base_name: str) -> Path:
    for candidate in (directory / base_name, directory / f"{base_name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{directory}: no {base_name} or {base_name}.gz")


def cifar_batches_folder(directory: Path) -> Path:
    """`directory` may be the root holding cifar-10-batches-py/, that folder itself, or hold the tarball."""
    for candidate in (directory / CIFAR_FOLDER, directory):
        if any(CIFAR_BATCH.match(path.name) for path in candidate.glob("data_batch_*")):
            return candidate
    tarball = directory / CIFAR_TARBALL
    if tarball.is_file():
        return extract_cifar_tarball(tarball)
    raise DatasetError(f"{directory}: no {CIFAR_FOLDER}/data_batch_N files and no {CIFAR_TARBALL}")


def cifar_training_batches(folder: Path) -> tuple[Path, ...]:
    batches = [path for path in folder.iterdir() if CIFAR_BATCH.match(path.name) and path.is_file()]
    return tuple(sorted(batches, key=lambda path: int(CIFAR_BATCH.match(path.name).group(1))))


def extract_cifar_tarball(tarball: Path) -> Path:
    """Extract the batches (only) into the cache, once per tarball version; returns the batches folder."""
    stat = tarball.stat()
    destination = cache_directory(f"tar {tarball.resolve()} {stat.st_size} {stat.st_mtime_ns}")
    target = destination / CIFAR_FOLDER
    if target.is_dir():
        return target
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination, prefix=".extract-"))
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            members = [member for member in archive.getmembers() if is_cifar_batch_member(member)]
            if not members:
                raise DatasetError(f"{tarball}: holds no {CIFAR_FOLDER}/ files")
            # The "data" filter refuses absolute paths, links out of the folder and device files.
            archive.extractall(staging, members=members, filter="data")
        os.replace(staging / CIFAR_FOLDER, target)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DatasetError(f"{tarball}: not a readable CIFAR-10 tarball ({error})") from None
    except OSError:
        if not target.is_dir():  # another trial extracting the same tarball won the rename: use its copy
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_cifar_batch_member(member: tarfile.TarInfo) -> bool:
    parts = PurePosixPath(member.name).parts
    return member.isfile() and len(parts) == 2 and parts[0] == CIFAR_FOLDER and parts[1] not in ("..", ".")


# --- parsing ----------------------------------------------------------------------------------


def read_raw_images(name: str, directory: Path) -> RawImages:
    files = dataset_files(name, directory)
    # Size and mtime in the key: a rewritten file is parsed again, an unchanged one is not.
    fingerprint = tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files)
    return parse_dataset_files(name, fingerprint)


@functools.lru_cache(maxsize=4)
def parse_dataset_files(name: str, fingerprint: tuple[tuple[str, int, int], ...]) -> RawImages:
    """Memoised per process, since one process may run several trials on the same data."""
    paths = [Path(entry[0]) for entry in fingerprint]
    raw = parse_cifar_batches(paths) if name == "cifar10" else parse_idx_pair(paths[0], paths[1])
    check_raw_images(name, raw, paths)
    raw.images.flags.writeable = False
    raw.labels.flags.writeable = False
    return raw


def check_raw_images(name: str, raw: RawImages, paths: list[Path]) -> None:
    where = paths[0].parent
    if raw.images.shape[1:] != DATASET_SHAPES[name]:
        raise DatasetError(f"{where}: images have shape {raw.images.shape[1:]}, {name} needs {DATASET_SHAPES[name]}")
    if len(raw.labels) == 0:
        raise DatasetError(f"{where}: no training images")
    if raw.labels.min() < 0 or raw.labels.max() >= DATASET_CLASSES[name]:
        raise DatasetError(f"{where}: labels outside 0..{DATASET_CLASSES[name] - 1}")


def parse_idx_pair(images_path: Path, labels_path: Path) -> RawImages:
    images = parse_idx(images_path, ndim=3)
    labels = parse_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DatasetError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path.name}")
    return RawImages(images[:, np.newaxis], labels.astype(np.int64))


def parse_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes (raw or gzipped): magic 0x0000 08 <ndim>, big-endian dims, data."""
    data = read_maybe_gzipped(path)
    header_size = 4 + 4 * ndim
    if len(data) < header_size or data[:4] != bytes([0, 0, IDX_UNSIGNED_BYTE, ndim]):
        raise DatasetError(f"{path}: not an idx file of unsigned bytes with {ndim} dimensions")
    dims = tuple(int(dim) for dim in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_size = header_size + int(np.prod(dims))
    if len(data) != expected_size:
        raise DatasetError(f"{path}: {len(data)} bytes where the idx header announces {expected_size} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def read_maybe_gzipped(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        # By content, not name: mirrors ship both, sometimes gunzipped under the .gz name.
        return gzip.decompress(data) if data[:2] == GZIP_MAGIC else data
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DatasetError(f"{path}: corrupt gzip data ({error})") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None


class CifarBatchUnpickler(pickle.Unpickler):
    """torchvision's pickle format, but only numpy arrays may be rebuilt.

    Batches can come from a shared bucket, and an unrestricted unpickler runs whatever code a
    pickle names.
    """

    ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3's protocol 2 spells bytes as _codecs.encode(str, 'latin1')
    }

    def find_class(self, module: str, name: str):
        module = module.replace("numpy.core.", "numpy._core.")  # the real files predate numpy 2
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def parse_cifar_batches(paths: list[Path]) -> RawImages:
    # torchvision.datasets.CIFAR10 would check the real files' md5 sums, so the format is read here.
    batches = [parse_cifar_batch(path) for path in paths]
    return RawImages(np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches]))


def parse_cifar_batch(path: Path) -> RawImages:
    """A pickled dict: data uint8 [N, 3072] (1024 red, then green, then blue, row-major), labels [N]."""
    try:
        with path.open("rb") as handle:
            batch = CifarBatchUnpickler(handle, encoding="latin1").load()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    except Exception as error:  # garbage bytes make the unpickler raise almost any exception type
        raise DatasetError(f"{path}: not a CIFAR-10 batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")
    # Python 2 pickles (the real files) load with str keys; Python 3 ones written with bytes keys keep them.
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = np.asarray(batch.get("data")), np.asarray(batch.get("labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: 'labels' must be {len(data)} integers")
    return RawImages(data.reshape(-1, 3, 32, 32), labels.astype(np.int64))


# --- choosing images --------------------------------------------------------------------------


def stratified_subset(labels: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of `size` images with the dataset's class proportions (all when None)."""
    if size is None:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quotas = proportional_quotas(counts, size, capacity=counts)
    picked = [rng.choice(np.flatnonzero(labels == cls), quota, replace=False) for cls, quota in zip(classes, quotas)]
    return np.sort(np.concatenate(picked))


def stratified_validation_split(labels: np.ndarray, chosen: np.ndarray, fraction: float,
                                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted positions from `chosen`, each class split in the same proportion."""
    chosen_labels = labels[chosen]
    classes, counts = np.unique(chosen_labels, return_counts=True)
    capacity = np.maximum(counts - 1, 0)  # every class keeps at least one training image
    if capacity.sum() == 0:
        raise DatasetError(f"{len(chosen)} images are too few for a validation split")
    total = int(min(max(round(fraction * len(chosen)), 1), capacity.sum()))
    quotas = proportional_quotas(counts, total, capacity)
    held_out = [rng.permutation(chosen[chosen_labels == cls])[:quota] for cls, quota in zip(classes, quotas)]
    val = np.sort(np.concatenate(held_out))
    return np.setdiff1d(chosen, val, assume_unique=True), val


def proportional_quotas(counts: np.ndarray, total: int, capacity: np.ndarray) -> np.ndarray:
    """`total` shared across classes in proportion to `counts` by largest remainder, at most
    `capacity` per class, and at least one per class wherever the total allows."""
    assert total <= capacity.sum()
    exact = counts * total / counts.sum()
    quotas = np.minimum(np.floor(exact).astype(np.int64), capacity)
    can_take = capacity > 0
    if total >= can_take.sum():
        quotas[can_take & (quotas == 0)] = 1
    while quotas.sum() < total:
        quotas[np.argmax(np.where(quotas < capacity, exact - quotas, -np.inf))] += 1
    while quotas.sum() > total:
        quotas[np.argmax(np.where(quotas > 1, quotas - exact, -np.inf))] -= 1
    return quotas


# --- pixels -----------------------------------------------------------------------------------


def to_model_input(images: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 [N, C, h, w] -> float32 [N, C, H, W] in [0, 1]: zero-padded when larger, area-downscaled when smaller."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    _, height, width = shape
    if x.shape[-2:] == (height, width):
        return x
    if height >= x.shape[-2] and width >= x.shape[-1]:
        return pad_centred(x, height, width)
    return F.interpolate(x, size=(height, width), mode="area")


def pad_centred(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # Black borders around the whole image, as the paper pads 28x28 images to CIFAR's 32x32.
    top, left = (height - x.shape[-2]) // 2, (width - x.shape[-1]) // 2
    return F.pad(x, (left, width - x.shape[-1] - left, top, height - x.shape[-2] - top))


def channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)  # a constant channel must not divide by zero
    return mean, std


def standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((x - mean[:, None, None]) / std[:, None, None]).contiguous()
