"""mitmdump / mitmweb subprocesses with the addon and an explicit `--mode`.

The explicit mode sidesteps a start-up race of mitmproxy 12 on Python 3.12, which brings
up its servers before it loads `-s` scripts (so the addon's default mode comes too late);
tests of the default mode itself live in test_mitmdump.py.
"""

from harness import SubprocessGateway, free_port


def start_gateway(config_path, workdir, *args: str, tool: str = "mitmdump", env=None,
                  reverse_target: str = "http://127.0.0.1:9", script=None) -> SubprocessGateway:
    """`reverse_target`: e.g. a tests/reversetarget.py RecordingTarget's url. `script`: an
    entry script other than ccx_addon/addon.py (tests/scripts/)."""
    port = free_port()
    gw = SubprocessGateway(
        config_path, workdir,
        "--mode", f"reverse:{reverse_target}@127.0.0.1:{port}", "--set", "connection_strategy=lazy", *args,
        tool=tool, env=env, port=port, script=script,
    )
    return gw.start()
