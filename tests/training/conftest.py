import copy

import pytest

import trustseg.training.loop as loop

from trustseg.training import config_from_dict

# Tiny synthetic runs: 32x32 scenes, a 2-level U-Net of width 4.
TINY = {
    "seed": 3,
    "batch_size": 4,
    "steps": 8,
    "log_every": 1,
    "data": {"train": "synthetic#size=32,num_images=12,cache=true", "val": "synthetic#split=val,size=32,num_images=6",
             "crop": [32, 32], "val_batch_size": 3},
    "model": {"name": "unet", "options": {"base_width": 4, "depth": 2}},
    "optim": {"lr": 0.01},
    "schedule": {"warmup_steps": 2},
}




@pytest.fixture
def tiny_values():
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_config(tmp_path):
    def make(*overrides: str, out: str = "run"):
        return config_from_dict(TINY, [f"out={tmp_path / out}", *overrides])

    return make


@pytest.fixture(autouse=True)
def _training_tests_on_one_thread(one_thread):
    """Every training test runs on one thread (see tests/conftest.py)."""


@pytest.fixture
def first_step(monkeypatch):
    """Records the first training step's input batch and a copy of the model as it was before it."""
    seen: dict = {}
    original = loop._Run._train_step

    def spy(run, images, masks):
        if not seen:
            seen.update(images=images.clone(), masks=masks.clone(), model=copy.deepcopy(run.model))
        return original(run, images, masks)

    monkeypatch.setattr(loop._Run, "_train_step", spy)
    return seen


class Interrupted(Exception):
    """A kill right after a checkpoint: the steps after it never happen."""


@pytest.fixture
def train_until_killed(monkeypatch):
    """train(config) stopped right after it writes last.pt at step `step` (as a kill would stop it)."""
    def run(config, step: int) -> None:
        save = loop.save_checkpoint

        def save_then_stop(checkpoint, path):
            save(checkpoint, path)
            if path.name == "last.pt" and checkpoint.training_state["step"] == step:
                raise Interrupted

        with monkeypatch.context() as patch:
            patch.setattr(loop, "save_checkpoint", save_then_stop)
            with pytest.raises(Interrupted):
                loop.train(config, progress=False)

    return run
