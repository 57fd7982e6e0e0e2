"""Config: cmd splitting, macros, ${PORT}, defaults and errors that name the key."""

from __future__ import annotations

import pytest

from llama_swap import ConfigError, go_duration, go_format, parse_config, split_command


def test_split_command_follows_the_original_test_vector():
    cmd = (
        "python model1.py \\\n"
        ' -a "double quotes" \\\n'
        " --arg2 'single quotes'\n"
        " -s\n"
        " # comment 1\n"
        " --arg3 123 \\\n"
        "\n"
        " # comment 2\n"
        " --arg4 '\"string in string\"'\n"
        "\n"
        "\n"
        " # \u2026\n"
        " -c \"'single quoted'\""
    )
    assert split_command(cmd) == [
        "python", "model1.py", "-a", "double quotes", "--arg2", "single quotes", "-s", "--arg3", "123",
        "--arg4", '"string in string"', "-c", "'single quoted'",
    ]


@pytest.mark.parametrize("cmd, argv", [
    ('a "" b', ["a", "", "b"]),
    ("a#b c", ["a#b", "c"]),
    ('x "a\\$b\\q"', ["x", "a$b\\q"]),
    ("x a\\ b", ["x", "a b"]),
    ("x 'unterminated quote", ["x", "unterminated quote"]),
    ("x a\rb", ["x", "a\rb"]),
    ('x pre"mid"\'post\'', ["x", "premidpost"]),
])
def test_split_command_quoting(cmd, argv):
    assert split_command(cmd) == argv


def test_split_command_refuses_an_empty_command():
    with pytest.raises(ValueError, match="empty command"):
        split_command("  \n # only a comment\n")


def test_ports_are_assigned_in_model_id_order_only_to_models_that_use_them():
    config = parse_config("""
startPort: 9000
models:
  model2: {cmd: "srv --port ${PORT}"}
  author/model:F16: {cmd: "srv --port ${PORT}"}
  model1: {cmd: "srv --port ${PORT}"}
  fixed: {cmd: "srv --port 1999", proxy: "http://127.0.0.1:1999"}
""")
    assert config.models["author/model:F16"].proxy == "http://localhost:9000"
    assert config.models["model1"].proxy == "http://localhost:9001"
    assert config.models["model2"].cmd == "srv --port 9002"
    assert config.models["fixed"].proxy == "http://127.0.0.1:1999"


def test_defaults_match_the_original():
    config = parse_config("models:\n  m: {cmd: 'srv --port ${PORT}'}\n")
    model = config.models["m"]
    assert config.health_check_timeout == 120
    assert model.proxy == "http://localhost:5800"
    assert model.check_endpoint == "/health"
    assert model.unload_timeout == 10
    assert model.ttl == 0


def test_health_check_timeout_has_a_minimum_of_15_seconds():
    assert parse_config("healthCheckTimeout: 3\nmodels: {}\n").health_check_timeout == 15


def test_macros_expand_in_declaration_order_with_model_id_and_typed_values():
    config = parse_config("""
macros:
  temp: 0.7
  base: "srv --port ${PORT}"
  full: "${base} --name ${MODEL_ID} --temp ${temp}"
models:
  qwen:
    macros: {temp: 1.0}
    cmd: "${full}"
    name: "${MODEL_ID} model"
    aliases: ["${MODEL_ID}-alias"]
""")
    model = config.models["qwen"]
    assert model.cmd == "srv --port 5800 --name qwen --temp 1.0"
    assert model.name == "qwen model"
    assert config.real_model_id("qwen-alias") == "qwen"


def test_cmd_comment_lines_are_dropped_before_macros_expand():
    config = parse_config("""
models:
  m:
    cmd: |
      srv --port ${PORT}
      # --flag ${undefined}
      --ctx 4096
""")
    assert config.models["m"].cmd == "srv --port ${PORT}\n--ctx 4096\n".replace("${PORT}", "5800")


def test_env_macros_are_substituted_before_parsing(monkeypatch):
    monkeypatch.setenv("LS_TEST_MODEL_DIR", "/models")
    config = parse_config("models:\n  m:\n    cmd: 'srv -m ${env.LS_TEST_MODEL_DIR}/x.gguf --port ${PORT}'\n"
                          "    # ${env.LS_NOT_SET_ANYWHERE}\n")
    assert config.models["m"].cmd == "srv -m /models/x.gguf --port 5800"


@pytest.mark.parametrize("yaml_text, message", [
    ("models:\n  m: {cmd: srv, proxy: 'http://h:1', ttl: abc}\n", "models.m.ttl: expected an integer"),
    ("models:\n  m: {cmd: 'srv --port 1'}\n", "models.m.proxy: uses ${PORT} but cmd does not"),
    ("models:\n  m: {cmd: 'srv ${nope}', proxy: 'http://h:1'}\n", "models.m.cmd: unknown macro '${nope}'"),
    ("models:\n  m: {cmd: 'srv --port ${PORT}', cmdStop: 'kill ${PORT} ${PID} ${x}'}\n",
     "models.m.cmdStop: unknown macro '${x}'"),
    ("models:\n  m: {cmd: 'srv --port ${PORT}', unloadTimeout: -1}\n",
     "models.m.unloadTimeout: invalid unloadTimeout value -1"),
    ("models:\n  a: {cmd: 'srv --port ${PORT}', aliases: [x]}\n  b: {cmd: 'srv --port ${PORT}', aliases: [x]}\n",
     "models.b.aliases: duplicate alias 'x'"),
    ("models:\n  m: {cmd: 'srv --port ${PORT}'\n", "invalid YAML (line"),
    ("- just\n- a list\n", "top-level YAML must be a mapping"),
    ("models: [a, b]\n", "models: expected a mapping, got a list"),
    ("macros: {a: '${b}', b: x}\nmodels:\n  m: {cmd: 'srv ${a}', proxy: 'http://h:1'}\n",
     "models.m.cmd: unknown macro '${b}'"),
    ("startPort: 0\nmodels: {}\n", "startPort: must be greater than 1"),
    ("macros: {PORT: 1}\nmodels: {}\n", "macro name 'PORT' is reserved"),
    ("models:\n  m: {cmd: 'srv ${env.LS_SURELY_UNSET_VAR}'}\n",
     "environment variable 'LS_SURELY_UNSET_VAR' is not set"),
])
def test_config_errors_name_the_key(yaml_text, message):
    with pytest.raises(ConfigError) as error:
        parse_config(yaml_text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("yaml_text, message", [
    ("models:\n  m: {proxy: 'http://x:1'}\n", "models.m.cmd: is required"),
    ("models:\n  m: {cmd: '# only a comment', proxy: 'http://x:1'}\n", "models.m.cmd: is required"),
    ("models:\n  m: {cmd: 'srv --port ${PORT}', proxy: 'not a url'}\n", "models.m.proxy: invalid proxy URL"),
    ("models:\n  m: {cmd: 'srv --port ${PORT}', env: [NOEQUALS]}\n",
     "models.m.env: entry 'NOEQUALS' must look like KEY=VALUE"),
])
def test_what_the_original_finds_only_at_start_leaves_the_model_loaded_but_broken(yaml_text, message):
    config = parse_config(yaml_text + "  ok: {cmd: 'srv --port ${PORT}'}\n")
    assert message in config.models["m"].problem and not config.models["ok"].problem
    assert any(message in note and "m cannot start until this is fixed" in note for note in config.notes())


def test_every_error_of_a_pass_is_reported_at_once():
    with pytest.raises(ConfigError) as error:  # types
        parse_config("startPort: abc\nmodels:\n  a: {cmd: 'srv --port ${PORT}', ttl: soon}\n"
                     "  b: {cmd: 'srv --port ${PORT}', unlisted: maybe}\n")
    assert [m.split(":")[0] for m in error.value.messages] == ["startPort", "models.a.ttl", "models.b.unlisted"]
    with pytest.raises(ConfigError) as error:  # values and cross-references, in the original's order
        parse_config("globalTTL: -1\nmodels:\n  a: {cmd: 'srv --port ${PORT}', ttl: -5}\n"
                     "  b: {cmd: 'srv --port ${PORT}', capabilities: {in: [video]}}\n"
                     "groups: {g: {members: [a, zz]}}\napiKeys: ['']\n")
    messages = error.value.messages
    assert len(messages) == 5, messages
    for message, needle in zip(messages, ["globalTTL", "invalid TTL value -5", "invalid modality",
                                          'no model config for "zz"', "empty api key"]):
        assert needle in message, messages


@pytest.mark.parametrize("seconds, text", [(15, "15s"), (120, "2m0s"), (3600, "1h0m0s"), (1.5, "1.5s"), (0.25, "250ms"),
                                           (90, "1m30s")])
def test_durations_read_like_go(seconds, text):
    assert go_duration(seconds) == text


@pytest.mark.parametrize("value, text", [(True, "true"), (16384, "16384"), (0.7, "0.7"), (1e21, "1e+21"), ("s", "s")])
def test_macro_values_format_like_go(value, text):
    assert go_format(value) == text
