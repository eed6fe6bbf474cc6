"""text-embeddings-inference's command line and request fields: TEI's flags and environment variables (the flag
beats the variable, which beats the default), prompts from config_sentence_transformers.json, and /embed's
defaults (normalize: true; truncate: the server's --auto-truncate, true unless told)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from fastbert.cli import build_parser, main
from fastbert.serve.cli import options_from_args
from tests.serve._control import free_port, wait_healthy
from tests.serve._reference import reference_embeddings
from tests.serve.conftest import TEXTS, serve, write_sentence_transformers_files

PROMPTS = {"query": "query: ", "passage": "passage: "}
TOLERANCE = 1e-5


@pytest.fixture
def clean_environment(monkeypatch):
    """None of TEI's variables set (a CI machine may export PORT or HOSTNAME)."""
    args = build_parser().parse_args(["serve"])
    for action in args.environment.actions:
        for name in action.variables:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MODEL_ID", raising=False)
    return monkeypatch


def parse(*argv):
    """(args, options) of `fastbert serve ARGV`, the environment applied."""
    args = build_parser().parse_args(["serve", *argv])
    return args, options_from_args(args)


@pytest.fixture(scope="module")
def prompt_dir(embed_dir, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("prompts") / "model"
    shutil.copytree(embed_dir, folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS}))
    return str(folder)


def test_tei_flags(embed_dir, clean_environment):
    args, options = parse(
        "--model-id", embed_dir, "--hostname", "0.0.0.0", "-p", "3000", "--served-model-name", "tiny",
        "--revision", "main", "--dtype", "bfloat16", "--pooling", "last-token", "--max-batch-tokens", "2048",
        "--max-client-batch-size", "8", "--max-concurrent-requests", "16", "--auto-truncate", "false",
        "--api-key", "k", "--default-prompt", "query: ", "--tokenization-workers", "2", "--payload-limit", "1000",
        "--json-output", "--cors-allow-origin", "http://a", "--cors-allow-origin", "http://b")
    assert (args.hostname, args.port, args.json_output) == ("0.0.0.0", 3000, True)
    assert (options.model_dir, options.model_id, options.served_model_name) == (embed_dir, embed_dir, "tiny")
    assert (options.dtype, options.pooling, options.auto_truncate) == ("bf16", "lasttoken", False)
    assert (options.max_batch_tokens, options.max_client_batch_size, options.max_concurrent_requests) == (2048, 8, 16)
    assert (options.api_key, options.default_prompt, options.tokenization_workers) == ("k", "query: ", 2)
    assert options.payload_limit == 1000 and options.cors_allow_origin == ("http://a", "http://b")


def test_defaults(embed_dir, clean_environment):
    args, options = parse(embed_dir)
    assert (args.hostname, args.port, args.json_output) == ("127.0.0.1", 8080, False)  # loopback, not TEI's 0.0.0.0
    assert (options.dtype, options.auto_truncate, options.max_batch_tokens, options.api_key) == (
        "auto", True, 16384, None)
    assert options.served_model_name is None and options.model_id == embed_dir
    assert parse(embed_dir, "--auto-truncate")[1].auto_truncate  # TEI's bare flag: true
    assert options.keep_freed_memory  # the server keeps freed memory unless told (fastbert/cpu/allocator.py)


def test_keep_freed_memory_is_turned_off_by_the_flag_or_the_variable(embed_dir, clean_environment):
    assert not parse(embed_dir, "--keep-freed-memory", "false")[1].keep_freed_memory
    clean_environment.setenv("FASTBERT_KEEP_FREED_MEMORY", "0")
    assert not parse(embed_dir)[1].keep_freed_memory
    assert parse(embed_dir, "--keep-freed-memory")[1].keep_freed_memory  # the flag beats the variable


def test_environment_variables(embed_dir, clean_environment):
    for name, value in {"MODEL_ID": embed_dir, "PORT": "3001", "HOSTNAME": "0.0.0.0", "MAX_BATCH_TOKENS": "4096",
                        "DTYPE": "float32", "POOLING": "cls", "AUTO_TRUNCATE": "false", "API_KEY": "secret",
                        "SERVED_MODEL_NAME": "tiny", "DEFAULT_PROMPT": "q: ", "MAX_CLIENT_BATCH_SIZE": "4",
                        "JSON_OUTPUT": "true", "CORS_ALLOW_ORIGIN": "http://a,http://b"}.items():
        clean_environment.setenv(name, value)
    args, options = parse()
    assert (args.port, args.hostname, args.json_output) == (3001, "0.0.0.0", True)
    assert (options.model_dir, options.max_batch_tokens, options.dtype, options.pooling) == (
        embed_dir, 4096, "fp32", "cls")
    assert (options.auto_truncate, options.api_key, options.served_model_name) == (False, "secret", "tiny")
    assert (options.default_prompt, options.max_client_batch_size) == ("q: ", 4)
    assert options.cors_allow_origin == ("http://a", "http://b")


def test_a_flag_beats_its_variable(embed_dir, tmp_path, clean_environment):
    clean_environment.setenv("PORT", "3001")
    clean_environment.setenv("MODEL_ID", str(tmp_path))
    clean_environment.setenv("AUTO_TRUNCATE", "false")
    clean_environment.setenv("FASTBERT_API_KEY", "old")
    args, options = parse(embed_dir, "--port", "3002", "--auto-truncate")
    assert args.port == 3002 and options.model_dir == embed_dir and options.auto_truncate
    assert options.api_key == "old"
    clean_environment.setenv("API_KEY", "tei")  # TEI's variable before fastbert's own
    assert parse(embed_dir)[1].api_key == "tei"
    assert parse(embed_dir, "--api-key", "flag")[1].api_key == "flag"


@pytest.mark.parametrize("argv, variables, message", [
    (["{model}", "--model-id", "{model}"], {}, "MODEL_DIR and --model-id both name the model"),
    ([], {}, "no model: pass --model-id"),
    (["{model}", "--revision", "v2"], {}, "--revision v2: {model} is a local directory, which has no revisions"),
    (["{model}"], {"PORT": "http"}, "$PORT='http' (for --port): invalid literal for int()"),
    (["{model}"], {"DTYPE": "float64"}, "$DTYPE='float64' (for --dtype): expected one of fp32, bf16, int8"),
    (["{model}"], {"AUTO_TRUNCATE": "maybe"}, "$AUTO_TRUNCATE='maybe' (for --auto-truncate): expected true or"),
    (["{model}", "--pooling", "splade"], {}, "--pooling 'splade': SPLADE pools a masked-LM head"),
    (["{model}", "--dense-path", "2_Dense"], {}, "--dense-path 2_Dense: a Dense module is not served"),
    (["{model}", "--default-prompt-name", "query"], {}, "--default-prompt-name: unknown prompt 'query'"),
    (["fastbert-tests/no-such-model"], {}, "--model-id fastbert-tests/no-such-model: not a local directory"),
])
def test_errors_name_the_flag_or_variable(embed_dir, clean_environment, capsys, argv, variables, message):
    from huggingface_hub import constants

    clean_environment.setattr(constants, "HF_HUB_OFFLINE", True)
    for name, value in variables.items():
        clean_environment.setenv(name, value)
    assert main(["serve", *(arg.format(model=embed_dir) for arg in argv)]) == 1
    err = capsys.readouterr().err
    assert f"fastbert serve: error: {message.format(model=embed_dir)}" in err, err


def test_float16_and_ignored_tei_flags_warn_in_one_line(embed_dir, clean_environment, capsys):
    clean_environment.setenv("OTLP_ENDPOINT", "http://localhost:4317")
    _, options = parse(embed_dir, "--dtype", "float16", "--uds-path", "/tmp/x", "--disable-spans",
                       "--max-batch-requests", "4", "--hf-api-token", "unused")
    assert options.dtype == "bf16"
    ignored, float16 = capsys.readouterr().err.splitlines()
    assert "--dtype float16: the CPU path has no float16 kernels; serving bfloat16" in float16
    assert ignored.startswith("fastbert serve: warning: ignoring TEI options")
    for flag in ("--max-batch-requests", "--otlp-endpoint", "--disable-spans", "--uds-path"):
        assert flag in ignored


def test_a_hub_id_loads_from_the_hub_cache(embed_dir, tmp_path, clean_environment):
    """Offline, a Hub id resolves to its cached snapshot; --revision picks the snapshot; /info names the id."""
    from huggingface_hub import constants

    clean_environment.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--fastbert-tests--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(embed_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cache = ["--huggingface-hub-cache", str(tmp_path)]
    _, options = parse("--model-id", "fastbert-tests/tiny", *cache)
    assert Path(options.model_dir) == repo / "snapshots" / commit
    assert parse("--model-id", "fastbert-tests/tiny", "--revision", commit, *cache)[1].model_dir == options.model_dir
    with serve(options.model_dir, model_id="fastbert-tests/tiny") as client:
        info = client.get("/info").json()
    assert info["model_id"] == info["served_model_name"] == "fastbert-tests/tiny"


def test_served_model_name_in_info_and_openai_answers(embed_dir):
    with serve(embed_dir, model_id="/models/tiny", served_model_name="tiny-v1") as client:
        info = client.get("/info").json()
        answer = client.post("/v1/embeddings", json={"input": "a", "model": "other"}).json()
    assert (info["model_id"], info["served_model_name"], answer["model"]) == ("/models/tiny", "tiny-v1", "tiny-v1")


def test_prompt_name_puts_the_prompt_before_each_input(prompt_dir):
    with serve(prompt_dir) as client:
        named = client.post("/embed", json={"inputs": TEXTS[:2], "prompt_name": "query"})
        assert named.status_code == 200
        written = client.post("/embed", json={"inputs": [f"query: {text}" for text in TEXTS[:2]]}).json()
        tokens = client.post("/tokenize", json={"inputs": "hello", "prompt_name": "passage"}).json()[0]
    assert torch.equal(torch.tensor(named.json()), torch.tensor(written))
    reference = reference_embeddings(prompt_dir, [f"query: {text}" for text in TEXTS[:2]])
    assert (torch.tensor(named.json()) - reference).abs().max() <= TOLERANCE
    assert [token["text"] for token in tokens[1:5]] == ["passage", ":", "hello", "[SEP]"]


def test_unknown_prompt_name_is_422_naming_the_known_prompts(prompt_dir, embed_client):
    with serve(prompt_dir) as client:
        body = client.post("/embed", json={"inputs": "a", "prompt_name": "title"}).json()
    assert body["field"] == "prompt_name" and body["error_type"] == "Validation"
    assert "unknown prompt 'title'; this model's prompts: passage, query" in body["error"]
    response = embed_client.post("/embed", json={"inputs": "a", "prompt_name": "query"})
    assert response.status_code == 422 and "has no prompts" in response.json()["error"]


@pytest.mark.parametrize("options", [{"default_prompt_name": "query"}, {"default_prompt": "query: "}])
def test_default_prompt_applies_unless_the_request_names_one(prompt_dir, options):
    with serve(prompt_dir) as plain, serve(prompt_dir, **options) as prompted:
        expected = plain.post("/embed", json={"inputs": TEXTS[:2], "prompt_name": "query"}).json()
        assert prompted.post("/embed", json={"inputs": TEXTS[:2]}).json() == expected
        openai = prompted.post("/v1/embeddings", json={"input": TEXTS[:2]}).json()
        assert [item["embedding"] for item in openai["data"]] == expected
        passage = plain.post("/embed", json={"inputs": TEXTS[:2], "prompt_name": "passage"}).json()
        assert prompted.post("/embed", json={"inputs": TEXTS[:2], "prompt_name": "passage"}).json() == passage


def test_embed_normalizes_by_default_without_a_normalize_module(embed_dir, tmp_path):
    """TEI's /embed default is normalize: true, whatever the pipeline; /v1/embeddings always normalizes."""
    folder = tmp_path / "model"
    shutil.copytree(embed_dir, folder)
    write_sentence_transformers_files(folder, normalize=False)
    with serve(str(folder)) as client:
        default = torch.tensor(client.post("/embed", json={"inputs": TEXTS}).json())
        raw = torch.tensor(client.post("/embed", json={"inputs": TEXTS, "normalize": False}).json())
        openai = client.post("/v1/embeddings", json={"input": TEXTS}).json()
    assert torch.allclose(default.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (raw - reference_embeddings(str(folder), TEXTS, normalize=False)).abs().max() <= TOLERANCE
    assert torch.equal(torch.tensor([item["embedding"] for item in openai["data"]]), default)


def test_cors_allow_origin(embed_dir):
    with serve(embed_dir, cors_allow_origin=("http://app.example",), api_key="k") as client:
        preflight = client.options("/embed", headers={"origin": "http://app.example",
                                                      "access-control-request-method": "POST"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        answer = client.post("/embed", json={"inputs": "a"}, headers={"origin": "http://app.example",
                                                                       "authorization": "Bearer k"})
        assert answer.headers["access-control-allow-origin"] == "http://app.example"


@pytest.mark.slow
def test_a_tei_command_line_starts_the_server(prompt_dir):
    """text-embeddings-router's spellings, flags and variables, on a real process; TEI's answers come back."""
    port = free_port()
    command = [sys.executable, "-m", "fastbert", "serve", "--model-id", prompt_dir, "--hostname", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--pooling", "mean", "--max-batch-tokens", "1024",
               "--max-client-batch-size", "8", "--served-model-name", "tiny", "--default-prompt-name", "query",
               "--json-output", "--otlp-endpoint", "http://localhost:4317"]
    environment = {**os.environ, "MAX_CONCURRENT_REQUESTS": "64", "AUTO_TRUNCATE": "false"}
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        info = httpx.get(f"{url}/info").json()
        embedded = httpx.post(f"{url}/embed", json={"inputs": ["Hello", "world"]}).json()
        openai = httpx.post(f"{url}/v1/embeddings", json={"input": ["Hello", "world"]}).json()
        too_long = httpx.post(f"{url}/embed", json={"inputs": " ".join(["word"] * 100)})
    finally:
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
    assert (info["model_id"], info["served_model_name"], info["max_concurrent_requests"]) == (prompt_dir, "tiny", 64)
    assert info["model_dtype"] == "float32" and info["auto_truncate"] is False
    reference = reference_embeddings(prompt_dir, ["query: Hello", "query: world"])
    assert (torch.tensor(embedded) - reference).abs().max() <= TOLERANCE
    assert openai["model"] == "tiny" and len(openai["data"]) == 2
    assert too_long.status_code == 413
    assert "ignoring TEI options with no counterpart here: --otlp-endpoint" in log
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(record["target"] == "uvicorn.error" and record["level"] == "INFO" for record in records)
