"""1-D signals: the UCR-format datamodule (series and image modes) and the SignalKD teacher-student model."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import AnomalibDataModule, ImageBatch
from jsonargparse import ArgumentParser

from kd_ext.data.ucr import SeriesBatch, SeriesImage, UCRSeries, preprocess, read_ucr, series_to_image

DATA = Path(os.environ.get("KD_EXT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ECG200 = DATA / "ecg"
LENGTH = 32
NORMAL, ABNORMAL = 12, 5


def beats(count: int, abnormal: bool, seed: int) -> np.ndarray:
    """Synthetic beats: one smooth bump (normal) or a bump plus a sharp late spike (abnormal), with noise."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, LENGTH)
    centres = rng.uniform(0.3, 0.4, (count, 1))
    series = np.exp(-((t - centres) ** 2) / 0.01) + 0.05 * rng.standard_normal((count, LENGTH))
    if abnormal:
        series += 1.5 * np.exp(-((t - 0.8) ** 2) / 0.0005)
    return series


def write_ucr(path: Path, normal: int = NORMAL, abnormal: int = ABNORMAL, seed: int = 0, separator: str = " ") -> Path:
    rows = [(1.0, row) for row in beats(normal, False, seed)] + [(-1.0, row) for row in beats(abnormal, True, seed + 1)]
    lines = [separator.join([f"{label:.7e}", *(f"{value:.7e}" for value in row)]) for label, row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_ucr(tmp_path / "SYN_TRAIN.txt"), write_ucr(tmp_path / "SYN_TEST.txt", normal=6, abnormal=6, seed=5)


def datamodule(files: tuple[Path, Path], tmp_path: Path, **kwargs) -> UCRSeries:
    module = UCRSeries(*files, image_dir=tmp_path / "images", seed=0, train_batch_size=8, eval_batch_size=8, **kwargs)
    module.setup()
    return module


# ----------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 0.1 0.2 0.3\n-1 0.1 0.2\n", r"BAD\.txt: series have different lengths.*line 2: 2 values"),
        ("1 0.1 0.2 0.3\n1 0.1 abc 0.3\n", r"BAD\.txt has 1 malformed line.*line 2, column 3: 'abc' is not a number"),
        ("1 0.1 0.2 0.3\n1 0.1 NaN 0.3\n", r"BAD\.txt has missing or infinite samples.*line 2: NaN or infinite"),
        ("1 0.1 0.2 0.3\n1\n", r"BAD\.txt has 1 malformed line.*line 2: a label without values"),
        ("\n\n", r"BAD\.txt has no series"),
    ],
    ids=["ragged", "non-numeric", "nan", "label-only", "empty"],
)
def test_malformed_files_are_refused_naming_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "BAD.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"(?s){message}"):
        read_ucr(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Series file not found: .*NOPE\.txt"):
        read_ucr(tmp_path / "NOPE.txt")


@pytest.mark.parametrize("separator", [",", "\t", "  "])
def test_comma_tab_and_space_separated_files_read_alike(tmp_path: Path, separator: str) -> None:
    reference = read_ucr(write_ucr(tmp_path / "a.txt"))
    other = read_ucr(write_ucr(tmp_path / "b.txt", separator=separator))
    np.testing.assert_array_equal(other.values, reference.values)
    np.testing.assert_array_equal(other.labels, reference.labels)
    assert other.lines == list(range(1, NORMAL + ABNORMAL + 1))


def test_no_normal_class_is_refused_at_setup_listing_the_labels(files: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no series with the normal label 2 \(labels found: -1, 1\)"):
        datamodule(files, tmp_path, normal_label=2)


def test_a_file_with_one_normal_series_is_refused(tmp_path: Path) -> None:
    train = write_ucr(tmp_path / "ONE_TRAIN.txt", normal=1, abnormal=0)
    test = write_ucr(tmp_path / "ONE_TEST.txt")
    with pytest.raises(ValueError, match="has 1 normal training series: too few"):
        datamodule((train, test), tmp_path)


def test_a_test_file_with_one_series_is_accepted_as_it_is(files: tuple[Path, Path], tmp_path: Path) -> None:
    """One series is enough to score; no normal training series are moved into a test set without normal ones."""
    single = write_ucr(tmp_path / "SINGLE_TEST.txt", normal=0, abnormal=1, seed=9)
    module = datamodule((files[0], single), tmp_path)
    assert len(module.test_data) == 1
    assert module.test_data.samples.label_index.tolist() == [1]
    assert len(module.train_data) + len(module.val_data) == NORMAL


def test_test_series_of_another_length_are_refused(files: tuple[Path, Path], tmp_path: Path) -> None:
    short = tmp_path / "SHORT_TEST.txt"
    short.write_text("1 0.1 0.2 0.3\n-1 0.3 0.2 0.1\n")
    with pytest.raises(ValueError, match=rf"Test series have 3 time steps, training series {LENGTH}"):
        datamodule((files[0], short), tmp_path)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"band_pass": (0, 1)}, "is not a filter"),
        ({"band_pass": (0.5, 0.2)}, "is not a filter"),
        ({"as_image": "spectrogram"}, "Unknown as_image 'spectrogram'; choose one of 'gaf', 'recurrence', 'scalogram'"),
        ({"val_split_mode": "none"}, "leaves UCRSeries without a validation set"),
        ({"test_file": None}, "needs test_file, or num_folds"),
        ({"num_folds": 5}, "leave test_file out"),
        ({"test_file": None, "num_folds": 1}, "num_folds must be a whole number >= 2, got 1"),
        ({"test_file": None, "num_folds": 3, "fold": 3}, r"fold must be an integer in \[0, 3\)"),
    ],
)
def test_invalid_options_are_refused_at_construction(files: tuple[Path, Path], arguments: dict, message: str) -> None:
    options = {"train_file": files[0], "test_file": files[1], **arguments}
    with pytest.raises(ValueError, match=message):
        UCRSeries(**options)


# ----------------------------------------------------------------------------------------------------- splits


def labels_and_lines(dataset) -> tuple[set[int], set[int]]:
    return set(dataset.samples.label_index), set(dataset.samples.line)


def test_training_uses_normal_series_only_and_validation_is_held_out_from_them(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    module = datamodule(files, tmp_path)
    train_labels, train_lines = labels_and_lines(module.train_data)
    val_labels, val_lines = labels_and_lines(module.val_data)
    assert train_labels == val_labels == {0}
    assert not train_lines & val_lines
    assert train_lines | val_lines == set(range(1, NORMAL + 1))  # the normal series of the training file
    assert len(module.test_data) == 12
    assert int(module.test_data.samples.label_index.sum()) == 6
    assert module.unlabelled_training_series().shape == (NORMAL + ABNORMAL, 1, LENGTH)


def test_normal_label_selects_the_normal_class(files: tuple[Path, Path], tmp_path: Path) -> None:
    module = datamodule(files, tmp_path, normal_label=-1)
    _, train_lines = labels_and_lines(module.train_data)
    _, val_lines = labels_and_lines(module.val_data)
    assert train_lines | val_lines == set(range(NORMAL + 1, NORMAL + ABNORMAL + 1))


def test_folds_partition_the_training_file_stratified(files: tuple[Path, Path], tmp_path: Path) -> None:
    test_lines = []
    for fold in range(3):
        module = datamodule((files[0], None), tmp_path, num_folds=3, fold=fold)
        _, held_out = labels_and_lines(module.test_data)
        _, train = labels_and_lines(module.train_data)
        _, val = labels_and_lines(module.val_data)
        assert not held_out & (train | val)
        assert (train | val) == set(range(1, NORMAL + 1)) - held_out
        assert int(module.test_data.samples.label_index.sum()) in {1, 2}  # 5 abnormal series over 3 folds
        assert len(module.unlabelled_training_series()) == NORMAL + ABNORMAL - len(held_out)
        test_lines += sorted(held_out)
    assert sorted(test_lines) == list(range(1, NORMAL + ABNORMAL + 1))


# ----------------------------------------------------------------------------------------------------- transforms


def test_series_batches_are_z_normalised_series(files: tuple[Path, Path], tmp_path: Path) -> None:
    batch = next(iter(datamodule(files, tmp_path).train_dataloader()))
    assert isinstance(batch, SeriesBatch)
    assert batch.series.shape == (8, 1, LENGTH)
    assert batch.gt_mask is None
    assert not batch.gt_label.any()
    torch.testing.assert_close(batch.series.mean(-1), torch.zeros(8, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.series.std(-1, unbiased=False), torch.ones(8, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", list(SeriesImage))
def test_images_have_three_channels_in_unit_range(mode: SeriesImage) -> None:
    series = preprocess(beats(3, True, 0))
    for row in [*series, np.zeros(LENGTH, dtype=np.float32)]:  # a constant series too
        image = series_to_image(row, mode)
        assert image.shape == (3, LENGTH, LENGTH)
        assert image.dtype == np.float32
        assert np.isfinite(image).all()
        assert image.min() >= 0
        assert image.max() <= 1


def test_gaf_channels_are_the_angular_fields() -> None:
    series = preprocess(beats(1, False, 0))[0]
    summation, difference, markov = series_to_image(series, "gaf")
    np.testing.assert_allclose(summation, summation.T, atol=1e-6)  # cos(phi_i + phi_j) is symmetric
    np.testing.assert_allclose(difference - 0.5, -(difference - 0.5).T, atol=1e-6)  # sin(phi_i - phi_j): antisymmetric
    scaled = 2 * (series - series.min()) / (series.max() - series.min()) - 1
    np.testing.assert_allclose(np.diag(summation) * 2 - 1, 2 * scaled**2 - 1, atol=1e-5)  # cos(2 phi)
    assert 0 <= markov.min() <= markov.max() <= 1


def test_image_mode_yields_anomalib_image_batches_with_files_for_the_visualiser(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    module = datamodule(files, tmp_path, as_image="recurrence")
    batch = next(iter(module.test_dataloader()))
    assert isinstance(batch, ImageBatch)
    assert batch.image.shape == (8, 3, LENGTH, LENGTH)
    assert batch.gt_mask is None
    assert batch.gt_label.dtype == torch.bool
    assert all(Path(path).is_file() for path in batch.image_path)
    assert {Path(path).parent.name for path in batch.image_path} == {"SYN_TEST"}


def test_low_pass_removes_high_frequencies() -> None:
    t = np.arange(256)
    values = (np.sin(2 * np.pi * t / 64) + np.sin(2 * np.pi * t / 4))[None]  # 1/32 and 1/2 of Nyquist
    filtered = preprocess(values, normalize=False, band_pass=(0, 0.25))[0]
    spectrum, original = np.abs(np.fft.rfft(filtered)), np.abs(np.fft.rfft(values[0]))
    assert spectrum[256 // 4] < 0.1 * original[256 // 4]  # second-order Butterworth, forwards and backwards
    assert spectrum[256 // 64] > 0.95 * original[256 // 64]


@pytest.mark.parametrize(
    "band_pass", [(0, 0.25), (0.05, 1), (0.05, 0.4), (0.3, 0.35)], ids=["low", "high", "band", "narrow"]
)
def test_numpy_filter_matches_scipy(band_pass: tuple[float, float]) -> None:
    """The one (numpy) filter of training and the edge equals scipy's butter + sosfiltfilt."""
    from scipy.signal import butter, sosfiltfilt

    from kd_ext.edge.series_preprocessing import FILTER_ORDER, filter_series

    low, high = band_pass
    kind, cut = ("lowpass", high) if low == 0 else ("highpass", low) if high == 1 else ("bandpass", [low, high])
    values = np.random.default_rng(0).standard_normal((4, 96)).cumsum(axis=1)
    expected = sosfiltfilt(butter(FILTER_ORDER, cut, btype=kind, output="sos"), values, axis=1)
    np.testing.assert_allclose(filter_series(values, band_pass), expected, atol=1e-9, rtol=0)


def test_anomalib_cli_parser_resolves_the_dotted_path(files: tuple[Path, Path]) -> None:
    """``--data kd_ext.data.UCRSeries`` as anomalib's CLI declares ``--data``, a negative label included."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    config = parser.parse_args(
        [
            "--data=kd_ext.data.UCRSeries",
            f"--data.train_file={files[0]}",
            f"--data.test_file={files[1]}",
            "--data.as_image=gaf",
            "--data.normal_label=-1",
        ]
    )
    module = parser.instantiate_classes(config).data
    assert isinstance(module, UCRSeries)
    assert module.as_image == SeriesImage.GAF
    assert module.normal_label == -1


def test_real_ecg200_counts(tmp_path: Path) -> None:
    if not ECG200.is_dir():
        pytest.skip(f"real data not found at {ECG200} (set KD_EXT_DATA to the folder in shared/data/README.md)")
    module = UCRSeries(ECG200 / "ECG200_TRAIN.txt", ECG200 / "ECG200_TEST.txt", seed=0)
    module.setup()
    assert len(module.train_data) + len(module.val_data) == 69
    assert len(module.test_data) == 100
    assert int(module.test_data.samples.label_index.sum()) == 36
    assert module.series_length == 96
    assert module.category == "ECG200"


# ----------------------------------------------------------------------------------------------------- SignalKD


def small_model(**kwargs):
    from kd_ext.models.signal_kd import SignalKDModel

    return SignalKDModel(width=8, hidden=16, **kwargs)


def test_teacher_pretraining_lowers_the_reconstruction_loss_and_freezes_the_teacher() -> None:
    torch.manual_seed(0)
    model = small_model()
    series = torch.from_numpy(preprocess(np.concatenate([beats(24, False, 0), beats(8, True, 1)]))).unsqueeze(1)
    history = model.pretrain_teacher(series, epochs=12, batch_size=8, seed=0)
    assert history[-1] < 0.7 * history[0]
    assert model.teacher_pretrained
    assert int(model.series_length) == LENGTH
    assert int(model.pretraining_series_count) == 32
    assert not any(parameter.requires_grad for parameter in model.teacher.parameters())
    model.train()
    assert not model.teacher.training  # batch-norm statistics of the pretraining stay fixed


def test_students_learn_the_normal_series() -> None:
    from kd_ext.models.signal_kd.loss import SignalKDLoss

    torch.manual_seed(0)
    model = small_model()
    normal = torch.from_numpy(preprocess(beats(16, False, 0))).unsqueeze(1)
    model.pretrain_teacher(normal, epochs=2, batch_size=8, seed=0)
    teacher_before = [parameter.clone() for parameter in model.teacher.parameters()]
    optimizer = torch.optim.Adam(model.student_parameters(), lr=1e-2)
    loss_function = SignalKDLoss()
    model.train()
    losses = []
    for _ in range(20):
        terms = loss_function(*model(normal))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert {"forward_loss", "reverse_loss"} <= set(terms)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    teacher_after = list(model.teacher.parameters())
    assert all(torch.equal(before, after) for before, after in zip(teacher_before, teacher_after, strict=True))
    model.eval()
    with torch.no_grad():
        predictions = model(normal)
    assert predictions.pred_score.shape == (16,)
    assert predictions.anomaly_map.shape == (16, LENGTH)


def test_series_of_another_length_are_refused_by_a_trained_model() -> None:
    model = small_model()
    model.pretrain_teacher(torch.randn(4, 1, LENGTH), epochs=1, seed=0)
    model.eval()
    with pytest.raises(ValueError, match=rf"trained on series of {LENGTH} time steps, got 40: resample"):
        model(torch.randn(2, 1, 40))
    with pytest.raises(ValueError, match="Expected series with 1 channel"):
        model(torch.randn(2, 3, LENGTH))
    with pytest.raises(ValueError, match=r"use kd_ext\.data\.UCRSeries without as_image for series"):
        model(torch.rand(2, 3, LENGTH, LENGTH))


def test_the_map_comes_from_the_chosen_levels_and_the_score_is_its_mean() -> None:
    model = small_model()
    model.pretrain_teacher(torch.randn(4, 1, LENGTH), epochs=1, seed=0)
    model.eval()
    series = torch.randn(3, 1, LENGTH)
    with torch.no_grad():
        deep = model(series)
        model.map_levels = [0, 1, 2]
        every_level = model(series).anomaly_map
    torch.testing.assert_close(deep.pred_score, deep.anomaly_map.mean(dim=-1))
    assert not torch.allclose(every_level, deep.anomaly_map)
    with pytest.raises(ValueError, match=r"map_levels must be a non-empty subset of \[0, 1, 2\], got \[3\]"):
        small_model(map_levels=(3,))


def test_the_reverse_student_rebuilds_the_levels_from_a_code_of_bottleneck_numbers() -> None:
    from kd_ext.models.signal_kd.torch_model import ReverseStudent

    model = small_model(bottleneck=3)
    teacher = model.teacher(torch.randn(5, 1, LENGTH))
    student = model.reverse_student
    codes = []
    handle = student.code[0].register_forward_hook(lambda _module, _inputs, output: codes.append(output))
    rebuilt = student(teacher)
    handle.remove()
    assert codes[0].shape == (5, 3)  # everything the decoder sees of a series
    assert [level.shape for level in rebuilt] == [level.shape for level in teacher]
    former = small_model(bottleneck=None).reverse_student
    assert former.code is None
    assert [level.shape for level in former(teacher)] == [level.shape for level in teacher]
    with pytest.raises(ValueError, match=r"bottleneck must be a whole number >= 1 \(the code size\) or None, got 0"):
        ReverseStudent((8, 16, 16), bottleneck=0)


def test_prior_fuses_the_standardised_distillation_and_prior_maps_fitted_on_normal_series() -> None:
    torch.manual_seed(0)
    model = small_model()
    model.prior_fusion.held_out = False  # in-sample statistics: the formula below; held-out ones: tests/test_prior.py
    normal = torch.from_numpy(preprocess(beats(16, False, 0))).unsqueeze(1)
    series = torch.from_numpy(preprocess(np.concatenate([beats(4, False, 7), beats(4, True, 8)]))).unsqueeze(1)
    with pytest.raises(RuntimeError, match="pretrain the teacher first"):
        model.calibrate(lambda: [normal])
    model.pretrain_teacher(normal, epochs=2, batch_size=8, seed=0)
    model.eval()
    assert model.calibration_pending
    with torch.no_grad():
        distillation = model(series).anomaly_map  # prior not fitted yet: the distillation map alone
        model.calibrate(lambda: [normal[:8], normal[8:]])
        assert not model.calibration_pending
        fused = model(series)
        prior = model.prior_fusion.prior(model._teacher_features(series), (1, LENGTH)).flatten(1)
        normal_distillation = model.distillation_map(*model.distill(normal), LENGTH)
        normal_prior = model.prior_fusion.prior(model._teacher_features(normal), (1, LENGTH)).flatten(1)

    def z(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return (values - reference.mean()) / reference.std(unbiased=False)

    expected = (z(distillation, normal_distillation) + z(prior, normal_prior)) / 2
    torch.testing.assert_close(fused.anomaly_map, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.pred_score, fused.anomaly_map.mean(dim=-1))
    model.train()
    model(normal[:4])  # a training step changes the students: the statistics are stale until calibrated again
    assert model.calibration_pending
    assert small_model(prior=False).prior_fusion is None


def test_a_new_teacher_drops_the_prior_of_the_old_one() -> None:
    model = small_model()
    normal = torch.from_numpy(preprocess(beats(8, False, 0))).unsqueeze(1)
    model.pretrain_teacher(normal, epochs=1, seed=0)
    model.calibrate(lambda: [normal])
    assert model.prior_fusion.ready
    model.pretrain_teacher(normal, epochs=1, seed=1)
    assert not model.prior_fusion.ready and model.calibration_pending


@pytest.fixture(scope="module")
def trained_signal_kd(tmp_path_factory: pytest.TempPathFactory):
    """SignalKD trained through anomalib's Engine (teacher 2 epochs, students 2 epochs) on synthetic beats."""
    from anomalib.engine import Engine

    from kd_ext.models.signal_kd import SignalKD

    root = tmp_path_factory.mktemp("signal_kd")
    files = write_ucr(root / "SYN_TRAIN.txt"), write_ucr(root / "SYN_TEST.txt", normal=6, abnormal=6, seed=5)
    module = UCRSeries(*files, seed=0, train_batch_size=8, eval_batch_size=8)
    torch.manual_seed(0)
    model = SignalKD(width=8, hidden=16, teacher_epochs=2, epochs=2)
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False)
    engine.fit(model, datamodule=module)
    assert (engine.trainer.max_epochs, engine.trainer.current_epoch) == (2, 2)  # the model's epochs, not 1000
    metrics = engine.test(model, datamodule=module, verbose=False)
    return model, module, metrics, root


def test_engine_pretrains_the_teacher_on_every_training_series_then_tests(trained_signal_kd) -> None:
    model, _, metrics, _ = trained_signal_kd
    assert int(model.model.pretraining_series_count) == NORMAL + ABNORMAL  # normal and abnormal, labels unused
    assert {"image_AUROC", "image_F1Score"} <= set(metrics[0])
    assert model.model.prior_fusion.ready and not model.model.calibration_pending  # fitted before testing
    assert model.model.prior_fusion.prior.mean.shape[0] == model.model.series_length // 2  # one Gaussian per step


def test_export_refuses_a_prior_not_fitted_to_the_trained_students(trained_signal_kd, tmp_path: Path) -> None:
    model, _, _, _ = trained_signal_kd
    model.model.needs_calibration = True
    try:
        with pytest.raises(RuntimeError, match="prior is not fitted to its trained students"):
            model.to_onnx(tmp_path)
    finally:
        model.model.needs_calibration = False


def test_signal_kd_records_the_datamodule_preprocessing(trained_signal_kd) -> None:
    from kd_ext.edge.series_preprocessing import SeriesPreprocessing

    model, module, _, _ = trained_signal_kd
    assert model.series_preprocessing == module.preprocessing == SeriesPreprocessing(normalize=True, band_pass=None)


def test_a_trained_signal_kd_refuses_test_series_of_another_length(trained_signal_kd, tmp_path: Path) -> None:
    """Series of another length than the model's stop at the first test batch, naming both lengths."""
    from anomalib.engine import Engine

    model, _, _, _ = trained_signal_kd
    rows = [f"{label} " + " ".join(["0.5", "-0.5"] * 20) for label in (1, 1, 1, -1)]
    (tmp_path / "LONG_TRAIN.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "LONG_TEST.txt").write_text("\n".join(rows) + "\n")
    other = UCRSeries(tmp_path / "LONG_TRAIN.txt", tmp_path / "LONG_TEST.txt", seed=0, val_split_ratio=0.5)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=rf"trained on series of {LENGTH} time steps, got 40: resample"):
        engine.test(model, datamodule=other, verbose=False)


def test_openvino_ir_matches_torch(trained_signal_kd) -> None:
    """The exported IR (network and post-processor) gives torch's scores, labels and maps within 1e-5 (f32 hint)."""
    import openvino as ov

    from kd_ext.export import export_openvino

    model, module, _, root = trained_signal_kd
    xml = export_openvino(model, root / "export", input_size=None)
    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert compiled.input(0).get_partial_shape().to_string() == f"[?,1,{LENGTH}]"
    series = module.test_data.series()
    for batch in (series[:1], series * 3 + 1):  # one series; every test series, raw scale (the IR z-normalises)
        outputs = {name: compiled(batch.numpy())[port] for port in compiled.outputs for name in port.get_names()}
        model.eval()
        with torch.no_grad():
            expected = model(batch)
        for name in ("pred_score", "anomaly_map"):
            np.testing.assert_allclose(outputs[name], getattr(expected, name).numpy(), atol=1e-5, rtol=0)
        for name in ("pred_label", "pred_mask"):
            np.testing.assert_array_equal(outputs[name], getattr(expected, name).numpy())
    with pytest.raises(ValueError, match="SignalKD takes series, not images"):
        export_openvino(model, root / "export", input_size=(256, 256))


def test_signal_kd_carries_its_epochs_over_the_trainers() -> None:
    from kd_ext.models.signal_kd import SignalKD

    assert SignalKD().trainer_arguments["max_epochs"] == SignalKD().epochs
    assert SignalKD(epochs=7).trainer_arguments["max_epochs"] == 7
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1, got 0"):
        SignalKD(epochs=0)


@pytest.mark.cli
@pytest.mark.slow
def test_readme_command_stops_after_the_models_epochs(tmp_path: Path) -> None:
    """README's ``anomalib train --model SignalKD --data kd_ext.data.UCRSeries`` ends after the model's epochs.

    No epoch count is given, as in the README (Lightning's default would be 1000 epochs); only the network is made
    small and the teacher's pretraining short, to keep the test fast.
    """
    import subprocess
    import sys

    from kd_ext.models.signal_kd import SignalKD

    train, test = write_ucr(tmp_path / "SYN_TRAIN.txt"), write_ucr(tmp_path / "SYN_TEST.txt", normal=6, abnormal=6)
    command = [
        str(Path(sys.executable).with_name("anomalib")),
        "train",
        "--model",
        "SignalKD",
        "--data",
        "kd_ext.data.UCRSeries",
        "--data.train_file",
        str(train),
        "--data.test_file",
        str(test),
        "--model.width",
        "8",
        "--model.hidden",
        "8",
        "--model.teacher_epochs",
        "1",
        "--default_root_dir",
        str(tmp_path / "results"),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"`max_epochs={SignalKD().epochs}` reached" in output, output[-4000:]
    assert "image_AUROC" in output
