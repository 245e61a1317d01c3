"""utils.config: resolution order, override typing, clear errors, and the shipped YAML files."""
import argparse
import itertools
from pathlib import Path

import jinja2.sandbox
import pytest
import yaml

from utils import config
from utils.config import ConfigError, load

REPO = Path(__file__).resolve().parent.parent
MODEL_FILES = sorted((REPO / "configs" / "models").glob("*.yaml"))
ALGO_FILES = sorted((REPO / "configs" / "algorithms").glob("*.yaml"))
DEFAULT_TEXT = (REPO / config.DEFAULT_MODEL_CONFIG).read_text()


def write(tmp_path, text, name="custom.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults ---
def test_default_loads():
    cfg = load()
    assert list(cfg) == list(config.SCHEMA)  # no algorithm section without an algorithm config
    assert cfg["model"]["name"] == "smollm2-135m"
    assert cfg["model"]["architecture"] == "llama"
    assert cfg["training"]["learning_rate"] == 2e-4
    assert cfg["training"]["per_device_train_batch_size"] == 4
    assert cfg["validation"]["max_new_tokens"] == 96
    assert cfg["paths"]["output_dir"] is None


def test_bare_name_and_path_resolve_to_the_same_config(repo_root, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # names and repo-relative paths must not depend on the working directory
    by_name = load("smollm2-135m")
    assert by_name == load("configs/models/smollm2-135m.yaml")
    assert by_name == load(repo_root / "configs/models/smollm2-135m.yaml")
    assert load("smollm2-135m", "grpo") == load("smollm2-135m", repo_root / "configs/algorithms/grpo.yaml")


def test_default_file_sets_every_schema_key():
    raw = yaml.safe_load(DEFAULT_TEXT)  # the default documents every key, none left implicit
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in config.SCHEMA.items()}


def test_dump_round_trips():
    cfg = load("dialogpt-medium", "dpo")
    assert yaml.safe_load(config.dump(cfg)) == cfg


# --- overrides ---
@pytest.mark.parametrize("tokens, dotted, expected", [
    (["--training.learning_rate", "1e-5"], "training.learning_rate", 1e-5),       # float, exponent form
    (["--training.learning_rate=3"], "training.learning_rate", 3.0),              # int text where float expected, = form
    (["--lora.r", "8"], "lora.r", 8),                                             # int
    (["--training.max_steps", "-1"], "training.max_steps", -1),                   # negative value is a value, not a flag
    (["--training.gradient_checkpointing", "yes"], "training.gradient_checkpointing", True),  # bool word
    (["--lora.enabled", "0"], "lora.enabled", False),                             # bool digit
    (["--lora.enabled=FALSE"], "lora.enabled", False),                            # bool, case-insensitive
    (["--lora.target_modules", "q_proj, v_proj"], "lora.target_modules", ["q_proj", "v_proj"]),  # comma list
    (["--lora.target_modules", '["c_attn"]'], "lora.target_modules", ["c_attn"]),  # JSON list
    (["--paths.output_dir", "null"], "paths.output_dir", None),                   # null for Optional
    (["--training.save_total_limit", "None"], "training.save_total_limit", None),  # none for Optional int
    (["--training.save_total_limit", "2"], "training.save_total_limit", 2),       # Optional int with a value
    (["--lora.bias", "none"], "lora.bias", "none"),                               # not Optional: "none" stays text
    (["--model.dtype", "bfloat16"], "model.dtype", "bfloat16"),                   # one of a fixed set
])
def test_override_typing(tokens, dotted, expected):
    section, key = dotted.split(".")
    value = load(overrides=tokens)[section][key]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("flag, value, dotted, expected", [
    ("--batch_size", "2", "training.per_device_train_batch_size", 2),
    ("--epochs", "1", "training.num_train_epochs", 1.0),
    ("--learning_rate", "5e-5", "training.learning_rate", 5e-5),
    ("--gradient_accumulation_steps", "8", "training.gradient_accumulation_steps", 8),
    ("--max_steps", "3", "training.max_steps", 3),
    ("--seed", "7", "training.seed", 7),
    ("--output_dir", "out/x", "paths.output_dir", "out/x"),
])
def test_shortcut_flags(flag, value, dotted, expected):
    section, key = dotted.split(".")
    assert load(overrides=[flag, value])[section][key] == expected


def test_later_override_wins():
    assert load(overrides=["--lora.r", "4", "--lora.r=12"])["lora"]["r"] == 12


@pytest.mark.parametrize("tokens, message", [
    (["--lora.r", "eight"], "expected integer"),                  # not an int
    (["--lora.r", "8.5"], "expected integer"),                    # a float is not an int
    (["--lora.enabled", "maybe"], "true/false"),                  # not a bool word
    (["--model.dtype", "float8"], "one of 'auto'"),               # outside the fixed set
    (["--lora.r", "null"], "expected integer"),                   # null only where Optional
    (["--lora.target_modules", "[1, 2]"], "expected text"),       # list of the wrong element type
    (["--lora.r"], "needs a value"),                              # flag at the end, no value
    (["--lora.r", "--epochs", "1"], "needs a value"),             # flag followed by a flag
    (["lora.r", "8"], "unexpected argument"),                     # no dashes
    (["--algorithm.beta", "0.1"], "--algo_config"),               # no algorithm loaded
])
def test_bad_overrides_raise(tokens, message):
    with pytest.raises(ConfigError, match=message):
        load(overrides=tokens)


@pytest.mark.parametrize("flag, suggestion", [
    ("--training.learnig_rate", "--training.learning_rate"),      # misspelled key
    ("--batchsize", "--batch_size"),                              # misspelled shortcut
    ("--dtype", "--model.dtype"),                                 # key without its section
    ("--trainig.seed", "--training.seed"),                        # misspelled section
])
def test_unknown_cli_key_names_close_match(flag, suggestion):
    with pytest.raises(ConfigError, match="unknown flag") as err:
        load(overrides=[flag, "1"])
    assert suggestion in str(err.value)


def test_unknown_algorithm_key_names_close_match():
    with pytest.raises(ConfigError) as err:
        load("smollm2-135m", "grpo", ["--algorithm.bta", "0.1"])
    assert "--algorithm.beta" in str(err.value)


def test_algorithm_name_cannot_be_overridden():
    with pytest.raises(ConfigError, match="--algo_config"):
        load("smollm2-135m", "grpo", ["--algorithm.name", "ppo"])


# --- resolution order ---
def test_model_then_algorithm_then_cli():
    model_only = load("tinyllama-1.1b")
    with_algo = load("tinyllama-1.1b", "grpo")
    with_cli = load("tinyllama-1.1b", "grpo", ["--learning_rate", "2e-5", "--max_steps", "5"])
    assert model_only["training"]["learning_rate"] == 1e-4           # tinyllama-1.1b.yaml
    assert with_algo["training"]["learning_rate"] == 1e-5            # grpo.yaml overrides the model
    assert with_cli["training"]["learning_rate"] == 2e-5             # the command line overrides both
    assert (model_only["training"]["max_steps"], with_algo["training"]["max_steps"],
            with_cli["training"]["max_steps"]) == (-1, 200, 5)
    assert with_algo["validation"]["eval_steps"] == 20                # grpo.yaml; the model says 50
    assert with_algo["lora"]["r"] == 32                              # untouched by grpo.yaml
    assert with_algo["algorithm"]["num_generations"] == 4
    assert load("tinyllama-1.1b", "grpo", ["--algorithm.beta", "0"])["algorithm"]["beta"] == 0.0


# --- argparse integration ---
def make_parser(algo=None):
    return config.add_common_args(argparse.ArgumentParser(prog="script.py"), algo=algo)


def test_from_args_shortcuts_and_extra_tokens():
    args, extra = make_parser().parse_known_args(
        ["--config", "qwen2.5-0.5b", "--batch_size", "2", "--seed", "7", "--lora.r=4",
         "--training.warmup_ratio", "0.1"])
    cfg = config.from_args(args, extra)
    assert cfg["model"]["name"] == "qwen2.5-0.5b"
    assert cfg["training"]["per_device_train_batch_size"] == 2
    assert cfg["training"]["seed"] == 7
    assert cfg["lora"]["r"] == 4
    assert cfg["training"]["warmup_ratio"] == 0.1
    assert args.run_id == "run_001"


def test_from_args_defaults_and_extra_tokens_win():
    args, extra = make_parser().parse_known_args(["--epochs", "2", "--training.num_train_epochs", "5"])
    cfg = config.from_args(args, extra)
    assert cfg["training"]["num_train_epochs"] == 5.0                # explicit key beats the shortcut
    assert cfg["training"]["seed"] == load()["training"]["seed"]     # no --seed: the config's seed


def test_algo_parser_defaults_to_its_algorithm():
    args, extra = make_parser("rloo").parse_known_args([])
    assert args.algo_config == "configs/algorithms/rloo.yaml"
    assert config.from_args(args, extra)["algorithm"]["name"] == "rloo"


def test_algo_config_of_another_method_is_refused():
    args, extra = make_parser("grpo").parse_known_args(["--algo_config", "ppo"])
    with pytest.raises(ConfigError, match="runs 'grpo'"):
        config.from_args(args, extra)


def test_abbreviated_flag_is_not_silently_accepted():
    args, extra = make_parser().parse_known_args(["--learning", "1e-4"])
    assert extra == ["--learning", "1e-4"]  # allow_abbrev is off: not taken as --learning_rate
    with pytest.raises(ConfigError, match="--learning_rate"):
        config.from_args(args, extra)


def test_help_mentions_overrides():
    text = make_parser("dpo").format_help()
    assert "--section.key value" in text
    assert "--algo_config" in text and "configs/algorithms/dpo.yaml" in text


# --- file errors ---
def test_unknown_yaml_key_names_file_and_close_match(tmp_path):
    path = write(tmp_path, DEFAULT_TEXT.replace("  learning_rate: 2.0e-4", "  learnig_rate: 2.0e-4"))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(path) in str(err.value)
    assert "training.learnig_rate" in str(err.value) and "training.learning_rate" in str(err.value)


def test_unknown_yaml_section_names_close_match(tmp_path):
    path = write(tmp_path, DEFAULT_TEXT.replace("\nvalidation:\n", "\nvalidaton:\n"))
    with pytest.raises(ConfigError, match="unknown section 'validaton' .did you mean: validation"):
        load(path)


def test_unknown_key_in_algorithm_yaml(tmp_path):
    text = (REPO / "configs/algorithms/dpo.yaml").read_text().replace("  beta: 0.1", "  bta: 0.1")
    path = write(tmp_path, text, "my_dpo.yaml")
    with pytest.raises(ConfigError) as err:
        load("smollm2-135m", path)
    assert str(path) in str(err.value) and "algorithm.beta" in str(err.value)


def test_algorithm_section_in_model_yaml_is_refused(tmp_path):
    path = write(tmp_path, DEFAULT_TEXT + "\nalgorithm:\n  name: dpo\n")
    with pytest.raises(ConfigError, match="configs/algorithms"):
        load(path)


@pytest.mark.parametrize("old, new, message", [
    ("  r: 16", "  r: sixteen", "lora.r: expected integer"),            # text for an int
    ("  r: 16", "  r: true", "lora.r: expected integer"),               # bool is not an int
    ("  enabled: true", "  enabled: 1", "lora.enabled: expected true/false"),  # int is not a bool
    ("  learning_rate: 2.0e-4", "  learning_rate: 2e-4", "write it as 2.0e-4"),  # YAML reads 2e-4 as text
    ("  max_steps: -1", "  max_steps: null", "null is not allowed"),   # null where not Optional
    ("  dtype: auto", "  dtype: fp16", "one of 'auto'"),               # outside the fixed set
])
def test_wrong_type_in_yaml(tmp_path, old, new, message):
    path = write(tmp_path, DEFAULT_TEXT.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_int_accepted_where_float_expected(tmp_path):
    path = write(tmp_path, DEFAULT_TEXT.replace("  max_grad_norm: 1.0", "  max_grad_norm: 1"))
    value = load(path)["training"]["max_grad_norm"]
    assert value == 1.0 and type(value) is float


def test_missing_required_key_and_implicit_optional(tmp_path):
    path = write(tmp_path, DEFAULT_TEXT.replace("  revision: null\n", ""))
    assert load(path)["model"]["revision"] is None                 # Optional: may be left out
    path = write(tmp_path, DEFAULT_TEXT.replace("  seed: 42\n", ""))
    with pytest.raises(ConfigError, match="missing required keys: training.seed"):
        load(path)


@pytest.mark.parametrize("model, algo, listed", [
    ("no-such-model", None, "smollm2-135m"),
    ("configs/models/typo.yaml", None, "qwen2.5-0.5b"),
    ("smollm2-135m", "no-such-algo", "grpo"),
])
def test_missing_config_lists_available(model, algo, listed):
    with pytest.raises(ConfigError, match="not found") as err:
        load(model, algo)
    assert listed in str(err.value)


def test_corrupt_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name: x\n  hub_id: [unclosed\nlora:\n  r: 1\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path, DEFAULT_TEXT.replace("  r: 16\n", "  r: 16\n  r: 8\n"))
    with pytest.raises(ConfigError, match="duplicate key 'r'"):
        load(path)


# --- the shipped files ---
@pytest.mark.parametrize("model_file, algo_file", list(itertools.product(MODEL_FILES, ALGO_FILES)),
                         ids=lambda p: p.stem)
def test_every_model_loads_with_every_algorithm(model_file, algo_file):
    cfg = load(model_file, algo_file)
    assert cfg["model"]["name"] == model_file.stem          # outputs and reports name models by file
    assert cfg["algorithm"]["name"] == algo_file.stem
    budget = cfg["training"]["max_prompt_tokens"] + cfg["validation"]["max_new_tokens"]
    assert budget <= cfg["model"]["max_length"]                # prompt and answer fit together


LLAMA_STYLE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("model_file", MODEL_FILES, ids=lambda p: p.stem)
def test_lora_targets_match_architecture(model_file):
    cfg = load(model_file)
    targets = cfg["lora"]["target_modules"]
    if cfg["model"]["architecture"] == "gpt2":
        assert targets == ["c_attn", "c_proj"] and cfg["lora"]["fan_in_fan_out"] is True
    else:  # llama and qwen2 share the projection names
        assert {"q_proj", "v_proj"} <= set(targets) <= LLAMA_STYLE
        assert cfg["lora"]["fan_in_fan_out"] is False


@pytest.mark.parametrize("name, architecture, layers, hidden, heads, kv_heads, vocab, tied", [
    ("smollm2-135m", "llama", 30, 576, 9, 3, 49152, True),
    ("dialogpt-medium", "gpt2", 24, 1024, 16, 16, 50257, True),
    ("tinyllama-1.1b", "llama", 22, 2048, 32, 4, 32000, False),
    ("llama-3.2-1b", "llama", 16, 2048, 32, 8, 128256, True),
    ("llama-3.2-1b-ultrafast", "llama", 16, 2048, 32, 8, 128256, True),
    ("llama-3-8b", "llama", 32, 4096, 32, 8, 128256, False),
    ("qwen2.5-0.5b", "qwen2", 24, 896, 14, 2, 151936, True),
    ("qwen2.5-1.5b", "qwen2", 28, 1536, 12, 2, 151936, True),
])
def test_architecture_facts(name, architecture, layers, hidden, heads, kv_heads, vocab, tied):
    cfg = load(name)
    meta = cfg["metadata"]
    assert cfg["model"]["architecture"] == architecture
    assert (meta["layers"], meta["hidden_size"], meta["heads"], meta["kv_heads"], meta["vocab_size"],
            meta["tied_embeddings"]) == (layers, hidden, heads, kv_heads, vocab, tied)


def test_every_model_file_is_covered_by_the_facts_table():
    assert {p.stem for p in MODEL_FILES} == {
        "smollm2-135m", "dialogpt-medium", "tinyllama-1.1b", "llama-3.2-1b", "llama-3.2-1b-ultrafast",
        "llama-3-8b", "qwen2.5-0.5b", "qwen2.5-1.5b"}


@pytest.mark.parametrize("model_file, algo", list(itertools.product(MODEL_FILES, ["grpo", "rloo"])),
                         ids=lambda x: getattr(x, "stem", x))
def test_generation_batch_divides_into_groups(model_file, algo):
    cfg = load(model_file, algo)  # TRL requires batch x grad-accum to be a multiple of num_generations
    train = cfg["training"]
    assert (train["per_device_train_batch_size"] * train["gradient_accumulation_steps"]) % \
        cfg["algorithm"]["num_generations"] == 0


@pytest.mark.parametrize("model_file", [p for p in MODEL_FILES if load(p)["model"]["chat_template"]],
                         ids=lambda p: p.stem)
def test_own_chat_template_renders_prompt_as_prefix(model_file):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers
    template = env.from_string(load(model_file)["model"]["chat_template"])
    prompt = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "2 + 3?"}]
    answer = [{"role": "assistant", "content": '{"program": "add(2, 3)", "answer": "5"}'}]
    head = template.render(messages=prompt, add_generation_prompt=True, eos_token="<|endoftext|>")
    full = template.render(messages=prompt + answer, add_generation_prompt=False, eos_token="<|endoftext|>")
    assert head == "System: Answer in JSON.<|endoftext|>User: 2 + 3?<|endoftext|>Assistant:"
    assert full.startswith(head) and full.endswith('"answer": "5"}<|endoftext|>')


# --- plain algorithm flags (every algorithm key as a flag of its own: --clip_range 0.3 --kl_coef 0.1) ---
@pytest.mark.parametrize("algo, flags, key, value", [
    ("ppo", ["--clip_range", "0.3"], "clip_range", 0.3),                  # = --algorithm.clip_range
    ("ppo", ["--kl_coef=0.1"], "kl_coef", 0.1),                           # the = form too
    ("dpo", ["--beta", "0.05"], "beta", 0.05),
    ("rloo", ["--num_generations", "8"], "num_generations", 8),           # RLOO's k
    ("grpo", ["--algorithm.beta", "0.2"], "beta", 0.2),                   # the dotted form still works
    ("grpo", ["--beta", "0.3", "--algorithm.beta", "0.4"], "beta", 0.4),  # the later one wins
])
def test_plain_algorithm_flags(algo, flags, key, value):
    args, extra = make_parser(algo).parse_known_args(flags)
    assert config.from_args(args, extra)["algorithm"][key] == value


def test_plain_flag_two_sections_share_names_both_dotted_forms():
    args, extra = make_parser("grpo").parse_known_args(["--temperature", "0.7"])
    with pytest.raises(ConfigError, match="--algorithm.temperature or --generation.temperature"):
        config.from_args(args, extra)


def test_plain_flag_of_another_method_is_unknown():
    args, extra = make_parser("dpo").parse_known_args(["--clip_range", "0.3"])   # a PPO key
    with pytest.raises(ConfigError, match="unknown flag --clip_range"):
        config.from_args(args, extra)


def test_quick_test_settings_yield_to_shortcuts_and_flags():
    quick = {"training.max_steps": 2, "validation.num_samples": 4, "training.learning_rate": 1e-3}
    args, extra = make_parser("grpo").parse_known_args(["--max_steps", "6", "--validation.num_samples", "3"])
    args.quick_test = True
    cfg = config.from_args(args, extra, quick)
    assert (cfg["training"]["max_steps"], cfg["validation"]["num_samples"]) == (6, 3)   # explicit flags win
    assert cfg["training"]["learning_rate"] == 1e-3                                      # the rest applies
    args.quick_test = False
    assert config.from_args(args, extra, quick)["training"]["learning_rate"] != 1e-3     # only with --quick_test


def test_help_lists_the_plain_algorithm_flags():
    text = make_parser("ppo").format_help()
    assert "--clip_range" in text and "--kl_coef" in text and "(= --algorithm.KEY)" in text
