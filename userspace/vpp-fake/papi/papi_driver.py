#!/usr/bin/env python3
"""Drives the real vpp_papi client (PyPI vpp-papi 2.4.2) against a VPP API socket.

Reads a JSON program on stdin:
  {"socket": PATH, "apidir": DIR, "name": "client name",
   "calls": [{"call": "sw_interface_dump", "args": {...}, "cursor_loop": false}, ...],
   "subscribe_events": false, "event_wait": 0.0}
and writes one JSON object on stdout:
  {"connected": bool, "table_size": int, "missing": [names of messages the server does not
   list with our CRC], "results": [result or {"error": text} per call], "events": [...]}

Results are vpp_papi's own decoded tuples turned into JSON (namedtuples -> objects, enums ->
ints, addresses and MACs -> strings, bytes -> lists of ints).
"""
import glob
import json
import os
import sys
import threading
import time

from vpp_papi import VPPApiClient


def jsonable(v):
    if hasattr(v, "_asdict"):
        return {k: jsonable(x) for k, x in v._asdict().items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return list(v)
    if isinstance(v, bool) or v is None or isinstance(v, (str, float)):
        return v
    if isinstance(v, int):
        return int(v)
    return str(v)


def main():
    prog = json.load(sys.stdin)
    apifiles = sorted(glob.glob(os.path.join(prog["apidir"], "*.api.json")))
    c = VPPApiClient(apifiles=apifiles, server_address=prog["socket"], read_timeout=5)
    events = []
    lock = threading.Lock()

    def on_event(name, msg):
        with lock:
            events.append({"name": name, "msg": jsonable(msg)})

    out = {"connected": False, "results": [], "events": events}
    c.connect(prog.get("name", "papi-driver"))
    out["connected"] = True
    out["table_size"] = len(c.transport.message_table)
    # vpp_papi makes a function of every request whose name_crc the server lists; it skips
    # the others (a CRC mismatch shows up here).
    out["missing"] = sorted(n for n in c.services if n in c.messages and not hasattr(c.api, n))
    if prog.get("subscribe_events"):
        c.register_event_callback(on_event)
    for call in prog.get("calls", []):
        name = call["call"]
        try:
            f = getattr(c.api, name)
            args = dict(call.get("args", {}))
            if call.get("cursor_loop"):
                details = []
                while True:
                    r, d = f(**args)
                    details.extend(d)
                    if r.retval != -165:
                        break
                    args["cursor"] = r.cursor
                res = {"reply": jsonable(r), "details": jsonable(details)}
            else:
                res = jsonable(f(**args))
            out["results"].append(res)
        except Exception as e:  # reported per call; the test decides what it expected
            out["results"].append({"error": "%s: %s" % (type(e).__name__, e)})
    time.sleep(prog.get("event_wait", 0.0))
    with lock:
        out["events"] = list(events)
    c.disconnect()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
