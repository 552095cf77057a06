"""A stand-in engine process for the launcher tests: a real child that behaves badly on request.

    python fake_engine_process.py --port P [--ready-after S] [--crash-when FILE] [--crash-starts N
        --counter FILE] [--unhealthy-when FILE] [--ignore-sigterm] [--spawn-child PIDFILE] [--print-key]

It reads its key from VLLM_API_KEY like vLLM, answers GET /health (200 once "ready"), and
exits with code 3 when told to crash. The test says when to crash or turn unhealthy by creating
FILE (the process takes it away, so the restarted engine is well): no race with the scheduler.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-after", type=float, default=0.2)
    parser.add_argument("--crash-when", default=None, help="crash once this file exists (and remove it)")
    parser.add_argument("--crash-starts", type=int, default=None, help="crash at start for the first N starts")
    parser.add_argument("--counter", default=None)
    parser.add_argument("--unhealthy-when", default=None, help="/health fails for good once this file exists")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-child", default=None, help="start a grandchild, write its pid here")
    parser.add_argument("--print-key", action="store_true")
    args = parser.parse_args()

    started = time.monotonic()
    print(f"fake engine starting on {args.host}:{args.port}", flush=True)
    if args.print_key:
        print(f"loaded key {os.environ.get('VLLM_API_KEY')} from the environment", flush=True)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(args.spawn_child, "w") as handle:
            handle.write(str(child.pid))
    if args.crash_starts is not None:
        count = 0
        if os.path.exists(args.counter):
            count = int(open(args.counter).read() or 0)
        with open(args.counter, "w") as handle:
            handle.write(str(count + 1))
        if count < args.crash_starts:
            time.sleep(0.1)
            print("fake engine: crashing at startup", flush=True)
            os._exit(3)

    unhealthy = threading.Event()

    def _take(path: str | None) -> bool:
        if path is None:
            return False
        try:
            os.remove(path)
        except FileNotFoundError:
            return False
        return True

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if _take(args.unhealthy_when):
                unhealthy.set()
            ok = time.monotonic() - started >= args.ready_after and not unhealthy.is_set()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    deadline = started + 600
    while time.monotonic() < deadline and not _take(args.crash_when):
        time.sleep(0.05)
    print("fake engine: crashing", flush=True)
    os._exit(3)


if __name__ == "__main__":
    main()
