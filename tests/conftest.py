import os
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fakeupstream import FakeUpstream, openai_like  # noqa: E402
from harness import InProcessGateway, SubprocessGateway  # noqa: E402

PROXY_KEY = "pk-test-proxy-key-7f3a9"
UPSTREAM_KEYS = ("sk-up-alpha-0c1d2e", "sk-up-beta-9a8b7c", "sk-up-gamma-5e6f7a")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch):
    """Tests talk to 127.0.0.1 only: a developer's HTTP(S)_PROXY must not reroute them (the
    gateway follows the proxy environment; test_proxy.py sets it where it is tested)."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def upstreams():
    """Start fake upstreams: `upstreams(behaviour)` returns a started FakeUpstream."""
    started = []

    def start(behaviour=openai_like) -> FakeUpstream:
        upstream = FakeUpstream(behaviour).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture
def write_config(tmp_path):
    def write(text: str, name: str = "ccx.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def gateway(write_config):
    """`gateway(config_text, **options)`: an in-process gateway on a free port."""
    started = []

    def start(config_text: str, **options) -> InProcessGateway:
        gw = InProcessGateway(write_config(config_text), **options).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def mitmdump(write_config, tmp_path):
    """`mitmdump(config_text, *args)`: a real `mitmdump -s ccx_addon/addon.py` subprocess."""
    started = []

    def start(config_text: str, *args: str, tool: str = "mitmdump", env=None) -> SubprocessGateway:
        gw = SubprocessGateway(write_config(config_text, f"ccx-{len(started)}.yaml"), tmp_path, *args, tool=tool, env=env)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


def channel(name: str, url: str, *, keys=(UPSTREAM_KEYS[0],), extra: str = "") -> str:
    """One channel entry of a config, indented for the `channels:` list."""
    keys_yaml = ", ".join(f'"{k}"' for k in keys)
    text = f"  - name: {name}\n    base_url: {url}\n    api_keys: [{keys_yaml}]\n"
    if extra:
        text += textwrap.indent(textwrap.dedent(extra).strip("\n"), "    ") + "\n"
    return text


def config(*channels: str, top: str = "") -> str:
    return f'proxy_access_keys: ["{PROXY_KEY}"]\n{top}channels:\n' + "".join(channels)
