"""train.report_to (engine/metrics_log.py): a tiny pre-training run logging to W&B offline sends it the records of
metrics.jsonl and the resolved config of config.yaml, read back from its transaction log with `wandb leet inspect
--json`; a resumed run continues the same W&B run; how a run ends reaches wandb.finish; a tracker that is not
installed or not known stops the run in one line before anything is written; wandb is imported only when asked."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import build_pretrain_stores, tiny_model_overrides

from engine import metrics_log, pretrain
from engine.config import ConfigError, load_config
from engine.metrics_log import WANDB_RUN_ID, MetricsLog, WandbRun, tracker_scalars
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer

D = 16
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return build_pretrain_stores(tmp_path_factory.mktemp("tracker_stores"), D)


def overrides(stores, out: Path, *extra: str) -> list[str]:
    text, feats = stores
    return [
        *tiny_model_overrides(text, D),
        f"data.train.text={text}",
        f"data.train.features={feats}",
        f"data.eval.text={text}",
        f"data.eval.features={feats}",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.epochs=100",
        "train.max_steps=4",
        "train.log_every=1",
        "train.eval_every=2",
        "train.save_every=1000",
        f"train.output_dir={out}",
        *extra,
    ]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, every file of it under tmp_path; its service process is shut down after the test."""
    wandb = pytest.importorskip("wandb", reason="wandb is a dev dependency (pip install -e .[dev])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    yield wandb
    wandb.teardown()


def inspect(run_dir: Path) -> list[dict]:
    """The records of an offline run's transaction log, as `wandb leet inspect --json` prints them."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    proc = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> list[dict]:
    """What each wandb.log call sent (W&B's own _step, _runtime, _timestamp left out)."""
    items = [r["history"]["item"] for r in records if r["type"] == "history"]
    return [{k: v for k, v in item.items() if not k.startswith("_")} for item in items]


def expected(metrics: Path) -> list[dict]:
    """metrics.jsonl's train and eval records as a tracker gets them."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{"step": r["step"], **tracker_scalars(r)} for r in records if r.get("kind", "train") in ("train", "eval")]


def test_wandb_offline_gets_the_records_and_the_config_and_a_resume_continues_the_run(stores, tmp_path, wandb_offline):
    out = tmp_path / "run"
    summary = Trainer(
        load_config(None, overrides(stores, out, "train.report_to=[wandb]")), PretrainTask(), use_deepspeed=False
    ).train()
    assert summary.steps == 4
    run_id = (out / WANDB_RUN_ID).read_text().strip()
    (first,) = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    records = inspect(first)
    logged = history(records)
    assert logged == expected(out / "metrics.jsonl")
    assert {r["step"] for r in logged} == {1, 2, 3, 4} and any("eval/loss" in r for r in logged)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config == yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["report_to"] == ["wandb"]
    assert run["project"] == "lxmert-engine" and run["display_name"] == "run" and run["run_id"] == run_id
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]

    # the same command with more steps resumes the checkpoint of step 4 and the W&B run
    lines_before = len((out / "metrics.jsonl").read_text().splitlines())
    config = load_config(None, overrides(stores, out, "train.report_to=[wandb]", "train.max_steps=6"))
    assert Trainer(config, PretrainTask(), use_deepspeed=False).train().steps == 6
    assert (out / WANDB_RUN_ID).read_text().strip() == run_id
    second = [d for d in (out / "wandb").glob(f"offline-run-*-{run_id}") if d != first]
    assert len(second) == 1  # offline, a resumed run is a second log of the same run id (wandb sync joins them)
    records = inspect(second[0])
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_id"] == run_id
    resumed = (out / "metrics.jsonl").read_text().splitlines()[lines_before:]
    (out / "resumed.jsonl").write_text("".join(line + "\n" for line in resumed))
    assert history(records) == expected(out / "resumed.jsonl") and history(records)[-1]["step"] == 6


def test_tensorboard_and_wandb_together_get_the_same_records(stores, tmp_path, wandb_offline):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (pip install -e .[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    config = load_config(None, overrides(stores, out, "train.report_to=[tensorboard, wandb]", "train.max_steps=2"))
    Trainer(config, PretrainTask(), use_deepspeed=False).train()
    records = expected(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = sorted({tag for r in records for tag in r if tag != "step"})
    assert sorted(events.Tags()["scalars"]) == tags
    for tag in tags:
        sent = [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in records if tag in r]  # TensorBoard keeps fp32
        assert [(e.step, e.value) for e in events.Scalars(tag)] == sent, tag
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert history(inspect(run_dir)) == records


class FakeWandb(types.ModuleType):
    """wandb's calls the engine makes, recorded."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.calls: list[tuple] = []
        self.logs_before_failing: int | None = None  # then wandb.log raises, as with its service process killed

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:
            id = kwargs.get("id") or "fake0001"

            def define_metric(self, name, **options):
                fake.calls.append(("define_metric", name, options))

            def log(self, data):
                if fake.logs_before_failing is not None:
                    if fake.logs_before_failing == 0:
                        raise ConnectionResetError("Connection lost")
                    fake.logs_before_failing -= 1
                fake.calls.append(("log", data))

            def mark_preempting(self):
                fake.calls.append(("mark_preempting",))

            def finish(self, exit_code=None):
                fake.calls.append(("finish", exit_code))

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setattr(metrics_log, "_load_wandb", lambda: (fake, ""))
    return fake


@pytest.mark.parametrize("status", [0, 75, 130, 1])
def test_close_tells_wandb_how_the_run_ended(tmp_path, fake_wandb, status):
    log = MetricsLog(tmp_path, report_to=["wandb"], wandb=WandbRun(config={"train": {"seed": 0}}))
    log.write({"kind": "resume", "step": 2, "checkpoint": "c"})  # metrics.jsonl only
    log.write({"step": 3, "total_steps": 9, "loss": 2.0, "losses": {"mlm": 1.5}, "skipped": False})
    log.write({"kind": "eval", "step": 3, "loss": 2.5})
    log.write({"kind": "stop", "step": 3, "status": 75})  # metrics.jsonl only
    log.close(status)
    (init,) = [c[1] for c in fake_wandb.calls if c[0] == "init"]
    assert init == {
        "project": "lxmert-engine",
        "name": tmp_path.name,
        "dir": str(tmp_path),
        "config": {"train": {"seed": 0}},
        "id": None,
        "resume": None,
    }
    assert [c for c in fake_wandb.calls if c[0] == "log"] == [
        ("log", {"step": 3, "loss": 2.0, "losses/mlm": 1.5}),
        ("log", {"step": 3, "eval/loss": 2.5}),
    ]
    ending = [("mark_preempting",)] if status == 75 else []
    assert fake_wandb.calls[-len(ending) - 1 :] == [*ending, ("finish", status)]
    assert (tmp_path / WANDB_RUN_ID).read_text() == "fake0001\n"
    # a run that resumes a checkpoint continues the kept id (a fresh start, above, got none)
    MetricsLog(tmp_path, report_to=["wandb"], wandb=WandbRun(resume=True)).close()
    inits = [c[1] for c in fake_wandb.calls if c[0] == "init"]
    assert inits[-1]["id"] == "fake0001" and inits[-1]["resume"] == "allow"


def test_a_stopped_run_finishes_its_wandb_run_with_the_stop_status(stores, tmp_path, fake_wandb, monkeypatch):
    def stop_at_2(self, requests, clock, group):
        if self.step < 2:
            return None
        return {"reason": "SIGUSR1", "status": 75, "line": "preempted: checkpoint {checkpoint}"}

    monkeypatch.setattr(Trainer, "_requested_stop", stop_at_2)
    config = load_config(None, overrides(stores, tmp_path / "run", "train.report_to=[wandb]", "train.eval_every=0"))
    summary = Trainer(config, PretrainTask(), use_deepspeed=False).train()
    assert summary.exit_status == 75
    assert [c[1]["step"] for c in fake_wandb.calls if c[0] == "log"] == [1, 2]
    assert fake_wandb.calls[-2:] == [("mark_preempting",), ("finish", 75)]


def test_a_tracker_that_fails_mid_run_is_dropped_in_one_line_and_the_log_goes_on(tmp_path, fake_wandb, capsys):
    fake_wandb.logs_before_failing = 1
    log = MetricsLog(tmp_path, report_to=["wandb"])
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0})
    log.close()
    assert [c[1]["step"] for c in fake_wandb.calls if c[0] == "log"] == [1]
    assert ("finish", 0) not in fake_wandb.calls  # dropped: not called again
    assert (
        capsys.readouterr().out
        == "W&B logging stopped (ConnectionResetError: Connection lost); metrics.jsonl goes on\n"
    )
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_tracker_that_is_not_installed_stops_the_run_before_it_writes(stores, tmp_path, monkeypatch, capsys, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: `import <tracker>` fails
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "run"
    assert pretrain.main(overrides(stores, out, f"train.report_to=[{tracker}]")) == 2
    err = capsys.readouterr().err
    assert err == (
        f"lxmert-pretrain: error: train.report_to: {tracker} is not installed: pip install {tracker} "
        f"(the lxmert-engine[{tracker}] extra), or leave {tracker} out of train.report_to\n"
    )
    assert not out.exists()


def test_a_broken_tracker_install_is_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))  # a package without a version
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError, match=r"^train\.report_to: tensorboard: torch\.utils\.tensorboard did not import"):
        MetricsLog(tmp_path, report_to=["tensorboard"])
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "value, message",
    [
        ("[tensorbord]", "train.report_to[0]: 'tensorbord' is not one of 'tensorboard', 'wandb', 'none'; did you mean"),
        ("[none, wandb]", "train.report_to: none is alone or left out"),
        ("[wandb, wandb]", "train.report_to has duplicates"),
    ],
)
def test_report_to_mistakes_are_config_errors_naming_the_key(value, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"train.report_to={value}"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_report_to_defaults_to_none_and_none_means_none(tmp_path, fake_writer_and_wandb):
    assert load_config(None, []).train.report_to == []
    assert load_config(None, ["train.report_to=[none]"]).train.report_to == ["none"]
    for report_to in ([], ["none"]):
        log = MetricsLog(tmp_path, report_to=report_to)
        log.write({"step": 1, "loss": 1.0})
        log.close()
    assert fake_writer_and_wandb == []
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / WANDB_RUN_ID).exists()


@pytest.fixture
def fake_writer_and_wandb(monkeypatch):
    """Any tracker opened is noted."""
    opened: list[str] = []
    monkeypatch.setattr(metrics_log, "_load_summary_writer", lambda: opened.append("tensorboard") or (None, ""))
    monkeypatch.setattr(metrics_log, "_load_wandb", lambda: opened.append("wandb") or (None, ""))
    return opened


def test_the_engine_imports_wandb_only_when_asked():
    code = "import sys, engine.pretrain, engine.finetune, engine.main; print('wandb' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
