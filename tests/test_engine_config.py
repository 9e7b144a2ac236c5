"""engine/config.py: recipes load and resolve, overrides are type-checked, errors are clear, DeepSpeed dicts merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import (
    ConfigError,
    RunConfig,
    deepspeed_config,
    format_config,
    from_dict,
    load_config,
    resolve,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
TEMPLATES = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
# the ZeRO stage and offload each template states explicitly
TEMPLATE_SETTINGS = {
    "zero1": (1, "none"),
    "zero2": (2, "none"),
    "zero3": (3, "none"),
    "zero2_offload": (2, "optimizer"),
    "zero3_offload": (3, "optimizer+params"),
}


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their DeepSpeed templates relative to the repository


def test_recipes_and_templates_exist():
    assert {p.stem for p in RECIPES} >= {"pretrain", "pretrain_adamw", "vqa", "gqa", "nlvr2", "tiny_cpu"}
    assert {p.stem for p in TEMPLATES} == set(TEMPLATE_SETTINGS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("world_size", [1, 8])
def test_every_recipe_loads_resolves_and_makes_a_deepspeed_config(recipe, world_size):
    config = load_config(recipe)
    resolved = resolve(config, world_size)
    t = resolved.train
    assert t.micro_batch_size * t.grad_accum_steps * world_size == t.batch_size
    assert t.world_size == world_size and config.train.world_size is None  # resolve copies
    ds = deepspeed_config(config, world_size)
    assert ds["train_batch_size"] == t.batch_size
    assert ds["train_micro_batch_size_per_gpu"] == t.micro_batch_size
    assert ds["gradient_accumulation_steps"] == t.grad_accum_steps
    assert ds["gradient_clipping"] == config.optim.grad_clip
    assert ds["bf16"]["enabled"] == (t.precision == "bf16") and ds["fp16"]["enabled"] == (t.precision == "fp16")
    assert ds["zero_optimization"]["stage"] == t.zero_stage
    assert "optimizer" not in ds and "scheduler" not in ds
    json.dumps(ds)  # plain JSON


def test_recipe_values_are_the_authors():
    pre = load_config("configs/pretrain.yaml")
    assert (pre.optim.name, pre.optim.lr, pre.optim.warmup_ratio, pre.optim.schedule, pre.optim.grad_clip) == (
        "bertadam",
        1e-4,
        0.05,
        "linear",
        1.0,
    )
    assert (pre.train.batch_size, pre.train.epochs, pre.optim.eps, pre.optim.weight_decay) == (256, 20, 1e-6, 0.01)
    assert pre.optim.no_decay is None and pre.model.hidden_size == 768 and pre.model.x_layers == 5
    assert all([pre.model.task_mask_lm, pre.model.task_obj_predict, pre.model.task_matched, pre.model.task_qa])
    assert pre.data.drop_last and load_config("configs/pretrain_adamw.yaml").data.drop_last  # get_tuple(drop_last=True)
    assert not load_config(None).data.drop_last  # elsewhere every sample is seen each epoch
    for name, lr in (("vqa", 5e-5), ("gqa", 1e-5), ("nlvr2", 5e-5)):
        c = load_config(f"configs/{name}.yaml")
        assert (c.train.task, c.optim.lr, c.train.batch_size, c.train.epochs) == (name, lr, 32, 4)
        assert (c.optim.warmup_ratio, c.optim.grad_clip, c.optim.name) == (0.1, 5.0, "bertadam")
    modern = load_config("configs/pretrain_adamw.yaml")
    assert (modern.optim.name, modern.train.precision) == ("adamw", "bf16")
    tiny = load_config("configs/tiny_cpu.yaml")
    assert (tiny.model.hidden_size, tiny.model.num_attention_heads, tiny.model.visual_feat_dim) == (128, 4, 64)
    assert (tiny.model.l_layers, tiny.model.r_layers, tiny.model.x_layers, tiny.train.precision) == (2, 1, 1, "fp32")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_deepspeed_template_parses_and_merges(template, precision):
    stage, offload = TEMPLATE_SETTINGS[template.stem]
    raw = json.loads(template.read_text())
    assert "optimizer" not in raw and "scheduler" not in raw
    config = load_config(
        "configs/pretrain.yaml",
        [
            f"deepspeed.config=configs/deepspeed/{template.name}",
            f"train.zero_stage={stage}",
            f"train.offload={offload}",
            f"train.precision={precision}",
        ],
    )
    ds = deepspeed_config(config, 8)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds[precision if precision != "fp32" else "bf16"]["enabled"] == (precision != "fp32")
    assert ("offload_optimizer" in zero) == (offload != "none")
    assert ("offload_param" in zero) == (offload == "optimizer+params")
    assert ds["zero_allow_untested_optimizer"] is True  # BertAdam is not on ZeRO's list
    assert ds.get("zero_force_ds_cpu_optimizer", True) == (offload == "none")
    for key, value in raw["zero_optimization"].items():  # the template's tuning survives
        if key not in ("stage", "offload_optimizer", "offload_param"):
            assert zero[key] == value


def test_deepspeed_defaults_without_a_template():
    ds = deepspeed_config(
        load_config(None, ["train.precision=fp16", "train.batch_size=64", "train.micro_batch_size=4"]), 2
    )
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        4,
        8,
    )
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    assert ds["zero_optimization"] == {"stage": 0} and ds["wall_clock_breakdown"] is False
    assert ds["steps_per_print"] >= 10**8 and "zero_allow_untested_optimizer" not in ds  # ZeRO off: no check
    ds = deepspeed_config(load_config(None, ["optim.name=adamw", "train.zero_stage=2"]), 1)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}
    assert "zero_allow_untested_optimizer" not in ds  # torch AdamW is on ZeRO's list


def _template(tmp_path, **values) -> str:
    base = json.loads((ROOT / "configs/deepspeed/zero2.json").read_text())
    for path, value in values.items():
        *parents, last = path.split("__")
        node = base
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base))
    return f"deepspeed.config={path}"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train_batch_size": 128}, "train_batch_size is 128 but the typed config makes it 256"),
        ({"gradient_clipping": 5.0}, "gradient_clipping is 5.0"),
        ({"bf16__enabled": True}, "bf16.enabled is True"),
        ({"zero_optimization__stage": 3}, "zero_optimization.stage is 3 but the typed config makes it 2"),
        ({"zero_optimization__offload_optimizer": {"device": "cpu"}}, "offload_optimizer.device is 'cpu'"),
        ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove 'scheduler'"),
        ({"zero_optimization__reduce_bucket_size": "auto"}, "also found at zero_optimization.reduce_bucket_size"),
    ],
)
def test_template_contradicting_the_typed_config_is_an_error(tmp_path, override, message):
    config = load_config("configs/pretrain.yaml", [_template(tmp_path, **override), "train.zero_stage=2"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        deepspeed_config(config, 8)


def test_template_agreeing_explicitly_is_fine(tmp_path):
    config = load_config(
        "configs/pretrain.yaml", [_template(tmp_path, train_batch_size=256, gradient_clipping=1), "train.zero_stage=2"]
    )
    assert deepspeed_config(config, 8)["train_batch_size"] == 256
    with pytest.raises(ConfigError, match="cannot read the DeepSpeed config"):
        deepspeed_config(load_config(None, ["deepspeed.config=no/such.json"]), 1)


def test_an_empty_override_empties_a_text_field():
    config = load_config("configs/vqa.yaml", ["train.init_from=", "data.eval.text="])
    assert config.train.init_from == "" and config.data.eval.text == ""
    assert load_config(None, ["train.micro_batch_size="]).train.micro_batch_size is None  # null where allowed


def test_overrides_fill_and_are_type_checked():
    c = load_config(
        "configs/pretrain.yaml",
        [
            "model.hidden_size=128",
            "model.num_attention_heads=4",
            "optim.lr=5e-5",
            "optim.betas=[0.9, 0.98]",
            "train.max_steps=10",
            "data.train.text=/data/x",
            "train.resume=none",
            "optim.no_decay=['*.bias']",
            "train.output_dir=2024",
            "deepspeed.config=null",
            "train.compile=true",
        ],
    )
    assert (
        c.model.hidden_size == 128 and c.optim.lr == 5e-5 and isinstance(c.optim.lr, float)
    )  # PyYAML: "5e-5" is a str
    assert c.optim.betas == (0.9, 0.98) and c.train.max_steps == 10 and c.data.train.text == "/data/x"
    assert c.data.train.features == "data/stores/feats"  # the rest of the nested section is kept
    assert c.train.resume == "none" and c.optim.no_decay == ["*.bias"] and c.train.output_dir == "2024"
    assert c.deepspeed.config is None and c.train.compile is True
    assert load_config(None, ["train.max_steps=null"]).train.max_steps is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=1e-4", "unknown key 'optim.learning_rate'"),
        ("optim.lrr=1e-4", "unknown key 'optim.lrr'; did you mean 'lr'?"),
        ("trian.epochs=3", "unknown key 'trian'; did you mean 'train'?"),
        ("model.hiden_size=3", "did you mean 'hidden_size'?"),
        ("data.train.feature=x", "unknown key 'data.train.feature'; did you mean 'features'?"),
        ("train.epochs.x=3", "train.epochs is not a section"),
        ("train=3", "must look like section.field=value"),
        ("train.epochs", "must look like section.field=value"),
        ("data.train=x", "data.train is a section"),
        ("train.batch_size=abc", r"train.batch_size: expected int, got 'abc' \(str\)"),
        ("train.batch_size=2.5", r"train.batch_size: expected int, got 2.5 \(float\)"),
        ("train.compile=3", r"train.compile: expected bool, got 3 \(int\)"),
        ("optim.lr=fast", r"optim.lr: expected float, got 'fast' \(str\)"),
        ("optim.betas=[0.9]", r"optim.betas: expected tuple"),
        ("train.max_steps=ten", r"train.max_steps: expected int \| None, got 'ten'"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
        ("train.precision=bf61", "did you mean 'bf16'?"),
        ("train.zero_stage=4", "train.zero_stage: 4 is not one of 0, 1, 2, 3"),
        ("train.zero_stage=true", "train.zero_stage: True is not one of"),
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("optim.lr=-1e-4", "optim.lr must be > 0"),
        ("optim.warmup_ratio=1", r"optim.warmup_ratio must be in \[0, 1\)"),
        ("optim.betas=[0.9, 1.0]", r"optim.betas must be in \[0, 1\)"),
        ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("train.keep_checkpoints=-1", r"train.keep_checkpoints must be >= 0 \(0 = keep all\), got -1"),
        ("train.offload=optimizer", "needs train.zero_stage >= 1"),
        ("data.sources=[coco]", "unknown source 'coco'; did you mean 'mscoco'?"),
        ("data.word_mask_prob=1.5", r"data.word_mask_prob must be in \[0, 1\)"),
        ("model.attn_backend=flashy", "model.attn_backend 'flashy' is not one of"),
        ("model.attn_backend=flash", "'flash' needs train.precision bf16 or fp16"),
        ("train.compile_backend=inductr", "did you mean 'inductor'?"),
        ("model.hidden_size=100", "model: hidden_size 100 is not a multiple of num_attention_heads 12"),
    ],
)
def test_bad_overrides_give_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_param_offload_needs_zero3_and_all_problems_are_listed():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.zero_stage=2", "train.offload=optimizer+params", "optim.lr=0", "train.epochs=0"])
    text = str(error.value)
    assert "needs train.zero_stage 3" in text and "optim.lr must be > 0" in text and "train.epochs must be >= 1" in text
    load_config(None, ["train.zero_stage=3", "train.offload=optimizer+params"])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-4\n  warmpu_ratio: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.warmpu_ratio'; did you mean 'warmup_ratio'?"):
        load_config(bad)
    bad.write_text("modle:\n  hidden_size: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'; did you mean 'model'?"):
        load_config(bad)
    bad.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"train: expected a mapping of TrainConfig fields, got 5"):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="a config is a mapping of sections"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("optim:\n  lr: 1e-4\nmodel:\n")  # PyYAML's "1e-4" string is a float; an empty section keeps defaults
    c = load_config(bad)
    assert c.optim.lr == 1e-4 and c.model.hidden_size == 768


@pytest.mark.parametrize(
    "train, world, message",
    [
        (["train.batch_size=256"], 3, "batch_size 256 is not divisible by world size 3"),
        (["train.batch_size=256", "train.micro_batch_size=48"], 1, "not divisible by micro_batch_size 48"),
        (
            ["train.batch_size=256", "train.micro_batch_size=16", "train.grad_accum_steps=4"],
            8,
            "!= micro_batch_size 16 x grad_accum_steps 4 x world size 8 = 512",
        ),
        (["train.world_size=8"], 4, "train.world_size is 8 but the job runs 4 ranks"),
    ],
)
def test_resolve_errors(train, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve(load_config(None, train), world)


def test_resolve_derives_whichever_is_missing():
    def derived(overrides, world):
        t = resolve(load_config(None, ["train.batch_size=256", *overrides]), world).train
        return t.micro_batch_size, t.grad_accum_steps

    assert derived([], 8) == (32, 1)
    assert derived(["train.micro_batch_size=8"], 8) == (8, 4)
    assert derived(["train.grad_accum_steps=2"], 4) == (32, 2)
    assert derived(["train.micro_batch_size=64", "train.grad_accum_steps=4"], 1) == (64, 4)
    assert load_config(None, ["train.max_steps=50"]).train.total_steps(100) == 50
    assert load_config(None, ["train.epochs=3"]).train.total_steps(100) == 300


def test_save_load_round_trip(tmp_path):
    config = resolve(load_config("configs/pretrain.yaml", ["optim.betas=[0.8, 0.9]", "data.sources=[vg]"]), 8)
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left
    again = load_config(path)
    assert again == config and isinstance(again.optim.betas, tuple)
    assert from_dict(to_dict(config)) == config
    assert resolve(again, 8) == config  # a recorded world size resolves again
    text = format_config(config)
    for section in ("model:", "data:", "optim:", "train:", "deepspeed:"):
        assert f"\n{section}" in f"\n{text}"


def test_defaults_are_the_authors():
    c = RunConfig()
    assert (c.optim.name, c.optim.lr, c.optim.betas, c.optim.eps, c.optim.weight_decay) == (
        "bertadam",
        1e-4,
        (0.9, 0.999),
        1e-6,
        0.01,
    )
    assert (c.data.word_mask_prob, c.data.region_mask_prob, c.data.negative_prob) == (0.15, 0.15, 0.5)
    assert load_config(None) == c


def test_merged_config_is_accepted_by_deepspeed(monkeypatch):
    """DeepSpeed's own parser and batch checks (only where deepspeed is installed)."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")

    class EightRanks:
        def get_rank(self):
            return 0

        def get_world_size(self, *args):
            return 8

    monkeypatch.setattr(ds_config, "dist", EightRanks())
    for template, (stage, offload) in TEMPLATE_SETTINGS.items():
        config = load_config(
            "configs/pretrain.yaml",
            [
                f"deepspeed.config=configs/deepspeed/{template}.json",
                f"train.zero_stage={stage}",
                f"train.offload={offload}",
                "train.precision=bf16",
            ],
        )
        parsed = ds_config.DeepSpeedConfig(deepspeed_config(config, 8))
        assert parsed.train_micro_batch_size_per_gpu == 32 and parsed.zero_optimization_stage == stage
