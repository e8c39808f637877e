"""Entry point for `mitmdump -s ccx_addon/addon.py` (and mitmweb).

mitmproxy executes this file outside of any package, so it stays a thin loader: all code
lives in the `ccx_addon` package, imported from the checkout when it is not installed.
"""

import os
import sys

try:
    import ccx_addon
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ccx_addon

addons = ccx_addon.make_addons()
