"""One image-loading rule (kd_ext.image_input) for anomalib's datasets, kd_ext's datamodules and the edge.

The parity test trains a tiny BiDirMSKD (random teacher, 64x64 input, one epoch) on a synthetic folder, then scores
8-bit RGB, 16-bit PNG and TIFF (values far below 65535, as a 12-bit camera writes them), greyscale, palette and
odd-sized files with ``Engine.predict`` from the saved checkpoint and with ``kd-ext infer`` on the model's exported
IR: the scores agree to 1e-5.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.data.datasets.base import image as anomalib_dataset_module
from anomalib.data.utils import read_image as anomalib_read_image
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from PIL import Image
from torchvision.transforms.v2 import Resize

from kd_ext.cli import main
from kd_ext.data import VideoFramesDataset
from kd_ext.data.reading import ANOMALIB_READ_IMAGE, ANOMALIB_READER_MODULES, kd_ext_image_reading, read_image
from kd_ext.edge import EdgeInputError, load_image
from kd_ext.export import export_openvino
from kd_ext.image_input import ImageValueRangeError, read_rgb, resize_values
from kd_ext.models import BiDirMSKD
from kd_ext.models.image_checks import unreadable_images

SIZE = (64, 64)
TWELVE_BIT_MAX = 4112  # a 12-bit camera's range in a 16-bit file: anomalib's own reader saturates it to 255


def texture(height: int, width: int, seed: int, defect: bool = False) -> np.ndarray:
    """A smooth RGB pattern with noise in ``[0, 1]`` (``defect``: a bright square)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([0.5 + 0.3 * np.sin(6 * x + c) * np.cos(5 * y) for c in range(3)], axis=-1)
    values = np.clip(base + 0.05 * rng.standard_normal((height, width, 3)), 0, 1)
    if defect:
        values[height // 3 : height // 2, width // 3 : width // 2] = 1.0
    return values


def eight_bit(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(values * 255).astype(np.uint8))


def sixteen_bit(values: np.ndarray, maximum: int = TWELVE_BIT_MAX) -> Image.Image:
    """Greyscale 16-bit (mode ``I;16``) with values up to ``maximum``."""
    image = Image.fromarray(np.rint(values.mean(axis=-1) * maximum).astype(np.uint16))
    assert image.mode == "I;16"
    return image


def write_test_files(folder: Path, seed: int, defect: bool) -> None:
    """One file of each kind the rule must handle: 8-bit RGB, 16-bit PNG/TIFF, greyscale, palette, odd sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    eight_bit(texture(37, 53, seed, defect)).save(folder / "rgb_odd.png")  # upscaled to 64x64
    eight_bit(texture(97, 83, seed + 1, defect)).save(folder / "rgb_large.jpg")  # downscaled
    sixteen_bit(texture(61, 70, seed + 2, defect)).save(folder / "sixteen.png")
    sixteen_bit(texture(64, 64, seed + 3, defect)).save(folder / "sixteen.tif")  # model size: no resize
    eight_bit(texture(45, 50, seed + 4, defect)).convert("L").save(folder / "grey.png")
    eight_bit(texture(50, 45, seed + 5, defect)).quantize(colors=32).save(folder / "palette.png")


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rule_folder")
    (root / "train" / "good").mkdir(parents=True)
    for index in range(6):
        eight_bit(texture(*SIZE, seed=100 + index)).save(root / "train" / "good" / f"{index}.png")
    write_test_files(root / "test" / "good", seed=0, defect=False)
    write_test_files(root / "test" / "bad", seed=10, defect=True)
    return root


def folder_datamodule(root: Path) -> Folder:
    return Folder(
        name="rule",
        root=root,
        normal_dir="train/good",
        abnormal_dir="test/bad",
        normal_test_dir="test/good",
        train_batch_size=3,
        eval_batch_size=1,  # the test files have different sizes
        num_workers=0,
        val_split_mode="same_as_test",
    )


@pytest.fixture(scope="module")
def trained(folder_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BiDirMSKD]:
    """A checkpoint of a tiny BiDirMSKD trained on the synthetic folder, and the model itself."""
    root = tmp_path_factory.mktemp("rule_train")
    seed_everything(0, workers=True)
    model = BiDirMSKD(
        pre_trained=False, pre_processor=BiDirMSKD.configure_pre_processor(SIZE), visualizer=False, epochs=1
    )
    engine = Engine(max_epochs=1, default_root_dir=root, logger=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=folder_datamodule(folder_root))
    checkpoint = root / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return checkpoint, model.eval()


def anomalib_scores(checkpoint: Path, root: Path) -> dict[str, float]:
    """``Engine.predict`` scores of the checkpoint on the folder's test images, by path relative to ``test/``."""
    model = BiDirMSKD(pre_trained=False, pre_processor=BiDirMSKD.configure_pre_processor(SIZE), visualizer=False)
    engine = Engine(logger=False, accelerator="cpu", devices=1, default_root_dir=checkpoint.parent)
    batches = engine.predict(model, datamodule=folder_datamodule(root), ckpt_path=checkpoint)
    return {
        Path(path).relative_to(root / "test").as_posix(): float(score)
        for batch in batches
        for path, score in zip(batch.image_path, batch.pred_score.reshape(-1), strict=True)
    }


def edge_scores(xml: Path, root: Path, out: Path) -> dict[str, float]:
    """``kd-ext infer`` scores of an IR on the folder's test images."""
    assert main(["infer", str(xml), str(root / "test"), "--out", str(out), "--recursive", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert not results["skipped"]
    return {row["image"]: row["score"] for row in results["images"]}


@pytest.fixture(scope="module")
def predicted(trained: tuple[Path, BiDirMSKD], folder_root: Path) -> dict[str, float]:
    return anomalib_scores(trained[0], folder_root)


def test_anomalib_predict_and_kd_ext_infer_score_every_kind_of_file_alike(
    trained: tuple[Path, BiDirMSKD], predicted: dict[str, float], folder_root: Path, tmp_path: Path
) -> None:
    # The standard IR (anomalib's export, read by any runtime); the features IR shares its input and matches
    # the torch model to 1e-5 in test_edge_tail.
    xml = export_openvino(trained[1], tmp_path / "ir", "fp32", input_size=SIZE, mode="standard")
    scores = edge_scores(xml, folder_root, tmp_path / "out")
    assert sorted(scores) == sorted(predicted)
    assert len(scores) == 12
    differences = {name: abs(scores[name] - predicted[name]) for name in predicted}
    assert max(differences.values()) <= 1e-5, differences


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path: Path) -> None:
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((5, 7), TWELVE_BIT_MAX, dtype=np.uint16)).save(path)
    assert np.asarray(anomalib_read_image(path, as_tensor=True)).max() == 1.0  # anomalib's reader saturates
    image = read_image(path, as_tensor=True)
    assert image.shape == (3, 5, 7)
    assert image.dtype == torch.float32
    np.testing.assert_allclose(image.numpy(), TWELVE_BIT_MAX / 65535, rtol=1e-6)
    array, original, notes = load_image(path, (5, 7))
    np.testing.assert_array_equal(array, image.numpy())  # the edge reads the same values
    assert original.getpixel((0, 0)) == (16, 16, 16)  # 4112 / 257, for overlays
    assert "16-bit values scaled by 1/65535" in notes[0]


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "1", "CMYK"])
def test_eight_bit_files_read_exactly_as_anomalib_reads_them(tmp_path: Path, mode: str) -> None:
    image = eight_bit(texture(23, 31, seed=3))
    image = image.quantize(colors=16) if mode == "P" else image.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    expected = anomalib_read_image(path, as_tensor=True)
    actual = read_image(path, as_tensor=True)
    assert type(actual) is type(expected)
    assert torch.equal(actual, expected)
    array, _, _ = load_image(path, (23, 31))
    np.testing.assert_array_equal(array, expected.numpy())


@pytest.mark.parametrize(("shape", "size"), [((37, 53), SIZE), ((97, 83), SIZE), ((61, 70), (32, 48)), (SIZE, SIZE)])
def test_resize_is_the_pre_processors(shape: tuple[int, int], size: tuple[int, int]) -> None:
    values = texture(*shape, seed=5).astype(np.float32)
    expected = Resize(size, antialias=True)(torch.from_numpy(values).permute(2, 0, 1)[None])[0]
    actual = resize_values(values, size)
    assert actual.shape == (*size, 3)
    np.testing.assert_allclose(actual.transpose(2, 0, 1), expected.numpy(), atol=1e-6)


def test_floating_point_images_are_refused_before_the_run_and_on_the_edge(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(ImageValueRangeError, match="mode F"):
        read_rgb(path)
    with pytest.raises(EdgeInputError, match="mode F"):
        load_image(path, SIZE)
    [(name, reason)] = unreadable_images([path])
    assert name == str(path)
    assert "no defined value range" in reason


def test_reading_swap_is_scoped_and_reentrant() -> None:
    modules = [__import__(name, fromlist=["read_image"]) for name in ANOMALIB_READER_MODULES]
    assert all(module.read_image is ANOMALIB_READ_IMAGE for module in modules)
    with kd_ext_image_reading():
        with kd_ext_image_reading():
            assert all(module.read_image is read_image for module in modules)
        assert anomalib_dataset_module.read_image is read_image  # the outer entry still holds
    assert all(module.read_image is ANOMALIB_READ_IMAGE for module in modules)


def test_model_runs_read_anomalib_datasets_by_the_rule(predicted: dict[str, float], folder_root: Path) -> None:
    """A kd_ext model's run (``predicted``) reads a Folder by the rule; after it, anomalib's reader is back."""
    assert {"good/sixteen.png", "bad/sixteen.tif"} <= set(predicted)
    assert anomalib_dataset_module.read_image is ANOMALIB_READ_IMAGE
    datamodule = folder_datamodule(folder_root)
    datamodule.setup("test")
    index = [Path(p).name for p in datamodule.test_data.samples.image_path].index("sixteen.tif")
    assert datamodule.test_data[index].image.max() == 1.0  # outside a kd_ext run: anomalib's saturation
    with kd_ext_image_reading():
        assert datamodule.test_data[index].image.max() < TWELVE_BIT_MAX / 65535 + 1e-6


def test_video_frames_read_sixteen_bit_frames_by_the_rule(tmp_path: Path) -> None:
    root = tmp_path / "video"
    for split, count in (("training", 2), ("testing", 2)):
        folder = root / split / "frames" / "01"
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(np.full((6, 8), TWELVE_BIT_MAX, dtype=np.uint16)).save(folder / f"{index:03d}.png")
    (root / "testing" / "frame_labels.csv").write_text("clip,frame,label\n1,0,0\n1,1,1\n")
    dataset = VideoFramesDataset(root, split="test")
    image = dataset[0].image
    np.testing.assert_allclose(image.numpy(), TWELVE_BIT_MAX / 65535, rtol=1e-6)
    assert anomalib_dataset_module.read_image is ANOMALIB_READ_IMAGE  # only while the frame is read


class StopTraining(Callback):
    """Raises as the first training batch starts: a run that ends on an exception, after its setup."""

    def on_train_batch_start(self, *args: object) -> None:
        del args
        msg = "stopped by the test"
        raise RuntimeError(msg)


def test_a_run_that_raises_puts_anomalib_reader_back(folder_root: Path, tmp_path: Path) -> None:
    """Lightning skips ``teardown`` after an exception; the model's callback still ends its reading scope."""
    model = BiDirMSKD(pre_trained=False, pre_processor=BiDirMSKD.configure_pre_processor(SIZE), visualizer=False)
    engine = Engine(
        max_epochs=1, default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1, callbacks=[StopTraining()]
    )
    with pytest.raises(RuntimeError, match="stopped by the test"):
        engine.fit(model=model, datamodule=folder_datamodule(folder_root))
    assert model.image_reading_runs == 0
    modules = [__import__(name, fromlist=["read_image"]) for name in ANOMALIB_READER_MODULES]
    assert all(module.read_image is ANOMALIB_READ_IMAGE for module in modules)
