"""The `ccx_config` option: loads the YAML config, watches it, reloads it."""

import asyncio
import logging
import os
from pathlib import Path

from mitmproxy import command, ctx, exceptions

from .config import ConfigError, GatewayConfig, load_config
from .state import GatewayState

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "config/ccx.yaml"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
WATCH_INTERVAL = 1.0


def resolve_config_path(option: str) -> Path:
    """The option as given; a relative path missing from the working directory is also
    looked up in the project checkout, so `mitmdump -s ccx_addon/addon.py` works from anywhere."""
    path = Path(option).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return path


def describe(config: GatewayConfig) -> str:
    active = [c for c in config.channels if c.active]
    idle = [c for c in config.channels if not c.active]
    text = f"{len(active)} active channel(s): " + (", ".join(c.name for c in active) or "none")
    if idle:
        text += "; inactive: " + ", ".join(
            f"{c.name} ({'disabled' if not c.enabled else c.inactive_reason})" for c in idle
        )
    return text


def _file_stamp(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigStore:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.path: Path | None = None
        self._stamp: tuple | None = None
        self._watcher: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_config", str, DEFAULT_CONFIG,
            "ccx-addon: the YAML file with channels and proxy access keys.",
        )
        loader.add_option(
            "ccx_config_watch", bool, True,
            "ccx-addon: reload the config file when it changes (a broken edit is reported "
            "and the last good config stays in force).",
        )

    def configure(self, updated) -> None:
        if "ccx_config" in updated:
            path = resolve_config_path(ctx.options.ccx_config)
            try:
                config = load_config(path)
            except ConfigError as e:
                raise exceptions.OptionsError(f"ccx-addon: {e}") from None
            self.path = path
            self._stamp = _file_stamp(path)
            self.state.install(config)
            logger.info(f"ccx-addon: loaded {path}: {describe(config)}")

    def running(self) -> None:
        if self._watcher is None and ctx.options.ccx_config_watch:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self.path is not None and _file_stamp(self.path) != self._stamp:
                try:
                    self.reload_now()
                except Exception:  # a bug must not end the watching for good
                    logger.exception("ccx-addon: config not reloaded, the previous one stays in force")

    def reload_now(self) -> bool:
        """Load the file again; on error keep the config in force. True when reloaded."""
        assert self.path is not None
        self._stamp = _file_stamp(self.path)
        try:
            config = load_config(self.path)
        except ConfigError as e:
            logger.error(f"ccx-addon: config not reloaded, the previous one stays in force: {e}")
            return False
        self.state.install(config)
        logger.info(f"ccx-addon: reloaded {self.path}: {describe(config)}")
        return True

    @command.command("ccx.reload")
    def reload(self) -> None:
        """Reload the ccx-addon config file now."""
        if self.path is not None:
            self.reload_now()
