"""Per-request timestamps inside ``rocmux serve`` and the bench/proxy.py client, to see
where the time to first token of a burst goes (docs/benchmarks.md, "The H100 again").
Not part of rocmux: it monkeypatches it from outside.

Put this folder on PYTHONPATH and name a file in ROCMUX_SCRATCH_TRACE; every process
started with that environment loads it (Python imports ``sitecustomize`` at start-up).
``rocmux serve`` writes FILE when its shutdown begins (uvicorn re-raises SIGTERM, which
would skip atexit), the bench client writes FILE.client at exit. Per request, in
``time.perf_counter()`` seconds (CLOCK_MONOTONIC, comparable across processes):
``a`` handler start, ``g`` at the burst gate, ``w`` written to the runtime, ``h`` head
received, ``f`` first body chunk, ``new`` whether a connection was opened for it; the
client's ``s`` sent, ``h``, ``f``. Read the files with bench/gpu/trace_report.py. (The
A/B of commit 070315d also set ROCMUX_SCRATCH_NO_REPLACE, for a relay hook that is gone.)
"""

import os
import sys

_out = os.environ.get("ROCMUX_SCRATCH_TRACE")
_serve = bool(_out) and "serve" in sys.argv
_bench = bool(_out) and bool(sys.argv) and sys.argv[0].endswith("proxy.py")
if _serve or _bench:
    import atexit
    import contextvars
    import json
    import time

    from rocmux import relay

    recs = []
    pending = {}
    cur = contextvars.ContextVar("rec", default=None)
    orig_aiter = relay.RelayResponse.aiter_raw

    async def aiter_raw(self):
        rec = pending.pop(id(self), None)
        async for chunk in orig_aiter(self):
            if rec is not None:
                rec["f"] = time.perf_counter()
                rec = None
            yield chunk

    relay.RelayResponse.aiter_raw = aiter_raw
    orig_post = relay.RelayClient.post

    async def post(self, base, path, body, read_timeout, *, fresh=False, hold=None):
        if _bench:
            rec = {"base": base, "s": time.perf_counter()}
            recs.append(rec)
        else:
            rec = cur.get()
        if rec is not None and hold is not None:
            orig_hold = hold

            async def hold(send, rec=rec):
                def timed():
                    rec["w"] = time.perf_counter()
                    send()

                rec["g"] = time.perf_counter()
                await orig_hold(timed)

        resp = await orig_post(self, base, path, body, read_timeout, fresh=fresh, hold=hold)
        if rec is not None:
            rec["h"] = time.perf_counter()
            pending[id(resp)] = rec
        return resp

    relay.RelayClient.post = post
    orig_checkout = relay.RelayClient._checkout

    async def _checkout(self, host, port, fresh):
        before = len(self._open)
        conn = await orig_checkout(self, host, port, fresh)
        rec = cur.get()
        if rec is not None:
            rec["new"] = len(self._open) > before
        return conn

    relay.RelayClient._checkout = _checkout
    if _serve:
        from rocmux import http_api

        orig_call = http_api.App.__call__

        async def call(self, scope, receive, send):
            completion = scope["type"] == "http" and scope["method"] == "POST"
            if completion and scope["path"] in http_api.COMPLETION_PATHS:
                rec = {"a": time.perf_counter(), "cpu": time.process_time()}
                recs.append(rec)
                cur.set(rec)
            return await orig_call(self, scope, receive, send)

        http_api.App.__call__ = call

    def dump():
        with open(_out + (".client" if _bench else ""), "w") as fh:
            json.dump(recs, fh)

    atexit.register(dump)
    if _serve:
        # uvicorn re-raises SIGTERM after its shutdown, which skips atexit.
        from rocmux import serve as _serve_mod
        from rocmux.supervisor import poll_until

        _orig_dd = _serve_mod._drain_deadline

        async def _dd(server, *a, **k):
            await poll_until(lambda: server.should_exit, interval=0.1)
            dump()
            return await _orig_dd(server, *a, **k)

        _serve_mod._drain_deadline = _dd
