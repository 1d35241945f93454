"""Images and the multi-exit ResNet (PCEE-BERT section 4.6.4): the image-folder reader and the tfds
path (and their agreement), augmentation and batches, and the model (exits, BatchNorm modes,
piecewise == whole). Tiny synthetic images and tiny networks only."""

from __future__ import annotations

import functools
import io
import re
import types
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest

from jaxexit.vision import images as imgs
from jaxexit.vision import resnet
from jaxexit.vision.resnet import ResNetConfig

Image = pytest.importorskip("PIL.Image", reason="the image-folder reader needs Pillow")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        pytest.skip(f"tensorflow-datasets not importable: {e}")
    return tfds


def _random_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, format="png")  # lossless: reads back exactly


# --- image folders ----------------------------------------------------------------------------------

def test_image_folder_gives_arrays_labels_and_class_names(tmp_path):
    pictures = _random_images(5)
    # Created out of order: classes sort by name, files by the number in their name (2 before 10).
    _write_png(tmp_path / "train" / "cat" / "10.png", pictures[4])
    _write_png(tmp_path / "train" / "cat" / "2.png", pictures[3])
    _write_png(tmp_path / "train" / "airplane" / "a.png", pictures[0])
    _write_png(tmp_path / "train" / "bird" / "0.png", pictures[1])
    _write_png(tmp_path / "train" / "bird" / "1.PNG", np.dstack([pictures[2][..., 0]] * 3), mode="L")  # grey -> RGB
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")  # other files are ignored
    (tmp_path / "train" / "cat" / ".hidden.png").write_bytes(b"")
    (tmp_path / "train" / ".cache").mkdir()  # hidden folders are not classes
    images, labels, names = imgs.load_image_folder(tmp_path, "train")
    expected = pictures.copy()
    expected[2] = np.dstack([pictures[2][..., 0]] * 3)
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(images, expected)
    assert labels.dtype == np.int32 and labels.tolist() == [0, 1, 1, 2, 2]
    assert names == ("airplane", "bird", "cat")


def test_image_folder_reads_jpeg_and_rgba(tmp_path):
    picture = _random_images(1, 16)[0]
    _write_png(tmp_path / "test" / "a" / "0.png", picture, mode="RGBA")
    path = tmp_path / "test" / "b" / "0.jpeg"
    path.parent.mkdir()
    Image.fromarray(picture).save(path, format="jpeg", quality=95)
    images, labels, _ = imgs.load_image_folder(tmp_path, "test")
    assert images.shape == (2, 16, 16, 3) and labels.tolist() == [0, 1]
    np.testing.assert_array_equal(images[0], picture)
    with Image.open(path) as jpeg:
        np.testing.assert_array_equal(images[1], np.asarray(jpeg.convert("RGB")))  # Pillow's decoding


def test_image_folder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere")) + ".* does not exist"):
        imgs.load_image_folder(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path / 'test'))} \\(no 'test' folder in"):
        imgs.load_image_folder(tmp_path, "test")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "stray.png").write_bytes(b"")
    with pytest.raises(ValueError, match=f"no class folders in {re.escape(str(tmp_path / 'train'))}"):
        imgs.load_image_folder(tmp_path, "train")
    pictures = _random_images(2)
    _write_png(tmp_path / "train" / "a" / "0.png", pictures[0])
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "readme.md").write_text("")
    with pytest.raises(ValueError, match=f"class folder {re.escape(str(tmp_path / 'train' / 'b'))} holds no images"):
        imgs.load_image_folder(tmp_path, "train")


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_unreadable_image_is_named(tmp_path, damage):
    _write_png(tmp_path / "train" / "a" / "0.png", _random_images(1)[0])
    bad = tmp_path / "train" / "b" / "1.png"
    _write_png(bad, _random_images(1, 16)[0])
    data = bad.read_bytes()
    bad.write_bytes(b"hello" if damage == "not an image" else data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(bad))}: "):
        imgs.load_image_folder(tmp_path, "train")


def test_images_of_differing_sizes_are_refused(tmp_path):
    _write_png(tmp_path / "train" / "a" / "0.png", _random_images(1, 8)[0])
    _write_png(tmp_path / "train" / "b" / "0.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=f"image {re.escape(str(tmp_path / 'train' / 'b' / '0.png'))} is 12x8 "
                                         r"\(width x height\), but .*a/0.png is 8x8"):
        imgs.load_image_folder(tmp_path, "train")


# --- tensorflow-datasets --------------------------------------------------------------------------

def test_tfds_mock_data_gives_arrays():
    tfds = _tfds()
    with tfds.testing.mock_data(num_examples=5):
        images, labels, names = imgs.load_tfds("cifar10", "train")
        images100, labels100, names100 = imgs.load_tfds("cifar100", "test")
    assert images.shape == images100.shape == (5, 32, 32, 3) and images.dtype == images100.dtype == np.uint8
    assert labels.dtype == labels100.dtype == np.int32 and labels.shape == (5,)
    assert len(names) == 10 and len(names100) == 100
    assert labels.min() >= 0 and labels.max() < 10 and labels100.max() < 100


def test_tfds_records_are_sorted_by_id_and_converted():
    tfds = _tfds()
    pictures = _random_images(3, 32)
    records = [  # as tfds.data_source returns them: stored shuffled, ids as bytes, int64 labels
        {"id": b"test_00002", "image": pictures[2], "label": np.int64(7)},
        {"id": b"test_00000", "image": pictures[0], "label": np.int64(3)},
        {"id": b"test_00001", "image": pictures[1], "label": np.int64(0)},
    ]
    with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kwargs: records):
        images, labels, _ = imgs.load_tfds("cifar10", "test")
    np.testing.assert_array_equal(images, pictures)
    assert labels.tolist() == [3, 0, 7] and labels.dtype == np.int32


def test_unreachable_tfds_is_one_clear_error():
    tfds = _tfds()
    failing = mock.patch.object(tfds, "data_source", side_effect=ConnectionError("Failed to resolve 'x'\nmore"))
    with failing, pytest.raises(OSError, match=r"cannot read cifar100 \(train\) through tensorflow-datasets "
                                               r"\(ConnectionError: Failed to resolve 'x'\).*load_image_folder"):
        imgs.load_tfds("cifar100", "train")


def _write_cifar10_binary(directory: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """CIFAR-10's binary distribution: per record 1 label byte, then the image as 3 x 32 x 32 planes."""
    directory.mkdir(parents=True)
    (directory / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    for name, (labels, pictures) in batches.items():
        planes = pictures.transpose(0, 3, 1, 2).reshape(len(pictures), -1)  # [N, 3 * 32 * 32], red plane first
        records = np.concatenate([np.asarray(labels, np.uint8)[:, None], planes], axis=1)
        (directory / name).write_bytes(records.tobytes())


def _png_bytes(self, array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    return buffer.getvalue()


def test_tfds_builder_and_image_folder_agree(tmp_path):
    """The same synthetic CIFAR-10 written twice: as the binary files tfds' own `cifar10` builder
    downloads (prepared by that builder into array_record files, read back by `load_tfds`), and as
    PNGs in an image folder (read by `load_image_folder`). Both give the same arrays.

    The builder's download is answered with the local files, as tests/test_glue.py does for GLUE.
    Its preparation step (not `load_tfds`, which reads without TensorFlow) needs TensorFlow for two
    things, which the test replaces so that it runs without it: `tf.io.gfile.GFile` to read the
    binary files (plain `open`) and the PNG encoder of `tfds.features.Image` (Pillow's).
    The records are written sorted by class, so the dataset's order (by `id`) is the folder's.
    """
    tfds = _tfds()
    pytest.importorskip("importlib_resources", reason="tfds' builder needs importlib_resources to prepare data")
    from tensorflow_datasets.core.features import image_feature
    from tensorflow_datasets.image_classification import cifar

    rng = np.random.default_rng(3)
    splits = {"train": np.repeat(np.arange(10), 2), "test": np.arange(10)}
    arrays = {split: (labels.astype(np.uint8), rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8))
              for split, labels in splits.items()}
    train_labels, train_pictures = arrays["train"]
    batches = {f"data_batch_{i + 1}.bin": (train_labels[4 * i:4 * i + 4], train_pictures[4 * i:4 * i + 4])
               for i in range(5)}
    batches["test_batch.bin"] = arrays["test"]
    source = tmp_path / "download"
    _write_cifar10_binary(source / "cifar-10-batches-bin", batches)
    for split, (labels, pictures) in arrays.items():
        for k, (label, picture) in enumerate(zip(labels, pictures, strict=True)):
            _write_png(tmp_path / "folder" / split / CIFAR10_CLASSES[label] / f"{k}.png", picture)

    no_tensorflow = types.SimpleNamespace(io=types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=open)))
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(source)), \
            mock.patch.object(cifar, "tf", no_tensorflow), \
            mock.patch.object(image_feature._ImageEncoder, "_encode_image", _png_bytes):
        builder = tfds.builder("cifar10", data_dir=str(tmp_path / "tfds"), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))

    for split, (labels, pictures) in arrays.items():
        from_tfds = imgs.load_tfds("cifar10", split, tmp_path / "tfds", download=False)
        from_folder = imgs.load_image_folder(tmp_path / "folder", split)
        np.testing.assert_array_equal(from_tfds[0], from_folder[0])
        np.testing.assert_array_equal(from_tfds[1], from_folder[1])
        assert from_tfds[2] == from_folder[2] == CIFAR10_CLASSES
        np.testing.assert_array_equal(from_folder[0], pictures)
        assert from_folder[1].tolist() == labels.tolist()


# --- normalisation, augmentation, batches -----------------------------------------------------------

def test_normalize_per_channel():
    mean = np.round(np.asarray(imgs.CIFAR10_MEAN) * 255).astype(np.uint8)
    out = imgs.normalize(np.stack([np.full((2, 2, 3), mean, np.uint8), np.full((2, 2, 3), 255, np.uint8)]))
    assert out.dtype == np.float32 and out.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(out[0], 0, atol=0.01)
    np.testing.assert_allclose(out[1, 0, 0], (1 - np.asarray(imgs.CIFAR10_MEAN)) / imgs.CIFAR10_STD, rtol=1e-6)


def test_crop_and_flip_on_a_hand_made_image():
    image = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1)
    batch = np.repeat(image, 4, axis=0)
    out = imgs.crop_and_flip(batch, offsets=np.array([[1, 1], [0, 0], [2, 1], [1, 1]]),
                             flips=np.array([False, False, False, True]), padding=1)[..., 0]
    np.testing.assert_array_equal(out[0], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])   # the image itself
    np.testing.assert_array_equal(out[1], [[0, 0, 0], [0, 1, 2], [0, 4, 5]])   # shifted down-right
    np.testing.assert_array_equal(out[2], [[4, 5, 6], [7, 8, 9], [0, 0, 0]])   # shifted up
    np.testing.assert_array_equal(out[3], [[3, 2, 1], [6, 5, 4], [9, 8, 7]])   # mirrored
    with pytest.raises(ValueError, match="offsets must be"):
        imgs.crop_and_flip(batch, np.full((4, 2), 3), np.zeros(4, bool), padding=1)


def test_augment_keeps_shape_and_dtype_and_draws_crops_and_flips():
    pictures = _random_images(64, 8)
    out = imgs.augment(pictures, np.random.default_rng(0))
    assert out.shape == pictures.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, imgs.augment(pictures, np.random.default_rng(0)))
    flipped = imgs.augment(pictures, np.random.default_rng(1), padding=0)  # flips only
    is_same = (flipped == pictures).all(axis=(1, 2, 3))
    is_mirror = (flipped == pictures[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (is_same | is_mirror).all() and is_same.any() and is_mirror.any()
    assert (out == 0).all(axis=(2, 3)).any()  # some crops show a zero-padded row


def test_train_batches_are_deterministic_and_resumable():
    pictures, labels = _random_images(11, 4), np.arange(11, dtype=np.int32)
    epoch = list(imgs.train_batches(pictures, labels, 3, seed=5, epoch=2))
    assert len(epoch) == imgs.steps_per_epoch(11, 3) == 3  # the partial last batch is dropped
    assert all(b["image"].dtype == np.float32 and b["image"].shape == (3, 4, 4, 3) for b in epoch)
    assert all(b["label"].dtype == np.int32 for b in epoch)
    seen = np.concatenate([b["label"] for b in epoch])
    assert len(set(seen.tolist())) == 9  # each example at most once
    again = list(imgs.train_batches(pictures, labels, 3, seed=5, epoch=2))
    resumed = list(imgs.train_batches(pictures, labels, 3, seed=5, epoch=2, start=1))
    for a, b in zip(epoch, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(epoch[1:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = np.concatenate([b["label"] for b in imgs.train_batches(pictures, labels, 3, seed=5, epoch=3)])
    assert other.tolist() != seen.tolist()
    with pytest.raises(ValueError, match="start batch 4 is outside 0..3"):
        next(imgs.train_batches(pictures, labels, 3, seed=5, epoch=2, start=4))
    with pytest.raises(ValueError, match="batch size 12 does not fit 11 training images"):
        next(imgs.train_batches(pictures, labels, 12, seed=5, epoch=0))


def test_train_batch_labels_follow_their_images():
    pictures = np.repeat(np.arange(1, 11, dtype=np.uint8) * 20, 4 * 4 * 3).reshape(10, 4, 4, 3)  # image k: 20 (k+1)
    for batch in imgs.train_batches(pictures, np.arange(10, dtype=np.int32), 5, seed=0, epoch=0):
        pixels = (batch["image"] * np.float32(imgs.CIFAR10_STD) + np.float32(imgs.CIFAR10_MEAN)) * 255
        own = 20 * (batch["label"] + 1)[:, None, None, None]
        assert (np.isclose(pixels, 0, atol=1e-3) | np.isclose(pixels, own, atol=1e-3)).all()  # padding or its own


def test_eval_batches_pad_the_last_batch():
    pictures, labels = _random_images(5, 4), np.arange(5, dtype=np.int32)
    batches = list(imgs.eval_batches(pictures, labels, 2))
    assert [rows for rows, _ in batches] == [2, 2, 1]
    assert all(b["image"].shape == (2, 4, 4, 3) for _, b in batches)
    assert batches[2][1]["label"].tolist() == [4, 4]
    np.testing.assert_array_equal(np.concatenate([b["image"][:rows] for rows, b in batches]),
                                  imgs.normalize(pictures))


# --- the multi-exit ResNet ------------------------------------------------------------------------

TINY = ResNetConfig(depth=8, num_classes=5, widths=(4, 8, 16))  # one block per stage: 3 exits


def _key(seed: int) -> jax.Array:
    # XLA's RngBitGenerator: the initialisation compiles in about a second on CPU, threefry's in ten.
    return jax.random.key(seed, impl="rbg")


def _init(cfg: ResNetConfig, seed: int, image_size: int):
    return jax.jit(resnet.init_variables, static_argnums=(0, 2))(cfg, _key(seed), image_size)


# Jitted: one compilation per shape is faster than Flax's eager op-by-op dispatch on CPU.
@functools.partial(jax.jit, static_argnums=0)
def _train_apply(model, variables, images):
    return model.apply(variables, images, train=True, mutable=["batch_stats"])


@functools.partial(jax.jit, static_argnums=0)
def _eval_apply(model, variables, images):
    return model.apply(variables, images, train=False)


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny ResNet with running statistics moved away from their initial values by a train step."""
    model = resnet.MultiExitResNet(TINY)
    variables = _init(TINY, 0, 8)
    images = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    _, updated = _train_apply(model, variables, images * 3 + 1)
    return model, {"params": variables["params"], **updated}, images


def test_config_checks_depth_and_counts_exits():
    assert ResNetConfig().num_layers == 27 and ResNetConfig().blocks_per_stage == 9
    assert TINY.num_layers == 3 and ResNetConfig(depth=20).num_layers == 9
    with pytest.raises(ValueError, match=r"depth 57 is not 6n \+ 2 .*e.g. 8, 20, 32, 56"):
        ResNetConfig(depth=57)
    with pytest.raises(ValueError, match="widths must not decrease"):
        ResNetConfig(widths=(32, 16, 64))
    restored = ResNetConfig.from_dict({**TINY.to_dict(), "widths": [4, 8, 16]})  # as read back from JSON
    assert restored == TINY and hash(restored) == hash(TINY)


def test_resnet56_has_27_exits_and_the_papers_size():
    cfg = ResNetConfig()
    shapes = jax.eval_shape(lambda key: resnet.init_variables(cfg, key), jax.random.key(0))
    logits = jax.eval_shape(lambda v, x: resnet.MultiExitResNet(cfg).apply(v, x), shapes,
                            jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32))
    assert logits.shape == (27, 2, 10) and logits.dtype == np.float32
    assert sorted(shapes["params"]) == ["backbone", "ramps"] and sorted(shapes["batch_stats"]) == ["backbone"]
    assert sorted(shapes["params"]["ramps"], key=int) == [str(i) for i in range(27)]
    backbone_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]["backbone"]))
    assert backbone_size == 852_368  # He et al.'s 0.85M: option-A shortcuts have no weights
    assert shapes["params"]["backbone"]["layer"]["9"]["conv1"]["kernel"].shape == (3, 3, 16, 32)
    assert resnet.num_block_programs(cfg) == 5


def test_output_shape_and_layout(tiny_model):
    model, variables, images = tiny_model
    logits = _eval_apply(model, variables, images)
    assert logits.shape == (TINY.num_layers, 4, 5) and logits.dtype == np.float32
    assert sorted(variables["params"]["ramps"]) == ["0", "1", "2"]
    assert sorted(variables["params"]["backbone"]["layer"]["1"]) == ["bn1", "bn2", "conv1", "conv2"]
    assert sorted(variables["batch_stats"]["backbone"]["layer"]["1"]) == ["bn1", "bn2"]


def test_eval_uses_running_statistics_and_train_updates_them(tiny_model):
    model, variables, images = tiny_model
    logits = np.asarray(_eval_apply(model, variables, images))
    np.testing.assert_array_equal(logits, _eval_apply(model, variables, images))  # deterministic
    # Running statistics: an image's logits do not depend on its batch ...
    np.testing.assert_allclose(_eval_apply(model, variables, images[:2]), logits[:, :2], rtol=1e-5, atol=1e-5)
    # ... and change with the statistics.
    shifted = {**variables, "batch_stats": jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])}
    assert not np.allclose(_eval_apply(model, shifted, images), logits)
    # Batch statistics in training: the running ones do not matter, and they are updated.
    train_logits, updated = _train_apply(model, variables, images)
    shifted_logits, _ = _train_apply(model, shifted, images)
    np.testing.assert_allclose(train_logits, shifted_logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(train_logits, logits)
    before, after = variables["batch_stats"], updated["batch_stats"]
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_piecewise_steps_equal_the_whole_model():
    """stem + block_step for every block == __call__(train=False), compiling one program per
    distinct block structure: depth 14 has 6 blocks of 5 structures (stage 1; first and other
    blocks of stages 2 and 3), as ResNet-56 has 27."""
    cfg = ResNetConfig(depth=14, num_classes=3, widths=(4, 8, 16))
    model = resnet.MultiExitResNet(cfg)
    variables = _init(cfg, 1, 8)
    images = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
    _, updated = _train_apply(model, variables, images + 0.5)
    variables = {"params": variables["params"], **updated}
    whole = _eval_apply(model, variables, images)

    resnet._block_program.clear_cache()
    h = resnet.stem(cfg, variables, images)
    steps = []
    for layer in range(cfg.num_layers):
        h, logits = resnet.block_step(cfg, variables, layer, h)
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps), whole, rtol=1e-5, atol=1e-5)
    assert resnet._block_program._cache_size() == resnet.num_block_programs(cfg) == 5
    assert h.shape == (3, 2, 2, 16)
    with pytest.raises(ValueError, match=r"block 6 is outside 0..5"):
        resnet.block_step(cfg, variables, 6, h)


@pytest.mark.parametrize("stride,size,channels", [(1, (6, 5), (3, 4)), (2, (7, 8), (4, 6)), (2, (8, 8), (2, 2))])
def test_conv3x3_values_and_gradients_equal_xla(stride, size, channels):
    """The custom kernel gradient (9 per-tap products) against lax.conv_general_dilated's, on odd
    and even, non-square images, stride 1 and 2; forward and input gradient are XLA's own."""
    rng = np.random.default_rng(stride)
    x = rng.normal(size=(3, *size, channels[0])).astype(np.float32)
    kernel = rng.normal(size=(3, 3, *channels)).astype(np.float32)

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def custom(x, kernel):
        return resnet.conv3x3(x, kernel, stride)

    out = reference(x, kernel)
    cotangent = rng.normal(size=out.shape).astype(np.float32)
    np.testing.assert_allclose(custom(x, kernel), out, rtol=1e-6, atol=1e-6)
    expected = jax.vjp(reference, x, kernel)[1](cotangent)
    got = jax.jit(lambda x, k, g: jax.vjp(custom, x, k)[1](g))(x, kernel, cotangent)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_conv_module_has_nn_convs_variables_and_numbers():
    """Conv3x3 is a drop-in for nn.Conv(3x3, padding 1, no bias): same variable tree, same
    initial values from the same key, same outputs (checkpoints of either load in the other)."""
    from jaxexit.vision.resnet import _KAIMING, Conv3x3
    import flax.linen as nn

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    ours, theirs = Conv3x3(6, 2), nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                                          kernel_init=_KAIMING)
    v_ours, v_theirs = ours.init(_key(3), x), theirs.init(_key(3), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)
    np.testing.assert_array_equal(v_ours["params"]["kernel"], v_theirs["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(v_ours, x), theirs.apply(v_theirs, x), rtol=1e-6, atol=1e-6)
