"""Image-classification data for the multi-exit ResNet (PCEE-BERT section 4.6.4): CIFAR-10/100.

Two sources give the same arrays, `(images uint8 [N, H, W, 3], labels int32 [N], class_names)`:

* `load_image_folder`: a directory in the image-folder layout `<root>/<split>/<class>/<image>`
  (offline; `../shared/data/cifar10` packs CIFAR-10 so). Class folders sorted by name give the
  label ids, which for CIFAR-10 is the official order (airplane=0 ... truck=9); images within a
  class come in natural file-name order (`2.png` before `10.png`).
* `load_tfds`: `cifar10`, `cifar100`, ... through tensorflow-datasets (online), read with
  `tfds.data_source` from array_record files, without TensorFlow; records come in the dataset's
  own order (by their `id`, which for CIFAR is the order of the original binary files).

Batches (`train_batches`, `eval_batches`) are plain numpy: images normalised per channel to
float32 `[B, H, W, 3]` and int32 labels. Training batches are augmented the standard CIFAR way
(`augment`: random crop with 4-pixel zero padding and a random horizontal flip), and everything
random derives from `(seed, epoch, batch index)`, so a run resumed at a batch sees the same data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Per-channel mean and standard deviation of the training images, on the [0, 1] scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

Arrays = tuple[np.ndarray, np.ndarray, tuple[str, ...]]


# ---------------------------------------------------------------------------------------------------
# image folders

def load_image_folder(root: str | Path, split: str) -> Arrays:
    """Every image of `<root>/<split>/<class>/*.{jpg,jpeg,png}`: `(images, labels, class_names)`.

    `images` is uint8 `[N, H, W, 3]` (decoded with Pillow and converted to RGB; every image must
    have the same size), `labels` int32 `[N]` with `class_names[label]` the class folder's name,
    classes sorted by name. Hidden entries and files with other suffixes are ignored. Raises
    `FileNotFoundError` for a missing folder and `ValueError` naming the folder or file for a split
    without class folders, an empty class folder, an unreadable image or images of differing sizes.
    """
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        where = f"no {split!r} folder in {root}" if root.is_dir() else f"{root} does not exist"
        raise FileNotFoundError(f"image folder split not found: {split_dir} ({where}; expected the layout "
                                f"{root}/{split}/<class>/<image>.png|jpg)")
    class_dirs = sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    if not class_dirs:
        raise ValueError(f"no class folders in {split_dir} (expected {split_dir}/<class>/<image>.png|jpg)")
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted((f for f in class_dir.iterdir()
                        if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()),
                       key=lambda f: _natural_key(f.name))
        if not files:
            raise ValueError(f"class folder {class_dir} holds no images (*{', *'.join(IMAGE_SUFFIXES)})")
        paths += files
        labels += [label] * len(files)
    images = _decode_all(paths)
    return images, np.asarray(labels, np.int32), tuple(d.name for d in class_dirs)


def _natural_key(name: str) -> list:
    """Sort key that orders the digit runs of a name by value: "img2" < "img10"."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))  # convert() loads, so truncated files fail here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # Pillow: SyntaxError for broken chunks
        raise ValueError(f"cannot read image {path}: {e}") from e


def _decode_all(paths: Sequence[Path]) -> np.ndarray:
    # A plain loop: 32x32 images decode in ~0.1 ms each, mostly Python-level work that holds the
    # GIL, so threads made it slower (measured: 60k CIFAR JPEGs in ~7 s on one core).
    first = _decode(paths[0])
    images = np.empty((len(paths), *first.shape), np.uint8)
    images[0] = first
    for i in range(1, len(paths)):
        image = _decode(paths[i])
        if image.shape != first.shape:
            raise ValueError(f"image {paths[i]} is {_size(image)}, but {paths[0]} is {_size(first)}: "
                             "every image of a split must have the same size")
        images[i] = image
    return images


def _size(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]} (width x height)"


# ---------------------------------------------------------------------------------------------------
# tensorflow-datasets

def load_tfds(name: str, split: str, data_dir: str | Path | None = None, *, download: bool = True) -> Arrays:
    """`(images, labels, class_names)` of a tensorflow-datasets image dataset (`cifar10`, `cifar100`).

    `split` is any tfds split ("train", "test", "train[:45000]", ...). Reads array_record files
    through `tfds.data_source` (no TensorFlow), downloading and preparing them under `data_dir`
    (default ~/tensorflow_datasets) unless `download=False`; records are sorted by their `id` when
    they have one, so the order is the dataset's and does not depend on tfds' shuffled storage
    (a sliced split such as "train[:90%]" is cut by tfds from that storage, then sorted).
    Single-channel images are repeated to RGB, as `load_image_folder` converts them.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"reading {name} needs tensorflow-datasets (pip install tensorflow-datasets); "
                          f"or read an image folder with load_image_folder: {e}") from e
    try:
        source = tfds.data_source(name, split=split, download=download,
                                  data_dir=None if data_dir is None else str(data_dir),
                                  builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # no network, a broken download, a data_dir prepared as tfrecord, no TensorFlow
        detail = " ".join(str(e).split("\n")[0].split())[:300]
        hint = ""
        if _tensorflow_missing() and download:
            hint = (f"; preparing {name} from its source files needs TensorFlow (pip install tensorflow), "
                    "reading it once prepared does not")
        raise OSError(f"cannot read {name} ({split}) through tensorflow-datasets ({type(e).__name__}: {detail})"
                      f"{hint}; offline, read an image folder instead (load_image_folder)") from e
    info = getattr(source, "dataset_info", None)  # tfds.testing.mock_data may give a plain list
    features = (info or tfds.builder(name, data_dir=None if data_dir is None else str(data_dir)).info).features
    missing = [key for key in ("image", "label") if key not in features]
    if missing:
        raise ValueError(f"tfds dataset {name} has no {' or '.join(missing)} feature "
                         f"(features: {', '.join(features.keys())}); it is not an image-classification set")
    names = getattr(features["label"], "names", None)
    if names is None:
        raise ValueError(f"tfds dataset {name}'s label feature is not a ClassLabel: it names no classes")
    records = _records(source)
    if not records:
        raise ValueError(f"tfds dataset {name} split {split!r} is empty")
    if "id" in records[0]:
        records.sort(key=lambda r: _natural_key(_text(r["id"])))
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    if images.ndim == 4 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    return images, labels, tuple(names)


def _tensorflow_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is None


def _records(source) -> list[dict]:
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            return list(getitems(range(len(source))))  # one batched read, much faster than item by item
        except TypeError:  # tfds.testing.mock_data's stand-in reader has no batched read
            pass
    return [source[i] for i in range(len(source))]


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------------
# normalisation and augmentation

def normalize(images: np.ndarray, mean: Sequence[float] = CIFAR10_MEAN,
              std: Sequence[float] = CIFAR10_STD) -> np.ndarray:
    """uint8 images `[..., 3]` -> float32 `(x / 255 - mean) / std`, per channel."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images.astype(np.float32) * np.float32(1 / 255) - mean) / std


def crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int = 4) -> np.ndarray:
    """Deterministic half of `augment`: zero-pads `images [B, H, W, C]` by `padding` on each side,
    takes the `H x W` window whose top-left corner is `offsets[b] = (row, col)` (0 .. 2 * padding;
    `(padding, padding)` is the image itself) and mirrors it left-right where `flips[b]`."""
    batch, height, width = images.shape[:3]
    offsets = np.asarray(offsets)
    if offsets.shape != (batch, 2) or offsets.min(initial=0) < 0 or offsets.max(initial=0) > 2 * padding:
        raise ValueError(f"offsets must be [{batch}, 2] in 0..{2 * padding}, got shape {offsets.shape}")
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, :1] + np.arange(height)                  # [B, H]
    cols = offsets[:, 1:] + np.arange(width)                   # [B, W]
    cols = np.where(np.asarray(flips, bool)[:, None], cols[:, ::-1], cols)
    return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """The standard CIFAR augmentation of uint8 `[B, H, W, C]`: a random `H x W` crop of the image
    zero-padded by `padding` pixels, then a horizontal flip with probability 1/2. Same shape and dtype.
    Draws the offsets (`[B, 2]`) first, then the flips (`[B]`), from `rng`."""
    offsets = rng.integers(0, 2 * padding + 1, size=(images.shape[0], 2))
    flips = rng.random(images.shape[0]) < 0.5
    return crop_and_flip(images, offsets, flips, padding)


# ---------------------------------------------------------------------------------------------------
# batches

def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full training batches in one epoch (the partial last batch is dropped)."""
    return num_examples // batch_size


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, epoch: int,
                  start: int = 0, *, mean: Sequence[float] = CIFAR10_MEAN,
                  std: Sequence[float] = CIFAR10_STD) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of augmented training batches `{"image": float32 [B, H, W, 3], "label": int32 [B]}`.

    The example order is a permutation drawn from `(seed, epoch)` and batch `b`'s augmentation an
    rng from `(seed, epoch, b)`, so the batches depend on nothing else: `start=b` resumes the
    epoch at batch `b` with exactly the batches an uninterrupted run would see. The partial last
    batch is dropped (`steps_per_epoch` batches in all).
    """
    _check_arrays(images, labels)
    steps = steps_per_epoch(len(images), batch_size)
    if batch_size < 1 or steps == 0:
        raise ValueError(f"batch size {batch_size} does not fit {len(images)} training images")
    if not 0 <= start <= steps:
        raise ValueError(f"start batch {start} is outside 0..{steps} (batches per epoch)")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    # Distinct tags (0: order, 1: augmentation) keep the streams apart: numpy's SeedSequence
    # ignores trailing zeros, so [seed, epoch] and [seed, epoch, 0] would be the same stream.
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(images))
    for b in range(start, steps):
        rows = order[b * batch_size:(b + 1) * batch_size]
        rng = np.random.default_rng([seed, epoch, 1, b])
        yield {"image": normalize(augment(images[rows], rng), mean, std), "label": labels[rows].astype(np.int32)}


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
                 ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """`(rows, batch)` over the examples in order, not augmented, every batch of `batch_size`
    rows (one compiled shape): the last one is padded by repeating its first row, and `rows` says
    how many of its rows are real."""
    _check_arrays(images, labels)
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    for begin in range(0, len(images), batch_size):
        index = np.arange(begin, min(begin + batch_size, len(images)))
        rows = len(index)
        index = np.concatenate([index, np.full(batch_size - rows, begin)])
        yield rows, {"image": normalize(images[index], mean, std), "label": labels[index].astype(np.int32)}


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [{len(images)}] like the images, got shape {labels.shape}")
