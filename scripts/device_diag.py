"""Which step of velollm's load crashes llama.cpp on this machine: a ladder of loads, each in its own process.

    python scripts/device_diag.py MODEL.gguf [--layers 99] [--timeout 60]

Each rung adds one thing velollm does before or around ``Llama(...)`` to a plain llama-cpp-python
load (verbose, the log callback, the registry read, the hardware probe, velollm's load options, the
pool's plan); the first rung that dies names the culprit. A dead rung is re-run under gdb, when the
machine has it, for llama.cpp's native stack. scripts/device-check runs it when a velollm load fails.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

PRELUDE = """
import sys
from pathlib import Path
path, layers = Path(sys.argv[1]), int(sys.argv[2])
def plain(verbose):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_gpu_layers=layers, n_ctx=512, verbose=verbose)
    out = llm.create_completion("The quick brown fox", max_tokens=4, temperature=0)
    print("generated", out["usage"]["completion_tokens"])
"""

RUNGS: list[tuple[str, str]] = [
    ("plain, verbose=True", "plain(True)"),
    ("plain, verbose=False", "plain(False)"),
    ("import velollm.plugins.llamacpp first", "import velollm.plugins.llamacpp; plain(False)"),
    ("velollm's log callback installed", "from velollm.plugins.llamacpp import log; log.install(); plain(False)"),
    ("inside velollm's log capture and load lock",
     "from velollm.plugins.llamacpp import log\nwith log.LOAD_LOCK, log.capture():\n    plain(False)"),
    ("after the ggml registry read", "from velollm.plugins.llamacpp.registry import read_registry; "
                                     "print(read_registry().devices); plain(False)"),
    ("after the hardware probe (NVML)", "from velollm.loading import probe_machine; probe_machine(); plain(False)"),
    ("plain Llama with velollm's load_kwargs",
     "from llama_cpp import Llama\nfrom velollm.engine import LoadOptions\nfrom velollm.gguf import info\n"
     "from velollm.plugins.llamacpp.engine import load_kwargs\n"
     "kw = load_kwargs(info.inspect(path), LoadOptions(n_gpu_layers=layers, n_ctx=512), offload=True)\n"
     "print('kwargs', kw)\nllm = Llama(model_path=str(path), **kw)\n"
     "print('generated', llm.create_completion('The quick brown fox', max_tokens=4, temperature=0)"
     "['usage']['completion_tokens'])"),
    ("velollm backend load, parallel=1",
     "from velollm.engine import LoadOptions, GenerationRequest\nfrom velollm.host import get_host\n"
     "import os\nbackend = os.environ.get('VELOLLM_EXPECT_BACKEND', 'llamacpp-cuda')\n"
     "e = get_host().backend(backend).load(path, LoadOptions(n_gpu_layers=layers, n_ctx=512, parallel=1))\n"
     "print('generated', e.generate(GenerationRequest(prompt='The quick brown fox', max_tokens=4, temperature=0))"
     ".usage.completion_tokens)"),
    ("velollm as placed (prepare + load_options)",
     "from velollm.engine import GenerationRequest\nfrom velollm.host import get_host\n"
     "from velollm.loading import prepare\n"
     "p = prepare(path)\nprint(p.plan.backend, p.load_options)\n"
     "e = get_host().backend(p.plan.backend).load(path, p.load_options)\n"
     "print('generated', e.generate(GenerationRequest(prompt='The quick brown fox', max_tokens=4, temperature=0))"
     ".usage.completion_tokens)"),
    ("the pool's route (test_gpu_backend_is_selected_automatically)",
     "from velollm.engine import GenerationRequest\nfrom velollm.pool import ModelPool\n"
     "pool = ModelPool(keep_alive=0)\nwith pool.engine(str(path)) as e:\n"
     "    print(e.backend, 'generated', e.generate(GenerationRequest(prompt='The quick brown fox', max_tokens=4, "
     "temperature=0)).usage.completion_tokens)\npool.close()"),
]

#: one of velollm's load_kwargs at a time on top of the plain load, when the load_kwargs rung dies
BISECT = (
    "from llama_cpp import Llama\nfrom velollm.engine import LoadOptions\nfrom velollm.gguf import info\n"
    "from velollm.plugins.llamacpp.engine import load_kwargs\n"
    "kw = load_kwargs(info.inspect(path), LoadOptions(n_gpu_layers=layers, n_ctx=512), offload=True)\n"
    "key = {key!r}\nprint('only', key, kw[key])\n"
    "llm = Llama(model_path=str(path), n_gpu_layers=layers, n_ctx=512, verbose=False, **{{key: kw[key]}})\n"
    "print('generated', llm.create_completion('The quick brown fox', max_tokens=4, temperature=0)"
    "['usage']['completion_tokens'])"
)
BISECT_KEYS = ("n_threads", "n_threads_batch", "use_mmap", "use_mlock", "numa", "n_batch", "flash_attn",
               "type_k", "type_v")


def debugger() -> str | None:
    """gdb, or NVIDIA's cuda-gdb (the GPU machines here have only that; it debugs host code too)."""
    return shutil.which("gdb") or shutil.which("cuda-gdb")


def run(code: str, model: str, layers: int, timeout: int, gdb: bool = False) -> tuple[int, str]:
    argv = [sys.executable, "-X", "faulthandler", "-c", PRELUDE + code, model, str(layers)]
    if gdb:
        argv = [debugger(), "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * (3 if gdb else 1))
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return done.returncode, (done.stdout + done.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--layers", type=int, default=99)
    parser.add_argument("--timeout", type=int, default=60)
    args = parser.parse_args()
    first_dead = None
    for name, code in RUNGS:
        rc, text = run(code, args.model, args.layers, args.timeout)
        last = [ln for ln in text.splitlines() if ln.startswith("generated")]
        print(f"{'ok  ' if rc == 0 else 'DEAD'} rc={rc:<4} {name}: {last[-1] if last else text.strip()[-300:]}",
              flush=True)
        if rc != 0:
            print("    " + "\n    ".join(text.strip().splitlines()[-25:]), flush=True)
        if rc != 0 and first_dead is None:
            first_dead = (name, code)
        if rc != 0 and "load_kwargs" in name:
            for key in BISECT_KEYS:
                rc_k, text_k = run(BISECT.format(key=key), args.model, args.layers, args.timeout)
                print(f"  {'ok  ' if rc_k == 0 else 'DEAD'} rc={rc_k:<4} only {key}: {text_k.strip()[-200:]!r}",
                      flush=True)
    if first_dead and debugger():
        name, code = first_dead
        rc, text = run(code, args.model, args.layers, args.timeout, gdb=True)
        print(f"--- gdb, {name} (rc {rc}):")
        print("\n".join(ln for ln in text.splitlines() if ln.startswith("#") or "signal" in ln.lower())[-6000:])
    elif first_dead:
        print("--- no gdb on this machine: Python's faulthandler stack only")
        print(run(first_dead[1], args.model, args.layers, args.timeout)[1][-4000:])
    return 1 if first_dead else 0


if __name__ == "__main__":
    sys.exit(main())
