"""The command line, run as a user runs it: a subprocess, exit codes, stdout vs stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VELOLLM = [sys.executable, "-m", "velollm.cli"]


def velollm(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([*VELOLLM, *args], capture_output=True, text=True, input=stdin, timeout=timeout, env=env)


def test_probe_json_lists_cpu_usable_and_gpus_as_the_probe_found_them() -> None:
    from velollm.plugins.llamacpp.registry import GgmlRegistry

    result = velollm("probe", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    backends = data["backends"]
    assert backends["llamacpp-cpu"]["usable"] is True
    found = GgmlRegistry.model_validate(data["machine"]["extras"]["ggml"])  # what this build and machine have
    for gpu in ("llamacpp-cuda", "llamacpp-vulkan", "llamacpp-metal"):
        kind = gpu.removeprefix("llamacpp-")
        expected = found.has_backend(kind) and bool(found.devices_of(kind))  # compiled in, and a device of it
        assert backends[gpu]["usable"] is expected and backends[gpu]["reason"], (gpu, backends[gpu], found)
    assert data["machine"]["cpu"]["logical_cores"] >= 1
    assert data["machine"]["memory"]["total_bytes"] > 0
    assert "CPU" in data["machine"]["extras"]["ggml"]["backends"]


def test_probe_table() -> None:
    result = velollm("probe")
    assert result.returncode == 0 and "llamacpp-cpu" in result.stdout and "CMAKE_ARGS" in result.stdout


def test_info_summarises_a_model(gemma_path: Path) -> None:
    data = json.loads(velollm("info", "gemma3-270m", "--json").stdout)
    assert data["architecture"] == "gemma3" and data["vocab_size"] == 262_144
    assert data["has_chat_template"] is False and data["file_type"] == "MOSTLY_Q4_K_M"
    table = velollm("info", str(gemma_path))
    assert table.returncode == 0 and "gemma3" in table.stdout


def test_pull_is_a_noop_when_present(gemma_path: Path) -> None:
    result = velollm("pull", "gemma3-270m")
    assert result.returncode == 0 and result.stdout.strip() == str(gemma_path)
    assert "already pulled" in result.stderr


def test_generate_streams_text_and_reports_speed(gemma_path: Path) -> None:
    result = velollm("generate", "gemma3-270m", "-p", "The three primary colours are", "-n", "16", "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 10
    assert "tok/s" in result.stderr and "TTFT" in result.stderr and "16 generated tokens" in result.stderr
    again = velollm("generate", "gemma3-270m", "-p", "The three primary colours are", "-n", "16", "--temp", "0")
    assert again.stdout == result.stdout  # greedy is deterministic across processes


def test_chat_reads_turns_from_stdin(qwen_path: Path) -> None:
    result = velollm("chat", "qwen2.5-coder-0.5b-instruct", "--temp", "0", "-n", "12",
                     "--system", "Answer with one word.", stdin="What is the capital of France?\n\n")
    assert result.returncode == 0, result.stderr
    assert "paris" in result.stdout.lower()


def test_plugins_lists_builtins() -> None:
    data = json.loads(velollm("plugins", "--json").stdout)
    names = {p["name"]: p for p in data}
    assert "llamacpp-cpu" in names["llamacpp"]["backends"]
    assert names["llamacpp"]["version"] and "register_backends" in names["llamacpp"]["hooks"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "no-such-model", "-p", "x"), "unknown model 'no-such-model'"),
        (("info", "/etc/hostname"), "not a GGUF file"),
        (("generate", "gemma3-270m", "-p", "x", "--backend", "llamacpp-cuda"), "cannot run here"),
        (("generate", "gemma3-270m", "-p", "x", "--backend", "nope"), "no backend named 'nope'"),
        (("generate", "gemma3-270m", "-p", "x", "-n", "0"), "max_tokens"),
        (("pull", "no-such-model"), "unknown model"),
    ],
)
def test_errors_are_one_line_without_traceback(args: tuple[str, ...], message: str, gemma_path: Path) -> None:
    result = velollm(*args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # one message (rich may wrap once)


def test_debug_shows_the_traceback() -> None:
    result = velollm("--debug", "info", "/etc/hostname")
    assert result.returncode != 0 and "Traceback" in result.stderr and "NotAGGUFFile" in result.stderr


def test_usage_errors_exit_2() -> None:
    result = velollm("generate")
    assert result.returncode == 2 and "Missing argument" in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "velollm"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout


def test_a_command_exit_code_reaches_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """typer.Exit(n) in a command (a plugin's, say) is the process's exit status, not 0."""
    import typer

    from velollm import cli

    def failing_check() -> None:
        raise typer.Exit(3)

    monkeypatch.setattr(cli, "_register_plugin_commands", lambda: cli.app.command("failing-check")(failing_check))
    try:
        assert cli.main(["failing-check"]) == 3
    finally:
        cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if c.name != "failing-check"]
