"""A stand-in for videor1_vllm_server.py (stdlib only) that fails on purpose, for the client's failure
tests: FAKE_MODE=die_on_generate exits on the first /generate; reject_first=N answers the first N
requests (counted over calls) with a per-request error; never_ready never opens its port; crash
exits at once with a message in its log. /init_weight_transfer always fails (it cannot join a group);
/load_weights of a safetensors file answers with the file's tensor count (read from its header)."""

import argparse
import json
import os
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

MODE = os.environ.get("FAKE_MODE", "")
state = {"seen": 0}


class Handler(BaseHTTPRequestHandler):
    def _reply(self, payload, code=200):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._reply({"ok": True, "model": "fake", "vllm": "fake", "weights_version": 0, "workers": 1})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/init_weight_transfer":
            self._reply({"error": "RuntimeError: fake server: no worker can join a group"}, code=500)
            return
        if self.path == "/load_weights":
            with open(body["path"], "rb") as f:  # safetensors: an 8-byte header length, then a JSON header
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            self._reply({"seconds": 0.0, "tensors": len(set(header) - {"__metadata__"}),
                         "weights_version": body["version"]})
            return
        if MODE == "die_on_generate":
            print("fake server: dying on /generate", flush=True)
            os._exit(3)
        reject = int(MODE.split("=")[1]) if MODE.startswith("reject_first=") else 0
        outs = []
        for req in body["requests"]:
            state["seen"] += 1
            if state["seen"] <= reject:
                outs.append({"error": f"ValueError: fake rejection {state['seen']}"})
                continue
            n = req["n"]
            outs.append({"prompt_token_ids": req["prompt_token_ids"], "error": None, "prompt_logprobs": None,
                         "completions": [{"token_ids": [5, 6, 7], "logprobs": [-1.0, -1.0, -1.0],
                                          "finish_reason": "length"}] * n})
        self._reply({"outputs": outs})

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    args, _ = ap.parse_known_args()
    if MODE == "crash":
        print("fake server: cannot load the model (on purpose)", flush=True)
        sys.exit(7)
    if MODE == "never_ready":
        time.sleep(600)
    HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
