"""Serve a local model over HTTP, then run the same DSPy program against it through the remote backend.

    python examples/serve_and_remote.py

The program is written once. Where it runs is only the model reference:

    velollm.LM("qwen2.5-coder-0.5b-instruct")                     # in this process
    velollm.LM("remote:http://127.0.0.1:PORT/v1#qwen")            # on a `velollm serve` (here)
    velollm.LM("remote:http://vllm-host:8000/v1#Qwen/Qwen2.5-Coder-7B-Instruct")   # on vLLM

and ``dspy.LM("velollm/remote:...")`` does the same through litellm. This example starts
``velollm serve`` on a free loopback port, runs the program both ways against it, and stops it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import dspy
import httpx

import velollm

MODEL = "qwen2.5-coder-0.5b-instruct"


class Capital(dspy.Signature):
    """Name the capital city of the country."""

    country: str = dspy.InputField()
    capital: str = dspy.OutputField()


def program(country: str) -> str:
    return dspy.Predict(Capital)(country=country).capital


def start_server(api_key: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "velollm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--model", f"qwen={MODEL}", "--api-key", api_key, "--ctx", "2048", "--log-level", "warning"],
        stdin=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                return server, f"{root}/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise SystemExit("velollm serve did not start")


def main() -> dict[str, str]:
    api_key = "example-key"
    os.environ["VELOLLM_REMOTE_API_KEY"] = api_key  # the remote backend sends it as a bearer token
    server, base_url = start_server(api_key)
    answers = {}
    try:
        remote_ref = f"remote:{base_url}#qwen"
        with dspy.context(lm=velollm.LM(remote_ref, max_tokens=32), adapter=velollm.Adapter()):
            answers["velollm.LM, remote"] = program("France")
        with dspy.context(lm=dspy.LM(f"velollm/{remote_ref}", temperature=0, max_tokens=32, cache=False),
                          adapter=dspy.ChatAdapter()):
            answers["dspy.LM via litellm, remote"] = program("France")
    finally:
        server.terminate()
        server.wait(30)
    for route, answer in answers.items():
        print(f"{route:>30}: {answer}")
    return answers


if __name__ == "__main__":
    main()
