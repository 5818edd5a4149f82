"""Error analysis and calibration: the spec these tests hold transferlab to.

- Expected calibration error: top-1 confidence in 15 equal-width bins (i/15, (i+1)/15]; ECE = sum over bins of
  n_b / N * |accuracy_b - mean confidence_b|. `scores()` (the one scoring path) reports it with its bins, the NLL,
  and per-class precision / recall / F1 / support equal to scikit-learn's (undefined ones None).
- Temperature scaling: at the end of a run (and at each recorded epoch) one T > 0 is fitted on the best checkpoint's
  validation logits by minimising the NLL of softmax(logits / T) (deterministic); it recovers a known temperature
  and never raises the validation NLL. Where validation cannot support a fit (fewer than 50 images, every image
  right, a minimum at the search's bound) T stays 1 and the record says why: an easy data set never collapses T to
  its lower bound. It is stored in the checkpoint (`temperature`, 1.0 when a checkpoint has none, with the record
  in `calibration`) and metrics.json; predict's probabilities are softmax(logits / T); T never changes the
  predicted class. A checkpoint whose T is not a positive number is refused in one line.
  Validation figures recorded per epoch stay those of the uncalibrated model.
- One loss: history, evaluate and calibration compute the cross-entropy / NLL from log-probabilities (no clamp).
- evaluate --json adds temperature, nll, nll_calibrated, ece, ece_calibrated; accuracy is that of the raw model.
- A study's selection records, for the selected trial on the test split: per-class precision / recall / F1,
  calibration before and after T (ECE, NLL, reliability bins), and the most confident mistakes (test position,
  classes, confidences, a thumbnail, Grad-CAM for the first few), in under 200 KB; the report shows a row-normalised
  confusion matrix with a colour scale, the precision / recall / F1 table, the most confused pairs, the gallery, the
  Grad-CAM figure and the reliability diagrams, with the stored numbers, images embedded in report.html.
- Grad-CAM (pytorch_grad_cam) targets the last conv of the backbone's last group before the head and returns maps of
  the image's size in [0, 1], on the CPU, for squeezenet and resnet.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import load_study, make_image_tree, quiet, tiny_config, write_spec
from PIL import Image

from transferlab import run_study
from transferlab.cli import main
from transferlab.data.decode import decode_png
from transferlab.data.sources import load_image_folder
from transferlab.data.split import Split, split_arrays
from transferlab.engine.checkpoint import Checkpoint
from transferlab.engine.train import run_training
from transferlab.inference.analysis import GALLERY, GRADCAM, grad_cam, gradcam_layer
from transferlab.inference.predict import load_checkpoint, predict_files
from transferlab.models.registry import get_backbone
from transferlab.models.weights import build_model
from transferlab.scoring.calibration import TEMPERATURE_RANGE, fit_temperature, view_probabilities
from transferlab.scoring.metrics import reliability, scores
from transferlab.scoring.stats import percent


# ---------------------------------------------------------------------------- ECE and per-class scores
def test_ece_matches_a_hand_computed_example():
    probs = torch.tensor([[0.9, 0.1], [0.05, 0.95], [0.3, 0.7], [0.38, 0.62], [0.88, 0.12]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 0, 0])
    # bins of width 1/15: 0.9 and 0.88 -> bin 13 (both right), 0.95 -> 14 (wrong), 0.7 -> 10 (right), 0.62 -> 9 (wrong)
    expected = (2 * abs(1 - 0.89) + abs(0 - 0.95) + abs(1 - 0.7) + abs(0 - 0.62)) / 5
    result = reliability(probs, y)
    assert result["ece"] == pytest.approx(expected) == pytest.approx(0.418)
    bins = result["reliability"]
    assert bins["bins"] == 15 and sum(bins["count"]) == 5
    assert [i for i, n in enumerate(bins["count"]) if n] == [9, 10, 13, 14]
    assert bins["count"][13] == 2 and bins["confidence"][13] == pytest.approx(0.89) and bins["accuracy"][13] == 1
    assert bins["accuracy"][14] == 0 and bins["confidence"][0] is None
    scored = scores(probs.float().log()[None], y, ["a", "b"], loss="ce", label_smoothing=0.0)
    assert scored["ece"] == pytest.approx(expected, abs=1e-6)
    assert scored["nll"] == pytest.approx(-np.log([0.9, 0.05, 0.7, 0.38, 0.88]).mean(), rel=1e-5)


def test_per_class_precision_recall_f1_equal_sklearn():
    from sklearn.metrics import precision_recall_fscore_support

    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0, 2, 1])  # class 3 is never predicted
    probs = F.one_hot(pred, 5).float() * 0.6 + 0.08  # class 4: no image, never predicted
    result = scores(probs.log()[None], y, list("abcde"), loss="ce", label_smoothing=0.0)["per_class"]
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(5), zero_division=np.nan)
    for i, c in enumerate("abcde"):
        for name, expected in (("precision", p[i]), ("recall", r[i]), ("f1", f[i])):
            got = result[c][name]
            assert (got is None) if math.isnan(expected) else got == pytest.approx(expected), (c, name)
        assert result[c]["support"] == s[i]
    assert result["d"]["precision"] is None and result["d"]["f1"] == 0.0
    assert result["e"] == {"precision": None, "recall": None, "f1": None, "support": 0}


# ---------------------------------------------------------------------------- temperature fitting
def test_temperature_fitting_recovers_a_known_temperature_and_lowers_nll():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(5000, 6, generator=g) * 2
    y = torch.multinomial(true_logits.softmax(1), 1, generator=g).flatten()
    logits = true_logits * 3  # three times too confident
    fit = fit_temperature(logits[None], y)
    assert fit.fitted and fit.temperature == pytest.approx(3.0, rel=0.08) and fit.n == 5000
    assert fit_temperature(logits[None], y) == fit  # deterministic
    assert F.cross_entropy(logits / fit.temperature, y) < F.cross_entropy(logits, y)
    assert fit.val_nll_calibrated == pytest.approx(F.cross_entropy(logits / fit.temperature, y).item(), rel=1e-5)
    under = fit_temperature((true_logits / 2)[None], y)
    assert under.temperature == pytest.approx(0.5, rel=0.08)  # under-confident: T < 1


def test_a_perfect_or_tiny_validation_split_keeps_t_at_1_and_says_why():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(200) % 4
    separated = F.one_hot(y, 4).float() * 5 + torch.randn(200, 4, generator=g) * 0.1  # every image right
    fit = fit_temperature(separated[None], y)
    assert (fit.temperature, fit.fitted) == (1.0, False) and "classified correctly" in fit.reason
    assert fit.val_nll_calibrated == fit.val_nll  # nothing applied, nothing worse
    tiny = fit_temperature(torch.randn(1, 12, 4, generator=g), torch.arange(12) % 4)
    assert (tiny.temperature, tiny.fitted) == (1.0, False) and "12 validation images" in tiny.reason


def test_a_nearly_separated_split_never_runs_t_to_its_bound():
    """One mistake among confident right answers: the unconstrained optimum sits at a tiny T, which would make every
    prediction read 1.000; the fit says so and keeps T = 1, or keeps a T strictly inside its range."""
    y = torch.arange(300) % 3
    logits = F.one_hot(y, 3).float() * 40
    logits[0] = torch.tensor([0.0, 40.1, 0.0])  # wrong, barely
    fit = fit_temperature(logits[None], y)
    low, high = TEMPERATURE_RANGE
    assert low < fit.temperature < high and fit.val_nll_calibrated <= fit.val_nll
    assert fit.fitted or "bound" in fit.reason


def test_loss_and_nll_come_from_log_probabilities_without_a_clamp():
    """A confident mistake costs its real log-likelihood (56 here), not a clamp's 27.6; validation, evaluate and
    calibration agree on it."""
    logits = torch.tensor([[[0.0, 56.0], [3.0, 0.0]]])  # image 0: class 0 at probability e**-56 (below 1e-12)
    y = torch.tensor([0, 0])
    expected = (56.0 + math.log1p(math.exp(-56.0)) + F.cross_entropy(torch.tensor([[3.0, 0.0]]), y[:1]).item()) / 2
    result = scores(logits, y, ["a", "b"], loss="ce", label_smoothing=0.0)
    assert result["nll"] == pytest.approx(expected, rel=1e-5) and result["loss"] == pytest.approx(expected, rel=1e-5)
    assert fit_temperature(logits, y).val_nll == pytest.approx(expected, rel=1e-5)


def test_temperature_never_changes_the_predicted_class():
    g = torch.Generator().manual_seed(1)
    for views in (1, 2):  # one view, or the image and its mirror under flip TTA
        logits = torch.randn(views, 500, 7, generator=g) * 4
        raw = view_probabilities(logits)
        for t in (0.2, 0.7, 3.0, 40.0):
            calibrated = view_probabilities(logits, t)
            assert torch.equal(calibrated.argmax(1), raw.argmax(1))
            assert torch.allclose(calibrated.sum(1), torch.ones(500))
    one = torch.randn(1, 50, 4, generator=g)
    assert torch.allclose(view_probabilities(one, 2.5), (one[0] / 2.5).softmax(1), atol=1e-6)


# ---------------------------------------------------------------------------- checkpoint, predict, evaluate
def val_logits_of(checkpoint, image_tree, cache, split_file):
    loaded = load_checkpoint(checkpoint, "cpu")
    data = load_image_folder(image_tree, cache, progress=False)
    split = Split.from_dict(json.loads(split_file.read_text()))
    x, y = split_arrays(data, split, "val")
    return loaded, loaded.view_logits(x), torch.as_tensor(y)


def test_the_checkpoint_stores_the_temperature_fitted_on_validation_and_predict_uses_it(
    calibrated_run, calibration_tree, tmp_path
):
    trained_run, image_tree = calibrated_run, calibration_tree
    out = trained_run.out_dir
    ckpt = Checkpoint.load(out / "best.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    assert ckpt.temperature > 0 and ckpt.temperature != 1.0 and ckpt.calibration["fitted"]
    assert metrics["calibration"]["temperature"] == ckpt.temperature
    assert metrics["calibration"]["epoch"] == trained_run.best_epoch
    assert metrics["calibration"]["val_nll_calibrated"] <= metrics["calibration"]["val_nll"]
    loaded, logits, y = val_logits_of(out / "best.pt", image_tree, tmp_path / "cache", out / "split.json")
    assert loaded.temperature == ckpt.temperature
    fit = fit_temperature(logits, y)  # the best checkpoint's val logits
    assert fit.temperature == pytest.approx(ckpt.temperature, rel=1e-2)
    # the recorded validation figures are the uncalibrated model's, and the calibration's NLL is the same quantity
    assert scores(logits, y, loaded.classes, loss="ce", label_smoothing=0.0)["loss"] == (
        pytest.approx(trained_run.best["val_loss"], rel=1e-5)
    )
    assert fit.val_nll == pytest.approx(trained_run.best["val_loss"], rel=1e-5)

    files = sorted((image_tree / "green").iterdir())[:3]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    expected = (loaded.view_logits(images)[0] / ckpt.temperature).softmax(1)
    assert torch.allclose(loaded.probabilities(images), expected, atol=1e-6)
    predicted = predict_files(out / "best.pt", files, top=3, device="cpu")
    for row, probs in zip(predicted, expected):
        assert row["top"][0]["probability"] == pytest.approx(probs.max().item(), abs=1e-6)
        assert row["top"][0]["class"] == loaded.classes[probs.argmax().item()]

    old = torch.load(out / "best.pt", weights_only=True)
    del old["temperature"]  # a checkpoint written before calibration
    torch.save(old, tmp_path / "old.pt")
    assert Checkpoint.load(tmp_path / "old.pt").temperature == 1.0
    raw = loaded.view_logits(images)[0].softmax(1)
    assert torch.allclose(load_checkpoint(tmp_path / "old.pt", "cpu").probabilities(images), raw, atol=1e-6)


def test_each_recorded_epoch_gets_its_own_temperature(calibration_tree, tmp_path):
    image_tree = calibration_tree
    config = tiny_config(image_tree, tmp_path / "cache", head="linear", lr=1e-2, epochs=3, record_epochs=[1],
                         val_fraction=0.3)  # fmt: skip
    result = run_training(config, tmp_path / "run", log=quiet)
    recorded = tmp_path / "run" / "best-epoch1.pt"
    loaded, logits, y = val_logits_of(recorded, image_tree, tmp_path / "cache", tmp_path / "run" / "split.json")
    assert loaded.info["epoch"] == 1
    assert loaded.temperature == pytest.approx(fit_temperature(logits, y).temperature, rel=1e-2)
    final, logits, y = val_logits_of(tmp_path / "run" / "best.pt", image_tree, tmp_path / "cache",
                                     tmp_path / "run" / "split.json")  # fmt: skip
    assert final.info["epoch"] == result.best_epoch
    assert final.temperature == pytest.approx(fit_temperature(logits, y).temperature, rel=1e-2)


def test_evaluate_json_reports_raw_and_calibrated_figures_with_unchanged_accuracy(
    calibrated_run, calibration_tree, capsys
):
    trained_run, image_tree = calibrated_run, calibration_tree
    args = ["evaluate", str(trained_run.out_dir / "best.pt"), "--data", str(image_tree), "--device", "cpu"]
    assert main([*args, "--json", "--split", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("temperature", "nll", "nll_calibrated", "ece", "ece_calibrated", "reliability_calibrated"):
        assert key in result
    assert result["temperature"] == Checkpoint.load(trained_run.out_dir / "best.pt").temperature
    assert result["accuracy"] == trained_run.best["val_accuracy"]  # the raw model's, as recorded
    assert result["nll_calibrated"] <= result["nll"] + 1e-6  # T minimises the validation NLL
    assert 0 <= result["ece_calibrated"] <= 1 and 0 <= result["ece"] <= 1

    loaded = load_checkpoint(trained_run.out_dir / "best.pt", "cpu")
    data = load_image_folder(image_tree, trained_run.out_dir.parent / "cache", progress=False)
    raw = loaded.probabilities(data.images, calibrated=False)
    calibrated = loaded.probabilities(data.images)
    assert not torch.allclose(raw, calibrated)
    assert torch.equal(raw.argmax(1), calibrated.argmax(1))
    assert main(args) == 0  # the table says it too
    assert "calibration: ECE" in capsys.readouterr().out


# ---------------------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize(
    "arch, layer, resolution",
    [("squeezenet1_1", "features.12.expand3x3", 32), ("resnet18", "layer4.1.conv2", 32),
     ("squeezenet1_1", "features.12.expand3x3", 64)],
)  # fmt: skip
def test_grad_cam_maps_have_the_image_size_and_lie_in_0_1(arch, layer, resolution):
    from transferlab.engine.preprocess import Preprocess

    torch.manual_seed(0)
    model, _ = build_model(arch, 3, weights="none", head="linear")
    model.eval()
    backbone = get_backbone(arch)
    assert gradcam_layer(model, backbone)[0] == layer
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 36, 3), dtype=np.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps, name, size = grad_cam(model, backbone, Preprocess(backbone.mean, backbone.std, resolution), images, [0, 1, 2])
    assert name == layer and maps.shape == (3, 40, 36) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left as it was
    if resolution == 64:
        assert size == [3, 3] and maps.max() > 0.5  # a map with a place in it
    else:
        assert size == [1, 1]


# ---------------------------------------------------------------------------- a tiny study and its report
@pytest.fixture(scope="module")
def calibrated_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated-study")
    data = make_image_tree(root / "images", per_class=12, size=16)
    spec = write_spec(root / "spec.toml", data, root / "cache", {"strategy": ["full"], "epochs": [2]},
                      head="linear", lr=0.01, batch_size=8)  # fmt: skip
    directory = run_study(spec, study_dir=root / "out")
    return directory, data, root / "cache"


def test_the_selection_records_the_error_analysis(calibrated_study):
    directory, data, cache = calibrated_study
    study = load_study(directory)
    selected = study.user_attrs["selected"]
    assert len(json.dumps(study.user_attrs)) < 200_000
    assert "errors" not in study.user_attrs["test_evaluations"][-1]  # thumbnails stored once
    confusion = np.asarray(selected["confusion_matrix"])
    for i, c in enumerate(selected["classes"]):
        stats = selected["per_class"][c]
        assert stats["support"] == confusion[i].sum()
        if confusion[:, i].sum():
            assert stats["precision"] == pytest.approx(confusion[i, i] / confusion[:, i].sum())
    calibration = selected["calibration"]
    checkpoint = directory / study.trials[selected["trial"]].user_attrs["checkpoint"]
    assert calibration["temperature"] == Checkpoint.load(checkpoint).temperature
    assert (
        sum(calibration["reliability"]["count"])
        == sum(calibration["reliability_calibrated"]["count"])
        == (selected["n_test"])
    )

    # the stored mistakes are the checkpoint's own on the test split, most confident first
    run_dir = checkpoint.parent
    split = Split.from_dict(json.loads((run_dir / "split.json").read_text()))
    test_x, test_y = split_arrays(load_image_folder(data, cache, progress=False), split, "test")
    loaded = load_checkpoint(checkpoint, "cpu")
    raw, calibrated = loaded.probabilities(test_x, calibrated=False), loaded.probabilities(test_x)
    errors = selected["errors"]
    wrong = (raw.argmax(1) != torch.as_tensor(test_y)).sum().item()
    assert errors["n_mistakes"] == wrong == confusion.sum() - confusion.trace() > 0
    mistakes = errors["mistakes"]
    assert len(mistakes) == min(wrong, GALLERY)
    confidences = [m["confidence"] for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    for m in mistakes:
        i = m["index"]
        assert m["true"] == test_y[i] != m["predicted"] == raw[i].argmax().item()
        assert m["confidence"] == pytest.approx(raw[i].max().item(), abs=1e-6)
        assert m["confidence_calibrated"] == pytest.approx(calibrated[i, m["predicted"]].item(), abs=1e-6)
        assert np.array_equal(decode_png(m["thumbnail"]), test_x[i])  # 16 px images are kept as they are
    with_cam = [m for m in mistakes if "gradcam" in m]
    assert len(with_cam) == min(wrong, GRADCAM) and with_cam == mistakes[: len(with_cam)]
    assert decode_png(with_cam[0]["gradcam"]).shape == (16, 16)
    assert errors["gradcam_layer"] == "features.12.expand3x3"


def test_the_report_shows_the_error_analysis_and_calibration(calibrated_study):
    directory, _, _ = calibrated_study
    selected = load_study(directory).user_attrs["selected"]
    md = (directory / "report.md").read_text()
    page = (directory / "report.html").read_text()
    for heading in ("### Error analysis (test split)", "### Calibration (test split)"):
        assert heading in md
    captions = [
        "each row normalised to its true class",
        "most confident mistakes",
        "Grad-CAM of the predicted class",
        "Reliability diagrams",
    ]
    for caption in captions:
        (figure,) = re.findall(rf"!\[[^\]]*{caption}[^\]]*\]\((report_files/figure\d+\.png)\)", md)
        assert (directory / figure).is_file()
        assert re.search(rf"<img src='data:image/png;base64,[A-Za-z0-9+/=]+' alt='[^']*{caption}", page)
    assert "src='http" not in page and 'src="http' not in page

    confusion, classes = selected["confusion_matrix"], selected["classes"]
    for i, (c, v) in enumerate(selected["per_class"].items()):
        # precision of the images predicted as c, recall of its own images: each at the precision its count allows
        predicted = sum(row[i] for row in confusion)
        precision = "-" if v["precision"] is None else percent(confusion[i][i], predicted)
        recall = "-" if v["recall"] is None else percent(confusion[i][i], v["support"])
        assert f"| {c} | {v['support']} | {precision} | {recall} | " in md
    off = sorted(
        ((v, i, j) for i, r in enumerate(confusion) for j, v in enumerate(r) if i != j and v), key=lambda x: -x[0]
    )
    for v, i, j in off[:5]:
        assert f"| {classes[i]} | {classes[j]} | {v} | {percent(v, sum(confusion[i]))} |" in md
    c = selected["calibration"]
    assert f"| ECE (15 bins) | {c['ece']:.4f} | {c['ece_calibrated']:.4f} |" in md
    assert f"| NLL | {c['nll']:.4f} | {c['nll_calibrated']:.4f} |" in md
    shown = "1 (not fitted)" if not c["fit"]["fitted"] else f"{c['temperature']:.3g}"
    assert f"| temperature | 1 | {shown}" in md
    if not c["fit"]["fitted"]:  # a tiny validation split: the report says why T stayed 1
        assert c["fit"]["reason"] in md
    assert "those of the uncalibrated model" in md
    assert f"of {selected['errors']['n_mistakes']} misclassified test images" in md


def test_an_easy_data_set_keeps_t_in_range_and_validation_nll_no_worse(make_tree, tmp_path, capsys):
    """Three clean colours: validation ends perfect, so the fit would run T to its lower bound (every prediction
    1.000, ECE and NLL far worse on new images); T stays 1, the checkpoint and metrics.json say why, evaluate too."""
    tree = make_tree("easy", per_class=60, size=16)
    config = tiny_config(tree, tmp_path / "cache", head="linear", lr=1e-2, epochs=3, val_fraction=0.3)
    result = run_training(config, tmp_path / "run", log=quiet)
    assert result.best["val_accuracy"] == 1.0
    calibration = json.loads((tmp_path / "run" / "metrics.json").read_text())["calibration"]
    low, high = TEMPERATURE_RANGE
    assert low < calibration["temperature"] < high and calibration["val_nll_calibrated"] <= calibration["val_nll"]
    assert calibration == {**calibration, "temperature": 1.0, "fitted": False, "n": 54}
    assert "classified correctly" in calibration["reason"]
    ckpt = Checkpoint.load(tmp_path / "run" / "best.pt")
    assert ckpt.temperature == 1.0 and ckpt.calibration == calibration
    assert main(["evaluate", str(tmp_path / "run" / "best.pt"), "--data", str(tree), "--device", "cpu"]) == 0
    assert "not fitted: all 54 validation images are classified correctly" in capsys.readouterr().out


@pytest.mark.parametrize("temperature", [float("nan"), 0.0, -1.0, float("inf")])
def test_a_checkpoint_whose_temperature_is_not_a_positive_number_is_refused(trained_run, tmp_path, temperature, capsys):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    raw["temperature"] = temperature
    torch.save(raw, tmp_path / "bad.pt")
    assert main(["predict", str(tmp_path / "bad.pt"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "temperature" in err and "Traceback" not in err
