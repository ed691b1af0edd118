"""A stand-in for `vllm serve`, for tests of how lorafleet launches vLLM: the Python standard
library alone (as if from another environment), the command line vLLM takes, the OpenAI
endpoints the gateway uses (/health, /v1/models, streamed /v1/chat/completions), and a record of
how it was started (arguments, launcher, environment) in the file $VLLM_STANDIN_RECORD. Each reply
says which model the request named."""

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENVIRONMENT = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "HF_HUB_OFFLINE")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--served-model-name", required=True)
    serve.add_argument("--host", required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--enable-lora", action="store_true", required=True)
    serve.add_argument("--lora-modules", nargs="+", default=[])
    args, _ = parser.parse_known_args(argv)
    return args


def handler(args: argparse.Namespace) -> type[BaseHTTPRequestHandler]:
    adapters = dict(module.split("=", 1) for module in args.lora_modules)
    models = [{"id": args.served_model_name, "object": "model", "root": args.model, "parent": None}]
    models += [{"id": name, "object": "model", "root": path, "parent": args.served_model_name}
               for name, path in adapters.items()]  # fmt: skip

    class StandIn(BaseHTTPRequestHandler):
        def log_message(self, *_) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/health":
                self.reply(200, b"")
            elif self.path == "/v1/models":
                self.reply(200, json.dumps({"object": "list", "data": models}).encode())
            else:
                self.reply(404, b"{}")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if self.path != "/v1/chat/completions" or not body.get("stream"):
                self.reply(404, b"{}")
                return
            text = f"{body['model']} answers"
            chunks = [
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
            ]
            events = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
            self.reply(200, events.encode(), "text/event-stream")

        def reply(self, status: int, payload: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return StandIn


def main() -> None:
    args = parse(sys.argv[1:])
    launched_as = os.environ.get("VLLM_STANDIN_LAUNCHED_AS", sys.argv[0])
    record = {"argv": sys.argv[1:], "launched_as": launched_as, "env": {k: os.environ.get(k) for k in ENVIRONMENT}}
    with open(os.environ["VLLM_STANDIN_RECORD"], "w") as out:
        json.dump(record, out)
    ThreadingHTTPServer((args.host, args.port), handler(args)).serve_forever()


if __name__ == "__main__":
    main()
