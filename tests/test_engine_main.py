"""The main job (engine/main.py), shortened: tiny model, 40 images, 20 pre-training steps, 2 fine-tuning epochs.

One job runs per module (about 10 s on one core); the tests read what it left in its work dir, rerun it
(reuse, exact resume, refusal, --fresh) and rig the falling-loss check. The last test runs the default job
(about 3.5 minutes): the only proof that matching really learns within it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine import main as job
from engine.data.store import RegionStore, TextStore
from engine.data.tasks import TaskStore
from lxmert.config import LxmertConfig
from lxmert.convert import load_into, read_state_dict
from lxmert.finetune import LxmertForQuestionAnswering
from lxmert.pretraining import LxmertForPreTraining

pytestmark = pytest.mark.slow  # about 20 s, and 3.5 minutes for the default job

STEPS = 20
TINY = [
    "--model",
    "hidden_size=32",
    "--model",
    "num_attention_heads=2",
    "--model",
    "intermediate_size=37",
    "--model",
    "l_layers=1",
]
ARGS = [
    "--steps",
    str(STEPS),
    "--images",
    "40",
    "--batch-size",
    "8",
    "--finetune-epochs",
    "2",
    "--finetune-batch-size",
    "8",
    "--log-every",
    "1",
    "--no-require-matched",
    *TINY,
]
# 20 steps are far too few to learn matching: the default check (matching required) is tested on a rigged log


def run_main(workdir: Path, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = job.main(["--workdir", str(workdir), *ARGS, *extra])
    return code, out.getvalue(), err.getvalue()


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def train_records(path: Path, kind: str = "train") -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r.get("kind", "train") == kind]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    workdir = tmp_path_factory.mktemp("main_job") / "work"
    code, out, err = run_main(workdir)
    return workdir, code, out, err


def report_of(workdir: Path) -> dict:
    return json.loads((workdir / "report.json").read_text())


def test_job_builds_verified_stores_from_the_public_files(ran):
    workdir, code, out, err = ran
    assert code in (0, 1), err
    for name in (
        "lxmert/mscoco_train.json",
        "lxmert/all_ans.json",
        "mscoco_imgfeat/train2014_obj36.tsv",
        "mscoco_imgfeat/val2014_obj36.tsv",
        "vqa/train.json",
        "vqa/minival.json",
    ):
        assert (workdir / "data" / name).is_file(), name
    feats = RegionStore(workdir / "stores/feats")
    assert len(feats) == 40 and feats.feat_dim == job.FEAT_DIM
    for store in (
        feats,
        TextStore(workdir / "stores/text_train"),
        TextStore(workdir / "stores/text_minival"),
        TaskStore(workdir / "stores/vqa_train"),
        TaskStore(workdir / "stores/vqa_minival"),
    ):
        store.verify()
        assert len(store) > 0


def test_the_world_has_places(ran):
    """The job's synthetic world (engine.data.synthetic, places=True): each image's background regions are of
    its place's classes, and every sentence (captions, region descriptions, questions) names the place."""
    from engine.data import formats, synthetic

    workdir, *_ = ran
    records = list(formats.read_tsv(workdir / "data/mscoco_imgfeat/train2014_obj36.tsv", feat_dim=job.FEAT_DIM))
    places = {}
    for r in records:
        backgrounds = {synthetic.OBJECT_NAMES[o] for o in r.objects_id if o >= len(synthetic.OBJECTS)}
        matching = [name for name, _, classes in synthetic.PLACES if backgrounds <= set(classes)]
        assert len(matching) == 1, backgrounds
        places[r.img_id] = matching[0]
    assert len(set(places.values())) == len(synthetic.PLACES)
    entries = list(formats.read_pretrain_entries(workdir / "data/lxmert/mscoco_train.json"))
    assert {e.source for e in entries} == {"mscoco", "vg", "vqa", "gqa"}
    for e in entries:
        preposition = {name: p for name, p, _ in synthetic.PLACES}[places[e.img_id]]
        assert f"{preposition} the {places[e.img_id]}" in e.sentence, e.sentence
    for e in entries:  # only its own: a mismatched pair differs in the place whenever the images' places do
        assert all(f"the {name}" not in e.sentence for name, _, _ in synthetic.PLACES if name != places[e.img_id])
    summary = json.loads((workdir / "data/synthetic.json").read_text())
    assert summary["places_version"] == synthetic.PLACES_VERSION


def test_checkpoint_export_and_fine_tuned_model_load(ran):
    workdir, *_ = ran
    report = report_of(workdir)
    config = LxmertConfig.from_dict(json.loads((workdir / "pretrain/model_config.json").read_text()))
    assert (config.hidden_size, config.l_layers, config.visual_feat_dim) == (32, 1, job.FEAT_DIM)
    exported = LxmertForPreTraining(config)
    load_into(exported, read_state_dict(report["pretrain"]["model"]))
    resumed = LxmertForPreTraining(config)
    resumed.load_state_dict(ckpt.load_plain(report["pretrain"]["checkpoint"])["model"])
    assert Path(report["pretrain"]["checkpoint"]).name == ckpt.tag_of(STEPS)
    for name, tensor in exported.state_dict().items():  # the export is the last checkpoint's weights
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    answers = TaskStore(workdir / "stores/vqa_train").answers
    tuned = LxmertForQuestionAnswering(config, num_answers=len(answers))
    load_into(tuned, read_state_dict(report["finetune"]["model"]))
    submission = json.loads(Path(report["finetune"]["submission"]).read_text())
    assert len(submission) == len(TaskStore(workdir / "stores/vqa_minival"))
    assert {row["answer"] for row in submission} <= set(answers)


def test_report_numbers_are_those_of_the_logs(ran):
    workdir, code, out, err = ran
    report = report_of(workdir)
    pre, fine = report["pretrain"], report["finetune"]

    records = train_records(workdir / "pretrain/metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    k = pre["window"]
    assert k == 2  # a tenth of the 20 logged steps
    for name in ("loss", *job.COMPONENTS):
        values = [r["loss"] if name == "loss" else r["losses"][name] for r in records]
        first, last = sum(values[:k]) / k, sum(values[-k:]) / k
        assert pre["losses"][name]["first"] == pytest.approx(first, rel=1e-12)
        assert pre["losses"][name]["last"] == pytest.approx(last, rel=1e-12)
        fell = last < (1 - job.MIN_FALL) * first and (name != "matched" or last < (1 - job.MIN_FALL) * math.log(2))
        assert pre["losses"][name]["fell"] == fell and pre["losses"][name]["required"] == (name != "matched")
        assert f"{first:9.4f} {last:9.4f}" in out, name
    seconds = sum(8 / r["samples_per_s"] for r in records)  # every window is one step of batch 8
    assert pre["samples_per_s"] == pytest.approx(STEPS * 8 / seconds, rel=1e-9)
    assert f"{pre['samples_per_s']:.1f} samples/s" in out
    evals = train_records(workdir / "pretrain/metrics.jsonl", "eval")
    assert pre["last_eval"]["step"] == STEPS and pre["last_eval"]["loss"] == evals[-1]["loss"]
    assert pre["last_eval"]["matched_accuracy"] == evals[-1]["matched_accuracy"]

    fine_evals = train_records(workdir / "vqa/metrics.jsonl", "eval")
    assert fine["by_epoch"] == [e["metric"] for e in fine_evals] and len(fine_evals) == 2
    assert fine["best"] == max(e["metric"] for e in fine_evals)
    assert f"best {fine['best']:.4f}" in out
    # chance: the best single answer's mean soft score over the eval questions, from the public file
    questions = json.loads((workdir / "data/vqa/minival.json").read_text())
    totals: dict[str, float] = {}
    for q in questions:
        for answer, score in q["label"].items():
            totals[answer] = totals.get(answer, 0.0) + score
    assert fine["chance"] == pytest.approx(max(totals.values()) / len(questions), rel=1e-9)
    assert f"chance {fine['chance']:.4f}" in out
    train = json.loads((workdir / "data/vqa/train.json").read_text())
    by_type: dict[str, dict[str, float]] = {}
    for q in train:
        for answer, score in q["label"].items():
            by_type.setdefault(q["question_type"], {})[answer] = (
                by_type.get(q["question_type"], {}).get(answer, 0) + score
            )
    best = {t: max(a, key=a.get) for t, a in by_type.items()}
    prior = sum(q["label"].get(best.get(q["question_type"], ""), 0.0) for q in questions) / len(questions)
    assert fine["prior"] == pytest.approx(prior, rel=1e-9) and f"prior {prior:.4f}" in out

    for path in (pre["checkpoint"], pre["model"], fine["model"], fine["submission"], *pre["plots"], *fine["plots"]):
        assert Path(path).exists() and str(path) in out
    # the exit status follows the falling-loss check
    assert code == (1 if report["problems"] else 0)
    if report["problems"]:
        assert "FAILED" in out and "did not fall" in err


def test_rerun_reuses_everything(ran):
    workdir, code, out, _ = ran
    before = mtimes(workdir / "data") | mtimes(workdir / "stores")
    logs = {p: (workdir / p).read_text() for p in ("pretrain/metrics.jsonl", "vqa/metrics.jsonl")}
    code2, out2, err2 = run_main(workdir)
    assert code2 == code, err2
    assert mtimes(workdir / "data") | mtimes(workdir / "stores") == before  # nothing regenerated or rebuilt
    assert {p: (workdir / p).read_text() for p in logs} == logs  # nothing trained again
    report = report_of(workdir)
    assert "reused" in report["data"]
    assert report["pretrain"]["steps_this_run"] == 0 and report["finetune"]["steps_this_run"] == 0
    assert "0 of them in this run" in out2


def test_killed_pretraining_resumes_from_its_checkpoint(ran):
    workdir, *_ = ran
    before = report_of(workdir)
    root = ckpt.checkpoint_root(workdir / "pretrain")
    keep = STEPS // 2  # checkpoints every STEPS // 4 steps: step 10 is one
    for tag in (ckpt.tag_of(s) for s in range(keep + 1, STEPS + 1)):
        shutil.rmtree(root / tag, ignore_errors=True)
    (root / ckpt.LATEST).write_text(ckpt.tag_of(keep) + "\n")
    code, out, err = run_main(workdir)
    assert code in (0, 1), err
    report = report_of(workdir)
    assert report["pretrain"]["steps_this_run"] == STEPS - keep and report["pretrain"]["steps"] == STEPS
    # exact resume: the same losses, so the same report numbers, though the log now holds steps 11-20 twice
    assert report["pretrain"]["losses"] == before["pretrain"]["losses"]
    records = train_records(workdir / "pretrain/metrics.jsonl")
    assert len(records) == STEPS + (STEPS - keep)


def test_changed_settings_are_refused_and_fresh_starts_over(ran, tmp_path):
    workdir, *_ = ran
    before = mtimes(workdir)
    code, out, err = run_main(workdir, "--steps", str(STEPS + 5))
    assert code == 2 and "train.max_steps: 20 -> 25" in err and "--fresh" in err
    assert mtimes(workdir) == before
    code, out, err = run_main(workdir, "--images", "50")
    assert code == 2 and "--fresh" in err and mtimes(workdir) == before
    marker = workdir / "data/synthetic.json"  # data of the first places world (no places_version) is not reused
    written = marker.read_text()
    old_world = json.loads(written)
    del old_world["places_version"]
    try:
        marker.write_text(json.dumps(old_world))
        code, out, err = run_main(workdir)
    finally:
        marker.write_text(written)
    assert code == 2 and "'places': 1" in err and "--fresh" in err


def test_fresh_regenerates(tmp_path):
    workdir = tmp_path / "work"
    code, *_ = run_main(workdir, "--steps", "4", "--finetune-epochs", "1")
    assert code in (0, 1)
    tsv = workdir / "data/mscoco_imgfeat/train2014_obj36.tsv"
    stamp = tsv.stat().st_mtime_ns
    os.utime(tsv, ns=(stamp - 10**9, stamp - 10**9))
    code, out, err = run_main(workdir, "--steps", "6", "--finetune-epochs", "1", "--fresh")
    assert code in (0, 1), err
    assert tsv.stat().st_mtime_ns > stamp - 10**9
    assert report_of(workdir)["pretrain"]["steps"] == 6 and "generated" in report_of(workdir)["data"]


def test_falling_check_names_what_did_not_fall():
    good = {name: job.Trend(1.0, 0.5) for name in ("loss", *job.COMPONENTS)}
    assert job.check_falling(good) == []
    rigged = good | {"mlm": job.Trend(2.3026, 2.3020), "feat": job.Trend(0.5, 0.7)}
    del rigged["qa"]
    assert job.check_falling(rigged) == [
        "mlm did not fall by 2%: 2.3026 -> 2.3020",
        "feat did not fall by 2%: 0.5000 -> 0.7000",
        "qa: not logged",
    ]
    assert job.check_falling(good | {"obj": job.Trend(1.0, 0.985)}) != []  # 1.5% is within the noise margin
    assert job.check_falling(good | {"attr": job.Trend(1.0, float("nan"))}) != []
    # matching is required (all five tasks) and must end below chance: falling to it is not learning
    assert "matched" in job.REQUIRED
    flat = good | {"matched": job.Trend(0.7200, 0.6932)}
    assert job.check_falling(flat) == ["matched did not fall below chance (0.6931) by 2%: 0.7200 -> 0.6932"]
    assert job.check_falling(good | {"matched": job.Trend(0.70, 0.60)}) == []
    assert job.check_falling(flat, tuple(n for n in job.REQUIRED if n != "matched")) == []  # --no-require-matched


def test_required_losses_that_do_not_fall_fail_the_job(ran):
    """Exit status and message on rigged logs (the finished run's metrics.jsonl rewritten, then the job rerun:
    nothing is trained, the report is made again): every loss falling passes; feat flat fails; matching flat at
    chance fails by default (--require-matched) and passes with --no-require-matched."""
    workdir, *_ = ran
    log = workdir / "pretrain/metrics.jsonl"
    original = log.read_text()

    def rerun_with(flat: dict[str, float], *extra: str) -> tuple[int, str, str]:
        records = [json.loads(line) for line in original.splitlines()]
        for r in records:
            if r.get("kind", "train") == "train":
                falling = 1.0 - r["step"] / (2 * STEPS)  # 1.0 -> 0.5: every component falls, matched below ln 2
                r["losses"] = {name: flat.get(name, falling) for name in r["losses"]}
                r["loss"] = sum(r["losses"].values())
        try:
            log.write_text("".join(json.dumps(r) + "\n" for r in records))
            return run_main(workdir, *extra)
        finally:
            log.write_text(original)

    code, out, err = rerun_with({}, "--require-matched")
    assert code == 0 and "FAILED" not in out, err
    code, out, err = rerun_with({"feat": 0.5})
    assert code == 1
    assert "feat did not fall by 2%: 0.5000 -> 0.5000" in err and "something is broken" in err
    assert "--no-require-matched" not in err  # the hint only when matching is what failed
    assert "FAILED" in out
    code, out, err = rerun_with({"matched": 0.6932}, "--require-matched")
    assert code == 1 and "matched did not fall by 2%: 0.6932 -> 0.6932" in err
    assert "matching did not learn" in err and "for shorter runs pass --no-require-matched" in err
    assert report_of(workdir)["pretrain"]["losses"]["matched"]["required"]
    code, out, err = rerun_with({"matched": 0.6932})  # ARGS: --no-require-matched
    assert code == 0 and "FAILED" not in out, err
    assert not report_of(workdir)["pretrain"]["losses"]["matched"]["required"]


def test_the_default_job_learns_all_five_tasks(tmp_path):
    """The README's main job as a user runs it (default settings, about 3.5 minutes on one core): exit 0 with
    every loss falling, image-sentence matching to well below chance, and a fine-tuned VQA score above the
    question-only baseline. Seeded and single-threaded, so the numbers are those NOTES.md records.

    .ci/run runs that very job first, verbatim, and names its work dir in LXMERT_MAIN_JOB_DONE once it exited 0:
    the test then checks that run's report instead of running the job a second time."""
    done = os.environ.get("LXMERT_MAIN_JOB_DONE")
    if done:
        workdir = Path(done)
        assert job.JobOptions().workdir == Path("runs/main") and workdir.name == "main", done
    else:
        workdir = tmp_path / "work"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = job.main(["--workdir", str(workdir)])
        assert code == 0, err.getvalue()[-3000:]
    report = report_of(workdir)
    pre, fine = report["pretrain"], report["finetune"]
    assert report["problems"] == [] and pre["steps"] == job.JobOptions().steps
    assert all(t["fell"] and t["required"] for t in pre["losses"].values())
    assert pre["losses"]["matched"]["last"] < 0.6  # ln 2 = 0.693
    assert pre["last_eval"]["matched_accuracy"] > 0.7 and pre["first_eval"]["matched_accuracy"] < 0.6
    assert fine["best"] > fine["prior"] > fine["chance"]


def test_the_readmes_predictions_run_as_written_on_the_main_jobs_outputs(tmp_path):
    """README "Asking the model": its lxmert-predict lines, verbatim, on the model and data the main job left in
    runs/main (CI's first command; tests/test_documented_commands.py runs them on the recipe chain's outputs)."""
    done = os.environ.get("LXMERT_MAIN_JOB_DONE")
    if not done:
        pytest.skip("LXMERT_MAIN_JOB_DONE: the main job's runs/main (CI runs it first)")
    from test_documented_commands import documented_commands

    prefix = "lxmert-predict --model runs/main/"

    lines = [c for c, docs in documented_commands().items() if "README.md" in docs and c.startswith(prefix)]
    assert len(lines) == 2, lines
    root = Path(done).parents[1]  # the README's commands run from the repository's root
    predictions = root / "runs/main/vqa_predictions.json"
    predictions.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for line in lines:
        proc = subprocess.run(line, shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
        if "--question" in line:  # five answers a question, probabilities, best first
            assert proc.stdout.count("what color are the chairs") == 1 and "how many bears" in proc.stdout
    submission = json.loads(predictions.read_text())
    assert len(submission) > 0 and all(set(r) == {"question_id", "answer"} for r in submission)
