"""config/ccx.schema.json: the shipped configs validate against it, broken ones do not, and
its fields are exactly those config.py accepts (so the two cannot drift apart).

`jsonschema` is not a dependency: a small validator for the keywords the schema uses is
below, and it refuses any keyword it does not know, so the schema cannot silently outgrow it.
"""

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from ccx_addon import config as ccx_config

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "config" / "ccx.schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text())

ANNOTATIONS = {"$schema", "title", "description", "default", "examples", "definitions"}
TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def _is_type(value, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, TYPES[name])


def schema_errors(value, schema: dict, path: str = "$", root: dict = SCHEMA) -> list[str]:
    """Errors of `value` against `schema` (draft-07 subset)."""
    unknown = set(schema) - ANNOTATIONS - {
        "type", "properties", "additionalProperties", "required", "items", "minItems", "enum",
        "const", "minimum", "maximum", "minLength", "pattern", "$ref", "if", "then", "else", "not",
        "oneOf",
    }
    assert not unknown, f"the test validator does not know {unknown}"
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return schema_errors(value, target, path, root)
    errors = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: expected {types}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: not {schema['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: above {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: too short")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{i}]", root)
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{path}: missing {name}")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, sub in value.items():
            if name in properties:
                errors += schema_errors(sub, properties[name], f"{path}.{name}", root)
            elif extra is False:
                errors.append(f"{path}.{name}: unknown field")
            elif isinstance(extra, dict):
                errors += schema_errors(sub, extra, f"{path}.{name}", root)
    if "not" in schema and not schema_errors(value, schema["not"], path, root):
        errors.append(f"{path}: matches a schema it must not match")
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not schema_errors(value, s, path, root)]
        if len(matching) != 1:
            errors.append(f"{path}: matches {len(matching)} of the oneOf schemas, not exactly one")
    if "if" in schema:
        branch = "then" if not schema_errors(value, schema["if"], path, root) else "else"
        if branch in schema:
            errors += schema_errors(value, schema[branch], path, root)
    return errors


def load_yaml(text: str):
    return yaml.safe_load(textwrap.dedent(text))


@pytest.mark.parametrize("name", ["ccx.yaml", "ccx.example.yaml"])
def test_shipped_configs_validate_and_point_at_the_schema(name):
    text = (ROOT / "config" / name).read_text()
    assert text.startswith("# yaml-language-server: $schema=./ccx.schema.json")
    assert schema_errors(yaml.safe_load(text), SCHEMA) == []


VALID = """
    proxy_access_keys: ["k"]
    rewrite_response_model: false
    channels:
      - name: main
        base_url: https://api.example.com/v1
        api_keys: ["sk-1"]
        enabled: "${MAIN_ON:-true}"
        timeouts: {connect: 5, idle: null}
      - name: multi
        base_urls: [https://a.example.com/v1, https://b.example.com/v1]
        api_keys: ["sk-2", {key: "sk-3", weight: 3, rpm: 60, max_concurrency: 2}]
        tls_verify: false
        rewrite_response_model: true
      - name: echo
        base_url: "echo:"
        fallback: true
"""


@pytest.mark.parametrize("broken, where", [
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    priorty: 1\n", "priorty"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n", "api_keys"),
    ('channels:\n  - name: e\n    base_url: "echo:"\n    api_keys: [k]\n', "must not"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    priority: high\n", "priority"),
    ("channels:\n  - name: main\n    base_url: ftp://x\n    api_keys: [k]\n", "base_url"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    auth_header: basic\n", "auth_header"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    timeouts: {connect: -1}\n", "connect"),
    ("channels: []\nmax_attempts: 0\n", "max_attempts"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    fixes: {drop_parms: [x]}\n", "drop_parms"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    fixes: {clamp: {max_tokens: {max: big}}}\n", "max"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    fixes: {role_map: {developer: boss}}\n", "role_map"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    fixes: {models: {\"a*\": {models: {}}}}\n", "models"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    fixes: {reasoning_passback: {scope: some}}\n", "scope"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    base_urls: [https://y/v1]\n    api_keys: [k]\n", "oneOf"),
    ("channels:\n  - name: main\n    api_keys: [k]\n", "oneOf"),
    ("channels:\n  - name: main\n    base_urls: [https://x/v1]\n    api_keys: [{key: k, rpm: 0}]\n", "api_keys[0]"),
    ("channels:\n  - name: main\n    base_urls: [https://x/v1]\n    api_keys: [{key: k, burst: 2}]\n", "api_keys[0]"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\n    tls_verify: 3\n", "tls_verify"),
    ("channels:\n  - name: main\n    base_url: https://x/v1\n    api_keys: [k]\ncircuit_breaker: {failure_ratio: 2}\n", "failure_ratio"),
])
def test_schema_and_loader_both_refuse_broken_configs(broken, where):
    assert schema_errors(load_yaml(VALID), SCHEMA) == []
    ccx_config.parse_config(textwrap.dedent(VALID), environ={})
    data = yaml.safe_load(broken)
    errors = schema_errors(data, SCHEMA)
    assert any(where in e for e in errors), errors
    with pytest.raises(ccx_config.ConfigError):
        ccx_config.parse_config('proxy_access_keys: ["k"]\n' + broken, environ={})


def test_schema_fields_are_the_fields_config_py_accepts():
    channel = SCHEMA["definitions"]["channel"]["properties"]
    top = SCHEMA["properties"]
    assert set(top) == ccx_config._TOP_FIELDS
    assert set(channel) == ccx_config._CHANNEL_FIELDS
    assert set(channel["timeouts"]["properties"]) == ccx_config._TIMEOUT_FIELDS
    assert set(top["circuit_breaker"]["properties"]) == ccx_config._BREAKER_FIELDS
    assert set(SCHEMA["definitions"]["channel"]["required"]) == {"name"}
    assert SCHEMA["definitions"]["channel"]["oneOf"] == [{"required": ["base_url"]}, {"required": ["base_urls"]}]
    assert set(SCHEMA["definitions"]["fixes"]["properties"]) == ccx_config._FIXES_FIELDS
    assert set(SCHEMA["definitions"]["fix"]["properties"]) == ccx_config._FIX_FIELDS
    # The schema's defaults are the loader's.
    for name, field in channel["timeouts"]["properties"].items():
        assert field["default"] == getattr(ccx_config.Timeouts(), name), name
    for name, field in top["circuit_breaker"]["properties"].items():
        assert field["default"] == getattr(ccx_config.BreakerSettings(), name), name
    assert top["max_attempts"]["default"] == ccx_config.GatewayConfig(source="", proxy_access_keys=()).max_attempts
