"""Config validation, macros, defaults, warnings and --config-dir merging, table-driven.

Every error the original's (Go llama-swap's) config loader reports has a case here. Errors are checked with
`in`: the key path our message starts with, and the original's wording (the key phrase), so a
clearer message is fine as long as it still says what the original says. Positive cases pin
down macro expansion, ${PORT} assignment, aliases, preload cleanup and the defaults of every
top-level key. The last sections run the CLI (`--check-config`, `--config-dir`) and a real
llama-swap to see typed macro values and the model records that `/v1/models` renders.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml

from helpers import ROOT, ServerProcess, chat, free_port, running
from llama_swap import ConfigError, load_config, parse_config

PY = sys.executable
SERVE = 'cmd: "srv --port ${PORT}"'  # a model that uses an automatic port


def text_of(yaml_text: str) -> str:
    """Dedented YAML with `@M` standing for a model that uses ${PORT}."""
    return textwrap.dedent(yaml_text).replace("@M", "{" + SERVE + "}")


def load(yaml_text: str):
    return parse_config(text_of(yaml_text))


def error_of(yaml_text: str) -> str:
    """The first error reported: the one the original reports (later lines are every other one)."""
    with pytest.raises(ConfigError) as error:
        parse_config(text_of(yaml_text))
    messages = error.value.messages
    assert messages and all(m.strip() and "\n" not in m for m in messages), messages
    return messages[0]


def assert_error(yaml_text: str, needles: list[str]) -> None:
    message = error_of(yaml_text)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


E = pytest.param  # one error case: (yaml, [key path, key phrase, ...], id=...)


# -- 1. macro declarations -----------------------------------------------------------

LONG = "a" * 64
MACRO_DECLARATIONS = [
    E(f"macros: {{{LONG}: x}}\n",
      ["macros", f"macro name '{LONG}' exceeds maximum length of 63 characters"], id="global-name-64-chars"),
    E("macros: {'a b': x}\n",
      ["macros", "macro name 'a b' contains invalid characters, must match pattern ^[a-zA-Z0-9_-]+$"],
      id="global-name-space"),
    E("macros: {a.b: x}\n", ["macros", "macro name 'a.b' contains invalid characters"], id="global-name-dot"),
    E("macros: {a: [1, 2]}\n",
      ["macros", "macro 'a' has invalid type", "must be a scalar type (string, int, float, or bool)"],
      id="global-list-value"),
    E("macros: {a: {b: 1}}\n",
      ["macros", "macro 'a' has invalid type", "must be a scalar type"], id="global-mapping-value"),
    E("macros: {a: ~}\n", ["macros", "macro 'a' has invalid type", "must be a scalar type"], id="global-null-value"),
    E("macros:\n  a:\n", ["macros", "macro 'a' has invalid type"], id="global-empty-value"),
    E("macros: {a: 'x ${a} y'}\n", ["macros", "macro 'a' contains self-reference"], id="global-self-reference"),
    E("macros: {PID: 1}\n", ["macros", "macro name 'PID' is reserved"], id="global-reserved-PID"),
    E("macros: {MODEL_ID: x}\n", ["macros", "macro name 'MODEL_ID' is reserved"], id="global-reserved-MODEL_ID"),
    # checks run in the order length, characters, type/self-reference, reserved
    E(f"macros: {{'{LONG} x': 1}}\n", ["exceeds maximum length of 63 characters"], id="order-length-before-characters"),
    E("macros: {'a b': [1]}\n", ["contains invalid characters"], id="order-characters-before-type"),
    E("macros: {PORT: [1]}\n", ["macro 'PORT' has invalid type"], id="order-type-before-reserved"),
    E("macros: {PID: 'x${PID}'}\n", ["macro 'PID' contains self-reference"], id="order-self-reference-before-reserved"),
]
for case_id, key, value, phrase in [
    ("name-64-chars", LONG, "x", f"macro name '{LONG}' exceeds maximum length of 63 characters"),
    ("name-space", "'a b'", "x", "macro name 'a b' contains invalid characters, must match pattern ^[a-zA-Z0-9_-]+$"),
    ("list-value", "a", "[1]", "macro 'a' has invalid type"),
    ("null-value", "a", "~", "macro 'a' has invalid type"),
    ("self-reference", "a", "'${a}'", "macro 'a' contains self-reference"),
    ("reserved-PORT", "PORT", "1", "macro name 'PORT' is reserved"),
    ("reserved-PID", "PID", "1", "macro name 'PID' is reserved"),
    ("reserved-MODEL_ID", "MODEL_ID", "x", "macro name 'MODEL_ID' is reserved"),
]:
    MACRO_DECLARATIONS.append(E(f"models:\n  m:\n    {SERVE}\n    macros: {{{key}: {value}}}\n", ["models.m", phrase],
                                id=f"model-{case_id}"))


@pytest.mark.parametrize("yaml_text, needles", MACRO_DECLARATIONS)
def test_macro_declaration_errors(yaml_text, needles):
    assert_error(yaml_text, needles)


def test_a_macro_name_of_63_characters_is_accepted():
    name = "a" * 63
    config = load(f"macros: {{{name}: v}}\nmodels:\n  m:\n    {SERVE}\n    name: '${{{name}}}'\n")
    assert config.models["m"].name == "v"


# -- 2. unresolved macros ----------------------------------------------------------------


def model_with(field: str) -> str:
    return f"models:\n  m:\n    {SERVE}\n    {field}\n"


UNKNOWN_MACROS = [
    E(model_with("proxy: 'http://127.0.0.1:${nope}'"), ["models.m.proxy", "unknown macro '${nope}'"], id="model-proxy"),
    E(model_with("checkEndpoint: '/health/${nope}'"),
      ["models.m.checkEndpoint", "unknown macro '${nope}'"], id="model-checkEndpoint"),
    E(model_with("name: 'model ${nope}'"), ["models.m.name", "unknown macro '${nope}'"], id="model-name"),
    E(model_with("description: 'about ${nope}'"),
      ["models.m.description", "unknown macro '${nope}'"], id="model-description"),
    E(model_with("filters: {stripParams: 'a, ${nope}'}"),
      ["models.m.filters", "unknown macro '${nope}'"], id="model-stripParams"),
    E(model_with("useModelName: '${nope}'"),
      ["models.m.useModelName", "unknown macro '${nope}'"], id="model-useModelName"),
    E(model_with("aliases: ['x-${nope}']"), ["models.m.aliases", "unknown macro '${nope}'"], id="model-aliases"),
    E(model_with("env: ['A=${nope}']"), ["models.m.env", "unknown macro '${nope}'"], id="model-env"),
    E(model_with("metadata: {a: {b: [1, 'x ${nope}']}}"),
      ["models.m.metadata", "unknown macro '${nope}'"], id="model-metadata-nested"),
    E(model_with("capabilities: {context: '${nope}'}"),
      ["models.m.capabilities", "unknown macro '${nope}'"], id="model-capabilities"),
    E(model_with("filters: {setParams: {t: '${nope}'}}"),
      ["models.m.filters", "unknown macro '${nope}'"], id="model-setParams"),
    E(model_with("filters: {setParamsByID: {'m:x': {t: '${nope}'}}}"),
      ["models.m.filters", "unknown macro '${nope}'"], id="model-setParamsByID-value"),
    E(model_with("ttl: '${nope}'"), ["models.m.ttl", "unknown macro '${nope}'"], id="model-ttl-before-type-check"),
    E(model_with("timeouts: {connect: '${nope}'}"),
      ["models.m.timeouts", "unknown macro '${nope}'"], id="model-timeouts"),
    # ${PID} survives only in cmdStop
    E(model_with("name: 'pid ${PID}'"), ["models.m.name", "${PID}"], id="PID-in-name"),
    E("models:\n  m:\n    cmd: 'srv --port ${PORT} --pid ${PID}'\n", ["models.m.cmd", "${PID}"], id="PID-in-cmd"),
    E("macros: {stop: 'kill ${PID}'}\nmodels:\n  m:\n    cmd: 'srv --port ${PORT} ${stop}'\n",
      ["models.m.cmd", "${PID}"], id="PID-via-macro-in-cmd"),
    # ${PORT} exists only when cmd uses it
    E("models:\n  m:\n    cmd: srv\n    proxy: http://127.0.0.1:9\n    cmdStop: 'kill ${PORT}'\n",
      ["models.m.cmdStop", "macro '${PORT}' should have been substituted"], id="PORT-in-cmdStop-without-cmd"),
    E("models:\n  m:\n    cmd: srv\n    proxy: http://127.0.0.1:9\n    name: 'on ${PORT}'\n",
      ["models.m.name", "macro '${PORT}' should have been substituted"], id="PORT-in-name-without-cmd"),
    E("models:\n  m:\n    name: no cmd and no proxy\n",
      ["models.m", "uses ${PORT} but cmd does not"], id="no-cmd-no-proxy"),
    # model macros never leak; in-place override keeps the global's position
    E("models:\n  a:\n    " + SERVE + "\n    macros: {own: x}\n  b:\n    " + SERVE + "\n    name: '${own}'\n",
      ["models.b.name", "unknown macro '${own}'"], id="model-macro-does-not-leak"),
    E("macros: {a: A, b: B}\nmodels:\n  m:\n    " + SERVE + "\n    macros: {a: '${b}'}\n    name: '${a}'\n",
      ["models.m.name", "unknown macro '${b}'"], id="override-keeps-global-position"),
    # non-model keys: <dotted path>: unknown macro
    E("peers:\n  p:\n    proxy: http://127.0.0.1:9\n    models: [x]\n    apiKey: '${nope}'\n",
      ["peers.p.apiKey", "unknown macro '${nope}'"], id="peers-apiKey"),
    E("peers:\n  p:\n    proxy: http://127.0.0.1:9\n    models: [x]\n    filters: {setParams: {value: '${nope}'}}\n",
      ["peers.p.filters.setParams.value", "unknown macro '${nope}'"], id="peers-setParams"),
    E("apiKeys: [good, '${nope}']\n", ["apiKeys[1]", "unknown macro '${nope}'"], id="apiKeys-index"),
    E("models: {m: @M}\nhooks: {on_startup: {preload: ['${nope}']}}\n",
      ["hooks.on_startup.preload[0]", "unknown macro '${nope}'"], id="hooks-preload"),
    E("globalTTL: '${nope}'\n", ["globalTTL", "unknown macro '${nope}'"], id="globalTTL-before-type-check"),
    E("startPort: '${nope}'\n", ["startPort", "unknown macro '${nope}'"], id="startPort-before-type-check"),
    E("ui: {activity: {session_id: [X-A, '${nope}']}}\n",
      ["ui.activity.session_id[1]", "unknown macro '${nope}'"], id="ui-session-id"),
    E("models: {m: @M}\ngroups: {g: {members: ['${nope}']}}\n",
      ["groups.g.members[0]", "unknown macro '${nope}'"], id="groups-members"),
    E("models: {m: @M}\nselectors: {s: {strategy: pin, targets: [m], metadata: {a: '${nope}'}}}\n",
      ["selectors.s.metadata.a", "unknown macro '${nope}'"], id="selector-metadata"),
    E("apiKeys: ['${MODEL_ID}']\n", ["apiKeys[0]", "unknown macro '${MODEL_ID}'"], id="MODEL_ID-outside-models"),
]


@pytest.mark.parametrize("yaml_text, needles", UNKNOWN_MACROS)
def test_unresolved_macro_errors(yaml_text, needles):
    assert_error(yaml_text, needles)


def test_unknown_top_level_keys_are_not_checked_for_macros():
    config = load("defs: {x: '${nope}'}\nmodels: {m: @M}\n")
    assert "m" in config.models


def test_a_macro_holding_PID_is_fine_in_cmdStop():
    config = load("macros: {stop: 'kill -TERM ${PID}'}\nmodels:\n  m:\n    " + SERVE + "\n    cmdStop: '${stop}'\n")
    assert config.models["m"].cmd_stop == "kill -TERM ${PID}"


# -- 3. environment macros ---------------------------------------------------------------


@pytest.mark.parametrize("value, yaml_text, needles", [
    pytest.param("a\nb", "models:\n  m: {cmd: 'srv --port ${PORT} ${env.LS_T_ENV}'}\n",
                 ["environment variable 'LS_T_ENV' contains newlines or null bytes which are not allowed in YAML "
                  "substitution"], id="newline"),
    pytest.param("a\rb", "models:\n  m: {cmd: 'srv --port ${PORT} ${env.LS_T_ENV}'}\n",
                 ["environment variable 'LS_T_ENV' contains newlines or null bytes"], id="carriage-return"),
    pytest.param(None, "apiKeys: [${env.LS_T_ENV}]\n",
                 ["environment variable 'LS_T_ENV' is not set"], id="unset-in-flow-list"),
    pytest.param("", "apiKeys: ['${env.LS_T_ENV}']\n",
                 ["apiKeys", "empty api key found in apiKeys"], id="empty-api-key"),
    pytest.param(None, "models:\n  m:\n    cmd: |\n      srv --port ${PORT}\n      # ${env.LS_T_ENV}\n",
                 ["environment variable 'LS_T_ENV' is not set"], id="unset-in-block-scalar-line-starting-with-hash"),
])
def test_environment_macro_errors(monkeypatch, value, yaml_text, needles):
    if value is None:
        monkeypatch.delenv("LS_T_ENV", raising=False)
    else:
        monkeypatch.setenv("LS_T_ENV", value)
    assert_error(yaml_text, needles)


def test_env_macros_come_first_so_an_env_value_may_hold_a_macro(monkeypatch):
    monkeypatch.setenv("LS_T_ARGS", "--ctx ${ctx} --id ${MODEL_ID}")
    config = load("macros: {ctx: 4096}\nmodels:\n  m:\n    cmd: 'srv --port ${PORT} ${env.LS_T_ARGS}'\n")
    assert config.models["m"].cmd == "srv --port 5800 --ctx 4096 --id m"


def test_env_macro_in_a_trailing_comment_is_ignored(monkeypatch):
    monkeypatch.delenv("LS_T_UNSET_COMMENT", raising=False)
    config = load("models:\n  m:\n    cmd: 'srv --port ${PORT}'  # see ${env.LS_T_UNSET_COMMENT}\n"
                  "# ${env.LS_T_UNSET_COMMENT}\n")
    assert config.models["m"].cmd == "srv --port 5800"


def test_env_values_are_escaped_for_double_quoted_yaml(monkeypatch):
    monkeypatch.setenv("LS_T_QUOTE", 'say "hi" \\o/')
    config = load('models:\n  m:\n    cmd: srv --port ${PORT}\n    name: "${env.LS_T_QUOTE}"\n')
    assert config.models["m"].name == 'say "hi" \\o/'


# -- 4. setParamsByID keys and aliases -----------------------------------------------

ALIAS_ERRORS = [
    E("models:\n  m:\n    " + SERVE + "\n    filters:\n      setParamsByID:\n        '${MODEL_ID}:x': {a: 1}\n"
      "        'm:x': {a: 2}\n",
      ["models.m.filters.setParamsByID", "m:x", "resolve to the same value"], id="setParamsByID-keys-collide"),
    E("models:\n  m:\n    " + SERVE + "\n    filters:\n      setParamsByID:\n        '${nope}:x': {a: 1}\n",
      ["models.m.filters.setParamsByID", "unknown macro '${nope}'"], id="setParamsByID-key-unknown-macro"),
    E("models:\n  a:\n    " + SERVE + "\n    filters: {setParamsByID: {b: {x: 1}}}\n  b: @M\n",
      ["models.a.filters.setParamsByID", "key 'b' conflicts with an existing model ID"],
      id="setParamsByID-key-is-model-id"),
    E("models:\n  a:\n    " + SERVE + "\n    filters: {setParamsByID: {bb: {x: 1}}}\n"
      "  b:\n    " + SERVE + "\n    aliases: [bb]\n",
      ["models.a.filters.setParamsByID", "duplicate alias 'bb'", "already used by model b"],
      id="setParamsByID-key-is-other-alias"),
    E("models:\n  a:\n    " + SERVE + "\n    filters: {setParamsByID: {x: {v: 1}}}\n"
      "  b:\n    " + SERVE + "\n    filters: {setParamsByID: {x: {v: 2}}}\n",
      ["models.b.filters.setParamsByID", "duplicate alias 'x'", "already used by model a"],
      id="setParamsByID-key-in-two-models"),
    E("models:\n  m:\n    " + SERVE + "\n    aliases: [x, x]\n",
      ["models.m.aliases", "duplicate alias", "x"], id="alias-twice-in-one-model"),
]


@pytest.mark.parametrize("yaml_text, needles", ALIAS_ERRORS)
def test_alias_errors(yaml_text, needles):
    assert_error(yaml_text, needles)


def test_setParamsByID_keys_become_aliases():
    config = load("""
        models:
          m:
            cmd: srv --port ${PORT}
            aliases: [m:low]
            filters:
              setParamsByID:
                "${MODEL_ID}:high": {reasoning_effort: high}
                "m:low": {reasoning_effort: low}
                "${MODEL_ID}": {reasoning_effort: medium}
                "port-${PORT}": {x: 1}
        """)
    model = config.models["m"]
    assert model.aliases == ["m:low", "m:high", "port-5800"]
    assert set(model.filters.set_params_by_id) == {"m:high", "m:low", "m", "port-5800"}
    assert config.real_model_id("m:high") == "m"
    assert config.real_model_id("port-5800") == "m"


# -- 5. top-level and model value checks ---------------------------------------

VALUE_ERRORS = [
    E("performance: {every: 4s}\n", ["performance.every", "must be at least 5s, got 4s"], id="performance-every-4s"),
    E("performance: {every: 4999ms}\n",
      ["performance.every", "must be at least 5s, got 4.999s"], id="performance-every-4999ms"),
    E("performance: {every: 10}\n", ["performance.every"], id="performance-every-bare-number"),
    E("performance: {every: soon}\n", ["performance.every"], id="performance-every-not-a-duration"),
    E("startPort: -5\n", ["startPort", "must be greater than 1"], id="startPort-negative"),
    E("globalTTL: -1\n", ["globalTTL", "must be >= 0"], id="globalTTL-negative"),
    E("unloadTimeout: -1\n", ["unloadTimeout", "must be >= 0"], id="unloadTimeout-negative"),
    E("store: {path: ''}\n", ["store.path", "must not be empty"], id="store-path-empty"),
    E("store: {path: '   '}\n", ["store.path", "must not be empty"], id="store-path-blank"),
    E("store: {}\n", ["store.path", "must not be empty"], id="store-without-path"),
    E("store: {path: /nonexistent-ls-dir/sub/activity.db}\n",
      ["store.path", "directory /nonexistent-ls-dir/sub is not writable"], id="store-parent-missing"),
    E("upstream: {ignorePaths: ['(']}\n",
      ["upstream.ignorePaths", 'invalid regular expression "("'], id="ignorePaths-bad-regex"),
    E("logToStdout: stdout\n",
      ["logToStdout", "must be one of: proxy, upstream, both, none"], id="logToStdout-unknown"),
    E("logToStdout: Proxy\n",
      ["logToStdout", "must be one of: proxy, upstream, both, none"], id="logToStdout-case-sensitive"),
    E(model_with("ttl: -5"), ["models.m", "invalid TTL value -5"], id="model-ttl-negative"),
    E(model_with("ttl: -2"), ["models.m", "invalid TTL value -2"], id="model-ttl-minus-2"),
    E(model_with("capabilities: {in: [text, video]}"),
      ["models.m", 'capabilities.in: invalid modality "video", must be one of: text, audio, image'],
      id="capabilities-in-video"),
    E(model_with("capabilities: {out: [smell]}"),
      ["models.m", 'capabilities.out: invalid modality "smell", must be one of: text, audio, image'],
      id="capabilities-out-smell"),
    E(model_with("capabilities: {context: -1}"),
      ["models.m", "capabilities.context: must be >= 0"], id="capabilities-context-negative"),
    # wrong scalar types are YAML decode errors that name the key
    E("startPort: abcd\n", ["startPort"], id="type-startPort-abcd"),
    E("healthCheckTimeout: soon\n", ["healthCheckTimeout"], id="type-healthCheckTimeout"),
    E("globalTTL: 1.5\n", ["globalTTL"], id="type-globalTTL-float"),
    E("includeAliasesInList: maybe\n", ["includeAliasesInList"], id="type-includeAliasesInList"),
    E("apiKeys: just-one-key\n", ["apiKeys"], id="type-apiKeys-scalar"),
    E(model_with("unlisted: maybe"), ["models.m.unlisted"], id="type-model-unlisted-maybe"),
    E(model_with("aliases: just-one"), ["models.m.aliases"], id="type-model-aliases-scalar"),
    E(model_with("sendLoadingState: 1"), ["models.m.sendLoadingState"], id="type-model-sendLoadingState-int"),
    E(model_with("concurrencyLimit: many"), ["models.m.concurrencyLimit"], id="type-model-concurrencyLimit"),
    E("models: {m: @M}\ngroups: {g: {swap: maybe, members: [m]}}\n", ["groups.g.swap"], id="type-group-swap"),
    E("models: {m: @M}\ngroups: {g: {members: m}}\n", ["groups.g.members"], id="type-group-members-scalar"),
    E("peers: {p: {proxy: 'http://127.0.0.1:9', models: x}}\n", ["peers.p.models"], id="type-peer-models-scalar"),
]


@pytest.mark.parametrize("yaml_text, needles", VALUE_ERRORS)
def test_value_errors(yaml_text, needles):
    assert_error(yaml_text, needles)


def test_store_path_that_is_a_directory(tmp_path):
    assert_error(f"store: {{path: '{tmp_path}'}}\n", ["store.path", f"{tmp_path} is a directory, not a file"])


def test_store_path_in_a_writable_directory_is_accepted(tmp_path):
    path = tmp_path / "activity.db"
    assert load(f"store: {{path: '{path}'}}\n").store_path == str(path)
    path.write_bytes(b"")
    assert load(f"store: {{path: '{path}'}}\n").store_path == str(path)


def test_store_without_a_value_means_in_memory():
    assert load("store:\n").store_path is None


@pytest.mark.parametrize("value", ["1", "'${FIRST}'"])
def test_start_port_accepts_1_and_a_macro(value):
    config = load(f"macros: {{FIRST: 1}}\nstartPort: {value}\nmodels: {{m: @M}}\n")
    assert config.models["m"].proxy == "http://localhost:1"


# -- 6. routing: style, groups, matrix, scheduler ----------------------------------------

THREE = "models: {a: @M, b: @M, c: @M}\n"
LEGACY_BOTH = "config uses both the legacy top-level 'matrix'/'groups' keys and the new 'routing.router' block"

ROUTING_ERRORS = [
    E(THREE + "groups: {g: {members: [a]}}\nrouting: {router: {use: group}}\n",
      [LEGACY_BOTH], id="legacy-groups-and-router-use"),
    E(THREE + "groups: {g: {members: [a]}}\nrouting: {router: {settings: {groups: {h: {members: [b]}}}}}\n",
      [LEGACY_BOTH], id="legacy-groups-and-settings-groups"),
    E(THREE + "matrix: {sets: {s: a}}\nrouting: {router: {settings: {groups: {h: {members: [b]}}}}}\n",
      [LEGACY_BOTH], id="legacy-matrix-and-settings-groups"),
    E(THREE + "groups: {g: {members: [a]}}\nrouting: {router: {settings: {matrix: {sets: {s: a}}}}}\n",
      [LEGACY_BOTH], id="legacy-groups-and-settings-matrix"),
    E(THREE + "groups: {g: {members: [a]}}\nmatrix: {sets: {s: a}}\n",
      ["config cannot use both 'groups' and 'matrix'"], id="legacy-groups-and-legacy-matrix"),
    E(THREE + "routing: {router: {use: best}}\n",
      ["routing.router.use", 'unknown router "best" (valid: group, matrix, vram)'], id="unknown-router"),
    E(THREE + "routing: {scheduler: {use: lifo}}\n",
      ["routing.scheduler.use", 'unknown scheduler "lifo" (valid: fifo)'], id="unknown-scheduler"),
    E(THREE + "routing: {router: {use: matrix}}\n",
      ["routing.router.use is 'matrix' but routing.router.settings.matrix is not set"],
      id="matrix-router-without-settings"),
    E(THREE + "routing: {scheduler: {settings: {fifo: {priority: {a: 1, zz: 2}}}}}\n",
      ['routing.scheduler.settings.fifo.priority references unknown model "zz"'], id="fifo-priority-unknown"),
    E(THREE + "groups: {g: {members: [a, b, a]}}\n",
      ["groups.g", "duplicate model member a found in group: g"], id="group-member-twice"),
    E(THREE + "groups: {g1: {members: [a]}, g2: {members: [b, a]}}\n",
      ["groups.g", "model member a is used in multiple groups"], id="group-member-in-two-groups"),
    E(THREE + "groups: {g: {members: [a, zz]}}\n", ["groups.g", 'no model config for "zz"'], id="group-member-unknown"),
    E(THREE + "routing: {router: {settings: {groups: {g: {members: [a, a]}}}}}\n",
      ["routing.router.settings.groups.g", "duplicate model member a found in group: g"],
      id="settings-group-member-twice"),
]


@pytest.mark.parametrize("yaml_text, needles", ROUTING_ERRORS)
def test_routing_errors(yaml_text, needles):
    assert_error(yaml_text, needles)


MATRIX_MODELS = "models:\n  a: @M\n  b: @M\n  c: {" + SERVE + ", aliases: [cc]}\n  org/m: @M\n"
MATRIX_ERRORS = [  # (matrix body, key phrase)
    E("{vars: {x: a}}", "matrix must define at least one set", id="no-sets"),
    E("{sets: {}}", "matrix must define at least one set", id="empty-sets"),
    E("{vars: {x_y: a}, sets: {s: a}}",
      'var key "x_y" must contain only alphanumeric, \'-\' or \'.\' characters and be 1-32 characters long',
      id="var-key-underscore"),
    E("{vars: {" + "v" * 33 + ": a}, sets: {s: a}}",
      f'var key "{"v" * 33}" must contain only alphanumeric', id="var-key-33-chars"),
    E("{vars: {v: zz}, sets: {s: a}}", 'var key "v" references unknown model "zz"', id="var-unknown-model"),
    E("{vars: {v: cc}, sets: {s: a}}", 'var key "v" references unknown model "cc"', id="var-references-alias"),
    E("{evict_costs: {a: 0}, sets: {s: a}}",
      'evict_cost for "a" must be a positive integer, got 0', id="evict-cost-zero"),
    E("{evict_costs: {a: -3}, sets: {s: a}}",
      'evict_cost for "a" must be a positive integer, got -3', id="evict-cost-negative"),
    E("{evict_costs: {zz: 5}, sets: {s: a}}", 'evict_costs: unknown var or model "zz"', id="evict-cost-unknown-key"),
    E("{sets: {s: ''}}", 'set "s": empty DSL expression', id="dsl-empty"),
    E("{sets: {s: '   '}}", 'set "s": empty DSL expression', id="dsl-blank"),
    E("{sets: {s: '(a'}}", 'set "s": parse: missing closing parenthesis', id="dsl-missing-paren"),
    E("{sets: {s: 'a)'}}", 'set "s": parse: unexpected token ")" after expression', id="dsl-trailing-paren"),
    E("{sets: {s: '()'}}", 'set "s": parse: unexpected token ")"', id="dsl-empty-parens"),
    E("{sets: {s: 'a @ b'}}", "set \"s\": tokenize: unexpected character '@' at position 2", id="dsl-bad-character"),
    E("{sets: {s: '+'}}", "set \"s\": tokenize: expected set name after '+' at position 0", id="dsl-plus-alone"),
    E("{sets: {s: 'a & +'}}", "set \"s\": tokenize: expected set name after '+' at position 4", id="dsl-plus-at-end"),
    E("{sets: {s: 'org/m'}}",
      "set \"s\": tokenize: unexpected character '/' at position 3", id="dsl-slash-needs-a-var"),
    E("{sets: {s: 'a | +nope'}}", 'set "s" references undefined set "nope"', id="dsl-undefined-ref"),
    E("{sets: {s1: '+s2', s2: 'a | +s1'}}", 'circular reference detected involving set', id="dsl-circular"),
    E("{sets: {s: 'a | +s'}}", 'circular reference detected involving set "s"', id="dsl-self-reference"),
    E("{sets: {s: 'a & zz'}}", 'set "s": unknown var or model "zz"', id="dsl-unknown-identifier"),
    E("{sets: {s: 'a & cc'}}", 'set "s": unknown var or model "cc"', id="dsl-alias-is-not-a-model"),
]


@pytest.mark.parametrize("style", ["legacy", "routing"])
@pytest.mark.parametrize("body, phrase", MATRIX_ERRORS)
def test_matrix_errors(style, body, phrase):
    if style == "legacy":
        yaml_text, prefix = MATRIX_MODELS + f"matrix: {body}\n", "matrix: "
    else:
        yaml_text = MATRIX_MODELS + f"routing: {{router: {{use: matrix, settings: {{matrix: {body}}}}}}}\n"
        prefix = "routing.router.settings.matrix: "
    message = error_of(yaml_text)
    assert prefix + phrase in message or (prefix in message and phrase in message), message


def test_matrix_vars_may_name_models_with_slashes_and_dots():
    config = load(MATRIX_MODELS + "matrix: {vars: {om: org/m, v.1-x: a}, evict_costs: {om: 3}, "
                                  "sets: {s: 'om & v.1-x | b', t: '+s & c'}}\n")
    assert config.routing.router == "matrix"
    assert config.routing.matrix.evict_costs == {"org/m": 3}


def test_router_group_ignores_a_settings_matrix():
    config = load(THREE + "routing: {router: {use: group, settings: {matrix: {sets: {}}, "
                          "groups: {g: {swap: false, members: [a, b]}}}}}\n")
    assert config.routing.router == "group"
    assert {g.name for g in config.routing.groups} == {"(default)", "g"}


def test_empty_legacy_groups_may_sit_beside_routing_router():
    config = load(THREE + "groups: {}\nrouting: {router: {use: group}}\n")
    assert config.routing.router == "group"


def test_fifo_priority_may_name_an_alias():
    config = load(MATRIX_MODELS + "routing: {scheduler: {use: fifo, settings: {fifo: {priority: {cc: 5, a: -1}}}}}\n")
    assert config.routing.priority["a"] == -1


# -- 7. apiKeys, peers, peer namespace -----------------------------------------------

PEER = "{proxy: 'http://127.0.0.1:9', models: [x]}"
PEER_ERRORS = [
    E("apiKeys: ['']\n", ["apiKeys", "empty api key found in apiKeys"], id="apiKeys-empty-string"),
    E("apiKeys: [ok, 'a b']\n", ["apiKeys[1]", "api key cannot contain spaces"], id="apiKeys-space"),
    E("peers: {p: {models: [x]}}\n", ["peers.p", "proxy is required"], id="peer-proxy-missing"),
    E("peers: {p: {proxy: '', models: [x]}}\n", ["peers.p", "proxy is required"], id="peer-proxy-empty"),
    E("peers: {p: {proxy: 'http://[::1', models: [x]}}\n",
      ["peers.p", "invalid peer proxy URL (http://[::1)"], id="peer-proxy-unclosed-bracket"),
    E("peers: {p: {proxy: 'http://host:port', models: [x]}}\n",
      ["peers.p", "invalid peer proxy URL (http://host:port)"], id="peer-proxy-bad-port"),
    E("peers: {p: {proxy: 'http://127.0.0.1:9', models: []}}\n",
      ["peers.p", "peer models can not be empty"], id="peer-models-empty"),
    E("peers: {p: {proxy: 'http://127.0.0.1:9'}}\n",
      ["peers.p", "peer models can not be empty"], id="peer-models-missing"),
    E("peers:\n  a: {proxy: 'http://127.0.0.1:9', models: [b/c]}\n  a/b: {proxy: 'http://127.0.0.1:8', models: [c]}\n",
      ['peer model name "a/b/c" is ambiguous'], id="peer-fqn-ambiguous"),
    E("models: {p/x: @M}\npeers: {p: " + PEER + "}\n",
      ['model ID "p/x" conflicts with fully qualified peer model name'], id="peer-fqn-is-model-id"),
    E("models: {m: {" + SERVE + ", aliases: [p/x]}}\npeers: {p: " + PEER + "}\n",
      ["model m", 'alias "p/x" conflicts with fully qualified peer model name'], id="peer-fqn-is-alias"),
    E("models:\n  m:\n    " + SERVE + "\n    filters: {setParamsByID: {p/x: {t: 1}}}\npeers: {p: " + PEER + "}\n",
      ["model m", 'alias "p/x" conflicts with fully qualified peer model name'], id="peer-fqn-is-setParamsByID-alias"),
    E("models: {m: @M}\npeers: {p: " + PEER + "}\nselectors: {p/x: {strategy: pin, targets: [m]}}\n",
      ["p/x", "conflict"], id="peer-fqn-is-selector"),
    E("models: {m: @M}\npeers: {p: " + PEER + "}\nprofiles: {pr: {pins: {p/x: m}}}\n",
      ["p/x", "conflict"], id="peer-fqn-is-profile-pin"),
]


@pytest.mark.parametrize("yaml_text, needles", PEER_ERRORS)
def test_peer_and_api_key_errors(yaml_text, needles):
    assert_error(yaml_text, needles)


def test_api_keys_and_peer_defaults():
    config = load("apiKeys: [k1, k2]\npeers:\n  p: {proxy: 'http://127.0.0.1:9', models: [x, x, y], apiKey: secret}\n"
                  "  q: {proxy: 'http://127.0.0.1:8', models: [z], timeouts: {responseHeader: 0, connect: 3}}\n")
    assert [k.key for k in config.api_keys] == ["k1", "k2"]
    p, q = config.peers["p"], config.peers["q"]
    assert p.models == ["x", "y"]
    assert p.api_key == "secret"
    assert (p.timeouts.connect, p.timeouts.keepalive, p.timeouts.response_header, p.timeouts.tls_handshake,
            p.timeouts.expect_continue, p.timeouts.idle_conn) == (30, 30, 60, 10, 1, 90)
    assert (q.timeouts.response_header, q.timeouts.connect) == (0, 3)


# -- 8. selectors --------------------------------------------------------------------------

SEL_MODELS = ("models:\n  a: {" + SERVE + ", aliases: [aa], filters: {setParamsByID: {'a:hi': {t: 1}}}}\n"
              "  b: @M\n  c: @M\npeers: {p: " + PEER + "}\n")
SELECTOR_ERRORS = [
    E(SEL_MODELS + "selectors: {'': {strategy: pin, targets: [a]}}\n",
      ["selectors: selector names cannot be empty"], id="name-empty"),
    E(SEL_MODELS + "selectors: {'  ': {strategy: pin, targets: [a]}}\n",
      ["selectors: selector names cannot be empty"], id="name-blank"),
    E(SEL_MODELS + "selectors: {a: {strategy: pin, targets: [b]}}\n",
      ['selectors.a: name conflicts with model ID "a"'], id="name-is-model-id"),
    E(SEL_MODELS + "selectors: {aa: {strategy: pin, targets: [b]}}\n",
      ['selectors.aa: name conflicts with model alias "aa"'], id="name-is-alias"),
    E(SEL_MODELS + "selectors: {'a:hi': {strategy: pin, targets: [b]}}\n",
      ['selectors.a:hi: name conflicts with model alias "a:hi"'], id="name-is-setParamsByID-alias"),
    E(SEL_MODELS + "selectors: {s: {targets: [a]}}\n", ["selectors.s.strategy is required"], id="strategy-missing"),
    E(SEL_MODELS + "selectors: {s: {strategy: best, targets: [a]}}\n",
      ['selectors.s.strategy: unknown strategy "best" (valid: warm, pin, spillover)'], id="strategy-unknown"),
    E(SEL_MODELS + "selectors: {s: {strategy: pin, targets: []}}\n",
      ["selectors.s.targets must contain at least one entry"], id="targets-empty"),
    E(SEL_MODELS + "selectors: {s: {strategy: pin}}\n",
      ["selectors.s.targets must contain at least one entry"], id="targets-missing"),
    E(SEL_MODELS + "selectors: {s: {strategy: pin, targets: [t]}, t: {strategy: pin, targets: [a]}}\n",
      ['selectors.s.targets[0] references selector "t"; selector chaining is not supported'], id="chaining"),
    E(SEL_MODELS + "selectors: {s: {strategy: pin, targets: [a, zz]}}\n",
      ['selectors.s.targets[1] references unknown model "zz"'], id="target-unknown"),
    E(SEL_MODELS + "selectors: {s: {strategy: warm, targets: [a, p/x]}}\n",
      ['selectors.s.targets[1] must resolve to a local model for strategy "warm"'], id="warm-peer-target"),
    E(SEL_MODELS + "selectors: {s: {strategy: warm, targets: [a, x]}}\n",
      ['selectors.s.targets[1] must resolve to a local model for strategy "warm"'], id="warm-bare-peer-target"),
    E(SEL_MODELS + "groups: {g: {swap: false, members: [a, b]}}\n"
      "selectors: {s: {strategy: spillover, targets: [a, b], settings: {spillover: 0}}}\n",
      ["selectors.s.settings.spillover must be >= 1"], id="spillover-zero"),
    E(SEL_MODELS + "groups: {g: {swap: false, members: [a, b]}}\n"
      "selectors: {s: {strategy: spillover, targets: [a, aa]}}\n",
      ['selectors.s.targets contains duplicate resolved model "a"'], id="spillover-duplicate-via-alias"),
    E(SEL_MODELS + "selectors: {s: {strategy: spillover, targets: [p/x, x]}}\n",
      ['selectors.s.targets contains duplicate resolved model "p/x"'], id="spillover-duplicate-peer-fqn-and-bare"),
    E(SEL_MODELS + "selectors: {s: {strategy: spillover, targets: [a, b]}}\n",
      ["selectors.s spillover targets must share a group with swap: false"], id="spillover-default-group-swaps"),
    E(SEL_MODELS + "groups: {g: {members: [a, b]}}\nselectors: {s: {strategy: spillover, targets: [a, b]}}\n",
      ["selectors.s spillover targets must share a group with swap: false"], id="spillover-group-swaps"),
    E(SEL_MODELS + "groups: {g: {swap: false, members: [a]}, h: {swap: false, members: [b]}}\n"
      "selectors: {s: {strategy: spillover, targets: [a, b]}}\n",
      ["selectors.s", "must share one routing group"], id="spillover-two-groups"),
    E(SEL_MODELS + "groups: {g: {swap: false, members: [a, b]}}\n"
      "selectors: {s: {strategy: spillover, targets: [a, c]}}\n",
      ['selectors.s target "c" is not in a routing group'], id="spillover-target-outside-groups"),
    E(SEL_MODELS + "matrix: {sets: {s1: 'a & b', s2: 'c'}}\nselectors: {s: {strategy: spillover, targets: [a, c]}}\n",
      ["selectors.s.targets must all appear together in one expanded matrix set"], id="spillover-matrix-apart"),
]


@pytest.mark.parametrize("yaml_text, needles", SELECTOR_ERRORS)
def test_selector_errors(yaml_text, needles):
    assert_error(yaml_text, needles)


@pytest.mark.parametrize("extra, selector", [
    pytest.param("groups: {g: {swap: false, members: [a, b]}}\n",
                 "{strategy: spillover, targets: [a, b], settings: {spillover: 4}}", id="swap-false-group"),
    pytest.param("matrix: {sets: {s1: '(a | c) & b'}}\n",
                 "{strategy: spillover, targets: [b, c]}", id="matrix-set-together"),
    pytest.param("", "{strategy: spillover, targets: [a, p/x]}", id="one-local-one-peer"),
    pytest.param("", "{strategy: warm, targets: [aa, 'a:hi', b]}", id="warm-through-aliases"),
    pytest.param("", "{strategy: pin, targets: [x, a], name: Pin, unlisted: true, metadata: {k: v}}",
                 id="pin-bare-peer"),
])
def test_valid_selectors(extra, selector):
    config = load(SEL_MODELS + extra + f"selectors: {{s: {selector}}}\n")
    assert "s" in config.selectors


# -- 9. profiles ---------------------------------------------------------------------------

PROFILE_ERRORS = [
    E(SEL_MODELS + "profiles: {pr: [a, b]}\n",
      ["profiles.pr",
       "profile must be a mapping with description and pins; the legacy list syntax is no longer supported"],
      id="legacy-list"),
    E(SEL_MODELS + "profiles: {pr: {description: d}}\n",
      ["profiles.pr.pins must contain at least one entry"], id="no-pins"),
    E(SEL_MODELS + "profiles: {pr: {pins: {}}}\n",
      ["profiles.pr.pins must contain at least one entry"], id="empty-pins"),
    E(SEL_MODELS + "profiles: {pr: {pins: {'': a}}}\n",
      ["profiles.pr.pins: pin names cannot be empty"], id="pin-name-empty"),
    E(SEL_MODELS + "profiles: {pr: {pins: {llm: zz}}}\n",
      ['profiles.pr.pins.llm references unknown model "zz"'], id="pin-target-unknown"),
    E(SEL_MODELS + "profiles: {pr: {pins: {llm: a, code: llm}}}\n",
      ['profiles.pr.pins.code references unknown model "llm"'], id="pins-do-not-chain"),
    E(SEL_MODELS + "profiles: {'': {pins: {llm: a}}}\n",
      ["profiles: profile names cannot be empty"], id="profile-name-empty"),
]


@pytest.mark.parametrize("yaml_text, needles", PROFILE_ERRORS)
def test_profile_errors(yaml_text, needles):
    assert_error(yaml_text, needles)


def test_profile_pins_resolve_like_requests_and_may_be_disabled():
    config = load(SEL_MODELS + "selectors: {sel: {strategy: pin, targets: [a]}}\n"
                  "profiles:\n  pr:\n    description: coding\n"
                  "    pins: {p1: a, p2: aa, p3: 'a:hi', p4: p/x, p5: x, p6: sel, disabled: ~, blank: '', b: c}\n")
    pins = config.profiles["pr"].pins
    assert pins["p2"] == "aa" and pins["p6"] == "sel" and pins["b"] == "c"
    assert pins["disabled"] == "" and pins["blank"] == ""


def test_yaml_1_1_words_stay_strings():
    """yaml.v3 reads `on`, `off`, `yes`, `no` as plain strings in keys and untyped values (YAML 1.2)."""
    config = load("models:\n  off: {" + SERVE + ", aliases: [no], metadata: {enabled: yes, mode: on}}\n"
                  "profiles: {pr: {pins: {on: off}}}\n")
    assert list(config.models) == ["off"]
    assert config.real_model_id("no") == "off"
    assert config.models["off"].metadata == {"enabled": "yes", "mode": "on"}
    assert config.profiles["pr"].pins == {"on": "off"}


# -- 10. validation order: the first failing check wins -------------------------------------

ORDER = [
    E("macros: {PID: 1}\nmodels: {m: {cmd: 'srv ${env.LS_T_ORDER_UNSET}'}}\n",
      ["environment variable 'LS_T_ORDER_UNSET' is not set"], id="env-before-macro-declarations"),
    E("macros: {PID: 1}\nmodels: {m: {cmd: 'srv ${nope}'}}\n",
      ["macro name 'PID' is reserved"], id="declarations-before-unknown-macros"),
    E("startPort: abcd\napiKeys: ['${nope}']\n",
      ["apiKeys[0]", "unknown macro '${nope}'"], id="unknown-macros-before-type-errors"),
    E("peers: {p: {models: [x], apiKey: '${nope}'}}\n",
      ["peers.p.apiKey", "unknown macro"], id="unknown-macros-before-peer-proxy"),
    E("performance: {every: 1s}\nmodels:\n  m: {" + SERVE + ", unlisted: maybe}\n",
      ["models.m.unlisted"], id="type-errors-before-performance"),
    E("performance: {every: 1s}\npeers: {p: {models: [x]}}\n",
      ["proxy is required"], id="peer-proxy-before-performance"),
    E("performance: {every: 1s}\nupstream: {ignorePaths: ['(']}\n",
      ["invalid regular expression"], id="ignorePaths-before-performance"),
    E("performance: {every: 1s}\nprofiles: {pr: [a]}\n",
      ["legacy list syntax"], id="legacy-profiles-before-performance"),
    E("startPort: 0\nperformance: {every: 1s}\n", ["must be at least 5s"], id="performance-before-startPort"),
    E("startPort: 0\nglobalTTL: -1\n", ["startPort", "must be greater than 1"], id="startPort-before-globalTTL"),
    E("globalTTL: -1\nunloadTimeout: -1\n", ["globalTTL"], id="globalTTL-before-unloadTimeout"),
    E("unloadTimeout: -1\nstore: {path: ''}\n", ["unloadTimeout"], id="unloadTimeout-before-store"),
    E("store: {path: ''}\nlogToStdout: x\n", ["store.path"], id="store-before-logToStdout"),
    E("logToStdout: x\nmodels:\n  a: {" + SERVE + ", aliases: [z]}\n  b: {" + SERVE + ", aliases: [z]}\n",
      ["logToStdout"], id="logToStdout-before-aliases"),
    E("models:\n  a: {" + SERVE + ", aliases: [z], ttl: -5}\n  b: {" + SERVE + ", aliases: [z]}\n",
      ["duplicate alias"], id="aliases-before-model-ttl"),
    E("models:\n  b: {" + SERVE + ", ttl: -7}\n  a: {" + SERVE + ", ttl: -5}\n",
      ["invalid TTL value -5"], id="models-in-sorted-order"),
    E("models:\n  m: {" + SERVE + ", ttl: -5, unloadTimeout: -1}\n",
      ["invalid TTL value -5"], id="ttl-before-unloadTimeout"),
    E("models:\n  m: {" + SERVE + ", unloadTimeout: -1, capabilities: {context: -1}}\n",
      ["invalid unloadTimeout value -1"], id="unloadTimeout-before-capabilities"),
    E("models:\n  a: {" + SERVE + ", capabilities: {in: [video]}, filters: {setParamsByID: {b: {t: 1}}}}\n  b: @M\n",
      ["invalid modality"], id="capabilities-before-setParamsByID"),
    E("groups: {g: {members: [m]}}\nrouting: {router: {use: group}}\nmodels: {m: {" + SERVE + ", ttl: -5}}\n",
      ["invalid TTL value -5"], id="models-before-routing-style"),
    E("groups: {g: {members: [m, m]}}\nrouting: {router: {use: group}}\nmodels: {m: @M}\n",
      [LEGACY_BOTH], id="routing-style-before-groups"),
    E("groups: {g: {members: [m, m]}}\nrouting: {scheduler: {use: lifo}}\nmodels: {m: @M}\n",
      ["duplicate model member m"], id="groups-before-scheduler"),
    E("matrix: {sets: {s: '(m'}}\nrouting: {scheduler: {use: lifo}}\nmodels: {m: @M}\n",
      ["missing closing parenthesis"], id="matrix-before-scheduler"),
    E("routing: {scheduler: {use: lifo, settings: {fifo: {priority: {zz: 1}}}}}\n",
      ["unknown scheduler"], id="scheduler-before-priority"),
    E("routing: {scheduler: {settings: {fifo: {priority: {zz: 1}}}}}\napiKeys: ['']\n",
      ["priority references unknown model"], id="priority-before-apiKeys"),
    E("apiKeys: ['']\nmodels: {p/x: @M}\npeers: {p: " + PEER + "}\n",
      ["empty api key"], id="apiKeys-before-peer-namespace"),
    E("models: {p/x: @M}\npeers: {p: " + PEER + "}\nselectors: {s: {strategy: best, targets: [x]}}\n",
      ["conflicts with fully qualified peer model name"], id="peer-namespace-before-selectors"),
    E("models: {m: @M}\nselectors: {s: {strategy: best, targets: [m]}}\nprofiles: {pr: {pins: {}}}\n",
      ["unknown strategy"], id="selectors-before-profiles"),
]


@pytest.mark.parametrize("yaml_text, needles", ORDER)
def test_validation_order(monkeypatch, yaml_text, needles):
    monkeypatch.delenv("LS_T_ORDER_UNSET", raising=False)
    assert_error(yaml_text, needles)


# -- 11. macros, positively -------------------------------------------------------------------


def test_typed_macro_values():
    config = load("""
        macros:
          ctx: 8192
          temp: 0.7
          flag: true
        models:
          m:
            cmd: srv --port ${PORT} --ctx ${ctx} --temp ${temp} --flag ${flag}
            metadata:
              ctx: "${ctx}"
              ctx_plain: ${ctx}
              temp: "${temp}"
              flag: "${flag}"
              label: "ctx ${ctx} flag ${flag} temp ${temp}"
              port: "${PORT}"
              nested: {list: ["${ctx}", "x${ctx}"]}
        """)
    model = config.models["m"]
    assert model.cmd == "srv --port 5800 --ctx 8192 --temp 0.7 --flag true"
    meta = model.metadata
    assert meta["ctx"] == 8192 and type(meta["ctx"]) is int
    assert meta["ctx_plain"] == 8192 and type(meta["ctx_plain"]) is int
    assert meta["temp"] == 0.7 and type(meta["temp"]) is float
    assert meta["flag"] is True
    assert meta["label"] == "ctx 8192 flag true temp 0.7"
    assert meta["port"] == 5800 and type(meta["port"]) is int
    assert meta["nested"] == {"list": [8192, "x8192"]}


def test_macro_in_macro_expands_in_declaration_order():
    config = load("""
        macros:
          bin: /opt/llama/server
          base: "${bin} --host 127.0.0.1"
          full: "${base} --alias ${MODEL_ID}"
        models:
          m: {cmd: "${full} --port ${PORT}"}
        """)
    assert config.models["m"].cmd == "/opt/llama/server --host 127.0.0.1 --alias m --port 5800"


def test_model_macros_override_globals_in_place_and_never_leak():
    config = load("""
        macros:
          a: A
          b: "${a}-b"
        models:
          m1:
            cmd: srv --port ${PORT}
            macros: {a: X, own: "${b}!"}
            name: "${b} ${own}"
          m2:
            cmd: srv --port ${PORT}
            name: "${b}"
        """)
    assert config.models["m1"].name == "X-b X-b!"
    assert config.models["m2"].name == "A-b"


def test_model_id_in_a_global_macro_expands_per_model():
    config = load("""
        macros:
          tag: "${MODEL_ID}-tag"
        models:
          a: {cmd: "srv --port ${PORT}", name: "${tag}", aliases: ["${tag}-alias"]}
          b: {cmd: "srv --port ${PORT}", name: "${tag}", macros: {tag: "own-${MODEL_ID}"}}
        """)
    assert config.models["a"].name == "a-tag"
    assert config.models["b"].name == "own-b"
    assert config.real_model_id("a-tag-alias") == "a"


def test_comment_lines_of_cmdStop_are_dropped_before_expansion():
    config = load("models:\n  m:\n    cmd: srv --port ${PORT}\n    cmdStop: |\n      kill ${PID}\n      # ${nope}\n")
    assert "kill ${PID}" in config.models["m"].cmd_stop
    assert "nope" not in config.models["m"].cmd_stop


def test_port_assignment_counts_macro_expansions_and_skips_fixed_ports():
    config = load("""
        startPort: 7000
        macros:
          serve: "srv --port ${PORT}"
        models:
          c: {cmd: "${serve}", checkEndpoint: "/health?port=${PORT}", aliases: ["c-${PORT}"], \
metadata: {port: "${PORT}"}}
          a: {cmd: "srv --port 1999", proxy: "http://127.0.0.1:1999"}
          b: {cmd: "${serve}"}
        """)
    assert config.models["a"].proxy == "http://127.0.0.1:1999"
    assert config.models["b"].cmd == "srv --port 7000"
    assert config.models["b"].proxy == "http://localhost:7000"
    c = config.models["c"]
    assert c.cmd == "srv --port 7001"
    assert c.check_endpoint == "/health?port=7001"
    assert c.metadata["port"] == 7001
    assert config.real_model_id("c-7001") == "c"


def test_yaml_anchors_give_each_model_its_own_copy():
    config = load("""
        defs:
          base: &base
            cmd: "srv --port ${PORT} --name ${MODEL_ID}"
        models:
          a:
            <<: *base
          b:
            <<: *base
            ttl: 30
        """)
    assert config.models["a"].cmd == "srv --port 5800 --name a"
    assert config.models["b"].cmd == "srv --port 5801 --name b"
    assert config.models["b"].ttl == 30


def test_preload_resolves_aliases_and_drops_unknown_names_with_a_warning():
    config = load(SEL_MODELS + "selectors: {sel: {strategy: pin, targets: [a]}}\n"
                  "hooks: {on_startup: {preload: [' aa ', '', b, zz, p/x, sel]}}\n")
    assert config.preload == ["a", "b"]
    assert any("zz" in w for w in config.warnings), config.warnings


@pytest.mark.parametrize("value, headers", [
    pytest.param(None, ["X-Session-ID", "X-Litellm-Session-Id"], id="default"),
    pytest.param("[]", [], id="explicit-empty"),
    pytest.param("[' X-A ', x-a, '', X-B, X-A]", ["X-A", "X-B"], id="trimmed-deduplicated-case-insensitively"),
])
def test_ui_activity_session_id(value, headers):
    text = "models: {}\n" if value is None else f"ui: {{activity: {{session_id: {value}}}}}\n"
    assert load(text).session_headers == headers


# -- 12. defaults --------------------------------------------------------------------------


def test_defaults_of_every_top_level_key():
    config = load("models: {m: @M}\n")
    assert config.health_check_timeout == 120
    assert config.log_level == "info"
    assert config.log_to_stdout == "proxy"
    assert config.log_time_format == ""
    assert config.metrics_max_in_memory == 1000
    assert config.capture_buffer_mb == 5
    assert config.store_path is None
    assert config.performance_disabled is False and config.performance_every == 5
    assert config.global_ttl == 0 and config.unload_timeout == 10
    assert config.include_aliases_in_list is False and config.send_loading_state is False
    assert config.api_keys == [] and config.peers == {} and config.preload == []
    assert [p.pattern for p in config.ignore_paths] == [r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$"]
    assert config.routing.router == "group"
    assert [(g.name, g.swap, g.exclusive, g.persistent, set(g.members)) for g in config.routing.groups] == [
        ("(default)", True, True, False, {"m"})]
    assert config.warnings == []
    model = config.models["m"]
    assert (model.proxy, model.check_endpoint, model.ttl, model.unload_timeout, model.concurrency_limit) == (
        "http://localhost:5800", "/health", 0, 10, 10)
    assert model.send_loading_state is False and model.unlisted is False and model.ignore_websockets is False
    t = model.timeouts
    assert ((t.connect, t.keepalive, t.response_header, t.tls_handshake, t.expect_continue, t.idle_conn)
            == (30, 30, 0, 10, 1, 90))


@pytest.mark.parametrize("yaml_text, attribute, expected", [
    ("logLevel: '  DEBUG '\n", "log_level", "debug"),
    ("logLevel: Warn\n", "log_level", "warn"),
    ("logLevel: verbose\n", "log_level", "info"),
    ("logTimeFormat: RFC3339\n", "log_time_format", "rfc3339"),
    ("logTimeFormat: iso\n", "log_time_format", ""),
    ("logToStdout: both\n", "log_to_stdout", "both"),
    ("logToStdout: none\n", "log_to_stdout", "none"),
    ("metricsMaxInMemory: 0\n", "metrics_max_in_memory", 1000),
    ("metricsMaxInMemory: -5\n", "metrics_max_in_memory", 1000),
    ("metricsMaxInMemory: 20\n", "metrics_max_in_memory", 20),
    ("captureBuffer: 0\n", "capture_buffer_mb", 0),
    ("unloadTimeout: 0\n", "unload_timeout", 10),
    ("unloadTimeout: 3\n", "unload_timeout", 3),
    ("healthCheckTimeout: 14\n", "health_check_timeout", 15),
    ("healthCheckTimeout: 16\n", "health_check_timeout", 16),
    ("performance: {every: 1m30s, disabled: true}\n", "performance_every", 90),
    ("upstream: {ignorePaths: []}\n", "ignore_paths", [r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$"]),
    ("upstream: {ignorePaths: ['^/x']}\n", "ignore_paths", ["^/x"]),
])
def test_top_level_values_and_normalisation(yaml_text, attribute, expected):
    value = getattr(load(yaml_text), attribute)
    if attribute == "ignore_paths":
        value = [p.pattern for p in value]
    assert value == expected


def test_model_values_inherit_and_normalise():
    config = load("""
        globalTTL: 300
        unloadTimeout: 20
        sendLoadingState: true
        models:
          inherits: {cmd: "srv --port ${PORT}"}
          own: {cmd: "srv --port ${PORT}", ttl: 0, unloadTimeout: 5, sendLoadingState: false, concurrencyLimit: -3, \
checkEndpoint: " none "}
          minus-one: {cmd: "srv --port ${PORT}", ttl: -1, concurrencyLimit: 4}
          comfyui_auto: {cmd: "srv --port ${PORT}", concurrencyLimit: 20}
          big: {cmd: "srv --port ${PORT}", concurrencyLimit: 80}
        """)
    m = config.models
    assert (m["inherits"].ttl, m["inherits"].unload_timeout, m["inherits"].send_loading_state) == (300, 20, True)
    assert (m["own"].ttl, m["own"].unload_timeout, m["own"].send_loading_state) == (0, 5, False)
    assert m["own"].concurrency_limit == 10
    assert m["own"].check_endpoint == "none"
    assert (m["minus-one"].ttl, m["minus-one"].concurrency_limit) == (300, 4)
    assert (m["comfyui_auto"].concurrency_limit, m["comfyui_auto"].ignore_websockets) == (50, True)
    assert (m["big"].concurrency_limit, m["big"].ignore_websockets) == (80, False)


def test_comfyui_auto_with_no_limit_gets_50():
    config = load("models: {comfyui_auto: @M}\n")
    assert config.models["comfyui_auto"].concurrency_limit == 50
    assert config.models["comfyui_auto"].ignore_websockets is True


# -- 13. unknown-key warnings -------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_text, warning", [
    (model_with("ttll: 5"), "models.m.ttll: unknown key, did you mean 'ttl'?"),
    ("peers: {p: {proxy: 'http://127.0.0.1:9', models: [x], apikey: k}}\n",
     "peers.p.apikey: unknown key, did you mean 'apiKey'?"),
    ("models: {m: @M}\nrouting: {router: {settings: {grups: {}}}}\n", "routing.router.settings.grups: unknown key"),
    ("helthCheckTimeout: 30\n", "helthCheckTimeout: unknown key, did you mean 'healthCheckTimeout'?"),
    ("frobnicate: 1\n", "frobnicate: unknown key"),
])
def test_unknown_keys_warn_but_do_not_fail(yaml_text, warning):
    config = load(yaml_text)
    assert any(warning in w for w in config.warnings), config.warnings


def test_user_named_keys_never_warn():
    config = load("""
        macros: {anything_goes: 1, other-macro: x}
        models:
          a:
            cmd: srv --port ${PORT}
            macros: {local_thing: 2}
            metadata: {whatever: 1, nested: {deep_key: 2}}
            env: [FOO=bar]
            filters:
              stripParams: "temperature, top_p"
              setParams: {custom_param: 1, nested: {x: 1}}
              setParamsByID: {"a:hi": {reasoning_effort: high, chat_template_kwargs: {enable_thinking: true}}}
          b: {cmd: "srv --port ${PORT}"}
        matrix:
          vars: {va: a, vb: b}
          evict_costs: {va: 2}
          sets: {together: "va & vb", alone: "va"}
        routing:
          scheduler: {settings: {fifo: {priority: {a: 2, b: 1}}}}
        peers:
          my-peer: {proxy: "http://127.0.0.1:9", models: [x], filters: {setParams: {peer_param: 1}}}
        selectors:
          my-sel: {strategy: pin, targets: [a], metadata: {sel_meta: 1}}
        profiles:
          my-profile: {description: d, pins: {llm-code: a, off: ~}}
        hooks: {on_startup: {preload: [a]}}
        ui: {activity: {session_id: [X-A]}}
        """)
    assert [w for w in config.warnings if "unknown key" in w] == []


# -- 14. --config-dir merging -----------------------------------------------------------


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_of(text))
    return path


def load_error(path, directory) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(str(path) if path else None, str(directory) if directory else None)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_config_dir_merges_models_lists_and_macros(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "10-macros.yaml", "macros: {flags: '--ctx 4096'}\napiKeys: [k2]\nhealthCheckTimeout: 30\n")
    write(d, "20-models.yml", "models:\n  b: {cmd: 'srv --port ${PORT} ${flags}'}\napiKeys: [k3]\n"
                              "healthCheckTimeout: 30\n")
    write(d, ".hidden.yaml", "models:\n  c: {cmd: 'srv --port ${PORT}'}\n")
    write(d, "empty.yaml", "")
    write(d, "comments.yaml", "# nothing here\n# ${env.LS_T_DIR_UNSET}\n")
    write(d, "notes.txt", "this: [is not yaml\n")
    write(d, "old.yaml.bak", "models: {b: @M}\n")
    write(d, "sub/nested.yaml", "models: {nested: @M}\n")
    (d / "dir.yaml").mkdir()
    main = write(tmp_path, "main.yaml", "models:\n  a: {cmd: 'srv --port ${PORT} ${flags}'}\napiKeys: [k1]\n")
    config = load_config(str(main), str(d))
    assert set(config.models) == {"a", "b", "c"}
    assert config.models["a"].cmd == "srv --port 5800 --ctx 4096"
    assert config.models["b"].cmd == "srv --port 5801 --ctx 4096"
    assert [k.key for k in config.api_keys] == ["k1", "k2", "k3"]  # --config first, then the directory sorted by path
    assert config.health_check_timeout == 30

    alone = load_config(None, str(d))
    assert set(alone.models) == {"b", "c"}
    assert [k.key for k in alone.api_keys] == ["k2", "k3"]


def test_config_dir_null_yields_to_a_value(tmp_path):
    write(tmp_path, "a.yaml", "healthCheckTimeout:\nmodels: {m: @M}\n")
    write(tmp_path, "b.yaml", "healthCheckTimeout: 40\n")
    assert load_config(None, str(tmp_path)).health_check_timeout == 40


def test_config_dir_of_only_empty_files_gives_defaults(tmp_path):
    write(tmp_path, "a.yaml", "")
    write(tmp_path, "b.yml", "# only a comment\n")
    config = load_config(None, str(tmp_path))
    assert config.models == {} and config.health_check_timeout == 120


@pytest.mark.parametrize("first, second, needles", [
    pytest.param("models: {dup: @M}\n", "models: {dup: @M}\n",
                 ['duplicate models "dup"', "b.yaml", "already defined in another config source"],
                 id="duplicate-model"),
    pytest.param("models: {m: @M}\ngroups: {g1: {members: [m]}}\n", "groups: {g1: {members: []}}\n",
                 ['duplicate groups "g1"'], id="duplicate-group"),
    pytest.param("peers: {remote: " + PEER + "}\n", "peers: {remote: " + PEER + "}\n",
                 ['duplicate peers "remote"'], id="duplicate-peer"),
    pytest.param("models: {m: @M}\nselectors: {public: {strategy: pin, targets: [m]}}\n",
                 "selectors: {public: {strategy: pin, targets: [m]}}\n",
                 ['duplicate selectors "public"'], id="duplicate-selector"),
    pytest.param("models: {m: @M}\nprofiles: {p: {pins: {x: m}}}\n", "profiles: {p: {pins: {y: m}}}\n",
                 ['duplicate profiles "p"'], id="duplicate-profile"),
    pytest.param("models: {m: @M}\nmatrix: {vars: {v: m}, sets: {s: v}}\n", "matrix: {vars: {w: m}}\n",
                 ['duplicate matrix "vars"'], id="matrix-children-not-split"),
    pytest.param("models: {m: @M}\nrouting: {router: {settings: {groups: {g: {members: [m]}}}}}\n",
                 "routing: {router: {settings: {groups: {g: {members: []}}}}}\n",
                 ['duplicate routing.router.settings.groups "g"'], id="duplicate-routing-group"),
    pytest.param("healthCheckTimeout: 30\n", "healthCheckTimeout: 40\n",
                 ['conflict at "healthCheckTimeout"', "b.yaml", "sets a different value than a previous source"],
                 id="scalar-conflict"),
    pytest.param("healthCheckTimeout: 30\n", "healthCheckTimeout: '30'\n",
                 ['conflict at "healthCheckTimeout"'], id="scalar-tag-conflict"),
    pytest.param("performance: {every: 5s}\n", "performance: {every: 10s}\n",
                 ['conflict at "performance.every"'], id="nested-scalar-conflict"),
    pytest.param("apiKeys: [k1]\n", "apiKeys: {k: v}\n",
                 ['conflict at "apiKeys"', "incompatible YAML node kinds", "b.yaml"], id="kind-mismatch"),
    pytest.param("ui: {activity: x}\n", "ui: {activity: {session_id: []}}\n",
                 ['conflict at "ui.activity"', "incompatible YAML node kinds"], id="nested-kind-mismatch"),
    pytest.param("models: {m: @M}\n", "- a\n- b\n",
                 ["b.yaml", "top-level YAML must be a mapping"], id="top-level-list"),
])
def test_config_dir_merge_errors(tmp_path, first, second, needles):
    write(tmp_path, "a.yaml", first)
    write(tmp_path, "b.yaml", second)
    message = load_error(None, tmp_path)
    for needle in needles:
        assert needle in message, message


def test_config_dir_equal_scalars_and_equal_lists_merge(tmp_path):
    write(tmp_path, "a.yaml", "healthCheckTimeout: 30\nmodels: {a: @M}\nmacros: {x: 1}\n")
    write(tmp_path, "b.yaml", "healthCheckTimeout: 30\nmodels: {b: @M}\nmacros: {y: '${x}2'}\n")
    config = load_config(None, str(tmp_path))
    assert set(config.models) == {"a", "b"}


def test_config_file_inside_the_config_dir_is_an_error(tmp_path):
    main = write(tmp_path, "main.yaml", "models: {m: @M}\n")
    message = load_error(main, tmp_path)
    assert str(main) in message and "is also present in" in message and "remove it from one" in message


def test_config_dir_without_yaml_files_is_an_error(tmp_path):
    write(tmp_path, "readme.txt", "models: {}\n")
    assert "no configuration sources found" in load_error(None, tmp_path)


def test_config_dir_that_does_not_exist_is_an_error(tmp_path):
    missing = tmp_path / "missing"
    assert str(missing) in load_error(None, missing)


def test_config_dir_env_macro_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LS_T_DIR_UNSET", raising=False)
    write(tmp_path, "a.yaml", "models: {m: {cmd: 'srv ${env.LS_T_DIR_UNSET}'}}\n")
    message = load_error(None, tmp_path)
    assert "a.yaml" in message and "environment variable 'LS_T_DIR_UNSET' is not set" in message


# -- 15. CLI: --check-config ---------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "llama_swap", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def marker_cmd(marker: Path) -> str:
    return f"sh -c 'touch {marker}' --port ${{PORT}}"


def test_check_config_prints_the_expanded_config_and_starts_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    config = write(tmp_path, "config.yaml", f"""
        startPort: 7100
        macros: {{ctx: 4096}}
        models:
          a: {{cmd: "{marker_cmd(marker)} --ctx ${{ctx}}"}}
          b: {{cmd: "{marker_cmd(marker)}", aliases: [bee]}}
          c: {{cmd: "{marker_cmd(marker)}"}}
        groups:
          pair: {{swap: false, members: [a, b]}}
        hooks: {{on_startup: {{preload: [a]}}}}
        """)
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    out = result.stdout
    assert "--port 7100 --ctx 4096" in out and "--port 7101" in out and "--port 7102" in out
    assert str(marker) in out
    assert any("pair" in line and "a" in line and "b" in line for line in out.splitlines()), out
    assert "(default)" in out
    assert "listening" not in out + result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("text, needles", [
    pytest.param('models:\n  m: {cmd: "srv --port ${PORT}", ttl: -5}\n',
                 ["models.m", "invalid TTL value -5"], id="model-ttl"),
    pytest.param("models: {m: @M}\nmatrix: {sets: {s: '(m'}}\n",
                 ["matrix", 'set "s": parse: missing closing parenthesis'], id="matrix-dsl"),
    pytest.param("models: {m: @M}\nselectors: {s: {strategy: pin, targets: [zz]}}\n",
                 ['selectors.s.targets[0] references unknown model "zz"'], id="selector"),
    pytest.param("startPort: abcd\n", ["startPort"], id="wrong-type"),
])
def test_check_config_on_a_bad_config_prints_one_line_and_exits_1(tmp_path, text, needles):
    marker = tmp_path / "MARKER"
    config = write(tmp_path, "config.yaml", text.replace("srv --port ${PORT}", marker_cmd(marker)))
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"llama-swap: {config}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not marker.exists()


def test_check_config_with_config_dir_alone_and_with_config(tmp_path):
    marker = tmp_path / "MARKER"
    d = tmp_path / "conf.d"
    write(d, "a.yaml", f"models:\n  from-dir: {{cmd: \"{marker_cmd(marker)}\"}}\n")
    result = run_cli("--config-dir", str(d), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "from-dir" in result.stdout
    main = write(tmp_path, "main.yaml", f"models:\n  from-file: {{cmd: \"{marker_cmd(marker)}\"}}\n")
    result = run_cli("--config", str(main), "-config-dir", str(d), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "from-dir" in result.stdout and "from-file" in result.stdout
    assert not marker.exists()


@pytest.mark.parametrize("setup, needle", [
    pytest.param("dup", 'duplicate models "m"', id="duplicate-model"),
    pytest.param("empty", "no configuration sources found", id="no-yaml"),
    pytest.param("inside", "is also present in", id="config-inside-dir"),
])
def test_check_config_with_a_bad_config_dir_prints_one_line(tmp_path, setup, needle):
    d = tmp_path / "conf.d"
    d.mkdir()
    args = ["--config-dir", str(d)]
    if setup == "dup":
        write(d, "a.yaml", "models: {m: @M}\n")
        write(d, "b.yaml", "models: {m: @M}\n")
    elif setup == "inside":
        args += ["--config", str(write(d, "a.yaml", "models: {m: @M}\n"))]
    result = run_cli(*args, "--check-config")
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_reports_every_error_at_once(tmp_path):
    config = write(tmp_path, "config.yaml", """
        startPort: abcd
        models:
          a: {cmd: "srv --port ${PORT}", ttl: soon}
          b: {cmd: "srv --port ${PORT}", aliases: just-one}
        """)
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == ["startPort", "models.a.ttl", "models.b.aliases"], lines
    assert all(line.startswith(f"llama-swap: {config}: ") for line in lines)


def test_check_config_warns_of_a_program_it_cannot_find_and_strict_fails_on_it(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "my-server").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "my-server").chmod(0o755)
    config = write(tmp_path, "config.yaml", f"""
        models:
          missing: {{cmd: "no-such-server-ls-test --port ${{PORT}}"}}
          found: {{cmd: "my-server --port ${{PORT}}", env: ["PATH={tmp_path / 'bin'}"]}}
          absolute: {{cmd: "{tmp_path}/nope/server --port ${{PORT}}"}}
        """)
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: models.absolute.cmd: program '{tmp_path}/nope/server' is not an executable file",
                        "warning: models.missing.cmd: program 'no-such-server-ls-test' "
                        "is not found on PATH"], result.stdout
    assert result.stdout.startswith("config OK: ")
    strict = run_cli("--config", str(config), "--check-config", "--strict")
    assert strict.returncode == 1 and strict.stdout.startswith("config has warnings (--strict): ")
    assert "Traceback" not in strict.stdout + strict.stderr


def test_check_config_prints_commands_with_their_quoting(tmp_path):
    config = write(tmp_path, "config.yaml", """
        models:
          m:
            cmd: |
              srv --port ${PORT}
                --prompt 'two words' --empty "" --dollar '$HOME'
        """)
    result = run_cli("--config", str(config), "--check-config")
    assert ("  cmd: srv --port 5800 --prompt 'two words' --empty '' --dollar '$HOME'"
            in result.stdout.splitlines()), result.stdout


def test_check_config_piped_into_head_stops_quietly(tmp_path):
    models = "".join(f"  model-{i}: {{cmd: 'srv --port ${{PORT}} --a-long-argument-{i}'}}\n" for i in range(3000))
    config = tmp_path / "config.yaml"
    config.write_text("models:\n" + models)
    result = subprocess.run(f"'{PY}' -m llama_swap --config '{config}' --check-config | head -1", shell=True, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("config OK: ") and len(result.stdout.splitlines()) == 1
    assert result.stderr == "", result.stderr


def test_check_config_and_strict_refuse_models_that_cannot_start(tmp_path):
    config = write(tmp_path, "config.yaml", """
        models:
          ok: {cmd: "srv --port ${PORT}"}
          comment-only: {cmd: "# to be filled in", proxy: "http://127.0.0.1:9"}
        """)
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode == 1 and result.stdout.startswith("config has errors: ")
    assert result.stderr.splitlines() == [f"llama-swap: {config}: models.comment-only.cmd: is required "
                                          "(the command that starts the model's server)"]
    started = run_cli("--config", str(config), "--strict", "--listen", f"127.0.0.1:{free_port()}")
    assert started.returncode == 1 and "models.comment-only.cmd" in started.stderr
    assert "not starting: --strict" in started.stderr and "listening" not in started.stdout


def test_check_config_rejects_a_cmd_that_splits_to_nothing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"cmd": "\\", "proxy": "http://127.0.0.1:9"}}}))
    result = subprocess.run([PY, "-m", "llama_swap", "--config", str(path), "--check-config"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "models.m.cmd" in lines[0], output


async def test_a_config_the_original_runs_starts_and_its_broken_models_answer_why(start_llama_swap, upstreams):
    # The original loads these and fails only the model, when it is asked for: so do we, without
    # stopping what runs for a start that cannot happen.
    ls = start_llama_swap({"healthCheckTimeout": 15, "models": {
        "ok": {"cmd": upstreams.cmd(name="ok")},
        "comment-only": {"cmd": "# llama-server --port ${PORT} -m model.gguf\n", "proxy": "http://127.0.0.1:9"},
        "no-equals": {"cmd": upstreams.cmd(name="no-equals"), "env": ["CUDA_VISIBLE_DEVICES"]},
    }})
    for model, key in (("comment-only", "cmd"), ("no-equals", "env")):
        assert (f"config: models.{model}.{key}: " in ls.output()
                and f"({model} cannot start until this is fixed)" in ls.output())
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "ok"))[0] == 200
        pid = (await running(s, ls))[0]
        for model, key in (("comment-only", "cmd"), ("no-equals", "env")):
            status, body = await chat(s, ls, model)
            assert status == 500, body
            assert body["error"]["message"].startswith(f"unspecific error: model {model} cannot start until its "
                                                       f"config is fixed: models.{model}.{key}: ")
        assert await running(s, ls) == [pid], "a start that cannot happen stopped the running model"
    assert len(upstreams.pids()) == 1


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_config_dir_alone_starts_the_server(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "a.yaml", "models: {one: {cmd: 'srv --port ${PORT}'}}\n")
    write(d, "b.yaml", "models: {two: {cmd: 'srv --port ${PORT}'}}\n")
    port = free_port()
    server = ServerProcess([PY, "-m", "llama_swap", "--config-dir", str(d), "--listen", f"127.0.0.1:{port}"], tmp_path)
    try:
        assert server.wait_for("listening on"), server.output()
        ids = [record["id"] for record in get_json(f"http://127.0.0.1:{port}/v1/models")["data"]]
        assert ids == ["one", "two"]
    finally:
        server.kill()


# -- 16. typed macros and the model records of /v1/models --------------------------------------------------


RECORD_FIELDS = ["id", "object", "created", "owned_by", "name", "description", "architecture", "capabilities",
                 "supported_parameters", "context_length", "meta", "status"]


def test_v1_models_shows_typed_macros_capabilities_aliases_peers_and_selectors(start_llama_swap, upstreams):
    def model(model_id: str, **fields) -> dict:
        return {"cmd": upstreams.cmd(name=model_id), **fields}

    ls = start_llama_swap({
        "includeAliasesInList": True,
        "macros": {"ctx": 8192, "flag": True},
        "models": {
            "m": model("m", name=" Model M ", description="about m", aliases=["m-alias", " "],
                       metadata={"context": "${ctx}", "on": "${flag}", "label": "ctx ${ctx}", "type": "user"},
                       filters={"setParamsByID": {"${MODEL_ID}:high": {"reasoning_effort": "high"}}}),
            "vision": model("vision", name="Vision", description="sees",
                            capabilities={"in": ["text", "image"], "out": ["text"], "tools": True, "context": 32768},
                            metadata={"architecture": "user", "context_length": 1, "keep": 1}),
            "audio": model("audio", capabilities={"in": ["audio"], "out": ["text"]}),
            "tts": model("tts", capabilities={"in": ["text"], "out": ["audio"]}),
            "imggen": model("imggen", capabilities={"in": ["text"], "out": ["image"]}),
            "img2img": model("img2img", capabilities={"in": ["image"], "out": ["image"]}),
            "inonly": model("inonly", capabilities={"in": ["text"]}),
            "ranker": model("ranker", capabilities={"reranker": True}),
            "ctxonly": model("ctxonly", capabilities={"context": 4096}, metadata={"capabilities": "dropped", "x": 1}),
            "plain": model("plain", metadata={"architecture": "kept", "capabilities": "kept"}),
            "hidden": model("hidden", unlisted=True, aliases=["hidden-alias"]),
        },
        "peers": {"p": {"proxy": "http://127.0.0.1:9", "models": ["x", "org/y"]}},
        "selectors": {
            "sel-pin": {"strategy": "pin", "targets": ["m-alias", "p/x"], "name": " Sel ", "description": "pick",
                        "metadata": {"k": "v", "type": "user"}},
            "sel-spill": {"strategy": "spillover", "targets": ["m", "p/x"], "settings": {"spillover": 3}},
            "sel-hidden": {"strategy": "pin", "targets": ["m"], "unlisted": True},
        },
    })
    body = get_json(ls.url + "/v1/models")
    assert body["object"] == "list"
    records = {r["id"]: r for r in body["data"]}
    ids = [r["id"] for r in body["data"]]
    assert ids == sorted(ids, key=str.encode)
    assert set(ids) == {"audio", "ctxonly", "img2img", "imggen", "inonly", "m", "m-alias", "m:high", "p/org/y", "p/x",
                        "plain", "ranker", "sel-pin", "sel-spill", "tts", "vision"}
    created = {r["created"] for r in body["data"]}
    assert len(created) == 1
    for record in body["data"]:
        assert [k for k in record if k in RECORD_FIELDS] == [k for k in RECORD_FIELDS if k in record], record
        assert set(record) <= set(RECORD_FIELDS), record
        assert ((record["object"], record["owned_by"], record["status"])
                == ("model", "llama-swap", {"value": "unloaded"}))

    m = records["m"]
    assert (m["name"], m["description"]) == ("Model M", "about m")
    assert m["meta"] == {"llamaswap": {"context": 8192, "on": True, "label": "ctx 8192", "type": "model",
                                       "aliases": ["m-alias", " ", "m:high"]}}
    assert type(m["meta"]["llamaswap"]["context"]) is int
    assert not {"architecture", "capabilities", "supported_parameters", "context_length"} & set(m)
    for alias in ("m-alias", "m:high"):
        record = records[alias]
        assert (record["name"], record["description"]) == ("Model M", "about m")
        assert record["meta"] == {"llamaswap": {"context": 8192, "on": True, "label": "ctx 8192", "type": "alias",
                                                "modelID": "m"}}

    vision = records["vision"]
    assert vision["architecture"] == {"input_modalities": ["text", "image"], "output_modalities": ["text"],
                                      "modality": "text+image->text"}
    assert vision["capabilities"] == {"vision": True, "function_calling": True}
    assert vision["supported_parameters"] == ["tools", "tool_choice"]
    assert vision["context_length"] == 32768
    assert vision["meta"] == {"llamaswap": {"keep": 1, "type": "model"}, "n_ctx": 32768}
    assert list(vision) == RECORD_FIELDS

    assert records["audio"]["architecture"]["modality"] == "audio->text"
    assert records["audio"]["capabilities"] == {"audio_transcriptions": True}
    assert records["tts"]["capabilities"] == {"audio_speech": True}
    assert records["imggen"]["capabilities"] == {"image_generation": True}
    assert records["img2img"]["capabilities"] == {"vision": True, "image_to_image": True}
    assert records["inonly"]["architecture"] == {"input_modalities": ["text"]}
    assert "capabilities" not in records["inonly"]
    assert records["ranker"]["capabilities"] == {"reranker": True}
    assert "architecture" not in records["ranker"]
    ctxonly = records["ctxonly"]
    assert ctxonly["context_length"] == 4096 and "capabilities" not in ctxonly and "architecture" not in ctxonly
    assert ctxonly["meta"] == {"llamaswap": {"x": 1, "type": "model"}, "n_ctx": 4096}
    assert records["plain"]["meta"] == {"llamaswap": {"architecture": "kept", "capabilities": "kept", "type": "model"}}

    peer = records["p/x"]
    assert {k: v for k, v in peer.items() if k != "created"} == {
        "id": "p/x", "object": "model", "owned_by": "llama-swap", "name": "p: x",
        "meta": {"llamaswap": {"type": "peer", "peerID": "p"}}, "status": {"value": "unloaded"}}
    assert records["p/org/y"]["name"] == "p: org/y"

    pin = records["sel-pin"]
    assert (pin["name"], pin["description"]) == ("Sel", "pick")
    assert pin["meta"] == {"llamaswap": {"k": "v", "type": "selector", "strategy": "pin",
                                         "targets": ["m-alias", "p/x"]}}
    assert records["sel-spill"]["meta"] == {"llamaswap": {"type": "selector", "strategy": "spillover",
                                                          "targets": ["m", "p/x"], "spillover": 3}}

    assert [r["id"] for r in get_json(ls.url + "/models")["data"]] == ids


def test_max_request_body_defaults_to_256_mb_and_must_be_positive():
    assert parse_config("models: {m: {cmd: 'srv --port ${PORT}'}}\n").max_request_body_mb == 256
    assert parse_config("maxRequestBodyMB: 8\nmodels: {m: {cmd: 'srv --port ${PORT}'}}\n").max_request_body_mb == 8
    with pytest.raises(ConfigError, match="maxRequestBodyMB: must be at least 1, got 0"):
        parse_config("maxRequestBodyMB: 0\nmodels: {m: {cmd: 'srv --port ${PORT}'}}\n")
