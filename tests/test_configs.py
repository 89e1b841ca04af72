"""Every shipped YAML config loads, names a real preset and resolves to a valid model."""
from pathlib import Path

import pytest

from hyperloop_lm.train.config import TrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = TrainConfig.load(path)
    model = cfg.model_config(vocab_size=32000)
    assert model.unrolled_depth >= 1 and cfg.steps >= 1


def test_there_are_configs():
    assert len(CONFIGS) >= 4
