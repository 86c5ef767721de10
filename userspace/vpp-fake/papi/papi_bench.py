#!/usr/bin/env python3
"""The vpp_papi side of `cargo xtask bench vpp`, against a (fake) VPP socket.

Reads {"socket", "apidir", "connects", "routes", "first_octet"} on stdin and prints JSON:
  connect_ms: per-connect times of VPPApiClient.connect() (handshake with the server's
              message table and building the API functions; loading the JSON files is
              done once, before timing, like a long-running client would),
  route_add_rate: ip_route_add_del requests per second, one blocking call after the
              other (vpp_papi's normal API),
  route_add_rate_async: the same requests through vpp_papi_async (asyncio, all futures
              created first, so they are pipelined), or null if it failed.
"""
import asyncio
import glob
import json
import os
import sys
import time

from vpp_papi import VPPApiClient


def path(sw_if_index):
    return {
        "sw_if_index": sw_if_index, "table_id": 0, "rpf_id": 0, "weight": 1, "preference": 0,
        "type": 0, "flags": 0, "proto": 0,
        "nh": {"address": {"ip4": "0.0.0.0"}, "via_label": 0, "obj_id": 0,
               "classify_table_index": 0xffffffff},
        "n_labels": 0,
        "label_stack": [{"is_uniform": 0, "label": 0, "ttl": 0, "exp": 0}] * 16,
    }


def route(i, first):
    return {"table_id": 0, "stats_index": 0,
            "prefix": "%d.%d.%d.0/24" % (first, (i >> 8) & 0xff, i & 0xff),
            "n_paths": 1, "paths": [path(1)]}


def main():
    prog = json.load(sys.stdin)
    apifiles = sorted(glob.glob(os.path.join(prog["apidir"], "*.api.json")))
    c = VPPApiClient(apifiles=apifiles, server_address=prog["socket"], read_timeout=10)
    out = {"connect_ms": []}
    for _ in range(prog["connects"]):
        t = time.perf_counter()
        c.connect("papi-bench")
        out["connect_ms"].append((time.perf_counter() - t) * 1e3)
        c.disconnect()

    n = prog["routes"]
    routes = [route(i, prog["first_octet"]) for i in range(n)]
    c.connect("papi-bench")
    t = time.perf_counter()
    for r in routes:
        rv = c.api.ip_route_add_del(is_add=True, is_multipath=False, route=r)
        if rv.retval != 0:
            raise SystemExit("ip_route_add_del failed: %s" % (rv,))
    out["route_add_rate"] = n / (time.perf_counter() - t)
    c.disconnect()

    out["route_add_rate_async"] = None
    try:
        from vpp_papi import vpp_papi_async

        async def run_async():
            a = vpp_papi_async.VPPApiClient(server_address=prog["socket"], read_timeout=10)
            await a.connect("papi-async-bench", asyncio.Queue())
            t = time.perf_counter()
            futures = [a.api.ip_route_add_del(is_add=True, is_multipath=False, route=r) for r in routes]
            replies = await asyncio.gather(*futures)
            rate = n / (time.perf_counter() - t)
            bad = [r for r in replies if r.retval != 0]
            await a.disconnect()
            if bad:
                raise RuntimeError("%d failed" % len(bad))
            return rate

        out["route_add_rate_async"] = asyncio.run(run_async())
    except Exception as e:  # reported, not fatal: the blocking client is the baseline
        out["async_error"] = "%s: %s" % (type(e).__name__, e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
