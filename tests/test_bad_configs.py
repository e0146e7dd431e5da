"""Every bad config input gets one clear error naming its culprit (issue 17): YAML files of eval,
SFT and GRPO, dotted overrides, intervention spec strings, mesh specs and CLI invocations. Every
shipped config still loads. No model is loaded: each case fails (or passes) at config time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jaxmm import interventions as I
from jaxmm.config import ConfigError
from jaxmm.eval.harness import PACKAGED, EvalConfig, mesh_axes
from jaxmm.plan import parse_mesh
from jaxmm.train.grpo import GRPOConfig
from jaxmm.train.sft import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"eval": EvalConfig, "train": TrainConfig, "grpo": GRPOConfig}


def _check(message: str, *needles: str):
    """One line, naming every culprit; no pydantic or yaml internals."""
    assert "\n" not in message, message
    for n in needles:
        assert n in message, f"{n!r} not in {message!r}"
    for internal in ("errors.pydantic.dev", "For further information", "<unicode string>", "Traceback"):
        assert internal not in message, message


# (kind, YAML text, what the message must name besides the file)
BAD_YAML = [
    ("eval", "batch_size: [1, 2\n", ["not valid YAML", ":2:"]),
    ("eval", "out: a\nbatch_size: 2\nout: b\n", [":3: key 'out' given twice (first at line 1)"]),
    ("eval", "methods:\n  - {method: avar, on: weights}\n", [":2: key 'methods.0.on' reads as a boolean", '"on"']),
    ("eval", "- baseline\n- pai\n", ["expected a mapping of config fields", "list"]),
    ("eval", "out: x\nbatch_size: eight\n", [":2: batch_size:", "valid integer", "'eight'"]),
    ("eval", "benchmarks:\n  - {name: grounded, limit: two}\n", [":2: benchmarks.0.limit:", "'two'"]),
    ("eval", "methods: baseline\n", [":1: methods:", "valid list", "'baseline'"]),
    ("eval", "max_new_tokens: -3\n", ["max_new_tokens:", "> 0", "-3"]),
    ("eval", "batchsize: 2\n", ["unknown field(s) ['batchsize']", "'batch_size'"]),
    ("eval", "dtype: fp8\n", ["dtype:", "'float32'", "'fp8'"]),
    ("eval", "mesh: {model: 8}\n", ["mesh: unknown field(s) ['model']", "'fsdp'"]),
    ("eval", "mesh: {data: 1, fsdp: 0}\n", ["mesh.fsdp:", "positive integer", "got 0"]),
    ("eval", "mesh: 1x8\n", ["mesh:", "'1x8'"]),
    ("eval", "benchmarks:\n  - {name: gounded}\n", ["benchmarks.0.name:", "unknown benchmark", "'gounded'"]),
    ("eval", "benchmarks:\n  - {limit: 3}\n", ["benchmarks.0.name:", "missing"]),
    ("eval", "benchmarks:\n  - {name: grounded, prompt: vgra}\n", ["benchmarks.0.prompt:", "'vgra'", "vrga"]),
    ("eval", "benchmarks:\n  - {name: grounded, lmit: 3}\n", ["benchmarks.0: unknown field(s) ['lmit']", "'limit'"]),
    ("eval", "benchmarks: []\n", ["benchmarks:", "at least 1"]),
    ("eval", "methods: [baseline, pia]\n", ["methods.1:", "unknown method 'pia'"]),
    ("eval", "methods: ['avar:alpha_img=abc']\n", ["methods.0:", "alpha_img", "'abc'"]),
    ("eval", "methods:\n  - {method: avar, alpha: 0.1}\n", ["methods.0:", "unknown knob(s) ['alpha']", "'alpha_img'"]),
    ("eval", "heatmaps: true\n", ["heatmaps:", "boolean", "True"]),
    ("eval", "if_changed: keep\n", ["if_changed:", "'refuse'", "'keep'"]),
    ("eval", "model: 7\n", ["model:", "string", "7"]),
    ("train", "steps: 0\n", ["steps:", "> 0", "got 0"]),
    ("train", "lr: abc\n", ["lr:", "valid number", "'abc'"]),
    ("train", "warmup: 2\n", ["warmup:", "<= 1", "got 2"]),
    ("train", "lora: {rank: 0}\n", ["lora.rank:", "> 0"]),
    ("train", "lora: {rnk: 4}\n", ["lora: unknown field(s) ['rnk']", "'rank'"]),
    ("train", "data: {name: grounded, tasks: [reading]}\n", ["data.tasks.0:", "'recognition'", "'reading'"]),
    ("train", "freeze: ['[unclosed']\n", ["freeze.0:", "regular expression", "'[unclosed'"]),
    ("train", "compute_dtype: float16\n", ["compute_dtype:", "'bfloat16'", "'float16'"]),
    ("train", "agto: {alpha: -1}\n", ["agto.alpha:", ">= 0", "-1"]),
    ("train", "rave: {kind: linear}\n", ["rave.kind:", "'bilinear'", "'linear'"]),
    ("train", "mesh: {fsdp: -2}\n", ["mesh.fsdp:", "-1", "-2"]),
    ("grpo", "group_size: 1\n", ["bad.yaml: group_size=1", "G >= 2"]),
    ("grpo", "rewards: {acc: 1.0}\n", ["unknown reward", "'acc'"]),
    ("grpo", "top_p: 1.5\n", ["top_p:", "<= 1", "1.5"]),
    ("grpo", "temperature: hot\n", ["temperature:", "'hot'"]),
    ("grpo", "vars_layers: 3\n", ["vars_layers:", "valid list", "3"]),
    ("grpo", "rewards: {accuracy: lots}\n", ["rewards.accuracy:", "'lots'"]),
]


@pytest.mark.parametrize("kind,text,needles", BAD_YAML, ids=[f"{k}-{t.splitlines()[-1][:30]}" for k, t, _ in BAD_YAML])
def test_a_bad_yaml_config_names_file_field_and_value(tmp_path, kind, text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        KINDS[kind].from_yaml(path)
    assert isinstance(e.value, ValueError)  # the CLI's one-line error class
    _check(str(e.value), str(path), *needles)


# overrides on the packaged organism config (eval) or on defaults (train, grpo)
BAD_OVERRIDES = [
    ("eval", "benchmarks.3.limit=2", ["benchmarks has 1 entry", "no index 3"]),
    ("eval", "batch_size", ["no '='", "key=value"]),
    ("eval", "batch_size=eight", ["batch_size:", "'eight'"]),
    ("eval", "max_new_tokens=-3", ["max_new_tokens:", "> 0", "-3"]),
    ("eval", "methods=baseline", ["methods:", "valid list", "'baseline'"]),
    ("eval", "methods=[baseline", ["not valid YAML"]),
    ("eval", "benchmarks.x.limit=2", ["benchmarks is a list", "expected an index", "'x'"]),
    ("eval", "batch_size.x=2", ["batch_size is 25, not a mapping or list"]),
    ("eval", "=3", ["empty key part"]),
    ("eval", "benchmarks.0.limit=two", ["benchmarks.0.limit:", "'two'"]),
    ("eval", "mesh.tensor=-2", ["mesh.tensor:", "-2"]),
    ("eval", "benchmarks=[{limit: 2}]", ["benchmarks.0.name:", "missing"]),
    ("eval", "methods=[baseline, 'ration:key_layers=[3,x]']", ["methods.1:", "key_layers.1", "'x'"]),
    ("train", "steps", ["no '='"]),
    ("train", "lr=fast", ["lr:", "'fast'"]),
    ("train", "data.size=0", ["data.size:", "> 0"]),
    ("train", "lora.rank=-1", ["lora.rank:", "-1"]),
    ("train", "freeze.0=x", ["freeze is an empty list", "no index 0"]),
    ("grpo", "loss_variant=easy", ["loss_variant='easy'", "('paper', 'easyr1', 'trl')"]),
    ("grpo", "group_size=two", ["group_size:", "'two'"]),
]


@pytest.mark.parametrize("kind,override,needles", BAD_OVERRIDES, ids=[f"{k}-{o}" for k, o, _ in BAD_OVERRIDES])
def test_a_bad_override_names_itself_and_the_field(kind, override, needles):
    cls = KINDS[kind]
    with pytest.raises(ConfigError) as e:
        cls.from_yaml("organism", [override]) if kind == "eval" else cls.from_yaml(None, [override])
    msg = str(e.value)
    _check(msg, *needles)
    assert f"override {override!r}" in msg or "with overrides" in msg, msg


def test_a_later_override_is_named_and_a_good_one_after_a_bad_file_value_is_not(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 4\nheatmaps: -1\n")
    with pytest.raises(ConfigError) as e:
        EvalConfig.from_yaml(path, ["batch_size=2"])
    _check(str(e.value), f"{path}:2: heatmaps:", ">= 0", "-1")
    assert "override 'batch_size=2'" not in str(e.value)


BAD_SPECS = [
    ("avar:alpha_img=abc", ["alpha_img:", "valid number", "'abc'"]),
    ("avar:alpha=0.1", ["unknown knob(s) ['alpha']", "'alpha_img'"]),
    ("pia", ["unknown method 'pia'", "'pai'"]),
    ("avar:alpha_img", ["'alpha_img' is not knob=value"]),
    ("ration:thresholds=[1,2]", ["thresholds:", "too few entries", "[1, 2]"]),
    ("ration:key_layers=[3,x]", ["key_layers.1:", "'x'"]),
    ("avar:layers=[1,", ["layers='[1,'", "not a valid YAML value"]),
    ("pai:start=true", ["start:", "boolean"]),
    ({"method": "vrga", "factor": "big"}, ["factor:", "'big'"]),
    ({"alpha": 0.1}, ["unknown method None"]),
    (3, ["method spec 3"]),
]


@pytest.mark.parametrize("spec,needles", BAD_SPECS, ids=[str(s) for s, _ in BAD_SPECS])
def test_a_bad_intervention_spec_names_the_spec_knob_and_value(spec, needles):
    with pytest.raises(ValueError) as e:
        I.parse(spec)
    _check(str(e.value), *needles)
    if isinstance(spec, str):
        assert repr(spec) in str(e.value)


OUT_OF_RANGE = [  # on the 7B config: 28 layers, hidden size 3584
    ("pai:alpha=-0.5", ["alpha=-0.5", ">= 0"]),
    ("pai:start=28", ["start=28", "0 … 27", "28 layers"]),
    ("pai:end=40", ["end=40", "1 … 28"]),
    ("avar:alpha_sys=-1", ["alpha_sys=-1", ">= 0"]),
    ("avar:layers=[0,30]", ["layers=[0, 30]", "0 … 27"]),
    ("ration:top_k=0", ["top_k=0", ">= 1"]),
    ("ration:d_a=0", ["d_a=0", "> 0"]),
    ("ration:key_layers=[3,28]", ["key_layers=[3, 28]", "0 … 27"]),
    ("vrga:factor=0", ["factor=0", "> 0"]),
    ("vrga:fa=3", ["fa=3", "1 or 2"]),
    ("vrga:border_frac=0.6", ["border_frac=0.6", "[0, 0.5)"]),
    ("vrga:min_focus=0", ["min_focus=0", ">= 1"]),
    ({"method": "vrga", "variant": "released", "head_mask": "random_choose", "head_mask_topk": 0}, ["head_mask_topk=0", ">= 1"]),
    ("var:p=1.5", ["p=1.5", "[0, 1]"]),
    ("var:tau=0", ["tau=0", "> 0"]),
    ("var:dims=[10,4000]", ["dims=[10, 4000]", "0 … 3583"]),
    ("var:start=-1", ["start=-1", "0 … 27"]),
]


@pytest.mark.parametrize("spec,needles", OUT_OF_RANGE, ids=[str(s) for s, _ in OUT_OF_RANGE])
def test_a_method_knob_out_of_range_names_the_knob_value_and_range(spec, needles):
    from jaxmm.plan import _load_config

    _, config = _load_config(ROOT / "configs" / "models" / "qwen2_5_vl_7b.yaml")
    with pytest.raises(ValueError) as e:
        I.build([spec], config)
    _check(str(e.value), *needles)
    ok = {"pai:alpha=-0.5": "pai:alpha=0.5", "vrga:fa=3": "vrga:fa=2", "var:dims=[10,4000]": "var:dims=[10,3583]"}
    if isinstance(spec, str) and spec in ok:  # the same knob in range builds
        assert len(I.build([ok[spec]], config)) == 1


def test_intervention_specs_take_lists_mappings_and_yaml_floats():
    assert I.parse("ration:key_layers=[3,5],top_k=2") == ("ration", {"key_layers": [3, 5], "top_k": 2})
    name, kw = I.parse("avar:alpha_sys=5e-2,layers={start: 2, end: 5}")
    assert name == "avar" and kw == {"alpha_sys": 0.05, "layers": {"start": 2, "end": 5}}
    assert I.parse("ration:thresholds=[0.1,0.2,0.3]")[1]["thresholds"] == (0.1, 0.2, 0.3)
    assert I.parse("vrga") == ("vrga", {})


@pytest.mark.parametrize(
    "text,needles",
    [
        ("data=0", ["data='0'", "positive integer"]),
        ("model=2", ["unknown axis 'model'"]),
        ("data=2,data=2", ["'data' given twice"]),
        ("fsdp", ["'fsdp' is not AXIS=N"]),
        ("tensor=two", ["tensor='two'"]),
    ],
)
def test_a_bad_mesh_string_names_the_part(text, needles):
    with pytest.raises(ValueError) as e:
        parse_mesh(text)
    _check(str(e.value), repr(text), *needles)


def test_plan_model_config_errors_name_the_file(tmp_path):
    from jaxmm.plan import plan

    bad = tmp_path / "m.yaml"
    bad.write_text("model_type: llama\n")
    with pytest.raises(ConfigError) as e:
        plan(bad, {})
    _check(str(e.value), str(bad), "model_type 'llama'", "qwen2_5_vl")
    bad.write_text("model_type: [qwen\n")
    with pytest.raises(ConfigError) as e:
        plan(bad, {})
    _check(str(e.value), f"{bad}:2:", "not valid YAML")


def test_good_mesh_strings_and_config_meshes():
    assert parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    cfg = EvalConfig.from_yaml("organism", ["mesh={fsdp: -1, tensor: 2}"])
    assert mesh_axes(cfg.mesh, 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="only one axis may be -1"):
        mesh_axes(EvalConfig.from_yaml("organism", ["mesh={fsdp: -1, tensor: -1}"]).mesh, 8)


def test_yaml_1_1_floats():
    """``lr: 3e-4`` is a string to YAML 1.1: it must arrive as a float."""
    cfg = TrainConfig.from_yaml(None, ["lr=3e-4", "agto={alpha: 1e-1, beta: 0}"])
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float) and cfg.agto["alpha"] == 0.1
    assert GRPOConfig.from_yaml(None, ["adv_eps=1e-6"]).adv_eps == 1e-6
    assert TrainConfig.from_yaml(None, ["data.size=10"]).data == {
        "name": "grounded",
        "size": 10,
        "seed": 0,
        "image_size": 112,
    }  # other defaults kept


@pytest.mark.parametrize("kind", ["eval", "train", "grpo"])
def test_model_means_one_thing_in_every_config(kind, monkeypatch, tmp_path):
    """``model``: null, omitted and ``"organism"`` are the shipped organism in eval, SFT and GRPO
    alike; ``"organism-random"`` is the seeded random start everywhere; a path stays a path."""
    from jaxmm import organism

    cls = KINDS[kind]
    load = (lambda ov: cls.from_yaml("organism", ov)) if kind == "eval" else (lambda ov: cls.from_yaml(None, ov))
    assert load([]).model is None and load(["model=null"]).model is None and load(["model=organism"]).model is None
    assert cls(model="organism").model is None and cls().model is None
    assert load(["model=organism-random"]).model == cls(model="organism-random").model == "organism-random"
    assert cls(model="ckpt/x").model == "ckpt/x"
    built = []
    monkeypatch.setattr(organism, "build", lambda *a, **k: built.append(1) or tmp_path / "random")
    assert organism.resolve(cls().model) == organism.default() == organism.resolve("organism")
    assert organism.resolve(cls(model="organism-random").model) == tmp_path / "random" and built == [1]
    assert organism.resolve("ckpt/x") == "ckpt/x"


def test_eval_settings_name_the_organism_model():
    from jaxmm.eval.harness import run_settings

    assert run_settings(EvalConfig())["model"] is None
    assert run_settings(EvalConfig(model="organism-random"))["model"] == "organism-random"
    assert run_settings(EvalConfig(model="organism-random"))["weights"] == ["organism-random"]


# A config built in Python is validated as a YAML file is: (class, keyword arguments, needles)
BAD_PYTHON = [
    ("eval", {"batch_size": "eight"}, ["EvalConfig: batch_size:", "integer", "'eight'"]),
    ("eval", {"max_new_tokens": -3}, ["EvalConfig: max_new_tokens:", "> 0", "-3"]),
    ("eval", {"methods": "baseline"}, ["EvalConfig: methods:", "list", "'baseline'"]),
    ("eval", {"methods": []}, ["EvalConfig: methods:", "at least 1"]),
    ("eval", {"methods": [3]}, ["EvalConfig: methods.0:", "instance of Intervention", "got 3"]),
    ("eval", {"methods": ["ration:key_layers=[3,x]"]}, ["EvalConfig: methods.0:", "key_layers.1", "'x'"]),
    ("eval", {"benchmarks": [{"name": "popee"}]}, ["EvalConfig: benchmarks.0.name:", "unknown benchmark", "'popee'"]),
    ("eval", {"mesh": {"model": 8}}, ["EvalConfig: mesh:", "unknown field(s) ['model']"]),
    ("eval", {"dtype": "fp8"}, ["EvalConfig: dtype:", "'float32'", "'fp8'"]),
    ("eval", {"model": ""}, ["EvalConfig: model:", "'organism-random'", "empty string"]),
    ("eval", {"heatmaps": True}, ["EvalConfig: heatmaps:", "boolean"]),
    ("train", {"lr": -1.0}, ["TrainConfig: lr:", "> 0", "-1"]),
    ("train", {"lr": "fast"}, ["TrainConfig: lr:", "'fast'"]),
    ("train", {"steps": "4"}, None),  # a numeric string reads as the number (as YAML's)
    ("train", {"freeze": ["("]}, ["TrainConfig: freeze.0:", "regular expression"]),
    ("train", {"agto": {"gamma": 1.0}}, ["TrainConfig: agto:", "unknown field(s) ['gamma']"]),
    ("train", {"lora": {"rank": 0}}, ["TrainConfig: lora.rank:", "> 0", "0"]),
    ("train", {"data": {"name": "grounded", "tasks": []}}, ["TrainConfig: data.tasks:", "at least 1"]),
    ("train", {"compute_dtype": "float16"}, ["TrainConfig: compute_dtype:", "'bfloat16'", "'float16'"]),
    ("grpo", {"group_size": 1}, ["GRPOConfig: group_size=1", "G >= 2"]),
    ("grpo", {"rewards": {"acc": 1.0}}, ["GRPOConfig: rewards:", "unknown reward(s) ['acc']"]),
    ("grpo", {"top_p": 1.5}, ["GRPOConfig: top_p:", "<= 1", "1.5"]),
    ("grpo", {"loss_variant": "easy"}, ["GRPOConfig: loss_variant='easy'", "'easyr1'"]),
    ("grpo", {"mesh": {"fsdp": 0}}, ["GRPOConfig: mesh.fsdp:", "positive integer"]),
]


@pytest.mark.parametrize("kind,kw,needles", BAD_PYTHON, ids=[f"{k}-{sorted(kw)[0]}" for k, kw, _ in BAD_PYTHON])
def test_a_config_built_in_python_is_validated(kind, kw, needles):
    cls = KINDS[kind]
    if needles is None:
        assert getattr(cls(**kw), next(iter(kw))) == 4
        return
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    _check(str(e.value), *needles)


def test_replace_and_python_values_are_validated():
    cfg = TrainConfig(lr="3e-4")
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match=r"TrainConfig: keep: expected a number > 0, got 0"):
        dataclasses.replace(cfg, keep=0)
    assert dataclasses.replace(cfg, keep=3).keep == 3 and dataclasses.replace(cfg, keep=3).lr == 3e-4
    from jaxmm.interventions import PAI

    iv = PAI(alpha=0.2, layers=(1,))
    assert EvalConfig(methods=["baseline", iv]).methods[1] is iv  # intervention objects pass as they are


SHIPPED = [("eval", p) for p in sorted(PACKAGED.glob("*.yaml"))] + [
    ("grpo" if p.name.startswith("grpo") else "train", p) for p in sorted((ROOT / "configs/train").glob("*.yaml"))
]


@pytest.mark.parametrize("kind,path", SHIPPED, ids=[p.name for _, p in SHIPPED])
def test_every_shipped_config_loads(kind, path):
    cfg = KINDS[kind].from_yaml(path)
    assert isinstance(cfg, KINDS[kind])
    assert cfg.out.startswith("runs/")


@pytest.mark.parametrize("path", sorted((ROOT / "configs/methods").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_method_config_parses(path):
    name, kw = I.parse(str(path))
    assert name in I.METHODS and "method" not in kw


# ----------------------------------------------------------------------------- the CLI
class _Ran(Exception):
    pass


def test_cli_takes_overrides_after_options_and_readme_commands(monkeypatch):
    from jaxmm import cli
    from jaxmm.eval import harness

    seen = []

    def fake_run(cfg, progress=True):
        seen.append((cfg, progress))
        raise _Ran

    monkeypatch.setattr(harness, "run", fake_run)
    with pytest.raises(_Ran):
        cli.main(["eval", "--config", "organism", "benchmarks.0.limit=2", "--no-progress", "batch_size=3"])
    cfg, progress = seen[-1]
    assert cfg.benchmarks[0]["limit"] == 2 and cfg.batch_size == 3 and progress is False
    with pytest.raises(_Ran):  # README: jaxmm eval --config qwen2_5_vl_7b_mmstar model=… benchmarks.0.path=…
        cli.main(["eval", "--config", "qwen2_5_vl_7b_mmstar", "model=ckpt/qwen2_5_vl_7b", "benchmarks.0.path=data/mmstar"])
    assert seen[-1][0].model == "ckpt/qwen2_5_vl_7b" and seen[-1][0].benchmarks[0]["path"] == "data/mmstar"
    with pytest.raises(_Ran):  # README: jaxmm eval --config organism
        cli.main(["eval", "--config", "organism"])
    assert seen[-1][0] == EvalConfig.from_yaml("organism") and seen[-1][1] is True


@pytest.mark.parametrize(
    "command,module,config",
    [("train", "jaxmm.train.sft", "configs/train/rave.yaml"), ("grpo", "jaxmm.train.grpo", "configs/train/grpo_sayo.yaml")],
)
def test_cli_train_and_grpo_take_overrides_after_options(monkeypatch, command, module, config):
    import importlib

    from jaxmm import cli

    seen = []

    def fake_train(cfg, progress=True):
        seen.append((cfg, progress))
        raise _Ran

    monkeypatch.setattr(importlib.import_module(module), "train", fake_train)
    with pytest.raises(_Ran):
        cli.main([command, "steps=2", "--config", str(ROOT / config), "lr=3e-4", "--no-progress", "keep=1"])
    cfg, progress = seen[-1]
    assert (cfg.steps, cfg.lr, cfg.keep, progress) == (2, 3e-4, 1, False)
    assert cfg.out == KINDS[command].from_yaml(ROOT / config).out


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["eval", "--config", "organism", "benchmarks.3.limit=2", "--no-progress"], ["benchmarks has 1 entry"]),
        (["eval", "--no-progress", "max_new_tokens=-3"], ["max_new_tokens:", "-3"]),
        (["eval", "--config", "organsim"], ["'organsim'", "packaged"]),
        (["train", "steps", "--no-progress"], ["override 'steps'", "no '='"]),
        (["grpo", "group_size=1"], ["group_size=1"]),
        (["plan", "--model", "configs/models/qwen3_vl_2b.yaml", "--mesh", "data=0"], ["--mesh 'data=0'"]),
    ],
)
def test_cli_prints_one_line_for_a_config_error(capsys, argv, needles):
    from jaxmm import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"jaxmm {argv[0]}: error: "), err
    _check(err.strip(), *needles)


def test_cli_bad_yaml_file_one_line(tmp_path, capsys):
    from jaxmm import cli

    path = tmp_path / "t.yaml"
    path.write_text("steps: 10\nlr: [\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    _check(err.strip(), str(path), "not valid YAML")


def test_cli_still_refuses_stray_arguments(capsys):
    from jaxmm import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "junk"])
    assert e.value.code == 2 and "unrecognized arguments: junk" in capsys.readouterr().err
