"""The whole-model training benchmark (zeroskip.bench.train) on a tiny model: the losses are
checked, every conv layer's operators are found in the profile, tuning runs in a database of
its own, and the report renders."""
from __future__ import annotations

import json

import pytest
import torch

from zeroskip.bench import train
from zeroskip.models import CifarResNet
from zeroskip.runtime import tuning

TINY = train.TrainModel("tiny-resnet", "a tiny ResNet", lambda: CifarResNet((4, 8)), batch=2,
                        size=8)


@pytest.fixture(autouse=True)
def own_database(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSKIP_TUNING_DB", str(tmp_path / "user-tuning.json"))
    tuning.reset()
    yield
    tuning.reset()


def test_tiny_model_untuned_and_tuned(tmp_path):
    rows = train.run_model(TINY, steps=3, repeats=1, min_time=0.001, profile_steps=1,
                           tune=True)
    assert [r.tuned for r in rows] == [False, True]
    for row in rows:
        assert row.loss_error <= max(train.LOSS_RTOL, 2 * row.loss_drift)
        assert len(row.losses_torch) == 3 and row.loss_drift >= 0
        assert row.losses_torch[0] != row.losses_torch[-1]          # it trained
        # stem, two convs per block, one projection: 6 convs, 5 with an input gradient
        names = [n for layer in row.layers for n in layer.names]
        assert len(names) == 6 and "stem.0" in names
        assert row.kernel_calls + row.torch_choices == 6 + 6 + 5
        for layer in row.layers:
            assert layer.torch_ms["forward"] > 0 and layer.torch_ms["backward"] > 0
            assert layer.zeroskip_ms["forward"] > 0 and layer.zeroskip_ms["grad_weight"] > 0
            assert ("grad_input" in layer.zeroskip_ms) == (layer.names != ["stem.0"])
            assert 0 < layer.density <= 1 and 0 < layer.grad_density <= 1
    assert rows[0].torch_choices == 0                      # untuned: generated kernels only
    # The tuning went to the run's own database, not the user's.
    assert not (tmp_path / "user-tuning.json").exists()
    report = train.TrainReport(rows, {"date": "2026-11-30T00:00:00", "cpu": "cpu", "threads": 1,
                                      "torch": torch.__version__, "zeroskip": "0"})
    text = train.markdown(report)
    assert "| tiny-resnet | 2 | untuned |" in text and "| tiny-resnet | 2 | tuned |" in text
    assert json.loads(json.dumps(report.to_json()))["train"][1]["tuned"] is True
    assert train.plot(report, tmp_path / "train.png").stat().st_size > 0


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        train.run_train(["alexnet"])


def test_gradient_densities_see_the_relu_mask():
    """A conv followed by a ReLU gets an output gradient about as sparse as the ReLU's output
    (and sparser after a max-pool); one followed by BatchNorm a dense one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 3))
    data = (torch.randn(4, 3, 8, 8), torch.randint(3, (4,)))
    found = train.gradient_densities(model, data)
    assert set(found) == {"0", "3"}
    assert found["0"] < 0.3 and found["3"] == 1.0


@pytest.mark.parametrize("name, density", [("vgg", 0.2), ("cifar-resnet", 0.4)])
def test_trained_like_densities(name, density):
    """Each ReLU's bias shift puts its share of non-zeros where trained networks have it: the
    first at 0.5, the rest at the model's figure; the conv layers' inputs show it (behind a
    max-pool the density rises, as in trained VGGs)."""
    model = train.MODELS[name]
    x = train.synthetic_data(model, 4)[0][0]
    torch.manual_seed(0)
    net = model.build()
    reached = train.trained_like(net, x, density)
    assert reached[0] == pytest.approx(train.FIRST_RELU_DENSITY, abs=0.01)
    assert reached[1:] == pytest.approx([density] * (len(reached) - 1), abs=0.01)
    from zeroskip.trace import trace_specs
    inputs = [w.density for _, _, w in trace_specs(net, x)]
    assert inputs[0] == 1.0                                # the image
    assert all(density - 0.02 <= d <= 0.6 for d in inputs[1:])
    assert min(inputs[1:]) == pytest.approx(density, abs=0.02)


def test_trained_like_row_is_marked(tmp_path):
    rows = train.run_model(TINY, steps=2, repeats=1, min_time=0.001, profile_steps=1,
                           trained=True)
    assert rows[0].trained and rows[0].loss_error <= max(train.LOSS_RTOL,
                                                         2 * rows[0].loss_drift)
    # Behind the first ReLU 0.5, behind the others 0.4 (the model's figure), as traced.
    seen = sorted(layer.density for layer in rows[0].layers if layer.names != ["stem.0"])
    assert seen[0] <= 0.45 and seen[-1] <= 0.55
    report = train.TrainReport(rows, {"date": "2026-12-06T00:00:00", "cpu": "cpu", "threads": 1,
                                      "torch": torch.__version__, "zeroskip": "0"})
    assert "| tiny-resnet | 2 | untuned, trained-like |" in train.markdown(report)
    with pytest.raises(ValueError, match="densities"):
        train.run_train(["vgg"], densities=("final",))


def test_tiny_model_tuned_online(tmp_path):
    """The online row trains from an empty database with autotuning in the loop: its first
    step tunes every operator (forward and gradients), later steps tune nothing new, the
    losses still agree with torch's, and the report shows the tuning."""
    from zeroskip.runtime import online
    rows = train.run_model(TINY, steps=3, repeats=1, min_time=0.001, profile_steps=1,
                           online=True)
    assert [(r.tuned, r.online) for r in rows] == [(False, False), (True, True)]
    row = rows[1]
    assert row.loss_error <= max(train.LOSS_RTOL, 2 * row.loss_drift)
    # 6 convs, some of one shape (their operators share records), 5 with an input gradient
    assert 6 <= row.tuned_cases <= 2 * (6 + 6 + 5) and row.tuning_s > 0
    assert len(row.first_steps_ms) == 3
    assert max(row.first_steps_ms) == row.first_steps_ms[0]  # the first step tunes most
    assert online._mode == [None]                           # restored
    assert not (tmp_path / "user-tuning.json").exists()
    report = train.TrainReport(rows, {"date": "2026-12-06T00:00:00", "cpu": "cpu", "threads": 1,
                                      "torch": torch.__version__, "zeroskip": "0"})
    text = train.markdown(report)
    assert "| tiny-resnet | 2 | tuned online |" in text and "| cases tuned |" in text
