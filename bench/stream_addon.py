"""Bare mitmdump, streaming: without an addon mitmproxy buffers whole responses (an SSE
answer reaches the client only when it ended), so SSE figures are compared against this."""


def responseheaders(flow):
    flow.response.stream = True
