"""An embedding server that costs (almost) nothing: the baseline for the extension's own overhead.

The deterministic test double (``omop_emb_pg.testing.DeterministicEmbeddingServer``) draws 384
Gaussians in Python for every text (~140 us/text), which would hide the extension's own cost.
This server answers ``POST /v1/embeddings`` from a pool of 4,096 pre-encoded unit vectors (the
text's CRC-32 picks one), base64 or JSON floats, so a request costs a JSON parse and a join.
Same text -> same vector; distinct texts may share a vector (fine for throughput and latency).

    python bench/instant_server.py --port 9100 [--dim 384]      # prints its URL
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import random
import signal
import struct
import sys
import threading
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from omop_emb_pg._http import FastThreadingHTTPServer, HTTPError, JSONRequestHandler  # noqa: E402

POOL = 4096


def make_pool(dim: int, seed: int = 7):
    rng = random.Random(seed)
    b64, flt = [], []
    for _ in range(POOL):
        v = [rng.gauss(0.0, 1.0) for _ in range(dim)]
        n = math.sqrt(sum(x * x for x in v))
        v = [x / n for x in v]
        b64.append('"' + base64.b64encode(struct.pack("<%df" % dim, *v)).decode() + '"')
        flt.append(json.dumps(v, separators=(",", ":")))
    return b64, flt


class Handler(JSONRequestHandler):
    def do_GET(self):
        self.guarded(self._get)

    def do_POST(self):
        self.guarded(self._post)

    def _get(self):
        dim = self.server.dim
        path = self.path.rstrip("/")
        if path in ("", "/health"):
            self.send_json(200, {"status": "ok", "model": "instant", "dimensions": dim})
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": "instant", "object": "model", "dimensions": dim}]})
        elif path == "/_control/stats":
            self.send_json(200, {"requests": self.server.requests, "texts": self.server.texts})
        else:
            raise HTTPError(404, "no route")

    def _post(self):
        if self.path.rstrip("/") not in ("/v1/embeddings", "/embeddings"):
            raise HTTPError(404, "no route")
        req = self.read_json()
        inp = req.get("input")
        texts = [inp] if isinstance(inp, str) else inp
        srv = self.server
        srv.requests += 1
        srv.texts += len(texts)
        pool = srv.b64 if req.get("encoding_format") == "base64" else srv.flt
        parts = ['{"object":"embedding","index":%d,"embedding":%s}'
                 % (i, pool[zlib.crc32(t.encode()) % POOL]) for i, t in enumerate(texts)]
        body = '{"object":"list","model":"instant","data":[' + ",".join(parts) + \
            '],"usage":{"prompt_tokens":0,"total_tokens":0}}'
        self.send_bytes(200, body.encode())


class Server(FastThreadingHTTPServer):
    def __init__(self, addr, dim):
        self.dim = dim
        self.b64, self.flt = make_pool(dim)
        self.requests = 0
        self.texts = 0
        super().__init__(addr, Handler)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--dim", type=int, default=384)
    a = ap.parse_args(argv)
    srv = Server((a.host, a.port), a.dim)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    print("http://%s:%d" % srv.server_address, flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
