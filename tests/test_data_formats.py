"""strata_trainer.data's other kinds: CIFAR-100, imagefolder and npz, test splits and the test hold-out.

Every dataset here is a real file written by the test (Pillow images, pickles, archives, .npz
files), read from a folder and from a real S3-compatible server over HTTP.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from strata.objectstore import ObjectInfo  # noqa: E402
from strata.spec import Dataset, Training, parse_spec  # noqa: E402
from strata_trainer import data  # noqa: E402
from strata_trainer.data import DatasetError, load_dataset  # noqa: E402
from strata_trainer.datacheck import verdict_for  # noqa: E402
from tests.test_data import (BUCKET, FASHION_DIR, cifar_images, idx_bytes, pixels, s3_client,  # noqa: E402,F401
                             s3_endpoint, upload_folder, write_cifar_folder, write_idx_pair)

CLASSES = ("cat", "dog", "eel")
PER_CLASS = 12
SUFFIXES = (".png", ".jpg", ".JPEG")


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch) -> Path:
    """Each test caches fetched, extracted and decoded files under its own tmp_path, and starts with
    empty in-process memos (a memo of another test's files would hide a decode)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(cache))
    for memo in (data.parse_dataset_files, data.decode_image_files, data.parse_npz_file):
        memo.cache_clear()
    return cache


def training(name: str, path: str | Path, channels: int | None = None, **settings) -> Training:
    return Training(dataset=Dataset(name=name, path=str(path), channels=channels), **settings)


# --- imagefolder ---------------------------------------------------------------------------------


def write_class_folders(root: Path, per_class: int = PER_CLASS, seed: int = 0, classes=CLASSES) -> Path:
    """Noise images of sizes from 8x8 to 47x47, as PNG, .jpg and .JPEG, `per_class` in each class folder."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(8, 48, 2)
            pixels_ = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels_).save(root / name / f"img{i:02d}{SUFFIXES[i % 3]}")
    (root / classes[0] / "notes.txt").write_text("not an image: ignored")
    (root / ".DS_Store").write_bytes(b"\0garbage")
    return root


def image_paths(split_root: Path) -> list[Path]:
    """The images in the loader's order: classes by folder name, files by name."""
    return [path for name in sorted(p.name for p in split_root.iterdir() if p.is_dir())
            for path in sorted((split_root / name).iterdir()) if path.suffix.lower() in data.IMAGE_SUFFIXES]


def pillow_pixels(paths: list[Path], size: int, mode: str = "RGB") -> np.ndarray:
    """[N, C, size, size] in [0, 1], as Pillow converts and resizes them."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode).resize((size, size), Image.Resampling.BILINEAR))
        arrays.append(array[np.newaxis] if mode == "L" else array.transpose(2, 0, 1))
    return np.stack(arrays) / 255


def assert_split_is(split, splits, paths: list[Path], size: int, mode: str = "RGB") -> None:
    expected = pillow_pixels([paths[i] for i in split.source_index], size, mode)
    np.testing.assert_allclose(pixels(split, splits), expected, atol=1e-5)
    labels = [CLASSES.index(paths[i].parent.name) for i in split.source_index]
    assert split.y.tolist() == labels


def test_imagefolder_images_of_any_size_are_resized_to_the_input_size_with_their_folder_classes(tmp_path):
    root = write_class_folders(tmp_path / "pets")
    splits = load_dataset(training("imagefolder", root, validation_split=0.25))
    paths = image_paths(root)

    assert splits.input_shape == (3, data.USER_DATASET_SIZE, data.USER_DATASET_SIZE)
    assert splits.num_classes == 3 and splits.classes == CLASSES
    assert splits.train.x.shape == (27, 3, 32, 32) and splits.val.x.shape == (9, 3, 32, 32)
    assert Counter(splits.val.y.tolist()) == {0: 3, 1: 3, 2: 3}
    assert splits.test is None
    assert_split_is(splits.train, splits, paths, 32)
    assert_split_is(splits.val, splits, paths, 32)


def test_imagefolder_train_and_test_folders_give_a_test_split_standardised_like_train(tmp_path):
    root = tmp_path / "split"
    write_class_folders(root / "train")
    write_class_folders(root / "test", per_class=4, seed=1)
    splits = load_dataset(training("imagefolder", root, input_size=20, test_split=0.5))  # testSplit: ignored

    assert len(splits.train) + len(splits.val) == 36 and len(splits.test) == 12
    assert splits.test.x.shape == (12, 3, 20, 20)
    assert_split_is(splits.test, splits, image_paths(root / "test"), 20)
    assert_split_is(splits.train, splits, image_paths(root / "train"), 20)


def test_a_test_folder_may_lack_a_class_but_not_add_one(tmp_path):
    root = tmp_path / "split"
    write_class_folders(root / "train")
    write_class_folders(root / "test", per_class=2, classes=("dog",))
    splits = load_dataset(training("imagefolder", root))
    assert splits.test.y.tolist() == [1, 1]

    write_class_folders(root / "test", per_class=2, classes=("fox",))
    with pytest.raises(DatasetError, match=f"{root / 'test' / 'fox'}: a test class that is not among the training"):
        load_dataset(training("imagefolder", root))


def test_imagefolder_with_one_channel_is_pillows_grayscale(tmp_path):
    root = write_class_folders(tmp_path / "pets")
    splits = load_dataset(training("imagefolder", root, channels=1, input_size=16))

    assert splits.input_shape == (1, 16, 16) and len(splits.channel_mean) == 1
    assert_split_is(splits.train, splits, image_paths(root), 16, mode="L")


def test_imagefolder_test_split_is_held_out_stratified_before_the_subset_and_never_trained_on(tmp_path):
    root = write_class_folders(tmp_path / "pets", per_class=20)
    splits = load_dataset(training("imagefolder", root, test_split=0.25, seed=3))
    again = load_dataset(training("imagefolder", root, test_split=0.25, seed=3, subset_size=30))
    other = load_dataset(training("imagefolder", root, test_split=0.25, seed=4))

    test = set(splits.test.source_index.tolist())
    train, val = set(splits.train.source_index.tolist()), set(splits.val.source_index.tolist())
    assert len(test) == 15 and Counter(splits.test.y.tolist()) == {0: 5, 1: 5, 2: 5}
    assert not test & (train | val) and len(train | val | test) == 60
    np.testing.assert_array_equal(again.test.source_index, splits.test.source_index)  # whatever the subset
    assert not test & (set(again.train.source_index.tolist()) | set(again.val.source_index.tolist()))
    assert len(again.train) + len(again.val) == 30
    assert not np.array_equal(other.test.source_index, splits.test.source_index)
    assert_split_is(splits.test, splits, image_paths(root), 32)


def test_a_subset_larger_than_what_the_hold_out_leaves_is_an_error(tmp_path):
    root = write_class_folders(tmp_path / "pets")
    with pytest.raises(DatasetError, match=r"subsetSize 30 exceeds the 27 training images left after the test split"):
        load_dataset(training("imagefolder", root, test_split=0.25, subset_size=30))


def make_archive(source: Path, archive: Path, top: str | None) -> Path:
    """source's files in a .tar.gz, .tgz, .tar or .zip, under `top`/ or under ./ (None)."""
    files = sorted(path for path in source.rglob("*") if path.is_file())
    names = [f"{top}/{p.relative_to(source).as_posix()}" if top else f"./{p.relative_to(source).as_posix()}"
             for p in files]
    archive.parent.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zipped:
            for path, name in zip(files, names):
                zipped.write(path, name)
    else:
        with tarfile.open(archive, "w:gz" if archive.name.endswith(("gz", "tgz")) else "w") as tar:
            tar.add(source, arcname=top or ".")
    return archive


@pytest.mark.parametrize("archive_name, top", [("pets.tar.gz", None), ("pets.zip", "pets"), ("pets.tgz", "pets"),
                                               ("pets.tar", None)])
def test_imagefolder_archives_are_extracted_once_into_the_cache_and_load_like_the_folder(tmp_path, dataset_cache,
                                                                                         archive_name, top):
    root = tmp_path / "pets"
    write_class_folders(root / "train")
    write_class_folders(root / "test", per_class=3, seed=2)
    archive = make_archive(root, tmp_path / "archives" / archive_name, top)

    from_archive = load_dataset(training("imagefolder", archive, test_split=0.3))
    from_folder = load_dataset(training("imagefolder", root))
    extracted = sorted(dataset_cache.rglob("img00.png"))
    stamps = [path.stat().st_mtime_ns for path in extracted]
    data.decode_image_files.cache_clear()
    load_dataset(training("imagefolder", archive))

    assert torch.equal(from_archive.train.x, from_folder.train.x) and torch.equal(from_archive.val.y, from_folder.val.y)
    assert torch.equal(from_archive.test.x, from_folder.test.x) and len(from_archive.test) == 9
    assert len(extracted) == 6 and [path.stat().st_mtime_ns for path in extracted] == stamps
    assert not list(dataset_cache.rglob("notes.txt"))  # only images are extracted


def test_an_archive_member_that_could_land_outside_the_folder_refuses_the_archive(tmp_path):
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in CLASSES:
            for i in range(3):
                zipped.writestr(f"{name}/img{i}.png", png_bytes(8 + i))
        zipped.writestr("../evil.png", png_bytes(8))
    with pytest.raises(DatasetError, match=rf"{archive}: refusing member '\.\./evil\.png'"):
        load_dataset(training("imagefolder", archive))

    tarball = tmp_path / "hostile.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in CLASSES:
            tar.addfile(tar_entry(f"{name}/a.png", png_bytes(9)), io.BytesIO(png_bytes(9)))
        tar.addfile(tar_entry("/tmp/evil-absolute.png", b"x"), io.BytesIO(b"x"))
    with pytest.raises(DatasetError, match=rf"{tarball}: refusing member '/tmp/evil-absolute\.png'"):
        load_dataset(training("imagefolder", tarball))
    assert not list(tmp_path.rglob("evil*")) and not Path("/tmp/evil-absolute.png").exists()


def test_a_corrupt_image_in_an_archive_or_a_bucket_names_the_archive_or_url_and_the_image(tmp_path, s3_client,
                                                                                           s3_endpoint):
    root = write_class_folders(tmp_path / "pets")
    (root / "eel" / "img05.JPEG").write_bytes(b"\xff\xd8\xff" + os.urandom(300))
    archive = make_archive(root, tmp_path / "pets.zip", None)
    with pytest.raises(DatasetError, match=rf"^{archive}: .*/eel/img05\.JPEG: not a readable PNG or JPEG image"):
        load_dataset(training("imagefolder", archive))

    upload_folder(s3_client, root, "pets-corrupt")
    with pytest.raises(DatasetError, match=rf"^s3://{BUCKET}/pets-corrupt: .*/eel/img05\.JPEG: not a readable"):
        load_dataset(training("imagefolder", f"s3://{BUCKET}/pets-corrupt"), store_endpoint=s3_endpoint)


def png_bytes(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), size, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def tar_entry(name: str, content: bytes) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.size = len(content)
    return entry


def test_decoded_images_are_kept_as_uint8_in_the_cache_and_reused_without_decoding(tmp_path, dataset_cache):
    root = write_class_folders(tmp_path / "pets")
    settings = training("imagefolder", root, input_size=24)
    first = load_dataset(settings)
    [cached] = dataset_cache.rglob("*.npy")
    written = cached.stat().st_mtime_ns
    assert np.load(cached).dtype == np.uint8 and np.load(cached).shape == (36, 3, 24, 24)

    # Garbage of the same size and mtime: the fingerprint is unchanged, so only a decode would notice.
    for path in image_paths(root):
        stat = path.stat()
        path.write_bytes(os.urandom(stat.st_size))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    data.decode_image_files.cache_clear()
    again = load_dataset(settings)

    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.val.y, again.val.y)
    assert cached.stat().st_mtime_ns == written and not list(dataset_cache.rglob(".tmp-*"))
    cached.unlink()  # now the images must be decoded, and they are garbage
    data.decode_image_files.cache_clear()
    with pytest.raises(DatasetError, match=rf"{root}/cat/img00\.png: not a readable PNG or JPEG image"):
        load_dataset(settings)


def test_another_input_size_or_changed_file_is_decoded_again(tmp_path, dataset_cache):
    root = write_class_folders(tmp_path / "pets")
    load_dataset(training("imagefolder", root))
    load_dataset(training("imagefolder", root, input_size=16))
    load_dataset(training("imagefolder", root, channels=1))
    path = image_paths(root)[0]
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))
    load_dataset(training("imagefolder", root))

    assert len(list(dataset_cache.rglob("*.npy"))) == 4


def test_imagefolder_loads_from_an_s3_prefix_of_class_folders(tmp_path, s3_client, s3_endpoint):
    root = tmp_path / "pets"
    write_class_folders(root / "train")
    write_class_folders(root / "test", per_class=3, seed=2)
    upload_folder(s3_client, root, "pets-folders")
    settings = dict(input_size=16, seed=2)

    from_s3 = load_dataset(training("imagefolder", f"s3://{BUCKET}/pets-folders", **settings),
                           store_endpoint=s3_endpoint)
    from_folder = load_dataset(training("imagefolder", root, **settings))

    assert torch.equal(from_s3.train.x, from_folder.train.x) and torch.equal(from_s3.test.y, from_folder.test.y)
    assert len(from_s3.test) == 9 and from_s3.classes == CLASSES
    assert f"s3://{BUCKET}/pets-folders" in from_s3.source


def test_an_image_deleted_from_the_bucket_leaves_the_local_copy_too(tmp_path, s3_client, s3_endpoint):
    root = write_class_folders(tmp_path / "pets")
    upload_folder(s3_client, root, "pets-shrinking")
    settings = training("imagefolder", f"s3://{BUCKET}/pets-shrinking")
    first = load_dataset(settings, store_endpoint=s3_endpoint)
    assert len(first.train) + len(first.val) == 36

    s3_client.remove_object(BUCKET, "pets-shrinking/cat/img00.png")
    splits = load_dataset(settings, store_endpoint=s3_endpoint)
    assert len(splits.train) + len(splits.val) == 35


@pytest.mark.parametrize("archive_name", ["pets.tar.gz", "pets.zip"])
def test_imagefolder_loads_from_one_archive_object_in_s3(tmp_path, s3_client, s3_endpoint, archive_name):
    root = write_class_folders(tmp_path / "pets")
    archive = make_archive(root, tmp_path / "archives" / archive_name, "pets")
    s3_client.fput_object(BUCKET, f"pets-archive-{archive_name}/{archive_name}", str(archive))

    from_s3 = load_dataset(training("imagefolder", f"s3://{BUCKET}/pets-archive-{archive_name}"),
                           store_endpoint=s3_endpoint)
    from_folder = load_dataset(training("imagefolder", root))

    assert torch.equal(from_s3.train.x, from_folder.train.x) and from_s3.classes == CLASSES


def test_object_keys_that_could_write_outside_the_cache_are_never_fetched():
    keys = ["cat/a.png", "train/dog/b.JPG", "test/dog/c.jpeg", "../cat/x.png", "/abs/x.png", "cat/../../x.png",
            "cat//x.png", "./cat/y.png", "cat/.hidden.png", "deep/er/cat/x.png", "cat/readme.txt", "x.png"]
    objects = [ObjectInfo(key, 1) for key in keys]
    chosen = [info.key for info in data.dataset_objects("imagefolder", objects, "s3://b/p")]
    assert chosen == ["cat/a.png", "train/dog/b.JPG", "test/dog/c.jpeg"]

    archives = [ObjectInfo(key, 1) for key in ("../pets.zip", "sub/pets.zip", "/pets.tgz", "pets.tgz")]
    assert [info.key for info in data.dataset_objects("imagefolder", archives, "s3://b/p")] == ["pets.tgz"]
    npz = [ObjectInfo(key, 1) for key in ("../a.npz", "sub/b.npz", "c.npz", "c.txt")]
    assert [info.key for info in data.dataset_objects("npz", npz, "s3://b/p")] == ["c.npz"]
    with pytest.raises(DatasetError, match=r"s3://b/p: holds 2 \.npz objects"):
        data.dataset_objects("npz", [ObjectInfo("a.npz", 1), ObjectInfo("b.npz", 1)], "s3://b/p")


def corrupt_image(root: Path) -> tuple[Path, str]:
    path = root / "dog" / "img03.png"
    path.write_bytes(path.read_bytes()[:60])
    return root, f"{path}: not a readable PNG or JPEG image"


def renamed_gif(root: Path) -> tuple[Path, str]:
    path = root / "dog" / "img03.png"
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(path, format="GIF")
    return root, f"{path}: not a readable PNG or JPEG image"


def empty_class(root: Path) -> tuple[Path, str]:
    (root / "fox").mkdir()
    (root / "fox" / "readme.txt").write_text("no images")
    return root, f"{root / 'fox'}: empty class folder"


def one_class(root: Path) -> tuple[Path, str]:
    for name in CLASSES[1:]:
        shutil.rmtree(root / name)
    return root, f"{root}: 1 class folder; imagefolder needs at least 2"


def no_class_folders(root: Path) -> tuple[Path, str]:
    for path in image_paths(root):
        path.rename(root / f"{path.parent.name}-{path.name}")
    for name in CLASSES:
        shutil.rmtree(root / name)
    return root, f"{root}: 0 class folders"


def lone_test_folder(root: Path) -> tuple[Path, str]:
    (root / "test").mkdir()
    return root, f"{root / 'test'}: a test/ folder needs a train/ folder"


def not_an_archive(root: Path) -> tuple[Path, str]:
    path = root / "pets.png"
    path.write_bytes(png_bytes(8))
    return path, f"{path}: imagefolder needs a directory or a"


def corrupt_archive(root: Path) -> tuple[Path, str]:
    path = root / "pets.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(200))
    return path, f"{path}: not a readable tar or zip archive"


def missing(root: Path) -> tuple[Path, str]:
    return root / "nowhere", f"imagefolder: dataset path {root / 'nowhere'} does not exist"


@pytest.mark.parametrize("damage", [corrupt_image, renamed_gif, empty_class, one_class, no_class_folders,
                                    lone_test_folder, not_an_archive, corrupt_archive, missing])
def test_bad_image_folders_are_one_dataset_error_naming_the_path(tmp_path, damage):
    path, message = damage(write_class_folders(tmp_path / "pets"))
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_dataset(training("imagefolder", path))


# --- npz ---------------------------------------------------------------------------------------------


def npz_arrays(count: int = 60, classes: int = 4, height: int = 20, width: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    labels = rng.permutation(np.arange(count) % classes)
    return images, labels


def write_npz(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.mark.parametrize("layout", ["NHWC", "NCHW-float", "NHW", "NHW1"])
def test_npz_arrays_in_every_layout_load_at_their_native_pixels(tmp_path, layout):
    images, labels = npz_arrays(height=32, width=32)
    x = {"NHWC": images, "NCHW-float": images.transpose(0, 3, 1, 2) / 255, "NHW": images[..., 0],
         "NHW1": images[..., :1]}[layout]
    path = write_npz(tmp_path / "set.npz", x_train=x, y_train=labels)

    channels = {"NHWC": 3, "NCHW-float": 3, "NHW": 1, "NHW1": 1}[layout]
    splits = load_dataset(training("npz", path, channels=channels))

    expected = images.transpose(0, 3, 1, 2)[:, :channels] / 255
    assert splits.num_classes == 4 and splits.test is None and splits.classes == ()
    np.testing.assert_allclose(pixels(splits.train, splits), expected[splits.train.source_index], atol=1e-5)
    assert splits.val.y.tolist() == labels[splits.val.source_index].tolist()


def test_npz_test_arrays_give_the_test_split_resized_like_the_training_images(tmp_path):
    images, labels = npz_arrays()
    test_images, test_labels = npz_arrays(count=12, seed=1)
    path = write_npz(tmp_path / "set.npz", x_train=images, y_train=labels, x_test=test_images, y_test=test_labels)

    splits = load_dataset(training("npz", path, input_size=16, test_split=0.5))

    assert splits.input_shape == (3, 16, 16) and splits.test.x.shape == (12, 3, 16, 16)
    assert splits.test.y.tolist() == test_labels.tolist() and len(splits.train) + len(splits.val) == 60
    resized = torch.nn.functional.interpolate(torch.from_numpy(test_images.transpose(0, 3, 1, 2)).float() / 255,
                                              size=(16, 16), mode="bilinear", antialias=True)
    np.testing.assert_allclose(pixels(splits.test, splits), resized.clamp(0, 1).numpy(), atol=1e-5)


def test_npz_channel_conversion_matches_pillow(tmp_path):
    images, labels = npz_arrays(height=32, width=32)
    path = write_npz(tmp_path / "set.npz", x_train=images, y_train=labels)

    grey = load_dataset(training("npz", path, channels=1))
    expected = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in images])[:, np.newaxis] / 255
    np.testing.assert_allclose(pixels(grey.train, grey), expected[grey.train.source_index], atol=1e-5)

    path = write_npz(tmp_path / "grey" / "set.npz", x_train=images[..., 0], y_train=labels)
    rgb = load_dataset(training("npz", path))
    restored = pixels(rgb.train, rgb)
    assert restored.shape[1] == 3 and np.allclose(restored[:, 0], restored[:, 2], atol=1e-5)
    np.testing.assert_allclose(restored[:, 1], images[rgb.train.source_index, :, :, 0] / 255, atol=1e-5)


def test_npz_test_split_is_held_out_when_it_has_no_test_arrays(tmp_path):
    images, labels = npz_arrays(count=80)
    path = write_npz(tmp_path / "set.npz", x_train=images, y_train=labels)

    splits = load_dataset(training("npz", path, test_split=0.25))

    assert len(splits.test) == 20 and Counter(splits.test.y.tolist()) == {c: 5 for c in range(4)}
    everything = np.concatenate([splits.train.source_index, splits.val.source_index, splits.test.source_index])
    assert sorted(everything.tolist()) == list(range(80))


def test_npz_from_a_directory_and_from_an_s3_prefix(tmp_path, s3_client, s3_endpoint):
    images, labels = npz_arrays()
    path = write_npz(tmp_path / "folder" / "set.npz", x_train=images, y_train=labels, x_test=images[:8],
                     y_test=labels[:8])
    s3_client.fput_object(BUCKET, "npz-set/set.npz", str(path))

    from_file = load_dataset(training("npz", path))
    from_folder = load_dataset(training("npz", path.parent))
    from_s3 = load_dataset(training("npz", f"s3://{BUCKET}/npz-set"), store_endpoint=s3_endpoint)

    for other in (from_folder, from_s3):
        assert torch.equal(other.train.x, from_file.train.x) and torch.equal(other.test.y, from_file.test.y)
    assert len(from_s3.test) == 8 and f"s3://{BUCKET}/npz-set" in from_s3.source


IMAGES, LABELS = npz_arrays(count=20)


@pytest.mark.parametrize("arrays, words", [
    ({"x_train": IMAGES, "y_train": LABELS[:19]}, r"'y_train' has 19 labels for the 20 images of 'x_train'"),
    ({"x_train": IMAGES, "y_train": LABELS, "x_test": IMAGES[:5], "y_test": LABELS[:4]},
     r"'y_test' has 4 labels for the 5 images of 'x_test'"),
    ({"x_train": IMAGES.astype(np.int32), "y_train": LABELS}, r"'x_train' must be uint8 or float in \[0, 1\], got int32"),
    ({"x_train": IMAGES / 100, "y_train": LABELS}, r"'x_train' holds floats outside \[0, 1\]"),
    ({"x_train": IMAGES[..., :2], "y_train": LABELS}, r"'x_train' must be \[N, H, W\], \[N, H, W, C\] or \[N, C, H, W\]"),
    ({"x_train": IMAGES[:, 0, 0], "y_train": LABELS}, r"'x_train' must be \[N, H, W\]"),
    ({"x_train": IMAGES, "y_train": LABELS.astype(np.float32)}, r"'y_train' must be integer class labels"),
    ({"x_train": IMAGES, "y_train": LABELS * 2}, r"class 1 of 0\.\.6 has no training image in 'y_train'"),
    ({"x_train": IMAGES, "y_train": LABELS - 1}, r"'y_train' has negative labels"),
    ({"x_train": IMAGES, "y_train": np.zeros(20, np.int64)}, r"'y_train' holds 1 class"),
    ({"x_train": IMAGES, "y_train": LABELS, "x_test": IMAGES[:2], "y_test": np.array([0, 4])},
     r"'y_test' has labels outside the 0\.\.3 of 'y_train'"),
    ({"x_train": IMAGES}, r"no 'y_train' \(it holds x_train\)"),
    ({"x_train": IMAGES, "y_train": LABELS, "x_test": IMAGES}, r"no 'y_test'"),
    ({"x_train": np.array([object()] * 20), "y_train": LABELS}, r"not a readable \.npz file"),
])
def test_bad_npz_arrays_are_one_dataset_error_naming_the_file_and_keys(tmp_path, arrays, words):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=rf"{path}: {words}"):
        load_dataset(training("npz", path))


@pytest.mark.parametrize("content, words", [
    (lambda: os.urandom(500), "not a readable .npz file"),
    (lambda: b"", "not a readable .npz file"),
    (lambda: (lambda b: (np.save(b, IMAGES), b.getvalue())[1])(io.BytesIO()), "one array, not an .npz archive"),
    (lambda: (lambda b: (np.savez(b, x_train=IMAGES, y_train=LABELS), b.getvalue()[:-300])[1])(io.BytesIO()),
     "not a readable .npz file"),
])
def test_a_damaged_npz_file_is_an_error_naming_it(tmp_path, content, words):
    path = tmp_path / "damaged.npz"
    path.write_bytes(content())
    with pytest.raises(DatasetError, match=rf"{path}: {words}"):
        load_dataset(training("npz", path))


def test_a_directory_without_exactly_one_npz_is_an_error_naming_it(tmp_path):
    with pytest.raises(DatasetError, match=rf"{tmp_path}: holds 0 \.npz files"):
        load_dataset(training("npz", tmp_path))
    write_npz(tmp_path / "a.npz", x_train=IMAGES, y_train=LABELS)
    write_npz(tmp_path / "b.npz", x_train=IMAGES, y_train=LABELS)
    with pytest.raises(DatasetError, match=rf"{tmp_path}: holds 2 \.npz files"):
        load_dataset(training("npz", tmp_path))
    with pytest.raises(DatasetError, match=rf"npz: dataset path {tmp_path / 'none.npz'} does not exist"):
        load_dataset(training("npz", tmp_path / "none.npz"))


def test_an_s3_prefix_without_an_npz_object_is_an_error_naming_the_url(s3_client, s3_endpoint):
    s3_client.put_object(BUCKET, "npz-empty/readme.txt", io.BytesIO(b"hello"), 5)
    with pytest.raises(DatasetError, match=rf"s3://{BUCKET}/npz-empty: holds none of the npz training files"):
        load_dataset(training("npz", f"s3://{BUCKET}/npz-empty"), store_endpoint=s3_endpoint)


# --- CIFAR-100 in torchvision's format ---------------------------------------------------------------


def cifar100_arrays(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8), rng.permutation(np.arange(count) % 100)


TRAIN100, TEST100 = cifar100_arrays(300, 0), cifar100_arrays(100, 1)


def write_cifar100_folder(root: Path) -> Path:
    """cifar-100-python/ with train, test and meta, as torchvision's tarball unpacks."""
    folder = root / data.CIFAR100_FOLDER
    folder.mkdir(parents=True)
    for name, (images, labels) in (("train", TRAIN100), ("test", TEST100)):
        batch = {b"filenames": [f"{i}.png".encode() for i in range(len(labels))], b"batch_label": name.encode(),
                 b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": images}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def assert_cifar100_rows(splits) -> None:
    for split, (images, labels) in ((splits.train, TRAIN100), (splits.val, TRAIN100), (splits.test, TEST100)):
        expected = images[split.source_index].reshape(-1, 3, 32, 32) / 255
        np.testing.assert_allclose(pixels(split, splits), expected, atol=1e-5)
        np.testing.assert_array_equal(split.y.numpy(), labels[split.source_index])


@pytest.mark.parametrize("point_at", ["root", "folder"])
def test_cifar100_loads_train_fine_labels_the_test_file_and_class_names(tmp_path, point_at):
    folder = write_cifar100_folder(tmp_path)
    splits = load_dataset(training("cifar100", tmp_path if point_at == "root" else folder, test_split=0.5))

    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 100
    assert splits.classes == tuple(f"fine{i}" for i in range(100))
    assert len(splits.train) + len(splits.val) == 300 and len(splits.test) == 100  # testSplit ignored
    assert_cifar100_rows(splits)


def test_cifar100_tarball_is_extracted_into_the_cache(tmp_path, dataset_cache):
    folder = write_cifar100_folder(tmp_path / "unpacked")
    tarball = tmp_path / "archive" / data.CIFAR100_TARBALL
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder, arcname=data.CIFAR100_FOLDER)

    splits = load_dataset(training("cifar100", tarball.parent, subset_size=200))

    assert len(splits.train) + len(splits.val) == 200 and len(splits.test) == 100
    assert_cifar100_rows(splits)
    assert sorted(path.name for path in dataset_cache.rglob("*") if path.is_file()) == ["meta", "test", "train"]


@pytest.mark.parametrize("layout", ["root", "folder", "tarball"])
def test_cifar100_loads_from_an_s3_prefix(tmp_path, s3_client, s3_endpoint, layout):
    folder = write_cifar100_folder(tmp_path / "cifar")
    prefix = f"cifar100-{layout}"
    if layout == "tarball":
        tarball = tmp_path / data.CIFAR100_TARBALL
        with tarfile.open(tarball, "w:gz") as archive:
            archive.add(folder, arcname=data.CIFAR100_FOLDER)
        s3_client.fput_object(BUCKET, f"{prefix}/{tarball.name}", str(tarball))
    else:
        upload_folder(s3_client, tmp_path / "cifar" if layout == "root" else folder, prefix)

    splits = load_dataset(training("cifar100", f"s3://{BUCKET}/{prefix}"), store_endpoint=s3_endpoint)

    assert len(splits.test) == 100 and splits.classes[7] == "fine7"
    assert_cifar100_rows(splits)


class OpensAFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_bad_cifar100_files_are_one_error_naming_them(tmp_path):
    folder = write_cifar100_folder(tmp_path)
    (folder / "test").write_bytes(os.urandom(2000))
    with pytest.raises(DatasetError, match=f"{folder / 'test'}: not a CIFAR-100 batch"):
        load_dataset(training("cifar100", tmp_path))

    marker = tmp_path / "code-ran"
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": OpensAFileWhenUnpickled(marker)}, protocol=2))
    (folder / "test").write_bytes((folder / "train").read_bytes())
    with pytest.raises(DatasetError, match=rf"{folder / 'meta'}: not a CIFAR-100 meta file .*refusing to load"):
        load_dataset(training("cifar100", tmp_path))
    assert not marker.exists()

    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": ["one", "two"]}, protocol=2))
    with pytest.raises(DatasetError, match=rf"{folder / 'meta'}: 'fine_label_names' must be a list of 100"):
        load_dataset(training("cifar100", tmp_path))

    (folder / "train").write_bytes(pickle.dumps({b"data": TRAIN100[0][:, :1024], b"fine_labels": TRAIN100[1]},
                                                protocol=2))
    with pytest.raises(DatasetError, match=rf"{folder / 'train'}: 'data' must be uint8 \[N, 3072\]"):
        load_dataset(training("cifar100", tmp_path))

    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'x'}: no cifar-100-python/train file"):
        load_dataset(training("cifar100", tmp_path / "x"))


# --- the bundled datasets' own test splits -----------------------------------------------------------


def test_cifar10_test_batch_is_the_test_split(tmp_path, cifar_images):
    write_cifar_folder(tmp_path, *cifar_images)
    with_test = load_dataset(training("cifar10", tmp_path, test_split=0.5))

    assert len(with_test.test) == 10 and with_test.test.y.tolist() == [0] * 10
    assert with_test.classes == tuple(f"class{i}" for i in range(10))
    assert len(with_test.train) + len(with_test.val) == 100  # the dataset's own test split wins over testSplit


def idx_arrays(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.permutation(np.arange(count) % 10)


def write_t10k(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))


def test_idx_t10k_files_are_the_test_split_and_leave_train_and_validation_as_they_were(tmp_path):
    images, labels = idx_arrays(200, 0)
    test_images, test_labels = idx_arrays(50, 1)
    plain = write_idx_pair(tmp_path / "plain", images, labels, gz=True)
    with_test = write_idx_pair(tmp_path / "with-test", images, labels, gz=True)
    write_t10k(with_test, test_images, test_labels)
    settings = dict(input_size=32, subset_size=100, seed=4)

    before = load_dataset(training("fashion-mnist", plain, **settings))
    after = load_dataset(training("mnist", with_test, test_split=0.3, **settings))

    assert before.test is None
    assert torch.equal(before.train.x, after.train.x) and torch.equal(before.val.y, after.val.y)
    assert after.test.x.shape == (50, 1, 32, 32) and after.test.y.tolist() == test_labels.tolist()
    np.testing.assert_allclose(pixels(after.test, after)[:, 0, 2:30, 2:30], test_images / 255, atol=1e-5)


def test_idx_without_t10k_files_holds_out_test_split_and_a_lone_t10k_file_is_an_error(tmp_path):
    images, labels = idx_arrays(200, 0)
    folder = write_idx_pair(tmp_path / "plain", images, labels, gz=False)
    splits = load_dataset(training("fashion-mnist", folder, test_split=0.1))
    assert len(splits.test) == 20 and Counter(splits.test.y.tolist()) == {c: 2 for c in range(10)}
    assert len(splits.train) + len(splits.val) == 180

    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(idx_bytes(images[:5]))
    with pytest.raises(DatasetError, match=rf"{folder}/t10k-images-idx3-ubyte\.gz: a test file without "
                                           r"t10k-labels-idx1-ubyte"):
        load_dataset(training("fashion-mnist", folder))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:5] + 10))
    with pytest.raises(DatasetError, match=rf"{folder}: test labels outside 0\.\.9"):
        load_dataset(training("fashion-mnist", folder))


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="the Debian package dataset-fashion-mnist (with its t10k files) is not installed")
def test_debian_fashion_mnist_has_its_10000_image_test_split():
    splits = load_dataset(Training(subset_size=200, input_size=32))

    assert len(splits.test) == 10_000 and splits.test.x.shape == (10_000, 1, 32, 32)
    assert Counter(splits.test.y.tolist()) == {cls: 1000 for cls in range(10)}
    assert len(splits.train) + len(splits.val) == 200


# --- the data check -----------------------------------------------------------------------------------


def test_the_data_check_reports_the_test_split_and_the_class_count(tmp_path):
    images, labels = npz_arrays(count=80)
    path = write_npz(tmp_path / "set.npz", x_train=images, y_train=labels)
    space = {"convLayers": {"type": "int", "low": 1, "high": 1}}

    def spec(**extra):
        return parse_spec({"searchSpace": space, "trials": {"max": 2},
                           "training": {"dataset": {"name": "npz", "path": str(path)}, "inputSize": 16, **extra}})

    held_out = verdict_for(spec(testSplit=0.25))
    without = verdict_for(spec())

    assert held_out["ok"] and held_out["test"] == 20 and held_out["classes"] == 4
    assert "48 training and 12 validation images, 4 classes, 20 test images, input 3x16x16" in held_out["message"]
    assert without["test"] == 0 and "4 classes, no test split" in without["message"]
    assert held_out["key"] != without["key"]
