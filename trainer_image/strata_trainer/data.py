"""Datasets become the normalised train, validation and test tensors one trial trains and is scored on.

Sources: a directory (idx files for Fashion-MNIST and MNIST; torchvision's cifar-10-batches-py or
cifar-100-python folder or its tarball for CIFAR; one folder of PNG or JPEG images per class, or a
.tar, .tar.gz, .tgz or .zip archive of them, for imagefolder; one .npz file for npz), or
s3://bucket/prefix, fetched once into a local cache.

Images stay uint8 until the test hold-out, the stratified subset and the validation split are
chosen; only the chosen images become floats at the study's input size, standardised with the
train split's per-channel statistics. The bundled datasets are padded or area-downscaled to that
size (the paper pads 28x28 to 32x32); the user's own (imagefolder, npz) come in any size and are
resized to it, bilinear with antialiasing.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from strata.families.base import DATASET_CLASSES, DATASET_SHAPES, USER_DATASET_SIZE
from strata.objectstore import ObjectInfo, ObjectStore, ObjectStoreError, open_object_store
from strata.spec import USER_DATASETS, Training
from strata_trainer.resources import cpu_limit

IDX_IMAGES = "train-images-idx3-ubyte"
IDX_LABELS = "train-labels-idx1-ubyte"
IDX_TEST_IMAGES = "t10k-images-idx3-ubyte"
IDX_TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_UNSIGNED_BYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TARBALL = "cifar-10-python.tar.gz"
CIFAR_BATCH = re.compile(r"^data_batch_(\d+)$")
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_TARBALL = "cifar-100-python.tar.gz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")  # what Pillow may decode: a renamed file of another format is refused
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
IMAGE_FOLDER_SPLITS = ("train", "test")
NPZ_SUFFIX = ".npz"
TEST_HOLD_OUT_STREAM = 1  # the hold-out draws from SeedSequence([seed, 1]), apart from the subset's default_rng(seed)
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
    # Each image's position in the dataset's training images (in its test images for a test split of its own).
    source_index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DatasetSplits:
    train: Split
    val: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    source: str  # human-readable: where it came from
    channel_mean: tuple[float, ...] = ()  # of the train split in [0, 1] pixels, subtracted from every split
    channel_std: tuple[float, ...] = ()
    test: Split | None = None  # the dataset's own test split, or the held-out spec.training.testSplit; never subset
    classes: tuple[str, ...] = ()  # class names, where the data has them (CIFAR's meta file, imagefolder's folders)


@dataclass(frozen=True)
class RawImages:
    images: np.ndarray  # uint8 [N, C, H, W], read-only (shared by the memo)
    labels: np.ndarray  # int64 [N], read-only


@dataclass(frozen=True)
class RawDataset:
    train: RawImages
    test: RawImages | None  # None: the dataset has no test split of its own
    num_classes: int
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CifarFormat:
    """torchvision's pickled CIFAR layout: one folder (or its tarball) of dicts with uint8 rows."""

    title: str
    folder: str
    tarball: str
    labels_key: str
    test: str  # the test batch's file name
    meta: str
    names_key: str  # the class names in the meta file
    training: re.Pattern  # the training batches' file names
    expected: str  # the training files, for messages

    def training_files(self, folder: Path) -> tuple[Path, ...]:
        batches = [path for path in folder.glob("*") if self.training.match(path.name) and path.is_file()]
        return tuple(sorted(batches, key=lambda path: batch_number(path.name)))

    def is_object(self, key: str) -> bool:
        parts = key.split("/")
        return (len(parts) == 1 or (len(parts) == 2 and parts[0] == self.folder)) and (
            bool(self.training.match(parts[-1])) or parts[-1] in (self.test, self.meta))


def batch_number(file_name: str) -> int:
    match = CIFAR_BATCH.match(file_name)
    return int(match.group(1)) if match else 0


CIFAR = {
    "cifar10": CifarFormat("CIFAR-10", CIFAR_FOLDER, CIFAR_TARBALL, "labels", "test_batch", "batches.meta",
                           "label_names", CIFAR_BATCH, "data_batch_N files"),
    "cifar100": CifarFormat("CIFAR-100", CIFAR100_FOLDER, CIFAR100_TARBALL, "fine_labels", "test", "meta",
                            "fine_label_names", re.compile(r"^train$"), "train file"),
}


def load_dataset(training: Training, store_endpoint: str | None = None) -> DatasetSplits:
    """The train, validation and (where there is one) test splits a trial with these training settings uses."""
    name = training.dataset.name
    location = dataset_location(name, training.dataset.path)
    source = local_source(name, location, store_endpoint)
    shape = model_input_shape(training)
    raw = read_copied_dataset(name, location, source, shape)
    pool, held_out = hold_out_test_split(raw, training)
    if training.subset_size is not None and training.subset_size > len(pool):
        left = " left after the test split" if held_out is not None else ""
        raise DatasetError(
            f"spec.training.subsetSize {training.subset_size} exceeds the {len(pool)} training images{left} in {location}"
        )
    rng = np.random.default_rng(training.seed)
    chosen = pool[stratified_subset(raw.train.labels[pool], training.subset_size, rng)]
    train_index, val_index = stratified_validation_split(raw.train.labels, chosen, training.validation_split, rng)
    model_input = to_resized_model_input if name in USER_DATASETS else to_model_input
    train_x = model_input(raw.train.images[train_index], shape)
    val_x = model_input(raw.train.images[val_index], shape)
    mean, std = channel_statistics(train_x)

    def split(images: RawImages, index: np.ndarray, x: torch.Tensor | None = None) -> Split:
        x = model_input(images.images[index], shape) if x is None else x
        return Split(standardise(x, mean, std), torch.from_numpy(images.labels[index]), index)

    if raw.test is not None:
        test = split(raw.test, np.arange(len(raw.test.labels)))
    else:
        test = split(raw.train, held_out) if held_out is not None else None
    return DatasetSplits(
        train=split(raw.train, train_index, train_x),
        val=split(raw.train, val_index, val_x),
        num_classes=raw.num_classes,
        input_shape=shape,
        source=f"{name} from {location}" + (f" (cached in {source})" if location.startswith("s3://") else ""),
        channel_mean=tuple(mean.tolist()),
        channel_std=tuple(std.tolist()),
        test=test,
        classes=raw.classes,
    )


def model_input_shape(training: Training) -> tuple[int, int, int]:
    # The same rule as strata.families.base.input_shape_for, which takes a whole StudySpec.
    dataset = training.dataset
    if dataset.name in USER_DATASETS:
        size = training.input_size or USER_DATASET_SIZE
        return dataset.channels or 3, size, size
    channels, height, width = DATASET_SHAPES[dataset.name]
    if training.input_size:
        return channels, training.input_size, training.input_size
    return channels, height, width


def hold_out_test_split(raw: RawDataset, training: Training) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions left for the subset and validation split, and those held out as the test split (or None).

    Only for a dataset without a test split of its own, and before the subset is drawn, so the test
    images are never trained on whatever the subset. Its own random stream of the seed: the same
    images are held out whatever subsetSize and validationSplit say, and a study without testSplit
    draws its subset and validation split exactly as before."""
    everything = np.arange(len(raw.train.labels))
    if raw.test is not None or training.test_split is None:
        return everything, None
    rng = np.random.default_rng([training.seed, TEST_HOLD_OUT_STREAM])
    return stratified_validation_split(raw.train.labels, everything, training.test_split, rng, "test")


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


def local_source(name: str, location: str, store_endpoint: str | None) -> Path:
    """A local directory (or, for imagefolder and npz, file) holding the dataset; an s3:// prefix is fetched first."""
    if location.startswith("s3://"):
        return fetch_from_store(name, location, store_endpoint)
    path = Path(location.removeprefix("file://")).expanduser()
    if name in USER_DATASETS:
        if not path.exists():
            raise DatasetError(f"{name}: dataset path {path} does not exist")
        return path
    if not path.is_dir():
        hint = " (install the Debian package dataset-fashion-mnist)" if location == FASHION_MNIST_DIR else ""
        raise DatasetError(f"{name}: dataset directory {path} does not exist{hint}")
    return path


def cache_directory(key: str) -> Path:
    root = Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()
    return root / hashlib.sha256(key.encode()).hexdigest()[:24]


def fetch_from_store(name: str, url: str, store_endpoint: str | None) -> Path:
    """Copy the dataset's objects under an s3:// prefix into the local cache (once); returns the copy.

    The copy is a directory, or the one archive (imagefolder) or .npz file (npz) the prefix holds."""
    destination = cache_directory(f"{store_endpoint or ''} {url}")
    try:
        store = open_object_store(url, endpoint=store_endpoint, create=False)
        objects = dataset_objects(name, list(store.list("")), url)
        if not objects:
            raise DatasetError(f"{url}: holds none of the {name} training files ({expected_files(name)})")
        for info in objects:
            download_once(store, info, destination)
    except ObjectStoreError as error:
        raise DatasetError(f"{url}: {error}") from None
    if name == "npz" or (name == "imagefolder" and is_archive_key(objects[0].key)):
        return destination / objects[0].key
    if name == "imagefolder":
        remove_stale_images(destination, {info.key for info in objects})
    return destination


def dataset_objects(name: str, objects: list[ObjectInfo], url: str = "") -> list[ObjectInfo]:
    """The objects a dataset needs; a whitelist of keys, so no key can write outside the cache."""
    if name in CIFAR:
        batches = [info for info in objects if CIFAR[name].is_object(info.key)]
        return batches or [info for info in objects if info.key == CIFAR[name].tarball]
    if name == "imagefolder":
        images = [info for info in objects if is_image_key(info.key)]
        return images or one_object(url, [info for info in objects if is_archive_key(info.key)], "archives")
    if name == "npz":
        return one_object(url, [info for info in objects if is_npz_key(info.key)], ".npz objects")
    names = {IDX_IMAGES, IDX_LABELS, IDX_TEST_IMAGES, IDX_TEST_LABELS}
    return [info for info in objects if info.key.removesuffix(".gz") in names]


def one_object(url: str, found: list[ObjectInfo], what: str) -> list[ObjectInfo]:
    if len(found) > 1:
        keys = ", ".join(info.key for info in found[:3]) + (", ..." if len(found) > 3 else "")
        raise DatasetError(f"{url}: holds {len(found)} {what} ({keys}); the dataset must be exactly one")
    return found


def key_parts(key: str) -> tuple[str, ...] | None:
    """The parts of an object key or archive member name, or None where it could point outside its
    folder (an absolute name, '..') or name it two ways ('.', an empty part)."""
    parts = tuple(key.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


def is_visible(name: str) -> bool:
    # .DS_Store, ._resource forks, __MACOSX/ and the cache's own .tmp- files are nobody's images.
    return not name.startswith(".") and name != "__MACOSX"


def is_image_name(name: str) -> bool:
    return is_visible(name) and name.lower().endswith(IMAGE_SUFFIXES)


def is_image_key(key: str) -> bool:
    """<class>/<image> or train|test/<class>/<image>."""
    parts = key_parts(key)
    if parts is None or not all(is_visible(part) for part in parts) or not is_image_name(parts[-1]):
        return False
    return len(parts) == 2 or (len(parts) == 3 and parts[0] in IMAGE_FOLDER_SPLITS)


def is_archive_key(key: str) -> bool:
    parts = key_parts(key)
    return parts is not None and len(parts) == 1 and is_visible(key) and is_archive_name(key)


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def is_npz_key(key: str) -> bool:
    parts = key_parts(key)
    return parts is not None and len(parts) == 1 and is_visible(key) and key.lower().endswith(NPZ_SUFFIX)


def expected_files(name: str) -> str:
    if name in CIFAR:
        return f"{CIFAR[name].folder}/{CIFAR[name].expected.split()[0]} or {CIFAR[name].tarball}"
    if name == "imagefolder":
        return ("<class>/<image> or train/<class>/<image> objects of .png, .jpg or .jpeg images, "
                f"or one {', '.join(ARCHIVE_SUFFIXES)} archive")
    if name == "npz":
        return "one .npz object"
    return f"{IDX_IMAGES}[.gz] and {IDX_LABELS}[.gz]"


def download_once(store: ObjectStore, info: ObjectInfo, destination: Path) -> None:
    target = destination / info.key
    if target.is_file() and target.stat().st_size == info.size:
        return
    write_atomically(target, store.get_bytes(info.key))


def remove_stale_images(destination: Path, keys: set[str]) -> None:
    # An image deleted from the bucket must not stay in the class folders of the local copy.
    for path in destination.rglob("*"):
        if path.is_file() and is_image_name(path.name) and path.relative_to(destination).as_posix() not in keys:
            path.unlink(missing_ok=True)


def write_atomically(target: Path, data: bytes | np.ndarray) -> None:
    # Trials running side by side share the cache: a reader sees a whole file or none.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, np.ndarray):
                np.save(handle, data, allow_pickle=False)
            else:
                handle.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def bundled_files(name: str, directory: Path) -> tuple[tuple[Path, ...], tuple[Path, ...] | None, Path | None]:
    """The files to parse: the training ones (idx images and labels, or the CIFAR training batches in
    order), the test ones (None where the dataset has none there), and CIFAR's meta file (or None)."""
    if name in CIFAR:
        cifar = CIFAR[name]
        folder = cifar_batches_folder(cifar, directory)
        test, meta = folder / cifar.test, folder / cifar.meta
        return cifar.training_files(folder), (test,) if test.is_file() else None, meta if meta.is_file() else None
    train = find_idx_file(directory, IDX_IMAGES), find_idx_file(directory, IDX_LABELS)
    return train, find_idx_test_files(directory), None


def find_idx_file(directory: Path, base_name: str, required: bool = True) -> Path | None:
    for candidate in (directory / base_name, directory / f"{base_name}.gz"):
        if candidate.is_file():
            return candidate
    if not required:
        return None
    raise DatasetError(f"{directory}: no {base_name} or {base_name}.gz")


def find_idx_test_files(directory: Path) -> tuple[Path, Path] | None:
    """The t10k images and labels, or None when neither is there."""
    images = find_idx_file(directory, IDX_TEST_IMAGES, required=False)
    labels = find_idx_file(directory, IDX_TEST_LABELS, required=False)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        present, missing = (labels, IDX_TEST_IMAGES) if images is None else (images, IDX_TEST_LABELS)
        raise DatasetError(f"{present}: a test file without {missing}[.gz] beside it")
    return images, labels


def cifar_batches_folder(cifar: CifarFormat, directory: Path) -> Path:
    """`directory` may be the root holding the batches folder, that folder itself, or hold the tarball."""
    for candidate in (directory / cifar.folder, directory):
        if cifar.training_files(candidate):
            return candidate
    tarball = directory / cifar.tarball
    if not tarball.is_file():
        raise DatasetError(f"{directory}: no {cifar.folder}/{cifar.expected} and no {cifar.tarball}")
    folder = extract_once(tarball, cifar.folder, lambda parts: len(parts) == 2 and parts[0] == cifar.folder,
                          refuse_unsafe=False, what=f"{cifar.title} tarball")
    if not cifar.training_files(folder):
        raise DatasetError(f"{tarball}: holds no {cifar.folder}/{cifar.expected}")
    return folder


def extract_once(archive: Path, keep: str | None, wanted: Callable[[tuple[str, ...]], bool], *,
                 refuse_unsafe: bool, what: str) -> Path:
    """Extract the wanted members (only) into the cache, once per archive version; returns the folder
    `keep` of the archive (None: all of it).

    Members that could land outside the folder (absolute names, '..') are skipped, or refuse the whole
    archive with `refuse_unsafe`; links and device files are never extracted."""
    stat = archive.stat()
    destination = cache_directory(f"extract {archive.resolve()} {stat.st_size} {stat.st_mtime_ns}")
    target = destination / (keep or "contents")
    if target.is_dir():
        return target
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination, prefix=".extract-"))
    try:
        try:
            unpack = unpack_zip if archive.name.lower().endswith(".zip") else unpack_tar
            extracted = unpack(archive, staging, wanted, refuse_unsafe)
        except DatasetError:
            raise
        except Exception as error:  # a damaged archive makes tarfile, zipfile and zlib raise many types
            raise DatasetError(f"{archive}: not a readable {what} ({type(error).__name__}: {error})") from None
        if not extracted:
            raise DatasetError(f"{archive}: holds no {keep + '/ files' if keep else 'images'}")
        try:
            os.replace(staging / keep if keep else staging, target)
        except OSError:
            if not target.is_dir():  # another trial extracting the same archive won the rename: use its copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def member_parts(archive: Path, name: str, refuse_unsafe: bool) -> tuple[str, ...] | None:
    while name.startswith("./"):  # what `tar -C folder .` writes
        name = name[2:]
    parts = key_parts(name)
    if parts is None and refuse_unsafe:
        raise DatasetError(f"{archive}: refusing member {name!r} (an absolute name or '..' could land outside)")
    return parts


def unpack_tar(archive: Path, staging: Path, wanted: Callable[[tuple[str, ...]], bool], refuse_unsafe: bool) -> int:
    with tarfile.open(archive) as tar:  # plain or compressed, by content
        members = []
        for member in tar.getmembers():
            # Only regular files: directories come with them, links and devices never do.
            parts = member_parts(archive, member.name, refuse_unsafe) if member.isfile() else None
            if parts is not None and wanted(parts):
                members.append(member)
        # The "data" filter refuses absolute paths, links out of the folder and device files.
        tar.extractall(staging, members=members, filter="data")
    return len(members)


def unpack_zip(archive: Path, staging: Path, wanted: Callable[[tuple[str, ...]], bool], refuse_unsafe: bool) -> int:
    extracted = 0
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            parts = None if info.is_dir() else member_parts(archive, info.filename, refuse_unsafe)
            if parts is None or not wanted(parts):
                continue
            target = staging.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(info) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink)
            extracted += 1
    return extracted


# --- parsing ----------------------------------------------------------------------------------


def read_copied_dataset(name: str, location: str, source: Path, shape: tuple[int, int, int]) -> RawDataset:
    """read_raw_dataset; an error in a copy (fetched from S3, extracted from an archive) also names the original."""
    copied = location.startswith("s3://") or (name == "imagefolder" and source.is_file())
    try:
        return read_raw_dataset(name, source, shape)
    except DatasetError as error:
        if not copied or str(error).startswith(location):
            raise
        raise DatasetError(f"{location}: {error}") from None


def read_raw_dataset(name: str, source: Path, shape: tuple[int, int, int]) -> RawDataset:
    if name == "imagefolder":
        return read_image_folder(source, shape)
    if name == "npz":
        return read_npz(source)
    train_files, test_files, meta = bundled_files(name, source)
    train = read_raw_images(name, train_files, "training")
    test = read_raw_images(name, test_files, "test") if test_files else None
    classes = cifar_class_names(CIFAR[name], meta, DATASET_CLASSES[name]) if meta else ()
    return RawDataset(train, test, DATASET_CLASSES[name], classes)


def read_raw_images(name: str, files: tuple[Path, ...], what: str) -> RawImages:
    # Size and mtime in the key: a rewritten file is parsed again, an unchanged one is not.
    fingerprint = tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files)
    return parse_dataset_files(name, fingerprint, what)


@functools.lru_cache(maxsize=8)
def parse_dataset_files(name: str, fingerprint: tuple[tuple[str, int, int], ...], what: str = "training") -> RawImages:
    """Memoised per process, since one process may run several trials on the same data."""
    paths = [Path(entry[0]) for entry in fingerprint]
    raw = parse_cifar_batches(CIFAR[name], paths) if name in CIFAR else parse_idx_pair(paths[0], paths[1])
    check_raw_images(name, raw, paths, what)
    return frozen(raw)


def frozen(raw: RawImages) -> RawImages:
    raw.images.flags.writeable = False
    raw.labels.flags.writeable = False
    return raw


def check_raw_images(name: str, raw: RawImages, paths: list[Path], what: str = "training") -> None:
    where = paths[0].parent
    if raw.images.shape[1:] != DATASET_SHAPES[name]:
        raise DatasetError(f"{where}: images have shape {raw.images.shape[1:]}, {name} needs {DATASET_SHAPES[name]}")
    if len(raw.labels) == 0:
        raise DatasetError(f"{where}: no {what} images")
    if raw.labels.min() < 0 or raw.labels.max() >= DATASET_CLASSES[name]:
        raise DatasetError(f"{where}: {what} labels outside 0..{DATASET_CLASSES[name] - 1}")


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
    pickle names. CIFAR-10's batches, CIFAR-100's train/test files and both meta files need no more.
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


def load_cifar_pickle(path: Path, what: str) -> dict:
    """One of torchvision's CIFAR pickles: a dict with str keys."""
    try:
        with path.open("rb") as handle:
            loaded = CifarBatchUnpickler(handle, encoding="latin1").load()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    except Exception as error:  # garbage bytes make the unpickler raise almost any exception type
        raise DatasetError(f"{path}: not a {what} ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, dict):
        raise DatasetError(f"{path}: not a {what} (a {type(loaded).__name__}, not a dict)")
    # Python 2 pickles (the real files) load with str keys; Python 3 ones written with bytes keys keep them.
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in loaded.items()}


def parse_cifar_batches(cifar: CifarFormat, paths: list[Path]) -> RawImages:
    # torchvision.datasets.CIFAR10 would check the real files' md5 sums, so the format is read here.
    batches = [parse_cifar_batch(cifar, path) for path in paths]
    return RawImages(np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches]))


def parse_cifar_batch(cifar: CifarFormat, path: Path) -> RawImages:
    """A pickled dict: data uint8 [N, 3072] (1024 red, then green, then blue, row-major), labels [N]."""
    batch = load_cifar_pickle(path, f"{cifar.title} batch")
    data, labels = np.asarray(batch.get("data")), np.asarray(batch.get(cifar.labels_key))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: '{cifar.labels_key}' must be {len(data)} integers")
    return RawImages(data.reshape(-1, 3, 32, 32), labels.astype(np.int64))


def cifar_class_names(cifar: CifarFormat, meta: Path, count: int) -> tuple[str, ...]:
    names = load_cifar_pickle(meta, f"{cifar.title} meta file").get(cifar.names_key)
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, (str, bytes)) for n in names):
        raise DatasetError(f"{meta}: '{cifar.names_key}' must be a list of {count} class names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


# --- imagefolder --------------------------------------------------------------------------------


def read_image_folder(source: Path, shape: tuple[int, int, int]) -> RawDataset:
    """One folder of images per class (class order: the sorted folder names, the same for train and test)."""
    train_root, test_root = image_folder_splits(image_folder_root(source))
    classes = class_folders(train_root)
    channels, size, _ = shape
    train = decoded_images(train_root, image_files(train_root, classes), size, channels)
    test = decoded_images(test_root, image_files(test_root, classes, test=True), size, channels) if test_root else None
    return RawDataset(train, test, len(classes), classes)


def image_folder_root(source: Path) -> Path:
    """The folder itself, or an archive's contents (descending into an archive's one top-level folder)."""
    if source.is_dir():
        return source
    if not is_archive_name(source.name):
        raise DatasetError(f"{source}: imagefolder needs a directory or a {', '.join(ARCHIVE_SUFFIXES)} archive")
    root = extract_once(source, None, lambda parts: all(is_visible(p) for p in parts) and is_image_name(parts[-1]),
                        refuse_unsafe=True, what="tar or zip archive")
    entries = visible_entries(root)
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in IMAGE_FOLDER_SPLITS \
            and not any(is_image_name(path.name) for path in visible_entries(entries[0])):
        return entries[0]
    return root


def image_folder_splits(root: Path) -> tuple[Path, Path | None]:
    """(train, test or None): root/train and root/test, or the class folders directly under root."""
    train, test = root / "train", root / "test"
    if train.is_dir():
        return train, test if test.is_dir() else None
    if test.is_dir():
        raise DatasetError(f"{test}: a test/ folder needs a train/ folder of class folders beside it")
    return root, None


def visible_entries(folder: Path) -> list[Path]:
    try:
        return sorted(path for path in folder.iterdir() if is_visible(path.name))
    except OSError as error:
        raise DatasetError(f"{folder}: cannot list ({error.strerror or error})") from None


def class_folders(train_root: Path) -> tuple[str, ...]:
    folders = tuple(path.name for path in visible_entries(train_root) if path.is_dir())
    if len(folders) < 2:
        raise DatasetError(f"{train_root}: {len(folders)} class folder{'' if len(folders) == 1 else 's'}; "
                           "imagefolder needs at least 2 (one folder of images per class)")
    return folders


ImageFiles = tuple[tuple[str, int, int, int], ...]  # (path relative to the split's folder, label, size, mtime_ns)


def image_files(split_root: Path, classes: tuple[str, ...], test: bool = False) -> ImageFiles:
    """(path relative to split_root, label, size, mtime_ns) of every image, class by class, sorted by name."""
    present = {path.name for path in visible_entries(split_root) if path.is_dir()}
    unknown = sorted(present - set(classes))
    if unknown:
        raise DatasetError(f"{split_root / unknown[0]}: a test class that is not among the training class folders")
    files = []
    for label, name in enumerate(classes):
        if name not in present:
            continue  # a test split may lack a class
        images = [path for path in visible_entries(split_root / name) if is_image_name(path.name) and path.is_file()]
        if not images:
            raise DatasetError(f"{split_root / name}: empty class folder (no .png, .jpg or .jpeg images)")
        for path in images:
            stat = path.stat()
            files.append((f"{name}/{path.name}", label, stat.st_size, stat.st_mtime_ns))
    if not files:
        raise DatasetError(f"{split_root}: no class folders of images")
    return tuple(files)


def decoded_images(root: Path, files: ImageFiles, size: int, channels: int) -> RawImages:
    return decode_image_files(str(root), files, size, channels)


@functools.lru_cache(maxsize=4)
def decode_image_files(root: str, files: ImageFiles, size: int, channels: int) -> RawImages:
    """The images decoded once per machine, then memoised per process.

    Decoding thousands of PNGs or JPEGs takes far longer than a trial's data setup should, so the
    uint8 result is kept in the cache directory, keyed by the files' relative paths, sizes and mtimes
    and by the size and channels: later trials and other processes load it instead of decoding."""
    labels = np.array([entry[1] for entry in files], dtype=np.int64)
    fingerprint = json.dumps([[[entry[0], entry[2], entry[3]] for entry in files], size, channels])
    cached = cache_directory(f"imagefolder uint8 {hashlib.sha256(fingerprint.encode()).hexdigest()}") / "images.npy"
    images = read_decoded_cache(cached, (len(files), channels, size, size))
    if images is None:
        images = decode_images(Path(root), files, size, channels)
        write_atomically(cached, images)
    return frozen(RawImages(images, labels))


def read_decoded_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array, or None when there is none or it is not what these files decode to."""
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return images if images.dtype == np.uint8 and images.shape == shape else None


def decode_images(root: Path, files: ImageFiles, size: int, channels: int) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    with ThreadPoolExecutor(max_workers=min(8, cpu_limit())) as pool:  # Pillow decodes without the GIL
        decoded = list(pool.map(lambda entry: decode_image(root / entry[0], size, mode), files))
    return np.stack(decoded)


def decode_image(path: Path, size: int, mode: str) -> np.ndarray:
    """uint8 [C, size, size]: converted to RGB or L (Pillow's ITU-R 601-2 luma), resized bilinear with
    antialiasing (Pillow widens the filter when shrinking) unless already that size."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            converted = image.convert(mode)
        if converted.size != (size, size):
            converted = converted.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(converted, dtype=np.uint8)
    except Exception as error:  # Pillow raises many types for a damaged or foreign file
        raise DatasetError(f"{path}: not a readable PNG or JPEG image ({type(error).__name__}: {error})") from None
    return pixels[np.newaxis] if mode == "L" else pixels.transpose(2, 0, 1)


# --- npz ----------------------------------------------------------------------------------------


def read_npz(source: Path) -> RawDataset:
    path = npz_file(source)
    stat = path.stat()
    train, test = parse_npz_file(str(path), stat.st_size, stat.st_mtime_ns)
    return RawDataset(train, test, int(train.labels.max()) + 1)


def npz_file(source: Path) -> Path:
    """The .npz file itself, or the one a directory holds."""
    if not source.is_dir():
        return source
    found = [path for path in visible_entries(source) if path.name.lower().endswith(NPZ_SUFFIX) and path.is_file()]
    if len(found) != 1:
        raise DatasetError(f"{source}: holds {len(found)} .npz files; npz needs exactly one (or the path of the file)")
    return found[0]


@functools.lru_cache(maxsize=4)
def parse_npz_file(path: str, size: int, mtime_ns: int) -> tuple[RawImages, RawImages | None]:
    """(train, test or None), memoised per process; size and mtime in the key, as for the bundled files."""
    arrays = load_npz_arrays(Path(path))
    train = npz_split(Path(path), arrays, "x_train", "y_train")
    classes = check_npz_classes(Path(path), train.labels)
    test = npz_split(Path(path), arrays, "x_test", "y_test") if "x_test" in arrays else None
    if test is not None and test.labels.max() >= classes:
        raise DatasetError(f"{path}: 'y_test' has labels outside the 0..{classes - 1} of 'y_train'")
    return frozen(train), frozen(test) if test is not None else None


def load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path}: one array, not an .npz archive of x_train and y_train")
        with loaded:
            keys = set(loaded.files)
            for required in (("x_train", "y_train"), ("x_test", "y_test")):
                missing = [key for key in required if key not in keys]
                if len(missing) == 1 or (required[0] == "x_train" and missing):
                    raise DatasetError(f"{path}: no '{missing[0]}' (it holds {', '.join(sorted(keys)) or 'nothing'})")
            return {key: loaded[key] for key in ("x_train", "y_train", "x_test", "y_test") if key in keys}
    except DatasetError:
        raise
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    except Exception as error:  # a damaged zip, a pickled object array, a bad .npy header...
        raise DatasetError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from None


def npz_split(path: Path, arrays: dict[str, np.ndarray], x_key: str, y_key: str) -> RawImages:
    images = npz_images(path, arrays[x_key], x_key)
    labels = arrays[y_key]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # Keras ships CIFAR's labels as [N, 1]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: '{y_key}' must be integer class labels [N], got {labels.dtype} "
                           f"{list(labels.shape)}")
    if len(labels) != len(images):
        raise DatasetError(f"{path}: '{y_key}' has {len(labels)} labels for the {len(images)} images of '{x_key}'")
    if len(labels) == 0:
        raise DatasetError(f"{path}: '{x_key}' holds no images")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DatasetError(f"{path}: '{y_key}' has negative labels; classes are numbered 0..K-1")
    return RawImages(images, labels)


def npz_images(path: Path, x: np.ndarray, key: str) -> np.ndarray:
    """uint8 [N, C, H, W] from [N, H, W], [N, H, W, C] or [N, C, H, W] (C 1 or 3; channels last wins a tie)."""
    if x.ndim == 3:
        x = x[:, np.newaxis]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise DatasetError(f"{path}: '{key}' must be [N, H, W], [N, H, W, C] or [N, C, H, W] with C 1 or 3, "
                           f"got {list(x.shape)}")
    if min(x.shape[2:]) < 1:
        raise DatasetError(f"{path}: '{key}' has images of size {list(x.shape[2:])}")
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise DatasetError(f"{path}: '{key}' holds floats outside [0, 1]")
        x = np.rint(x * 255).astype(np.uint8)  # 8 bits per pixel, as every other source
    elif x.dtype != np.uint8:
        raise DatasetError(f"{path}: '{key}' must be uint8 or float in [0, 1], got {x.dtype}")
    return np.ascontiguousarray(x)


def check_npz_classes(path: Path, labels: np.ndarray) -> int:
    """K = the largest label + 1, each of 0..K-1 present among the training labels."""
    classes = int(labels.max()) + 1
    if classes < 2:
        raise DatasetError(f"{path}: 'y_train' holds 1 class; at least 2 are needed")
    missing = np.setdiff1d(np.arange(classes), labels)
    if len(missing):
        raise DatasetError(f"{path}: class {missing[0]} of 0..{classes - 1} has no training image in 'y_train' "
                           "(labels must be 0..K-1, each of them present)")
    return classes


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
                                rng: np.random.Generator, what: str = "validation") -> tuple[np.ndarray, np.ndarray]:
    """(train, held out) sorted positions from `chosen`, each class split in the same proportion."""
    chosen_labels = labels[chosen]
    classes, counts = np.unique(chosen_labels, return_counts=True)
    capacity = np.maximum(counts - 1, 0)  # every class keeps at least one training image
    if capacity.sum() == 0:
        raise DatasetError(f"{len(chosen)} images are too few for a {what} split")
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


def to_resized_model_input(images: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 [N, c, h, w] -> float32 [N, C, H, W] in [0, 1] for the user's own images: channels converted,
    then resized to H x W (bilinear with antialiasing), never padded: their size has nothing to do with
    the input size. imagefolder's images were decoded at the right size and channels already."""
    x = torch.from_numpy(np.ascontiguousarray(convert_channels(images, shape[0]))).float().div_(255)
    if x.shape[-2:] == shape[1:]:
        return x
    return F.interpolate(x, size=shape[1:], mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [N, C, H, W] with `channels` channels: grey repeated to RGB, RGB to Pillow's L (ITU-R 601-2 luma)."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=1)
    red, green, blue = (images[:, index].astype(np.uint32) for index in range(3))
    # Pillow's own integer form of L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded.
    return ((red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16).astype(np.uint8)[:, np.newaxis]


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
