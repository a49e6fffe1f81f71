"""moe/config.py: precedence, key and type checking, impossible combinations."""

import dataclasses

import pytest

from moe.config import Config, ConfigError, ModelConfig, from_dict, load_config


def write_yaml(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def config_error(path=None, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


# --- precedence --------------------------------------------------------------------------------


def test_defaults_when_nothing_given():
    cfg = load_config(None, [])
    assert cfg == Config()
    assert cfg.model.top_k == ModelConfig.top_k == 2
    assert cfg.model.capacity_factor == 1.25


def test_defaults_lt_yaml_lt_cli(tmp_path):
    path = write_yaml(tmp_path, "model:\n  n_experts: 8\n  top_k: 1\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, [])
    assert (cfg.model.n_experts, cfg.model.top_k, cfg.train.lr) == (8, 1, 0.01)
    assert cfg.model.d_model == 256  # untouched keys keep their defaults
    cfg = load_config(path, ["--model.top_k=2", "--train.lr=0.5"])
    assert (cfg.model.n_experts, cfg.model.top_k, cfg.train.lr) == (8, 2, 0.5)
    # The last of repeated overrides wins.
    cfg = load_config(path, ["--model.top_k=2", "--model.top_k=4"])
    assert cfg.model.top_k == 4


def test_empty_yaml_and_empty_section(tmp_path):
    assert load_config(write_yaml(tmp_path, ""), []) == Config()
    assert load_config(write_yaml(tmp_path, "model:\n"), []) == Config()


def test_to_dict_round_trips():
    cfg = load_config(None, ["--model.n_experts=4", "--model.capacity_factor=null",
                             "--data.files=a.txt", "--data.source=files"])
    assert from_dict(cfg.to_dict()).validate() == cfg


# --- unknown keys and wrong types --------------------------------------------------------------


def test_unknown_section_in_yaml(tmp_path):
    msg = config_error(write_yaml(tmp_path, "modle:\n  top_k: 2\n"))
    assert "modle" in msg


def test_unknown_section_and_key_on_cli():
    assert "modle.top_k" in config_error(overrides=["--modle.top_k=2"])
    msg = config_error(overrides=["--model.topk=2"])
    assert "model.topk" in msg and "top_k" in msg  # names the bad key and lists the good ones


def test_unknown_key_in_yaml(tmp_path):
    assert "train.learning_rate" in config_error(write_yaml(tmp_path,
                                                            "train:\n  learning_rate: 1\n"))


def test_malformed_override_and_missing_file(tmp_path):
    assert "model.top_k=2" in config_error(overrides=["model.top_k=2"])
    assert "--model.top_k" in config_error(overrides=["--model.top_k"])
    assert "nope.yaml" in config_error(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, key", [
    ("--model.n_layers=abc", "model.n_layers"),
    ("--model.activation=3", "model.activation"),
    ("--train.compile=1", "train.compile"),  # an int is not a bool
    ("--train.compile=yes please", "train.compile"),
    ("--model.capacity_factor=fast", "model.capacity_factor"),
    ("--model.n_layers=null", "model.n_layers"),  # null only for Optional keys
    ("--model.d_model=[1, 2]", "model.d_model"),
])
def test_wrong_type_names_key(override, key):
    assert key in config_error(overrides=[override])


# --- coercion ----------------------------------------------------------------------------------


def test_null_is_none_for_optional_float(tmp_path):
    cfg = load_config(None, ["--model.capacity_factor=null", "--model.eval_capacity_factor=~"])
    assert cfg.model.capacity_factor is None and cfg.model.eval_capacity_factor is None
    path = write_yaml(tmp_path, "model:\n  capacity_factor: null\n  head_dim: null\n")
    cfg = load_config(path, [])
    assert cfg.model.capacity_factor is None and cfg.model.head_dim is None


def test_eval_capacity_factor_train_number_or_null(tmp_path):
    # Default "train": follows capacity_factor, including dropless.
    cfg = load_config(None, ["--model.capacity_factor=1.0"])
    assert cfg.model.eval_capacity_factor == "train"
    assert cfg.model.eval_capacity_factor_resolved == 1.0
    assert load_config(None, ["--model.capacity_factor=null"]).model \
        .eval_capacity_factor_resolved is None
    path = write_yaml(tmp_path, "model:\n  capacity_factor: 1.0\n")  # no eval key
    assert load_config(path, []).model.eval_capacity_factor_resolved == 1.0
    # A number (an int becomes a float) or null sets it explicitly.
    cfg = load_config(None, ["--model.capacity_factor=null", "--model.eval_capacity_factor=2"])
    ecf = cfg.model.eval_capacity_factor
    assert ecf == 2.0 and type(ecf) is float and cfg.model.eval_capacity_factor_resolved == 2.0
    cfg = load_config(None, ["--model.eval_capacity_factor=null"])
    assert cfg.model.eval_capacity_factor is None is cfg.model.eval_capacity_factor_resolved
    path = write_yaml(tmp_path, "model:\n  capacity_factor: 1.5\n  eval_capacity_factor: train\n")
    assert load_config(path, []).model.eval_capacity_factor_resolved == 1.5
    # The saved config loads back to the same thing.
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("value", ["fast", "Train", "true", "[1]"])
def test_eval_capacity_factor_rejects_other_values(value):
    msg = config_error(overrides=[f"--model.eval_capacity_factor={value}"])
    assert "model.eval_capacity_factor" in msg


def test_drop_policy_position_names_its_new_name():
    msg = config_error(overrides=["--model.drop_policy=position"])
    assert "model.drop_policy" in msg and "token_major" in msg
    assert ModelConfig().drop_policy == "choice_major"  # GShard's order is the default
    for policy in ("choice_major", "token_major", "probs"):
        assert load_config(None, [f"--model.drop_policy={policy}"]).model.drop_policy == policy


@pytest.mark.parametrize("top_k, given, resolved", [
    (1, "auto", "raw"), (2, "auto", "renorm"), (4, "auto", "renorm"),
    (1, "renorm", "renorm"), (2, "raw", "raw"),
])
def test_router_weights_resolution(top_k, given, resolved):
    cfg = load_config(None, [f"--model.top_k={top_k}", f"--model.router_weights={given}"])
    assert cfg.model.router_weights == given
    assert cfg.model.router_weights_resolved == resolved


def test_int_accepted_for_float_key():
    cfg = load_config(None, ["--model.capacity_factor=2", "--train.lr=1"])
    assert cfg.model.capacity_factor == 2.0 and type(cfg.model.capacity_factor) is float
    assert type(cfg.train.lr) is float


def test_exponent_without_dot_is_a_float(tmp_path):
    assert load_config(None, ["--train.lr=3e-3"]).train.lr == 3e-3
    assert load_config(write_yaml(tmp_path, "model:\n  norm_eps: 1e-6\n"), []).model.norm_eps \
        == 1e-6


def test_exponent_with_dot_is_a_float():
    assert load_config(None, ["--train.lr=3.0e-3"]).train.lr == 3e-3


def test_integral_float_accepted_for_int_key_and_converted():
    cfg = load_config(None, ["--model.n_layers=2.0"])
    assert cfg.model.n_layers == 2 and type(cfg.model.n_layers) is int


@pytest.mark.parametrize("value", ["2.5", "true", "false", "'3'", ".inf"])
def test_rejected_for_int_key(value):
    assert "model.n_layers" in config_error(overrides=[f"--model.n_layers={value}"])


@pytest.mark.parametrize("value", ["true", ".nan", ".inf", "'1.0'"])
def test_rejected_for_float_key(value):
    assert "train.lr" in config_error(overrides=[f"--train.lr={value}"])


def test_bool_key_takes_yaml_booleans_only(tmp_path):
    assert load_config(None, ["--train.compile=true"]).train.compile is True
    assert load_config(None, ["--model.tie_embeddings=false"]).model.tie_embeddings is False
    assert "train.compile" in config_error(write_yaml(tmp_path, "train:\n  compile: 0\n"))


def test_string_and_list_keys():
    cfg = load_config(None, ["--data.source=files", "--data.files=a/*.txt"])
    assert cfg.data.files == ["a/*.txt"]  # a single string becomes a one-element list
    cfg = load_config(None, ["--data.source=files", "--data.files=[a.txt, b.txt]"])
    assert cfg.data.files == ["a.txt", "b.txt"]
    assert load_config(None, ["--train.sample_prompt="]).train.sample_prompt == ""


# --- impossible values -------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["--model.n_experts=4", "--model.top_k=5"], "model.top_k"),
    (["--model.n_heads=8", "--model.n_kv_heads=3"], "model.n_kv_heads"),
    (["--model.n_heads=6"], "model.n_heads"),  # 256 % 6 != 0
    (["--model.capacity_factor=0"], "model.capacity_factor"),
    (["--model.capacity_factor=-1.5"], "model.capacity_factor"),
    (["--model.eval_capacity_factor=0.0"], "model.eval_capacity_factor"),
    (["--train.batch_size=12", "--train.micro_batch_size=8"], "train.batch_size"),
    (["--data.seq_len=512"], "data.seq_len"),  # > max_seq_len 256
    (["--model.capacity_group_seqs=3"], "model.capacity_group_seqs"),  # 16 % 3
    (["--model.min_capacity=-1"], "model.min_capacity"),
    (["--model.router_jitter=1.0"], "model.router_jitter"),
    (["--model.head_dim=7"], "model.head_dim"),
    (["--model.drop_policy=random"], "model.drop_policy"),
    (["--model.router_weights=softmax"], "model.router_weights"),
    (["--model.eval_capacity_factor=-1"], "model.eval_capacity_factor"),
    (["--model.expert_impl=cuda"], "model.expert_impl"),
    (["--train.optimizer_impl=apex"], "train.optimizer_impl"),
    (["--model.top_k=0"], "model.top_k"),
    (["--data.val_fraction=1"], "data.val_fraction"),
    (["--data.source=hf"], "data.hf_name"),
])
def test_impossible_values_name_the_key(overrides, key):
    assert key in config_error(overrides=overrides)


def test_seq_len_equal_to_max_is_fine():
    cfg = load_config(None, ["--data.seq_len=256", "--model.max_seq_len=256"])
    assert cfg.data.seq_len == cfg.model.max_seq_len


def test_every_key_accepts_its_own_default():
    # The type hints and the coercion rules agree for every key (a new key whose type the
    # coercion does not handle fails here).
    cfg = Config()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            assert from_dict({section.name: {f.name: value}}) == cfg, f"{section.name}.{f.name}"


# --- configs that used to run wrongly or crash (issue: comparable numbers) ---------------------

EC = ["--model.routing=expert_choice", "--model.balance=none"]


@pytest.mark.parametrize("overrides, keys", [
    # an odd implicit head size: rotary embeddings rotate pairs (60 / 4 = 15)
    (["--model.d_model=60", "--model.n_heads=4"], ["model.d_model", "model.head_dim"]),
    # a top-1 gate renormalised to 1 with nothing else to learn from
    (["--model.top_k=1", "--model.router_weights=renorm", "--model.balance=bias"],
     ["model.router_weights=raw"]),
    (["--model.top_k=1", "--model.router_weights=renorm", "--model.balance=none"],
     ["model.router_weights=raw"]),
    (["--train.eps=-1"], ["train.eps"]),
    (["--train.eps=0"], ["train.eps"]),
    (["--train.compile=true", "--parallel.pp=2"], ["train.compile", "parallel.pp"]),
    *[(["--model.n_experts=0", "--model.top_k=0", "--model.n_shared_experts=1", *extra], keys)
      for extra, keys in ((["--model.balance=bias"], ["model.balance"]),
                          (["--model.routing=expert_choice", "--model.balance=none"],
                           ["model.routing"]),
                          (["--parallel.ep=2"], ["parallel.ep", "model.n_experts=0"]))],
    ([*EC, "--model.drop_policy=token_major"], ["model.drop_policy"]),
    ([*EC, "--model.router_weights=raw"], ["model.router_weights"]),
    # 16 experts, top-2, factor 8: ceil(8 * n * 2 / 16) = n slots, every expert every token
    ([*EC, "--model.capacity_factor=8"], ["model.capacity_factor"]),
    ([*EC, "--model.eval_capacity_factor=8"], ["model.eval_capacity_factor"]),
    # min_capacity alone can give every expert the whole group of 256 tokens
    ([*EC, "--model.min_capacity=256"], ["model.min_capacity"]),
    (["--model.max_seq_len=600", "--model.rope_scaling.type=yarn",
      "--model.rope_scaling.factor=4", "--model.rope_scaling.original_max_seq_len=128"],
     ["model.max_seq_len", "rope_scaling.factor"]),
    (["--parallel.backend=nccl", "--train.device=cpu"], ["parallel.backend"]),
    (["--train.batch_ramp_increment=3", "--model.capacity_group_seqs=2"],
     ["train.batch_ramp_increment"]),
    (["--data.val_windows=7", "--model.capacity_group_seqs=2"], ["data.val_windows"]),
    (["--data.val_windows=0"], ["data.val_windows"]),
    (["--train.eval_batches=4"], ["train.eval_batches", "data.val_windows"]),
    (["--parallel.zero1=true"], ["parallel.zero1", "parallel.dp_shard"]),
    (["--parallel.dp_shard=zero2"], ["parallel.dp_shard", "fsdp"]),
    (["--parallel.dp_shard=fsdp", "--train.compile=true"], ["parallel.dp_shard", "train.compile"]),
    (["--parallel.dp_shard=fsdp", "--vision.enabled=true"], ["parallel.dp_shard", "vision"]),
])
def test_configs_that_used_to_run_are_refused_naming_the_key(overrides, keys):
    msg = config_error(overrides=overrides)
    for key in keys:
        assert key in msg, (key, msg)


def test_accepted_neighbours_of_the_refused_configs():
    """What the refusals above must not catch."""
    ok = [["--model.d_model=64", "--model.n_heads=4"],  # head size 16
          ["--model.d_model=60", "--model.n_heads=4", "--model.head_dim=16"],
          ["--model.top_k=1"],  # auto: raw weights (Switch)
          ["--model.top_k=1", "--model.router_weights=renorm"],  # balance=aux_loss teaches it
          ["--model.moe_every=4", "--model.n_layers=4"],  # layer 3 is MoE
          [*EC, "--model.capacity_factor=2"],
          ["--model.max_seq_len=512", "--model.rope_scaling.type=yarn",
           "--model.rope_scaling.factor=4", "--model.rope_scaling.original_max_seq_len=128"],
          ["--model.max_seq_len=4096", "--model.rope_scaling.type=dynamic",
           "--model.rope_scaling.factor=2", "--model.rope_scaling.original_max_seq_len=128"]]
    for overrides in ok:
        load_config(None, overrides)


def test_a_model_with_no_moe_layer_is_said_once():
    """moe_every > n_layers is how a dense model is built (configs/draft.yaml): accepted, and
    the trainer prints this line before step 1."""
    (note,) = load_config(None, ["--model.moe_every=5", "--model.n_layers=4"]).notices()
    assert "model.moe_every=5 > model.n_layers=4" in note and "dense" in note
    assert load_config(None, ["--model.moe_every=4", "--model.n_layers=4"]).notices() == []


def test_yaml_with_a_replaced_key_names_its_replacement(tmp_path):
    msg = config_error(write_yaml(tmp_path, "train:\n  eval_batches: 8\n"))
    assert "train.eval_batches" in msg and "data.val_windows" in msg


def test_saved_configs_with_a_replaced_key_load_as_the_same_run():
    """A run folder saved before data.val_windows: eval_batches x micro_batch_size windows,
    exactly the windows it evaluated."""
    saved = Config().to_dict()
    del saved["data"]["val_windows"]
    saved["train"].update(eval_batches=4, micro_batch_size=8)
    cfg = from_dict(saved)
    assert cfg.data.val_windows == 32 and cfg.train.micro_batch_size == 8
    # parallel.zero1 (before parallel.dp_shard): the same optimizer sharding.
    for zero1, dp_shard in ((True, "zero1"), (False, "none")):
        saved = Config().to_dict()
        del saved["parallel"]["dp_shard"]
        saved["parallel"]["zero1"] = zero1
        assert from_dict(saved).parallel.dp_shard == dp_shard


def test_nested_sections_built_in_python_take_a_mapping():
    m = ModelConfig(max_seq_len=256, rope_scaling={"type": "yarn", "factor": 4.0,
                                                   "original_max_seq_len": 64})
    m.validate()
    assert m.rope_scaling.type == "yarn" and m.rope_scaling.beta_fast == 32.0
    with pytest.raises(ConfigError, match="model.rope_scaling.kind"):
        ModelConfig(rope_scaling={"kind": "yarn"})
    bad = ModelConfig()
    bad.rope_scaling = "yarn"  # set after construction: validate says what it expects
    with pytest.raises(ConfigError, match="model.rope_scaling expects a mapping"):
        bad.validate()


def test_saved_differences_is_the_one_comparison_of_resume_and_init_from():
    from moe.config import saved_differences
    from moe.train.init_from import init_config_problems

    cfg = load_config(None, ["--model.d_model=64", "--model.n_heads=4"])
    saved = Config().to_dict()
    del saved["data"]["val_windows"]  # a key added since: counts as its default
    saved["train"]["seed"] = 7
    assert saved_differences(saved, cfg, ["model", "data", "train.seed"]) == [
        ("model.d_model", 256, 64), ("model.n_heads", 8, 4), ("train.seed", 7, 1337)]
    # init_from: a vision source into a vision run must keep the encoder's shape; a text
    # source (vision disabled) brings no vision weights, so its vision keys do not count.
    vision = load_config(None, ["--vision.enabled=true", "--vision.d_vision=32",
                                "--vision.freeze_text=true"])
    source = Config().to_dict()
    source["vision"]["enabled"] = True
    assert init_config_problems(source, vision) == ["vision.d_vision (64 -> 32)"]
    source["vision"]["enabled"] = False
    assert init_config_problems(source, vision) == []
