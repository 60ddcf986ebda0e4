"""`mudd serve`: the OpenAI client against transformers' server running a tiny MUDD folder on 127.0.0.1.

Every answer is compared with `generate` on the same folder in this process (greedy, so the texts must be equal). The
MUDDPythia server (continuous batching) starts once for the module; the MUDDFormer one (sequential generation) only
for its test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from openai import APIStatusError, OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_muddpythia import MUDDFormerConfig, MUDDFormerForCausalLM
from modeling_muddpythia.serve import check_transformers_version


REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "checkpoints" / "depth8-muddpythia"
# In-vocabulary words of the shipped word-level tokenizer, so the template's tokens are real ones.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ 'copy' if message['role'] == 'user' else 'is' }} {{ message['content'] }} ; "
    "{% endfor %}{% if add_generation_prompt %}recall{% endif %}"
)
PROMPTS = ["k5 v28 ; k10", "recall k3", "copy A B C ;", "count 4 plus", "the", "1 2 3 4 5 6 7 8"]
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mudd serve FOLDER` in a subprocess, with the folder loaded here too for reference generations."""

    def __init__(self, folder: Path, log: Path, *options: str):
        self.folder, self.log, self.port = str(folder), log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
        command = [sys.executable, "-m", "modeling_muddpythia.cli", "serve", self.folder, "--port", str(self.port),
                   "--device", "cpu", "--log-level", "info", *options]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=120, max_retries=0)
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mudd serve exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mudd serve did not answer /health in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode

    def generate(self, ids: list[int], max_new_tokens: int) -> str:
        """The greedy continuation of `ids` decoded as the server decodes it."""
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    def expected_completion(self, prompt: str, max_new_tokens: int) -> str:
        return self.generate(self.tokenizer(prompt)["input_ids"], max_new_tokens)

    def expected_chat(self, messages: list[dict], max_new_tokens: int) -> tuple[str, int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        return self.generate(ids, max_new_tokens), len(ids)

    def post(self, path: str, data: bytes) -> tuple[int, dict]:
        """A raw POST (the OpenAI client cannot send malformed bodies): status and JSON answer."""
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "muddpythia"
    shutil.copytree(SHIPPED, folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": CHAT_TEMPLATE}))
    server = Server(folder, folder.parent / "serve.log", "--continuous-batching", "--cb-num-blocks", "16",
                    "--cb-max-batch-tokens", "512")
    yield server
    server.stop()


def test_greedy_completion_equals_generate(pythia):
    for prompt, max_tokens in zip(PROMPTS[:3], (12, 7, 9)):
        answer = pythia.client.completions.create(model=pythia.folder, prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0)
        assert answer.choices[0].text == pythia.expected_completion(prompt, max_tokens), prompt
        assert answer.usage.prompt_tokens == len(pythia.tokenizer(prompt)["input_ids"])


def test_chat_uses_the_tokenizer_chat_template(pythia):
    messages = [{"role": "user", "content": "k5 v28 ; k10 v3"}, {"role": "assistant", "content": "v28"},
                {"role": "user", "content": "k5"}]
    expected, prompt_tokens = pythia.expected_chat(messages, 10)
    answer = pythia.client.chat.completions.create(model=pythia.folder, messages=messages, max_tokens=10,
                                                   temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == prompt_tokens  # the template's tokens, not the bare contents'


def test_streaming_completion_and_chat(pythia):
    prompt, messages = PROMPTS[3], [{"role": "user", "content": "copy A B"}]
    chunks = list(pythia.client.completions.create(model=pythia.folder, prompt=prompt, max_tokens=10,
                                                   temperature=0, stream=True))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed, token by token
    assert "".join(c.choices[0].text for c in chunks if c.choices) == pythia.expected_completion(prompt, 10)
    chunks = list(pythia.client.chat.completions.create(model=pythia.folder, messages=messages, max_tokens=10,
                                                        temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == pythia.expected_chat(messages, 10)[0]


def test_sixteen_concurrent_requests_are_all_answered(pythia):
    requests = [(f"{PROMPTS[i % len(PROMPTS)]} {i}", 4 + i % 5) for i in range(16)]

    def complete(request):
        prompt, max_tokens = request
        return pythia.client.completions.create(model=pythia.folder, prompt=prompt, max_tokens=max_tokens,
                                                temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(complete, requests, timeout=300))
    assert answers == [pythia.expected_completion(prompt, max_tokens) for prompt, max_tokens in requests]


def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(pythia):
    good = {"model": pythia.folder, "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
    chat = {"model": pythia.folder, "messages": [{"role": "user", "content": "k5"}], "max_tokens": 5}
    bad = {
        "unknown model": ("/v1/completions", {**good, "model": "no-such-model"}, 400, "no-such-model"),
        "negative max_tokens": ("/v1/completions", {**good, "max_tokens": -3}, 422, "max_tokens"),
        "string max_tokens": ("/v1/completions", {**good, "max_tokens": "five"}, 422, "max_tokens"),
        "string temperature": ("/v1/completions", {**good, "temperature": "hot"}, 422, "temperature"),
        "top_p above 1": ("/v1/completions", {**good, "top_p": 1.5}, 422, "top_p"),
        "number as chat content": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": 5}]},
                                   422, "messages"),
        "string stream": ("/v1/chat/completions", {**chat, "stream": "yes"}, 422, "stream"),
        "negative chat max_tokens": ("/v1/chat/completions", {**chat, "max_tokens": -1}, 422, "max_tokens"),
    }
    for name, (path, body, status, named) in bad.items():
        code, answer = pythia.post(path, json.dumps(body).encode())
        assert code == status and named in json.dumps(answer["detail"]), (name, code, answer)
    for path in ("/v1/completions", "/v1/chat/completions"):
        code, answer = pythia.post(path, b'{"model": "x", "prompt": ')
        assert code == 422 and answer["detail"][0]["type"] == "json_invalid", answer
        code, answer = pythia.post(path, b"[1, 2]")
        assert code == 422 and "JSON object" in answer["detail"], answer
    with pytest.raises(APIStatusError) as raised:  # as the OpenAI client reports it
        pythia.client.completions.create(model=pythia.folder, prompt="the", max_tokens=-1)
    assert raised.value.status_code == 422
    answer = pythia.client.completions.create(**good)
    assert answer.choices[0].text == pythia.expected_completion(good["prompt"], 5)
    assert pythia.process.poll() is None


def test_sigterm_stops_the_server_cleanly(pythia):
    """Last of the module's server tests: it stops the shared server."""
    pythia.client.completions.create(model=pythia.folder, prompt="the", max_tokens=2)  # the batching worker runs
    started = time.monotonic()
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status says "ended by SIGTERM"
    assert pythia.stop() in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 30
    log = pythia.log.read_text()
    assert "Application shutdown complete" in log and "Finished server process" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_muddformer_folder_serves_without_continuous_batching_nor_chat_template(tmp_path):
    torch.manual_seed(0)
    config = MUDDFormerConfig(vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=192, max_position_embeddings=256,
                              bos_token_id=0, eos_token_id=0, pad_token_id=1)
    folder = tmp_path / "muddformer"
    MUDDFormerForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, folder / name)
    server = Server(folder, tmp_path / "serve.log")
    try:
        for prompt in PROMPTS[:2]:
            answer = server.client.completions.create(model=server.folder, prompt=prompt, max_tokens=8,
                                                      temperature=0)
            assert answer.choices[0].text == server.expected_completion(prompt, 8), prompt
        # this folder's tokenizer has no chat template: chat is refused in so many words, completions go on
        code, answer = server.post("/v1/chat/completions", json.dumps(
            {"model": server.folder, "messages": [{"role": "user", "content": "k5"}]}).encode())
        assert code == 400 and "no chat template" in answer["detail"], answer
        answer = server.client.completions.create(model=server.folder, prompt="the", max_tokens=3, temperature=0)
        assert answer.choices[0].text == server.expected_completion("the", 3)
    finally:
        assert server.stop() in (0, -signal.SIGTERM)


def test_refuses_other_architectures_and_other_transformers_releases():
    result = subprocess.run([sys.executable, "-m", "modeling_muddpythia.cli", "serve",
                             str(REPO / "checkpoints" / "depth8-gptneox")],
                            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 2
    assert "GPTNeoXForCausalLM" in result.stderr and "transformers serve" in result.stderr
    assert "Traceback" not in result.stderr
    check_transformers_version("5.23.0")
    check_transformers_version("5.23.1.dev0")
    for other in ("5.24.0", "5.2.3", "4.57.1", "6.23.0"):
        with pytest.raises(ValueError, match="tested with transformers 5.23"):
            check_transformers_version(other)
