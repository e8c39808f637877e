"""mitmweb's flow list: show the gateway's comment as a column, and keep the list bounded
(mitmweb holds every flow in memory for as long as it runs)."""

import logging
from collections.abc import Iterable, Sequence

from mitmproxy import ctx, exceptions, flow

logger = logging.getLogger(__name__)

COMMENT_COLUMN = "comment"
DEFAULT_KEEP_FLOWS = 1000


def columns_with_comment(columns: Sequence[str]) -> list[str] | None:
    """The column list with the comment column added, or None when it is there already."""
    if COMMENT_COLUMN in columns:
        return None
    return [*columns, COMMENT_COLUMN]


def flows_to_drop(flows: Iterable[flow.Flow], keep: int) -> list[flow.Flow]:
    """The oldest finished flows beyond the newest `keep` (`flows` oldest first). Flows still
    in flight are never dropped: removing one from the view would kill it."""
    flows = list(flows)
    excess = len(flows) - keep
    if keep <= 0 or excess <= 0:
        return []
    return [f for f in flows if not f.live][:excess]


class CommentColumn:
    """Switches on mitmweb's comment column, where the gateway says what happened to each
    request. Only when the user has not chosen columns (`--set web_columns=...`) and only
    at start-up, so a later choice in mitmweb's options stays as made."""

    def __init__(self) -> None:
        self.checked = False

    def configure(self, updated) -> None:
        if self.checked or "web_columns" not in ctx.options:  # not mitmweb
            return
        self.checked = True
        if ctx.options.has_changed("web_columns"):
            return
        if columns := columns_with_comment(ctx.options.web_columns):
            ctx.options.update(web_columns=columns)


class FlowLimit:
    """Keeps only the newest `ccx_keep_flows` flows in the view (mitmweb, mitmproxy), so a
    gateway left running does not grow without bound. mitmdump keeps no flows anyway."""

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_keep_flows", int, DEFAULT_KEEP_FLOWS,
            "ccx-addon: how many flows mitmweb (or mitmproxy) keeps in its flow list; the "
            "oldest finished ones are removed beyond that. 0 keeps every flow. Flows saved "
            "with -w are not affected.",
        )

    def configure(self, updated) -> None:
        if "ccx_keep_flows" in updated:
            if ctx.options.ccx_keep_flows < 0:
                raise exceptions.OptionsError("ccx_keep_flows: must be 0 (keep all) or a positive number")
            self.trim()

    def response(self, f) -> None:
        self.trim()

    def error(self, f) -> None:
        self.trim()

    def trim(self) -> None:
        view = ctx.master.addons.get("view")
        keep = ctx.options.ccx_keep_flows
        if view is None or keep <= 0 or view.store_count() <= keep:
            return
        # "@all" lists the view's store oldest first.
        if dropped := flows_to_drop(view.resolve("@all"), keep):
            view.remove(dropped)
