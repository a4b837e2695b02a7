"""``velollm serve`` for a team: a config file, keys and roles, load/unload, keep_alive, metrics, CORS.

Pure logic (config parsing, keys files) runs without a model. The rest uses real models: Gemma
270M and Qwen2.5-Coder 0.5B, both with small contexts, in one server subprocess started from a
config file (module-scoped; SIGHUP and process memory need a real process), plus an in-process
app where a test must reach the engines themselves.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import GEMMA, QWEN_05B
from server_process import Server, start_server

from velollm import models
from velollm.engine import LoadOptions
from velollm.errors import AuthenticationFailed
from velollm.server.access import KeyStore, parse_keys_file, request_id
from velollm.server.config import ConfigError, apply_flags, load_config, parse_size

ADMIN, ALICE, BOB = "admin-secret-0001", "alice-secret-0002", "bob-secret-0003"
HI = [{"role": "user", "content": "Say hi."}]

TEAM_TOML = """\
# a team server: two models with their own context and threads
[server]
api_keys_file = "keys.txt"
cors_origins = ["https://app.example.com"]
memory_budget = "6GiB"
keep_alive = "10m"

[server.limits]
queue_size = 16
queue_timeout = "2m"

[models.gemma]
ref = "gemma3-270m"
aliases = ["g"]
n_ctx = 512
threads = 1

[models.qwen]
ref = "qwen2.5-coder-0.5b-instruct"
n_ctx = 1024
threads = 2
keep_alive = -1
load_at_start = true
"""

KEYS = f"""\
# KEY NAME ROLE
{ADMIN} root admin
{ALICE} alice user
{BOB} bob
"""


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the config file (no model) ------------------------------------------------------------------------
def test_toml_config_parses_with_per_model_settings(tmp_path: Path) -> None:
    path = tmp_path / "team.toml"
    path.write_text(TEAM_TOML)
    config = load_config(path)
    assert config.server.api_keys_file == tmp_path / "keys.txt"  # relative to the config file
    assert config.server.memory_budget == 6 * 1024**3
    assert config.server.keep_alive == 600 and config.server.limits.queue_timeout == 120
    assert config.models["gemma"].load_options() == {"n_ctx": 512, "n_threads": 1}
    assert config.models["qwen"].load_options() == {"n_ctx": 1024, "n_threads": 2}
    assert config.models["qwen"].keep_alive == -1 and config.models["gemma"].keep_alive is None
    assert config.aliases() == {"g": "gemma"}


@pytest.mark.parametrize(("text", "line", "words"), [
    (TEAM_TOML.replace("n_ctx = 1024", "n_ctx = 8"), 20, "models.qwen.n_ctx: Input should be greater than or equal"),
    (TEAM_TOML.replace("threads = 2", "thread = 2"), 21, "models.qwen.thread: unknown setting"),
    (TEAM_TOML.replace('keep_alive = "10m"', 'keep_alive = "ten"'), 6, "'ten' is not a duration"),
    (TEAM_TOML.replace('memory_budget = "6GiB"', 'memory_budget = "lots"'), 5, "'lots' is not a size"),
    (TEAM_TOML.replace('ref = "qwen2.5-coder-0.5b-instruct"\n', ""), 18, "models.qwen.ref: Field required"),
    (TEAM_TOML.replace("n_ctx = 512", "n_ctx = = 512"), 15, "not valid TOML"),
    (TEAM_TOML.replace('aliases = ["g"]', 'aliases = ["qwen"]'), 1, "'qwen' is used by both"),
    (TEAM_TOML.replace('["https://app.example.com"]', '["app.example.com/x"]'), 4, "CORS origin"),
])
def test_config_errors_name_the_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = tmp_path / "team.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}:{line}:" in str(caught.value) and words in str(caught.value)


def test_yaml_config_and_its_error_lines(tmp_path: Path) -> None:
    path = tmp_path / "team.yaml"
    path.write_text("server:\n  port: 9000\nmodels:\n  gemma:\n    ref: gemma3-270m\n    n_ctx: 512\n"
                    "    kv_cache_type: q8_0\n")
    config = load_config(path)
    assert config.server.port == 9000
    options = config.models["gemma"].load_options()
    LoadOptions(**options)  # what the pool will be given is valid
    kv = options.get("type_k") or options["extra"]["type_k"]  # LoadOptions' field, or llama.cpp's number
    assert options["n_ctx"] == 512 and kv in ("q8_0", 8) and options["flash_attn"] is True
    path.write_text("server:\n  port: 9000\nmodels:\n  gemma:\n    ref: gemma3-270m\n    n_ctx: lots\n")
    with pytest.raises(ConfigError, match=r"team\.yaml:6: models\.gemma\.n_ctx"):
        load_config(path)
    path.write_text("server:\n  port: [9000\n")
    with pytest.raises(ConfigError, match=r"team\.yaml:\d+: not valid YAML"):
        load_config(path)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "team.toml"
    path.write_text(TEAM_TOML)
    config = apply_flags(load_config(path), models=["tiny=gemma3-270m"], port=9100, threads=3,
                         cors_origins=["http://localhost:5173"])
    assert config.server.port == 9100 and config.server.host == "127.0.0.1"
    assert config.server.cors_origins == ["https://app.example.com", "http://localhost:5173"]
    assert {m.threads for m in config.models.values()} == {3}
    assert config.models["tiny"].ref == "gemma3-270m" and config.models["qwen"].n_ctx == 1024  # the file stays
    with pytest.raises(ConfigError, match="port"):
        apply_flags(config, port=70000)


def test_sizes() -> None:
    assert parse_size("6GiB") == parse_size("6G") == 6 * 1024**3
    assert parse_size("512 MB") == 512 * 1000**2 and parse_size(1000) == 1000
    with pytest.raises(ValueError):
        parse_size("-1G")


# --- keys (no model) -------------------------------------------------------------------------------
def test_keys_file_names_roles_and_errors_that_never_show_a_key(tmp_path: Path) -> None:
    keys = parse_keys_file(KEYS)
    assert [(k.name, k.role) for k in keys] == [("root", "admin"), ("alice", "user"), ("bob", "user")]
    assert all(ADMIN not in repr(k) for k in keys)
    plain = parse_keys_file("k1-aaaaaaaa\n\nk2-bbbbbbbb  # a comment\n")  # llama.cpp's one-key-per-line file
    assert [(k.name, k.role) for k in plain] == [("line1", "user"), ("line3", "user")]
    for bad, words in ((f"{ADMIN} root superuser\n", "role 'superuser'"), (f"{ADMIN} a\n{ADMIN} b\n", "line 1"),
                       (f"{ADMIN} a b c d\n", "expected")):
        with pytest.raises(AuthenticationFailed, match=words) as caught:
            parse_keys_file(bad, "keys.txt")
        assert ADMIN not in str(caught.value)


def test_key_store_reload_keeps_old_keys_when_the_file_breaks(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(KEYS)
    store = KeyStore(keys_file=path, api_key="cli-key")
    assert store.authenticate(f"Bearer {ALICE}").name == "alice"
    assert store.authenticate("Bearer cli-key").role == "admin"
    with pytest.raises(AuthenticationFailed):
        store.authenticate(f"Bearer {ALICE}x")
    path.write_text(f"{ADMIN} root nonsense-role\n")
    with pytest.raises(AuthenticationFailed):
        store.reload()
    assert store.authenticate(f"Bearer {BOB}").name == "bob"  # still in force
    path.write_text(f"{ADMIN} root admin\n")
    assert store.reload() == 2  # the file's key and --api-key
    with pytest.raises(AuthenticationFailed):
        store.authenticate(f"Bearer {BOB}")
    assert KeyStore().authenticate(None) is None  # an open server


def test_a_keys_file_others_can_read_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(KEYS)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="velollm.server.access"):
        KeyStore(keys_file=path)
        assert "can be read by other users" in caplog.text
        caplog.clear()
        path.chmod(0o600)
        KeyStore(keys_file=path)
    assert caplog.text == ""


def test_request_ids_are_echoed_only_when_sane() -> None:
    assert request_id([(b"x-request-id", b"abc-123")]) == "abc-123"
    generated = request_id([(b"x-request-id", b"has space\nnewline")])
    assert len(generated) == 32 and " " not in generated
    assert request_id([]) != request_id([])


# --- in-process app: the engines themselves --------------------------------------------------------
@pytest.fixture
def team_files(tmp_path: Path) -> Path:
    (tmp_path / "keys.txt").write_text(KEYS)
    path = tmp_path / "team.toml"
    path.write_text(TEAM_TOML)
    return path


def _in_process(path: Path) -> tuple[Any, Any]:
    from fastapi.testclient import TestClient

    from velollm.pool import ModelPool
    from velollm.server.app import create_app
    from velollm.server.config import to_server_config

    config = load_config(path)
    pool = ModelPool(queue_size=config.server.limits.queue_size, keep_alive=config.server.keep_alive)
    return TestClient(create_app(to_server_config(config), pool=pool)), pool


@pytest.mark.slow
def test_each_model_gets_its_own_context_and_threads_in_its_engine(team_files: Path, gemma_path: Path,
                                                                    qwen_path: Path) -> None:
    import llama_cpp

    client, pool = _in_process(team_files)
    try:
        with client:
            for model in ("g", "qwen"):  # an alias, and an id
                r = client.post("/v1/chat/completions", headers=_auth(ALICE),
                                json={"model": model, "messages": HI, "max_tokens": 2})
                assert r.status_code == 200, r.text
            engines = {e.ref: e.engine for e in pool._entries.values()}
            for ref, n_ctx, threads in ((GEMMA, 512, 1), (QWEN_05B, 1024, 2)):
                llama = engines[ref]._llama
                assert engines[ref].context_length == n_ctx == llama_cpp.llama_n_ctx(llama.ctx)
                assert llama_cpp.llama_n_threads(llama.ctx) == threads
                assert llama_cpp.llama_n_threads_batch(llama.ctx) == threads
    finally:
        pool.close()


def test_cors_preflight_allowed_origin_only(team_files: Path) -> None:
    client, pool = _in_process(team_files)
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = client.options("/v1/chat/completions", headers={"Origin": "https://app.example.com", **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    refused = client.options("/v1/chat/completions", headers={"Origin": "https://evil.example.org", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    simple = client.get("/health", headers={"Origin": "https://app.example.com"})
    assert simple.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()


def test_every_response_has_a_request_id_and_one_log_line(team_files: Path, caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    client, pool = _in_process(team_files)
    with caplog.at_level(logging.INFO, logger="velollm.access"):
        echoed = client.get("/v1/pool", headers={**_auth(BOB), "x-request-id": "trace-42"})
        fresh = client.get("/v1/pool", headers=_auth("wrong-key"))
    assert echoed.headers["x-request-id"] == "trace-42" and echoed.status_code == 200
    assert fresh.status_code == 401 and len(fresh.headers["x-request-id"]) == 32
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "velollm.access"]
    assert [(x["id"], x["key"], x["status"], x["route"]) for x in lines] == [
        ("trace-42", "bob", 200, "/v1/pool"), (fresh.headers["x-request-id"], None, 401, "/v1/pool")]
    assert all(k not in caplog.text for k in (BOB, "wrong-key"))


def test_even_an_unexpected_error_has_a_request_id_and_an_openai_body(team_files: Path) -> None:
    client, _ = _in_process(team_files)
    client.raise_server_exceptions = False

    @client.app.get("/boom")  # a stand-in for a bug in a handler
    async def boom() -> None:
        raise RuntimeError("bug")

    r = client.get("/boom", headers={"x-request-id": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json()["error"]["type"] == "server_error" and "RuntimeError" in r.json()["error"]["message"]


# --- one server subprocess from the config ------------------------------------------------------------
@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, qwen_path: Path) -> Iterator[tuple[Server, Path]]:
    folder = tmp_path_factory.mktemp("team")
    (folder / "keys.txt").write_text(KEYS)
    (folder / "team.toml").write_text(TEAM_TOML)
    server = start_server("--config", str(folder / "team.toml"))
    yield server, folder
    server.stop()


def _chat(server: Server, model: str, key: str = ALICE, **body: Any) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", headers=_auth(key), timeout=300,
                      json={"model": model, "messages": HI, "max_tokens": 4, "temperature": 0, **body})


def _pool(server: Server) -> dict[str, dict[str, Any]]:
    status = httpx.get(server.base_url + "/pool", headers=_auth(BOB), timeout=30).json()
    return {m["id"]: m for m in status["models"]}


def _rss(server: Server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


@pytest.mark.slow
def test_settings_from_the_config_reach_the_pool(team: tuple[Server, Path]) -> None:
    server, _ = team
    assert set(_pool(server)) == {"qwen"}  # load_at_start: ready before the first request; gemma on demand
    for model in ("gemma", "qwen"):
        assert _chat(server, model).status_code == 200
    models = _pool(server)
    assert (models["gemma"]["load_options"]["n_ctx"], models["gemma"]["load_options"]["n_threads"]) == (512, 1)
    assert (models["qwen"]["load_options"]["n_ctx"], models["qwen"]["load_options"]["n_threads"]) == (1024, 2)
    assert models["qwen"]["keep_alive_s"] == -1 and models["gemma"]["keep_alive_s"] == 600
    assert models["gemma"]["idle_s"] >= 0 and models["gemma"]["queued"] == 0 and models["gemma"]["memory_bytes"] > 0


#: Unloading must give back all but this much of what loading (and one answer) took (measured: 4 MiB kept).
RSS_MARGIN = 64 * 1024**2


@pytest.mark.slow
def test_admin_loads_and_unloads_and_memory_follows(team: tuple[Server, Path]) -> None:
    server, _ = team
    base = server.base_url
    for path in ("/models/gemma/unload", "/models/gemma/load", "/models/gemma/unload"):  # warm: code, libraries
        assert httpx.post(base + path, headers=_auth(ADMIN), timeout=300).status_code == 200
    assert "gemma" not in _pool(server)
    before = _rss(server)
    loaded = httpx.post(base + "/models/g/load", headers=_auth(ADMIN), timeout=300)
    assert loaded.status_code == 200 and loaded.json()["context_length"] == 512
    assert _chat(server, "gemma").status_code == 200  # touch the weights
    assert _pool(server)["gemma"]["state"] == "ready"
    during = _rss(server)
    unloaded = httpx.post(base + "/models/gemma/unload", headers=_auth(ADMIN), timeout=300)
    assert unloaded.status_code == 200 and unloaded.json()["unloaded"] == 1
    assert "gemma" not in _pool(server)
    after = _rss(server)
    weights = models.resolve(GEMMA).path.stat().st_size
    assert during - before > weights // 2, (before, during, weights)  # measured: +301 MiB for a 241 MiB file
    assert after - before < RSS_MARGIN, (before, during, after)


@pytest.mark.slow
def test_a_user_key_cannot_load_or_unload(team: tuple[Server, Path]) -> None:
    server, _ = team
    for action in ("load", "unload"):
        r = httpx.post(f"{server.base_url}/models/gemma/{action}", headers=_auth(ALICE), timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        assert httpx.post(f"{server.base_url}/models/gemma/{action}", timeout=30).status_code == 401
    assert httpx.post(f"{server.base_url}/models/nope/load", headers=_auth(ADMIN), timeout=30).status_code == 404


@pytest.mark.slow
def test_unloading_a_model_in_use_is_refused_until_it_is_idle(team: tuple[Server, Path]) -> None:
    server, _ = team
    # ("la " | "lo "): llguidance's Earley items grow without bound on 'root ::= "la " root' (ParserTooComplex)
    body = {"model": "gemma", "messages": HI, "max_tokens": 400, "stream": True,
            "grammar": 'root ::= ("la " | "lo ") root'}
    unload = server.base_url + "/models/gemma/unload"
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=_auth(ALICE),
                      timeout=300) as streaming:
        lines = streaming.iter_lines()  # kept: a dropped iterator closes the connection (the server then stops)
        for line in lines:  # generating now: the first text has arrived
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        busy = httpx.post(unload, headers=_auth(ADMIN), timeout=30)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_busy", busy.text
    deadline = time.monotonic() + 60  # the client left: generation stops at the next token
    while (r := httpx.post(unload, headers=_auth(ADMIN), timeout=30)).status_code == 409:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 200 and "gemma" not in _pool(server)


@pytest.mark.slow
def test_keep_alive_zero_unloads_after_the_answer(team: tuple[Server, Path]) -> None:
    server, _ = team
    assert _chat(server, "gemma").status_code == 200
    assert _pool(server)["gemma"]["keep_alive_s"] == 600
    answer = _chat(server, "gemma", keep_alive=0)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
    assert "gemma" not in _pool(server)
    assert _chat(server, "gemma", keep_alive="forever").status_code == 400


def _samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.root + "/metrics", headers=_auth(BOB), timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.mark.slow
def test_metrics_count_exactly_what_a_bounded_load_sent(team: tuple[Server, Path]) -> None:
    server, _ = team
    route = "/v1/chat/completions"
    before = _samples(server)
    jobs = [("gemma" if i % 2 else "qwen", i % 3 == 0, 2 + i % 3) for i in range(8)]  # model, stream, max_tokens

    def run(job: tuple[str, bool, int]) -> dict[str, int]:
        model, stream, max_tokens = job
        body = {"model": model, "messages": HI, "max_tokens": max_tokens, "temperature": 0}
        if not stream:
            r = _chat(server, model, max_tokens=max_tokens)
            assert r.status_code == 200, r.text
            return r.json()["usage"]
        body.update(stream=True, stream_options={"include_usage": True})
        usage = None
        with httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=_auth(ALICE),
                          timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage") or usage
        assert usage is not None
        return usage

    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        usages = list(executor.map(run, jobs))  # re-raises any thread's failure here
    refused = _chat(server, "qwen", key="nobody")
    assert refused.status_code == 401
    after = _samples(server)

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    for model in ("gemma", "qwen"):
        mine = [u for (m, _, _), u in zip(jobs, usages, strict=True) if m == model]
        assert delta("velollm_requests_total", model=model, route=route, status="200") == len(mine)
        assert delta("velollm_prompt_tokens_total", model=model) == sum(u["prompt_tokens"] for u in mine)
        assert delta("velollm_completion_tokens_total", model=model) == sum(u["completion_tokens"] for u in mine)
        assert delta("velollm_queue_wait_seconds_count", model=model) == len(mine)
        assert delta("velollm_time_to_first_token_seconds_count", model=model) == len(mine)
    assert delta("velollm_requests_total", route=route, status="401") == 1
    assert _sum(after, "velollm_model_loads_total") >= 2
    assert _sum(after, "velollm_model_memory_bytes", model="qwen") > 0


@pytest.mark.slow
def test_two_keys_work_and_a_removed_key_stops_after_sighup(team: tuple[Server, Path]) -> None:
    server, folder = team
    assert _chat(server, "gemma", key=ALICE).status_code == 200
    assert _chat(server, "gemma", key=BOB).status_code == 200
    (folder / "keys.txt").write_text(KEYS.replace(f"{BOB} bob\n", ""))
    assert _chat(server, "gemma", key=BOB).status_code == 200  # not yet: only SIGHUP reloads
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while _chat(server, "gemma", key=BOB, max_tokens=1).status_code != 401:
        assert time.monotonic() < deadline, "the removed key still works 30 s after SIGHUP"
        time.sleep(0.2)
    assert _chat(server, "gemma", key=ALICE).status_code == 200
    assert BOB not in server.output() and ALICE not in server.output()
    (folder / "keys.txt").write_text(KEYS)
    server.process.send_signal(signal.SIGHUP)


@pytest.mark.slow
def test_check_prints_every_plan_without_loading(team_files: Path, gemma_path: Path, qwen_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from velollm.cli import main
    from velollm.pool import get_pool

    loaded = [m.path for m in get_pool().status().models]  # earlier tests may have left models in the pool
    assert main(["serve", "--config", str(team_files), "--check"]) == 0
    out = capsys.readouterr().out
    gemma, qwen = out.index("gemma (aliases: g): gemma3-270m"), out.index("qwen: qwen2.5-coder-0.5b-instruct")
    assert "n_ctx: 512, threads: 1" in out[gemma:qwen] and "n_ctx: 1024, threads: 2" in out[qwen:]
    assert "3 key(s)" in out and ALICE not in out
    assert [m.path for m in get_pool().status().models] == loaded  # the check loaded nothing
    bad = team_files.parent / "bad.toml"
    bad.write_text(TEAM_TOML.replace("threads = 1", "threads = 0"))
    assert main(["serve", "--config", str(bad), "--check"]) == 1
    assert f"{bad}:16: models.gemma.threads" in capsys.readouterr().err.replace("\n", "")
    missing = team_files.parent / "missing.toml"
    missing.write_text(TEAM_TOML.replace('ref = "gemma3-270m"', f'ref = "{team_files.parent}/none.gguf"'))
    assert main(["serve", "--config", str(missing), "--check"]) == 1
    assert "ERROR: model file not found" in capsys.readouterr().out
    assert main(["serve", "--ctx", "640", "--check"]) == 0  # no file, no --model: the pulled models, with --ctx
    plans = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  backend:")]
    assert len(plans) >= 2 and all("n_ctx: 640," in line for line in plans)


def test_the_documented_config_and_keys_file_are_valid(tmp_path: Path) -> None:
    import re

    doc = (Path(__file__).parent.parent / "docs" / "serving.md").read_text()
    team = doc[doc.index("## Running it for a team"):doc.index("## Remote")]
    toml = re.search(r"```toml\n(.*?)```", team, re.S).group(1)
    keys = re.search(r"```text\n(.*?)```", team, re.S).group(1)
    (tmp_path / "keys.txt").write_text(keys)
    (tmp_path / "team.toml").write_text(toml)
    config = load_config(tmp_path / "team.toml")
    assert set(config.models) == {"coder", "small"} and config.server.limits.max_loaded == 3
    assert config.models["coder"].load_options()["draft_model"] == "qwen2.5-coder-0.5b-instruct"
    assert [(k.name, k.role) for k in parse_keys_file(keys)] == [("ops", "admin"), ("alice", "user"), ("bob", "user")]
    assert "ExecReload=/bin/kill -HUP $MAINPID" in team
