"""A user's mistakes at the command line: exit 2, one line on stderr naming the key, path or file, no traceback,
and nothing written (no config.yaml, no output directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_pretrain_stores, tiny_model_overrides

from engine import finetune, pretrain

D = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return build_pretrain_stores(tmp_path_factory.mktemp("cli_stores"), D)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory: whatever a failed command writes shows up here."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def one_line_error(capsys, *expected: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err + captured.out
    for text in expected:
        assert text in err, (text, err)
    return err


def test_pretrain_without_arguments_names_the_missing_store(workdir):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lxmert-pretrain")], capture_output=True, text=True, cwd=workdir, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "data.train.features is empty" in proc.stderr and "--config" in proc.stderr
    assert list(workdir.iterdir()) == []


def test_pretrain_store_mistakes(stores, workdir, capsys):
    text, feats = stores
    base = [*tiny_model_overrides(text, D), "data.num_workers=0", "train.batch_size=4", "train.output_dir=out"]
    cases = [
        (
            [f"data.train.text={text}", "data.train.features=nowhere/feats"],
            ("data.train.features: the feature store nowhere/feats does not exist", "engine.data.convert --tsv"),
        ),
        (
            [f"data.train.text={workdir / 'missing'}", f"data.train.features={feats}"],
            ("data.train.text: the text store", "does not exist"),
        ),
        (
            [f"data.train.text={feats}", f"data.train.features={feats}"],  # a feature store where text belongs
            ("data.train.text:", "expected 'lxmert-text-store'"),
        ),
        (
            [
                f"data.train.text={text}",
                f"data.train.features={feats}",
                f"data.eval.text={text}",
                "data.eval.features=nowhere",
            ],
            ("data.eval.features: the feature store nowhere does not exist",),
        ),
        (
            [f"data.train.text={text}", f"data.train.features={feats}", "data.sources=[visual7w]"],
            ("data.sources: ['visual7w'] are not in the data.train.text store",),
        ),
        (
            [f"data.train.text={text}", f"data.train.features={feats}", "model.visual_feat_dim=20"],
            ("holds 16-d features but model.visual_feat_dim is 20",),
        ),
        (
            [f"data.train.text={text}", f"data.train.features={feats}", "model.num_qa_labels=9500"],
            ("answers but the QA head has model.num_qa_labels 9500",),
        ),
        (
            [f"data.train.text={text}", f"data.train.features={feats}", "train.resume=nowhere/step_1"],
            ("train.resume nowhere/step_1: no complete checkpoint there",),
        ),
        ([f"data.train.text={text}", f"data.train.features={feats}", "train.task=vqa"], ("lxmert-finetune",)),
    ]
    for extra, expected in cases:
        assert pretrain.main([*base, *extra]) == 2, extra
        one_line_error(capsys, "lxmert-pretrain: error: ", *expected)
        assert list(workdir.iterdir()) == [], extra  # not even config.yaml
    assert pretrain.main(["--config", "nothere.yaml"]) == 2
    one_line_error(capsys, "cannot read config nothere.yaml")


def test_finetune_mistakes(workdir, capsys):
    assert finetune.main(["--config", str(Path(__file__).parents[1] / "configs/vqa.yaml")]) == 2
    one_line_error(capsys, "train.init_from runs/pretrain/model.safetensors does not exist")
    assert finetune.main(["train.task=vqa", "--from-scratch"]) == 2
    one_line_error(capsys, "data.train.features is empty")
    assert list(workdir.iterdir()) == []
