"""The gateway as `mitmdump -s` loads it, with one hook made to raise on chat requests
(CCX_BREAK=Class.hook): a stand-in for a bug, to prove the gateway fails closed
(tests/test_hardening.py). Other paths (/health, which the start-up waits for) still work."""

import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ccx_addon  # noqa: E402
from ccx_addon import access, flowview, gateway  # noqa: E402

CLASSES = {"AccessGate": access.AccessGate, "FlowView": flowview.FlowView, "ChatGateway": gateway.ChatGateway}
class_name, hook = os.environ["CCX_BREAK"].split(".")
cls = CLASSES[class_name]
original = getattr(cls, hook)


def broken(self, flow):
    if flow.request.path.startswith("/v1/chat"):
        raise RuntimeError(f"{class_name}.{hook} deliberately broken")
    return original(self, flow)


async def broken_async(self, flow):
    if flow.request.path.startswith("/v1/chat"):
        raise RuntimeError(f"{class_name}.{hook} deliberately broken")
    return await original(self, flow)


setattr(cls, hook, broken_async if inspect.iscoroutinefunction(original) else broken)
addons = ccx_addon.make_addons()
