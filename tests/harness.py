"""Running gateways for tests: mitmproxy's own master in-process (fast, flows inspectable)
or a real `mitmdump -s ccx_addon/addon.py` subprocess (exercises script loading)."""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "ccx_addon" / "addon.py"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"gateway at {url} did not become healthy")


class FlowCollector:
    """Keeps every finished flow so tests can read the flow view."""

    def __init__(self) -> None:
        self.flows = []
        self.updates = []  # (hook, flow state snapshot) for secret checks while in flight

    def response(self, flow) -> None:
        self.flows.append(flow)

    def error(self, flow) -> None:
        if flow not in self.flows:
            self.flows.append(flow)

    def requestheaders(self, flow) -> None:
        self.updates.append(("requestheaders", flow.get_state()))

    def request(self, flow) -> None:
        self.updates.append(("request", flow.get_state()))

    def responseheaders(self, flow) -> None:
        self.updates.append(("responseheaders", flow.get_state()))


class LoadedScript:
    """What mitmproxy makes of `-s ccx_addon/addon.py`: one addon whose children are the
    gateway's addons, so each hook runs for all of them in one call, and an exception in one
    skips the rest (as it does for users). Adding the addons one by one hid exactly that."""

    def __init__(self, addons: list) -> None:
        self.addons = addons


class InProcessGateway:
    """A DumpMaster with the gateway's addons, on its own event loop in a thread."""

    def __init__(self, config_path: Path, **options) -> None:
        self.config_path = config_path
        self.options = options
        self.collector = FlowCollector()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.master = None
        self.addons = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def flows(self):
        return self.collector.flows

    def start(self) -> "InProcessGateway":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(20)
        wait_healthy(self.url)
        return self

    async def _start(self) -> None:
        from mitmproxy import hooks
        from mitmproxy.options import Options
        from mitmproxy.tools.dump import DumpMaster

        import ccx_addon

        options = Options()
        self.master = DumpMaster(options, with_termlog=False, with_dumper=False)
        # errorcheck exits on any error logged during start-up, process-wide: in a test
        # session that includes other tests' noise. Start-up errors are tested via mitmdump.
        self.master.addons.remove(self.master.addons.get("errorcheck"))
        self.addons = ccx_addon.make_addons()
        script = LoadedScript(self.addons)
        self.master.addons.add(script, self.collector)
        options.update(ccx_config=str(self.config_path), **self.options)
        # What mitmproxy's script loader does for a freshly loaded script.
        self.master.addons.invoke_addon_sync(script, hooks.ConfigureHook(set(options.keys())))
        options.update(mode=["reverse:http://127.0.0.1:9@127.0.0.1:0"])
        self._run = asyncio.ensure_future(self.master.run())
        proxyserver = self.master.addons.get("proxyserver")
        for _ in range(400):
            addrs = proxyserver.listen_addrs()
            if addrs:
                self.port = addrs[0][1]
                return
            await asyncio.sleep(0.01)
        raise TimeoutError("proxy server did not start")

    def call(self, fn, *args):
        """Run `fn(*args)` on the gateway's loop (for touching its state safely)."""

        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def addon(self, cls):
        return next(a for a in self.addons if isinstance(a, cls))

    def stop(self) -> None:
        if self.master is not None:
            self.loop.call_soon_threadsafe(self.master.shutdown)
            deadline = time.time() + 10
            while not self._run.done() and time.time() < deadline:
                time.sleep(0.02)

        async def cancel_leftovers():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_leftovers(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class SubprocessGateway:
    """`mitmdump -s ccx_addon/addon.py` (or mitmweb) as a user starts it."""

    def __init__(self, config_path: Path, workdir: Path, *args: str, tool: str = "mitmdump",
                 env: dict[str, str] | None = None, argv: list[str] | None = None,
                 port: int | None = None, script=None) -> None:
        """`argv` replaces the default command line (then pass the `port` it listens on)."""
        self.argv = argv
        self.script = script or ADDON
        self.config_path = config_path
        self.workdir = workdir
        self.args = list(args)
        self.tool = tool
        self.env = env
        self.port = port or free_port()
        self.log_path = workdir / f"{tool}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.argv is not None:
            return self.argv
        return [
            str(BIN / self.tool), "-s", str(self.script),
            "--set", f"ccx_listen=127.0.0.1:{self.port}",
            "--set", f"ccx_config={self.config_path}",
            *self.args,
        ]

    def start(self) -> "SubprocessGateway":
        env = dict(os.environ)
        env.update(self.env or {})
        self.process = subprocess.Popen(
            self.command(), cwd=self.workdir, env=env,
            stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            wait_healthy(self.url, process=self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"gateway did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
