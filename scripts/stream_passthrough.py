"""The benchmark's honest baseline: mitmproxy streaming SSE through, with no metering.

Without ``flow.response.stream`` mitmproxy would buffer whole streams (TTFB = generation time).
Run: mitmdump -s scripts/stream_passthrough.py --mode reverse:http://127.0.0.1:PORT
"""

from mitmproxy import http


class StreamPassthrough:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        assert flow.response
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True


addons = [StreamPassthrough()]
