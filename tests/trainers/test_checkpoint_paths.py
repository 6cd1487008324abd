"""A crafted checkpoints/latest can neither point a resume nor a deletion outside the run."""
import os

import pytest

pytest.importorskip("accelerate", reason="the trainers extra is not installed")

from fastcl.trainers import engine  # noqa: E402


class _Accelerator:
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, directory, safe_serialization=True):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "model.safetensors"), "w") as f:
            f.write("weights")


@pytest.mark.parametrize("crafted", ["../../victim", "..", ".", "/absolute/victim", "step-1/../../victim"])
def test_crafted_latest_deletes_nothing_outside_the_checkpoints(tmp_path, crafted):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    run = tmp_path / "p" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(crafted.replace("/absolute", str(tmp_path)))
    final = engine.save_checkpoint(_Accelerator(), str(run), {"step": 2})
    assert (victim / "keep.txt").read_text() == "mine"
    assert os.path.isfile(os.path.join(final, engine.STATE_FILE))  # the new checkpoint survives its own save
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002"
    assert engine.resolve_checkpoint(str(run)) == final


def test_resume_through_a_crafted_latest_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / engine.STATE_FILE).write_text("{}")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("../../outside")
    with pytest.raises(engine.CheckpointError, match="not a fastcl trainer checkpoint"):
        engine.resolve_checkpoint(str(run))


def test_the_previous_checkpoint_is_replaced(tmp_path):
    run = tmp_path / "run"
    first = engine.save_checkpoint(_Accelerator(), str(run), {"step": 1})
    second = engine.save_checkpoint(_Accelerator(), str(run), {"step": 2})
    assert not os.path.exists(first) and os.path.isdir(second)
