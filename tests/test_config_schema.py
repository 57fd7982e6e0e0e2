"""config-schema.json: a valid JSON Schema that accepts config.example.yaml (the active part and
every documented block in its comments) and rejects the mistakes it is meant to catch."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "config-schema.json"
EXAMPLE_PATH = ROOT / "config.example.yaml"

BEGIN = re.compile(r"^# --- (?P<label>.+): begin ---$")
END = "# --- {label}: end ---"


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def problems(validator, config) -> list[str]:
    """Every schema violation as 'path: message', empty when the config is valid."""
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors]


def parse(text: str):
    return yaml.safe_load(textwrap.dedent(text))


def documented_blocks() -> dict[str, str]:
    """The commented YAML between '# --- <label>: begin ---' and '# --- <label>: end ---' lines,
    with the comment marker taken off: '# key: v' -> 'key: v', '## note' -> '# note'."""
    blocks: dict[str, str] = {}
    lines = EXAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        start = BEGIN.match(lines[i])
        i += 1
        if not start:
            continue
        label = start["label"]
        body = []
        while lines[i] != END.format(label=label):
            line = lines[i]
            assert line.startswith("#"), f"line {i + 1} inside block {label!r} is not a comment"
            body.append(line[2:] if line.startswith("# ") else line[1:])
            i += 1
        blocks[label] = "\n".join(body) + "\n"
    return blocks


def test_schema_is_a_valid_draft_2020_12_schema(validator):
    assert validator.META_SCHEMA["$id"].startswith("https://json-schema.org/draft/2020-12/")


def test_example_config_is_valid(validator):
    config = yaml.safe_load(EXAMPLE_PATH.read_text(encoding="utf-8"))
    assert problems(validator, config) == []


def test_example_config_still_serves_the_demo_models():
    from llama_swap import load_config

    config = load_config(str(EXAMPLE_PATH))
    assert set(config.models) == {"small", "large"}
    assert config.models["small"].aliases == ["gpt-4o-mini"]
    assert config.models["large"].use_model_name == "large-v2"
    assert all("llama_swap_responder" in m.cmd for m in config.models.values())


def test_example_config_keeps_lines_short():
    long_lines = [n for n, line in enumerate(EXAMPLE_PATH.read_text().splitlines(), 1)
                  if len(line) > 100]
    assert long_lines == []


def test_every_documented_block_is_a_valid_config(validator):
    blocks = documented_blocks()
    assert {"all keys", "legacy groups", "legacy matrix"} <= set(blocks)
    for label, text in blocks.items():
        config = yaml.safe_load(text)
        assert isinstance(config, dict), label
        assert problems(validator, config) == [], label


def test_every_documented_block_loads_in_llama_swap(monkeypatch, tmp_path):
    """The reference is also a config the program accepts (env keys set, relative store path)."""
    from llama_swap import parse_config

    for name in re.findall(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}", EXAMPLE_PATH.read_text()):
        monkeypatch.setenv(name, f"example-key-{name.lower()}")  # keys differ, as real ones do
    monkeypatch.chdir(tmp_path)
    for label, text in documented_blocks().items():
        config = parse_config(text)
        assert "qwen-8b" in config.models, label


def _keys_in_schema(schema: dict, defs: dict, seen: set[str]) -> set[str]:
    """Dotted names of every property the schema knows (map entries written as '*')."""
    names: set[str] = set()

    def walk(node, prefix):
        if not isinstance(node, dict):
            return
        if "$ref" in node:
            ref = node["$ref"].rsplit("/", 1)[-1]
            if (ref, prefix) in seen:
                return
            seen.add((ref, prefix))
            walk(defs[ref], prefix)
        for key, sub in node.get("properties", {}).items():
            names.add(prefix + key)
            walk(sub, prefix + key + ".")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], prefix + "*.")
        for word in ("anyOf", "allOf", "oneOf"):
            for sub in node.get(word, []):
                walk(sub, prefix)

    walk(schema, "")
    return names


def _keys_in_config(node, prefix="") -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            names.add(prefix + str(key))
            names |= _keys_in_config(value, prefix + str(key) + ".")
    return names


def test_documentation_covers_every_key_of_the_schema(validator):
    schema = validator.schema
    known = _keys_in_schema(schema, schema["$defs"], set())
    documented: set[str] = set()
    for text in documented_blocks().values():
        documented |= _keys_in_config(yaml.safe_load(text))

    def covered(name: str) -> bool:
        pattern = re.escape(name).replace(r"\*", "[^.]+")
        return any(re.fullmatch(pattern, d) for d in documented)

    # Inside free-form values (metadata, setParams...) the schema knows no keys, so only
    # properties with fixed names are compared.
    assert sorted(n for n in known if not covered(n)) == []


GROUPS = """
healthCheckTimeout: 30
models:
  a: {cmd: "srv --port ${PORT}"}
  b: {cmd: "srv --port ${PORT}", ttl: 60}
  c: {proxy: "http://10.0.0.5:8080"}
groups:
  pair: {swap: false, exclusive: false, members: [a, b]}
  solo: {persistent: true, members: [c]}
"""

ROUTING_MATRIX = """
macros: {first: 9000, idle: 120}
startPort: ${first}
models:
  a:
    cmd: srv --port ${PORT}
    ttl: ${idle}
    capabilities: {in: [text, image], out: [text], context: 8192}
  b: {cmd: "srv --port ${PORT}", vram: {0: 12GiB, 1: "8 GiB"}}
routing:
  router:
    use: matrix
    settings:
      matrix:
        vars: {a1: a, b.2: b}
        evict_costs: {a1: 3}
        sets: {both: "a1 & b.2", one: "a1 | b.2"}
  scheduler:
    use: fifo
    settings: {fifo: {priority: {a: 5, b: -1}}}
"""

PEERS_PROFILES_SELECTORS = """
apiKeys: [sk-1, "${env.KEY}"]
adminKeys: [admin-1]
models:
  local: {cmd: "srv --port ${PORT}", vram: 20GiB}
peers:
  remote:
    proxy: http://other:8080
    models: [big, "org/model"]
    apiKey: secret
    filters: {setParamsByID: {big: {temperature: 0.2}}}
    timeouts: {responseHeader: 120}
profiles:
  work:
    description: for work
    pins: {chat: local, plan: remote/big, off: ~}
selectors:
  any:
    strategy: spillover
    targets: [local, remote/big]
    settings: {spillover: 2}
    metadata: {anything: [1, 2]}
hooks: {on_startup: {preload: [local]}}
performance: {every: 1m30s}
defs:
  unknown top-level keys: are allowed (YAML anchors live here)
"""


@pytest.mark.parametrize("text", [GROUPS, ROUTING_MATRIX, PEERS_PROFILES_SELECTORS],
                         ids=["groups", "routing-matrix", "peers-profiles-selectors"])
def test_valid_configs_are_accepted(validator, text):
    assert problems(validator, parse(text)) == []


def test_empty_sections_are_accepted(validator):
    assert problems(validator, parse("models:\nmacros:\napiKeys:\n")) == []
    assert problems(validator, {}) == []


@pytest.mark.parametrize("text", [
    "logToStdout: sometimes",
    "models: {m: {cmd: x, capabilities: {in: [video]}}}",
    "models: {m: {cmd: x, capabilities: {out: [text, smell]}}}",
    "models: {m: {cmd: x, ttll: 5}}",
    "models: {m: {cmd: x, ttl: -2}}",
    "models: {m: {cmd: x, ttl: soon}}",
    "models: {m: {cmd: x, unlisted: maybe}}",
    "models: {m: {cmd: x, capabilities: {context: -1}}}",
    "models: {m: {cmd: x, timeouts: {connectt: 5}}}",
    "models: {m: {cmd: x, filters: {setParam: {a: 1}}}}",
    "models: {m: {cmd: x, vram: lots}}",
    "models: {m: {description: no cmd and no proxy}}",
    "startPort: 0",
    "globalTTL: -1",
    "unloadTimeout: -5",
    "healthCheckTimeout: '60'",
    "performance: {every: 5}",
    "store: {}",
    "store: {path: ''}",
    "macros: {PORT: 8000}",
    "macros: {bad name: 1}",
    "macros: {list: [1, 2]}",
    "apiKeys: ['has space']",
    "apiKeys: ['']",
    "selectors: {s: {strategy: random, targets: [a]}}",
    "selectors: {s: {strategy: pin, targets: []}}",
    "selectors: {s: {targets: [a]}}",
    "selectors: {s: {strategy: spillover, targets: [a], settings: {spillover: 0}}}",
    "profiles: {p: [a, b]}",
    "profiles: {p: {description: no pins}}",
    "profiles: {p: {pins: {}}}",
    "peers: {r: {proxy: 'http://x'}}",
    "peers: {r: {proxy: 'http://x', models: []}}",
    "peers: {r: {proxy: 'http://x', models: [a], filters: {strip_params: a}}}",
    "groups: {g: {swap: false, members: [a, a]}}",
    "groups: {g: {members: [a], persistant: true}}",
    "matrix: {vars: {a_b: m}, sets: {s: a_b}}",
    "matrix: {vars: {a: m}}",
    "matrix: {sets: {s: a}, evict_costs: {a: 0}}",
    "routing: {router: {use: lottery}}",
    "routing: {router: {use: matrix}}",
    "routing: {scheduler: {use: lifo}}",
    "groups: {g: {members: [a]}}\nmatrix: {sets: {s: a}}",
    "groups: {g: {members: [a]}}\nrouting: {router: {use: group}}",
    "matrix: {sets: {s: a}}\nrouting: {router: {settings: {groups: {g: {members: [a]}}}}}",
])
def test_invalid_configs_are_rejected(validator, text):
    assert problems(validator, parse(text)) != [], text
