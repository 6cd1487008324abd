"""Checkpoints: safetensors weights, a clear error for foreign or corrupt ones, a crash mid-save
keeps the previous checkpoint."""
import json
import os

import pytest

from .helpers import losses, train

from fastcl.trainers import engine  # noqa: E402


def latest(run):
    with open(os.path.join(run, "checkpoints", "latest")) as f:
        return os.path.join(run, "checkpoints", f.read().strip())


def test_checkpoint_holds_safetensors_weights_and_json_state(tmp_path):
    assert train("simcse", tmp_path, "--steps", "2") == 0
    directory = latest(str(tmp_path))
    assert os.path.isfile(os.path.join(directory, "model.safetensors"))
    state = json.load(open(os.path.join(directory, "trainer_state.json")))
    assert state["format"] == engine.CHECKPOINT_FORMAT and state["step"] == 2 and state["method"] == "simcse"


@pytest.mark.parametrize("damage, message", [
    ("other_method", "a checkpoint of method 'simcse', not 'dpr'"),
    ("corrupt_weights", "could not load the checkpoint"),
    ("no_state", "not a fastcl trainer checkpoint"),
    ("foreign_state", "not a fastcl trainer checkpoint"),
    ("other_batch", "--batch-size"),
])
def test_resume_refuses_foreign_or_corrupt_checkpoints(damage, message, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train("simcse", run, "--steps", "2") == 0
    directory = latest(run)
    method, extra = "simcse", []
    if damage == "other_method":
        method = "dpr"
    elif damage == "corrupt_weights":
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"\x00garbage, not a safetensors file" * 10)
    elif damage == "no_state":
        os.remove(os.path.join(directory, "trainer_state.json"))
    elif damage == "foreign_state":
        with open(os.path.join(directory, "trainer_state.json"), "w") as f:
            json.dump({"format": "something else"}, f)
    elif damage == "other_batch":
        extra = ["--batch-size", "16"]
    code = train(method, tmp_path / "again", "--steps", "2", "--resume", directory, *extra)
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    run = str(tmp_path / "run")
    original = Accelerator.save_state
    calls = []

    def crashing(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            original(self, output_dir, **kwargs)  # half written, then the crash
            raise KeyboardInterrupt("power cut")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", crashing)
    assert train("simcse", run, "--steps", "4", "--save-every", "2", "--lr", "1e-3") == 130  # no traceback
    monkeypatch.setattr(Accelerator, "save_state", original)
    assert latest(run).endswith("step-00000002")
    assert train("simcse", run, "--steps", "4", "--lr", "1e-3", "--resume", run) == 0
    assert train("simcse", tmp_path / "full", "--steps", "4", "--lr", "1e-3") == 0
    assert losses(run) == losses(tmp_path / "full")


@pytest.mark.parametrize("argv", [["--steps", "5", "--lr", "0.5"], ["--batch-size", "16"]], ids=["steps", "batch"])
def test_a_refused_resume_writes_nothing(argv, tmp_path):
    """Resuming into the run itself with options the checkpoint refuses leaves its config.json,
    log.jsonl and checkpoint exactly as they were."""
    run = tmp_path / "run"
    assert train("simcse", run, "--steps", "2") == 0
    before = {name: (run / name).read_bytes() for name in ("config.json", "log.jsonl")}
    assert train("simcse", run, "--resume", str(run), *argv) == 2
    assert {name: (run / name).read_bytes() for name in before} == before


def test_resuming_as_another_method_creates_no_run(tmp_path):
    run = tmp_path / "run"
    assert train("simcse", run, "--steps", "2") == 0
    assert train("dpr", tmp_path / "other", "--resume", str(run)) == 2
    assert not (tmp_path / "other").exists()
