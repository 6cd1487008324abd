"""A run owns its directory: refused reuse, --overwrite, --resume DIR continuing in DIR, default
fresh directories, checks before any write; interruption by SIGINT / SIGTERM and a diverged
loss leave a checkpoint whose resumed log equals the uninterrupted run's, for every method."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .helpers import ROOT, TINY, losses, main, metrics, torchrun
from .test_recommendation import SYNTHETIC as RECOMMENDATION_TINY
from .test_vision_distributed import TINY as PS3_TINY
from .test_vision_methods import TINY as VISION_TINY

from fastcl.trainers import METHODS, load_method  # noqa: E402

# every method at a size that runs in about a second (synthetic data, no evaluation): the sizes
# the other trainer tests use
QUICK = {
    **{name: ["--data", "synthetic", *options] for name, options in TINY.items()},
    **{name: ["--data", "synthetic", *[arg for key, value in VISION_TINY[name][1].items()
                                       for arg in (f"--{key.replace('_', '-')}", str(value))]]
       for name in ("simclr", "clip")},
    "ps3": PS3_TINY[:-4],  # without its --steps and --lr
    "cml": ["--data", "synthetic", *RECOMMENDATION_TINY["cml"]],
    "ccn": ["--data", "synthetic", *RECOMMENDATION_TINY["ccn"], "--ablation", "false"],
}
STEPS = ["--steps", "5", "--lr", "1e-3", "--warmup-steps", "2", "--skip-eval"]


def run(method, out, *extra):
    return main([method, *QUICK[method], *STEPS, "--out", str(out), *extra])


def records(out):
    """log.jsonl without the wall-clock fields (the rest must be equal: step, loss, lr, stage)."""
    with open(os.path.join(str(out), "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "samples_per_s")} for line in f]


def snapshot(directory):
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


# -- run directories -------------------------------------------------------------------------------
def test_the_resume_hint_continues_the_run_in_its_own_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run("simcse", "mine", "--stop-after", "2") == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.endswith("python -m fastcl.trainers simcse --resume mine"), hint
    assert main(["simcse", *QUICK["simcse"], *STEPS, "--resume", "mine"]) == 0  # no --out: continues in mine/
    assert run("simcse", "full") == 0
    assert records("mine") == records("full") and len(records("mine")) == 5
    assert os.path.isfile("mine/metrics.json") and not os.path.exists("runs")


def test_a_new_run_in_a_used_directory_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("simcse", out, "--seed", "1") == 0
    before = snapshot(out)
    assert run("simcse", out) == 2
    error = capsys.readouterr().err
    assert "--out" in error and "already holds a run" in error and "--overwrite" in error and "--resume" in error
    assert snapshot(out) == before  # nothing touched
    (out / "notes.txt").write_text("mine")  # a file the run did not write survives --overwrite
    assert run("simcse", out, "--overwrite") == 0
    assert run("simcse", tmp_path / "fresh") == 0
    assert records(out) == records(tmp_path / "fresh")  # the old run's lines are gone
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000005"]


def test_overwrite_never_deletes_through_a_link_out_of_the_run(tmp_path):
    """A run directory whose checkpoints/ is a link to another directory: --overwrite removes the
    link, never what it points to."""
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    os.symlink(outside, out / "checkpoints")
    assert run("simcse", out, "--overwrite") == 0
    assert (outside / "data.bin").read_bytes() == b"keep" and os.listdir(outside) == ["data.bin"]
    assert not os.path.islink(out / "checkpoints") and len(records(out)) == 5


def test_overwrite_cannot_delete_the_run_it_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("simcse", out, "--stop-after", "2") == 0
    before = snapshot(out)
    assert run("simcse", out, "--resume", str(out), "--overwrite") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == before


def test_without_out_every_run_gets_a_fresh_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["simcse", *QUICK["simcse"], "--steps", "1", "--skip-eval"]) == 0
    runs = sorted(os.listdir(tmp_path / "runs" / "simcse"))
    assert len(runs) == 2 and all(os.path.isfile(tmp_path / "runs" / "simcse" / r / "log.jsonl") for r in runs)


def test_resume_into_another_directory_leaves_the_original_as_it_was(tmp_path):
    assert run("simcse", tmp_path / "part", "--stop-after", "2") == 0
    before = snapshot(tmp_path / "part")
    assert run("simcse", tmp_path / "other", "--resume", str(tmp_path / "part")) == 0
    assert run("simcse", tmp_path / "full") == 0
    assert records(tmp_path / "other") == records(tmp_path / "full")
    assert snapshot(tmp_path / "part") == before


@pytest.mark.parametrize("kind", ["file", "below a file", "unwritable"])
def test_an_unusable_out_is_refused_before_the_data_and_model_are_built(kind, tmp_path, monkeypatch, capsys):
    module = load_method("simcse")
    monkeypatch.setattr(module, "build", lambda config: pytest.fail("built before --out was checked"))
    (tmp_path / "file").write_text("x")
    out = {"file": tmp_path / "file", "below a file": tmp_path / "file" / "run", "unwritable": "/proc/self/fastcl-run"}[kind]
    assert run("simcse", out) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --out") and "Traceback" not in error and len(error.splitlines()) == 1, error
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_negative_seed_is_refused_naming_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("simcse", tmp_path / "out", "--seed", "-1")
    assert exit_info.value.code == 2
    assert "--seed must be an integer in [0, 2^32)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resuming_a_finished_run_keeps_its_timing_and_results(tmp_path):
    out = tmp_path / "run"
    assert run("simcse", out) == 0
    first = metrics(out)
    assert run("simcse", out, "--resume", str(out)) == 0
    again = metrics(out)
    assert again["train"] == first["train"] and again["train"]["steps_run"] == 5
    assert again["final_train_loss"] == first["final_train_loss"] == losses(out)[-1]
    assert again["loss_implementation"] == "fused"


# -- interruption ----------------------------------------------------------------------------------
def _signal_at(monkeypatch, method, step, signum):
    """The method's after_step (called once per finished step) sends ``signum`` to this process at ``step``."""
    module = load_method(method)
    original = module.build
    count = [0]

    def build(config):
        built = original(config)
        inner = built.after_step

        def after_step(model):
            if inner is not None:
                inner(model)
            count[0] += 1
            if count[0] == step:
                os.kill(os.getpid(), signum)

        built.after_step = after_step
        return built

    monkeypatch.setattr(module, "build", build)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigterm_checkpoints_and_the_resumed_log_equals_the_uninterrupted(method, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _signal_at(patch, method, 3, signal.SIGTERM)
        assert run(method, tmp_path / "run") == 128 + signal.SIGTERM
    error = capsys.readouterr().err
    assert f"SIGTERM: stopped after step 3 with a checkpoint; continue with python -m fastcl.trainers {method} --resume" in error
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", "step-00000003"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert run(method, tmp_path / "run", "--resume", str(tmp_path / "run")) == 0
    assert run(method, tmp_path / "full") == 0
    assert records(tmp_path / "run") == records(tmp_path / "full")


def test_sigint_at_the_last_step_and_with_skip_save_still_checkpoints(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _signal_at(patch, "simcse", 5, signal.SIGINT)
        assert run("simcse", tmp_path / "run", "--skip-save") == 130
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", "step-00000005"]
    assert run("simcse", tmp_path / "run", "--resume", str(tmp_path / "run")) == 0  # evaluates and writes the results
    assert metrics(tmp_path / "run")["train"]["steps_run"] == 5


def _signal_once_logged(process, log, lines: int, signum: int, timeout: float) -> str:
    """Send ``signum`` once ``log`` holds ``lines`` steps (the handlers are installed by then);
    the process's stderr when it has exited."""
    try:
        while not (log.exists() and len(log.read_text().splitlines()) >= lines) and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signum)
        return process.communicate(timeout=timeout)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_a_real_sigint_in_a_separate_process(tmp_path):
    """Ctrl-C as a terminal sends it: the process finishes its step, writes a checkpoint, exits 130
    with the resume command and no traceback; the resumed run equals the uninterrupted one (all
    three runs one thread each: the same rounding)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(*extra):
        return [sys.executable, "-m", "fastcl.trainers", "simcse", *QUICK["simcse"], "--steps", "100", "--lr", "1e-3",
                "--skip-eval", *extra]

    process = subprocess.Popen(command("--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=env, start_new_session=True)
    log = out / "log.jsonl"
    stderr = _signal_once_logged(process, log, 3, signal.SIGINT, timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "--resume" in stderr.splitlines()[-1]
    done = len(log.read_text().splitlines())
    assert 3 <= done < 100
    assert f"step-{done:08d}" in os.listdir(out / "checkpoints")
    for extra in (["--resume", str(out)], ["--out", str(tmp_path / "full")]):
        finished = subprocess.run(command(*extra), capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert finished.returncode == 0, finished.stderr[-2000:]
    assert records(out) == records(tmp_path / "full")


def test_a_second_signal_exits_at_once(tmp_path):
    script = ("import os, signal, sys\n"
              "from fastcl.trainers.engine import StopSignals\n"
              "with StopSignals() as signals:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('asked to stop:', signals.received == signal.SIGTERM, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('still running', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == -signal.SIGTERM
    assert done.stdout == "asked to stop: True\n"


def test_a_non_finite_loss_refuses_the_update_keeps_the_last_good_state_and_resumes(tmp_path, monkeypatch, capsys):
    module = load_method("simcse")
    original = module.build

    def build(config):
        built = original(config)
        loss, calls = built.representation_loss, [0]

        def poisoned(*representations, **kwargs):
            calls[0] += 1
            value = loss(*representations, **kwargs)
            return value * float("nan") if calls[0] == 4 else value

        built.representation_loss = poisoned
        return built

    with monkeypatch.context() as patch:
        patch.setattr(module, "build", build)
        assert run("simcse", tmp_path / "run") == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert errors[0].startswith("error: step 4: the loss is nan; the state after step 3 is saved") and "--resume" in errors[0]
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]
    assert run("simcse", tmp_path / "run", "--resume", str(tmp_path / "run")) == 0
    assert run("simcse", tmp_path / "full") == 0
    assert records(tmp_path / "run") == records(tmp_path / "full")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method", ["simcse", "ps3"])
def test_sigterm_under_torchrun_resumes_to_the_uninterrupted_log(method, tmp_path):
    """torchrun forwards SIGTERM to both workers; every rank stops after the same step (the stop
    request is all-reduced), rank 0 writes the checkpoint; the resumed 2-process run's log
    equals an uninterrupted 2-process run's."""
    out = tmp_path / "run"
    common = [*QUICK[method], "--steps", "300" if method == "simcse" else "40", "--lr", "1e-3", "--skip-eval"]
    if method == "simcse":
        common += ["--dropout", "0"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastcl.trainers", method, *common, "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True)
    log = out / "log.jsonl"
    stderr = _signal_once_logged(process, log, 2, signal.SIGTERM, timeout=240)
    done = len(log.read_text().splitlines())
    assert f"step-{done:08d}" in os.listdir(out / "checkpoints"), stderr[-3000:]
    assert stderr.count("SIGTERM: stopped after step") == 1, stderr[-3000:]  # rank 0 says it, once
    torchrun(method, *common, "--resume", str(out), timeout=600)
    torchrun(method, *common, "--out", str(tmp_path / "full"), timeout=600)
    assert records(out) == records(tmp_path / "full")


def test_errors_are_printed_once_under_torchrun(tmp_path):
    (tmp_path / "file").write_text("x")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastcl.trainers", "simcse", *QUICK["simcse"], "--out", str(tmp_path / "file")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("error: --out") == 1, done.stderr[-2000:]
