"""Calibration: a temperature fitted on validation logits, ECE, and the temperature stored
in the checkpoint and used by evaluate, predict, load_model and export."""

import json
import math

import pytest
import torch

from finetune.config.validation import validate
from finetune.errors import ConfigError
from finetune.run import run
from finetune.state.files import load_safe
from finetune.use.calibration import expected_calibration_error, fit_temperature
from finetune.use.export import describe
from finetune.use.load import load_model

from conftest import FAST, make_config


def test_ece_matches_a_hand_computed_case():
    # confidences 0.95, 0.95 (bin 15 of 15; one right: accuracy 0.5) and 0.55, 0.55 (bin 9;
    # both right): each bin's gap is 0.45, each holds half the images
    probabilities = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1])
    error, table = expected_calibration_error(probabilities, labels, bins=15)
    assert error == pytest.approx(0.45)
    assert [(row["images"], row["accuracy"]) for row in table] == [(2, 1.0), (2, 0.5)]
    assert table[1]["low"] == pytest.approx(14 / 15)


def test_the_fitted_temperature_matches_the_closed_form():
    # every image has logits [4, 0] and 3 of 4 are class 0: the NLL is lowest where
    # softmax(logits / T)[0] = 0.75, that is 4 / T = ln 3
    logits = torch.tensor([[4.0, 0.0]]).repeat(400, 1)
    labels = torch.tensor([0, 0, 0, 1]).repeat(100)
    assert fit_temperature(logits, labels) == pytest.approx(4 / math.log(3), rel=1e-4)


@pytest.mark.slow
def test_a_calibrated_checkpoint_predicts_with_its_temperature(tmp_path):
    run(make_config(*FAST, "calibrate=true", "plots=true"),
        str(tmp_path / "run"))
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    scores = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert (tmp_path / "run" / "reliability.png").is_file()
    temperature = load_safe(str(best))["calibration"]["temperature"]
    assert temperature == scores["temperature"] > 0
    assert scores["nll_after"] <= scores["nll_before"]  # what the temperature minimizes

    model = load_model(str(best))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = (model.net(images) / temperature).softmax(dim=1)
    assert torch.allclose(model.predict(images)[1], expected, atol=1e-6)

    run(make_config(*FAST, "mode=evaluate", f"checkpoint={best}"), str(tmp_path / "evaluated"))
    result = json.loads((tmp_path / "evaluated" / "evaluation.json").read_text())
    assert result["calibration"]["temperature"] == temperature
    assert result["loss"] == pytest.approx(scores["nll_after"], rel=1e-5)  # the calibrated loss

    exporting = make_config(*FAST, "mode=export", f"checkpoint={best}")  # model.json's entry
    assert describe(exporting, model, "model.onnx")["temperature"] == temperature


def test_a_damaged_temperature_and_multi_label_data_are_refused(tmp_path):
    run(make_config(*FAST), str(tmp_path / "run"))
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    state = load_safe(str(best))
    state["calibration"] = {"temperature": -1.0}
    torch.save(state, best)
    with pytest.raises(ConfigError, match="its calibration entry is not a positive temperature"):
        load_model(str(best))
    with pytest.raises(ConfigError, match="calibrate=True is not valid: temperature scaling"):
        validate(make_config("data=csv", "data.file=labels.csv", "data.label_delimiter=' '",
                             "calibrate=true"))
