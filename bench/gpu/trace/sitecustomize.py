"""Per-request timestamps inside ``rocmux serve`` and the bench/proxy.py client, to see
where the time to first token of a burst goes (docs/benchmarks.md, "The H100 again").
Not part of rocmux: it monkeypatches it from outside.

Put this folder on PYTHONPATH and name a file in ROCMUX_SCRATCH_TRACE; every process
started with that environment loads it (Python imports ``sitecustomize`` at start-up).
``rocmux serve`` writes FILE when its shutdown begins (uvicorn re-raises SIGTERM, which
would skip atexit), bench/passthrough.py's asgi floor FILE.asgi, the bench client
writes FILE.client at exit. Per request, in
``time.perf_counter()`` seconds (CLOCK_MONOTONIC, comparable across processes):
``a`` handler start, ``g`` at the burst gate, ``w`` written to the runtime, ``h`` head
received, ``f`` first body chunk, ``new`` whether a connection was opened for it; the
client's ``s`` sent, ``h``, ``f``. Read the files with bench/gpu/trace_report.py. (The
A/B of commit 070315d also set ROCMUX_SCRATCH_NO_REPLACE, for a relay hook that is gone.)
"""

import os
import sys

if os.environ.get("ROCMUX_SCRATCH_SPARES") == "off" and "serve" in sys.argv:
    # The A/B of the relay's spares (commit "perf: relay: connections opened ahead"):
    # rocmux serve as before them, every request of a burst opening its own connection.
    from rocmux import relay as _relay

    _relay.RelayClient._keep_spares = lambda self, key: None

_out = os.environ.get("ROCMUX_SCRATCH_TRACE")
# ROCMUX_SCRATCH_CLIENT_ONLY: the client's timestamps only, the servers left untouched.
_servers = bool(_out) and not os.environ.get("ROCMUX_SCRATCH_CLIENT_ONLY")
_serve = _servers and "serve" in sys.argv
_floor = _servers and sys.argv[0].endswith("passthrough.py") and "asgi" in sys.argv
_bench = bool(_out) and bool(sys.argv) and sys.argv[0].endswith("proxy.py")
_file = f"{_out}.client" if _bench else f"{_out}.asgi" if _floor else _out
if _serve or _floor or _bench:
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
    if _serve or _floor:
        import gc

        import uvicorn
    if (_serve or _floor) and os.environ.get("ROCMUX_SCRATCH_GC"):
        # ROCMUX_SCRATCH_GC=off: no cyclic GC in the servers; =freeze: what exists when
        # uvicorn starts serving is left out of every collection (gc.freeze); =N: that
        # and a threshold of N for the young generation (rocmux serve now does both
        # itself, rocmux.serve.keep_gc_out_of_bursts: these are for the asgi floor).
        _orig_serve = uvicorn.Server.serve

        async def serve(self, *a, **k):
            mode = os.environ["ROCMUX_SCRATCH_GC"]
            if mode == "off":
                gc.disable()
            else:
                gc.collect()
                gc.freeze()
            if mode.isdigit():  # a young-generation threshold too
                gc.set_threshold(int(mode), *gc.get_threshold()[1:])
            return await _orig_serve(self, *a, **k)

        uvicorn.Server.serve = serve

    if _serve or _floor:
        from rocmux import burst

        orig_arrived = burst.BurstGate.arrived

        def arrived(self):
            # Called first thing in the handler of a completion, in its task.
            rec = {"a": time.perf_counter(), "cpu": time.process_time()}
            recs.append(rec)
            cur.set(rec)
            orig_arrived(self)

        burst.BurstGate.arrived = arrived

    collections = []
    if _serve or _floor:

        def _gc_watch(phase, info):
            # [generation, start, end] of every collection, for the report's read span.
            if phase == "start":
                collections.append([info["generation"], time.perf_counter(), None])
            elif collections:
                collections[-1][2] = time.perf_counter()

        gc.callbacks.append(_gc_watch)

    def dump():
        with open(_file, "w") as fh:
            json.dump([*recs, {"gc": collections}], fh)

    atexit.register(dump)
    if _serve or _floor:
        # uvicorn re-raises SIGTERM after its shutdown, which skips atexit.
        _orig_shutdown = uvicorn.Server.shutdown

        async def shutdown(self, *a, **k):
            dump()
            return await _orig_shutdown(self, *a, **k)

        uvicorn.Server.shutdown = shutdown
