"""`r1nest serve`'s run loop (gateway + supervisor + signals) with a fake engine, as a process.

    python serve_with_fake_engine.py DATA_DIR PORT TOKEN_DELAY_S

Everything is the real `serve_async` except the engine command: a FakeEngine (vLLM's wire
format) that, like vLLM, takes its key from VLLM_API_KEY.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

FAKE_ENGINE_MAIN = """
import asyncio, os, sys
from r1nest.testing.fake_engine import Behavior, FakeEngine
engine = FakeEngine(Behavior(api_key=os.environ["VLLM_API_KEY"], served_model="fake-r1",
                             reasoning_tokens=3, content_tokens=60, token_delay_s=float(sys.argv[2])),
                    port=int(sys.argv[1]))
print("fake engine up", flush=True)
asyncio.run(engine.serve(host="127.0.0.1", record=False))
"""


def main() -> int:
    from r1nest.engines.base import EngineProfile
    from r1nest.console import Display
    from r1nest.launch import Launch
    from r1nest.serve import serve_async
    from r1nest.settings import load_settings

    data_dir, port, delay = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(data_dir=data_dir, host="127.0.0.1", port=port)
    profile = EngineProfile(engine="vllm", model="fake-r1", served_model_name="fake-r1", args=(), env={},
                            hardware_class="cpu")
    launch = Launch(served_model="fake-r1", engine="vllm", hardware="CPU", profile=profile, weight_bytes=0)
    argv = [sys.executable, "-c", FAKE_ENGINE_MAIN, "{port}", delay]
    return asyncio.run(serve_async(settings, launch, Display(), engine_argv=argv))


if __name__ == "__main__":
    os.environ.pop("VLLM_API_KEY", None)
    sys.exit(main())
