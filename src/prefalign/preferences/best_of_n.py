"""Best-of-N preference pairs: sample N candidates per prompt, score them, pair the ends.

    prefalign generate --model runs/sft/final --data prompts.jsonl --scorer runs/rm/final \\
        --num-candidates 4 --output synthetic.jsonl

For each prompt, N candidates are sampled (generation.generate's per-row seeds), scored by
a scorer spec (preferences.scorer_spec) and sorted by score, best first. Pairing:
  extremes  best vs worst, 2nd best vs 2nd worst, ...: N // 2 pairs, no candidate used twice
  all       every pair whose score gap is at least min_gap
A pair is left out, and counted, when its texts are identical, its scores tie, its gap is
below min_gap, or it repeats a pair already taken; empty candidates are never paired.
Rows: {prompt, chosen, rejected, source ("best_of_n:<scorer>"), score_chosen,
score_rejected, model, temperature, top_p, max_new_tokens, seed, num_candidates, id?},
which load_preferences reads as they are. keep_candidates also writes every candidate to
OUTPUT.candidates.jsonl (OUTPUT without .jsonl): {prompt, candidates, scores, finished,
prompt_index, id?}, the input of `prefalign annotate` and `prefalign judge`.

Resuming. Candidate j of prompt i is drawn from the seed of row (i, j), so it does not
depend on the batch size or on which prompts are still to do. Outputs are written through
a Journal: a run stopped at any moment (Ctrl-C, a crash, a failing scorer) continues with
the same command, without duplicating or losing rows.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prefalign.errors import ConfigError, DataError, writing

PAIRINGS = ("extremes", "all")
# What a failed write (disk full) leaves: the restart cuts the files back to the last commit.
COMMITTED_KEPT = " (the rows committed so far are kept: the same command continues)"
SKIP_REASONS = ("identical text", "tied score", "gap below min_gap", "duplicate pair")


# ---- exactly-once output files ------------------------------------------------------------


def item_key(value: Any) -> str:
    """A short hash of an input item, to notice an input that changed between runs."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Journal:
    """JSONL output files filled item by item, made exactly-once by a commit log.

    A commit appends the rows of some items to every file and fsyncs them, then appends one
    log line per item, {"index", "key", "sizes"} (each file's size after that item), and
    fsyncs the log: the log line is the commit. On restart a torn last log line is dropped,
    each file is cut back to the sizes of the last commit (removing rows of items that were
    being written) and the committed indices are skipped. The first log line holds the
    settings; a restart with other settings is refused, so one output never mixes two.
    """

    def __init__(self, log: Path, files: dict[str, Path], kind: str, settings: dict[str, Any]):
        self.log, self.files, self.kind = Path(log), {k: Path(p) for k, p in files.items()}, kind
        self.settings = json.loads(json.dumps(settings))  # as it reads back from disk
        self.handles: dict[str, Any] = {}

    def open(self) -> dict[int, dict]:
        """Prepare the files; returns the committed records by item index."""
        with writing(self.log, COMMITTED_KEPT, "--output"):
            records = self._recover() if self.log.exists() else self._start()
            # Unbuffered: a write the full disk refused is not retried by a later flush or
            # close, which would raise again outside this `writing`.
            self.handles = {name: open(path, "ab", buffering=0)
                            for name, path in self.files.items()}
            self.handles["_log"] = open(self.log, "ab", buffering=0)
        return {r["index"]: r for r in records}

    def _start(self) -> list[dict]:
        for path in self.files.values():
            if path.exists() and path.stat().st_size > 0:
                raise DataError(f"{path}: already exists and has no {self.log.name} beside it; "
                                "choose another output or move the file away")
        for path in (*self.files.values(), self.log):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        _append(self.log, [json.dumps(self._header(), ensure_ascii=False)])
        return []

    def _header(self) -> dict[str, Any]:
        return {"format": f"prefalign-{self.kind}/1", "settings": self.settings}

    def _recover(self) -> list[dict]:
        lines = self.log.read_bytes().split(b"\n")
        good, records = 0, []  # good: bytes of the log that hold complete lines
        for number, line in enumerate(lines[:-1], start=1):  # the part after the last \n is torn
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines) - 1:  # a last line cut mid-write: not committed
                    break
                raise DataError(f"{self.log}:{number}: not a progress record") from None
            good += len(line) + 1
            if number == 1:
                self._check_header(record)
            else:
                records.append(record)
        with open(self.log, "r+b") as handle:
            handle.truncate(good)
        if good == 0:  # stopped before the header was written: start the log again
            _append(self.log, [json.dumps(self._header(), ensure_ascii=False)])
        sizes = records[-1]["sizes"] if records else {}
        for name, path in self.files.items():
            want, have = sizes.get(name, 0), path.stat().st_size if path.exists() else 0
            if have < want:
                raise DataError(f"{path}: {have} bytes, but {self.log.name} records {want}; the "
                                f"file was changed: move it and {self.log.name} away to start over")
            with open(path, "ab") as handle:
                handle.truncate(want)
        return records

    def _check_header(self, header: Any) -> None:
        if not isinstance(header, dict) or header.get("format") != f"prefalign-{self.kind}/1":
            raise DataError(f"{self.log}:1: not a prefalign {self.kind} progress file")
        old = header.get("settings", {})
        for key in sorted(set(old) | set(self.settings)):
            if old.get(key) != self.settings.get(key):
                raise ConfigError(f"{self.log}: this output was started with {key}="
                                  f"{old.get(key)!r}, now {key}={self.settings.get(key)!r}; "
                                  "use the same settings to continue, or another output")

    def commit(self, items: Iterable[tuple[int, str, dict[str, list[dict]]]]) -> None:
        """Append (index, key, {file name: rows}) for several items, then their log lines."""
        chunks: dict[str, list[bytes]] = {name: [] for name in self.files}
        sizes = {name: self.handles[name].tell() for name in self.files}
        log_lines = []
        for index, key, rows in items:
            for name in self.files:
                data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n"
                                for r in rows.get(name, []))
                chunks[name].append(data)
                sizes[name] += len(data)
            log_lines.append(json.dumps({"index": index, "key": key, "sizes": dict(sizes)}))
        for name, path in self.files.items():
            with writing(path, COMMITTED_KEPT, "--output"):
                _write_synced(self.handles[name], b"".join(chunks[name]))
        with writing(self.log, COMMITTED_KEPT, "--output"):
            _write_synced(self.handles["_log"], "".join(s + "\n" for s in log_lines).encode())

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles = {}

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_synced(handle: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:  # an unbuffered write may take part of the bytes; the next one says why
        written = handle.write(view)
        if not written:
            raise OSError(errno.EIO, "the file took no bytes")
        view = view[written:]
    os.fsync(handle.fileno())


def _append(path: Path, lines: list[str]) -> None:
    with open(path, "ab") as handle:
        _write_synced(handle, "".join(s + "\n" for s in lines).encode("utf-8"))


def check_committed(records: dict[int, dict], keys: list[str], origins: list[str],
                    log: Path) -> None:
    """DataError when a committed item is not the input's item at the same index."""
    for index, record in sorted(records.items()):
        if index >= len(keys) or record.get("key") != keys[index]:
            where = origins[index] if index < len(keys) else f"item {index}"
            raise DataError(f"{where}: not the item recorded at index {index} in {log.name} (the "
                            f"input changed); restore it, or move {log.name} and the outputs away")


def sidecar(output: str | os.PathLike, suffix: str) -> Path:
    """OUTPUT.jsonl -> OUTPUT<suffix>: `pairs.jsonl` -> `pairs.candidates.jsonl`."""
    text = str(output)
    return Path((text[: -len(".jsonl")] if text.endswith(".jsonl") else text) + suffix)


# ---- pairing (pure) -----------------------------------------------------------------------


def select_pairs(texts: list[str], scores: list[float], pairing: str = "extremes",
                 min_gap: float = 0.0) -> tuple[list[tuple[int, int]], Counter]:
    """(better, worse) candidate indices and a Counter of left-out pairs by reason.

    Candidates are sorted by score, best first (ties keep their order); empty texts are
    never paired. texts ["a", "bb", "c", "d"], scores [0.1, 0.9, 0.5, 0.3], "extremes" ->
    order [1, 2, 3, 0] -> [(1, 0), (2, 3)].
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing {pairing!r}: use one of {', '.join(PAIRINGS)}")
    order = sorted((i for i, t in enumerate(texts) if t.strip()), key=lambda i: -scores[i])
    if pairing == "extremes":
        wanted = [(order[k], order[-1 - k]) for k in range(len(order) // 2)]
    else:
        wanted = [(b, w) for k, b in enumerate(order) for w in order[k + 1:]]
    pairs, skipped, seen = [], Counter(), set()
    for better, worse in wanted:
        gap = scores[better] - scores[worse]
        reason = ("identical text" if texts[better] == texts[worse] else "tied score" if gap == 0
                  else "gap below min_gap" if gap < min_gap
                  else "duplicate pair" if (texts[better], texts[worse]) in seen else None)
        if reason:
            skipped[reason] += 1
            continue
        seen.add((texts[better], texts[worse]))
        pairs.append((better, worse))
    return pairs, skipped


# ---- generation ---------------------------------------------------------------------------


@dataclass
class BestOfNReport:
    """What a generate run did; `prompts_done_before` were committed by an earlier run."""

    output: Path
    prompts: int
    prompts_done_before: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    candidates: Path | None = None

    def format(self) -> str:
        now = self.prompts - self.prompts_done_before
        text = (f"{self.prompts} prompts ({now} generated now, {self.prompts_done_before} "
                f"before): {self.pairs} pairs written to {self.output}")
        if self.skipped:
            text += "; left out: " + ", ".join(f"{k} {v}" for k, v in self.skipped.most_common())
        return text + (f"; candidates in {self.candidates}" if self.candidates else "")


def sample_candidates(model: torch.nn.Module, tokenizer: Any, prompts: list[Any],
                      indices: list[int], sampling: Any) -> list[list[Any]]:
    """sampling.n Generations per prompt, prompt k keyed as index indices[k] of the whole set,
    so the candidates of prompt i are the same in every run, however a restart slices it."""
    from prefalign.generation import generate

    gens = generate(model, tokenizer, prompts, sampling, progress=False, seed_indices=indices)
    return [gens[k * sampling.n:(k + 1) * sampling.n] for k in range(len(prompts))]


def scorer_prompt(tokenizer: Any, prompt: str | list[dict]) -> str:
    """What a scorer sees of a prompt: the text, or chat messages rendered by the template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _model_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        from prefalign.algorithms.runner import model_reference

        return model_reference(str(model))
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def generate_preferences(
    model: Any, data: Any, output: str | os.PathLike, scorer: Any, num_candidates: int = 4,
    max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
    batch_size: int = 8, pairing: str = "extremes", min_gap: float = 0.0,
    keep_candidates: bool = False, source: str | None = None, tokenizer: Any = None,
    progress: bool = True, candidate_fields: Callable[[list[Any]], list[dict]] | None = None,
    chat_template: str | None = None, text_as_chat: bool = False,
) -> BestOfNReport:
    """Write best-of-N preference pairs for every prompt of `data` (see the module docstring).

    model: a model directory (or adapter directory), or a loaded model with `tokenizer`.
    scorer: a scorer spec, a Scorer or a function (preferences.scorer_spec.load_scorer).
    candidate_fields(generations of one batch, prompt-major): one dict per prompt, added
    to its candidates row (iterate uses it to record log-probs of the samples).
    chat_template, text_as_chat: how the tokenizer of a model directory renders the prompts
    (data.chat); a loaded model's tokenizer is used as it is.
    """
    from prefalign.data.prompts import load_prompts
    from prefalign.generation import SamplingConfig
    from prefalign.preferences.scorer_spec import load_scorer
    from prefalign.preferences.scorers import row_columns

    if num_candidates < 2:
        raise ConfigError(f"num_candidates must be >= 2 to make pairs, got {num_candidates}")
    if min_gap < 0:
        raise ConfigError(f"min_gap must be >= 0, got {min_gap}")
    select_pairs([], [], pairing)  # the pairing name is checked before any work
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, n=num_candidates, batch_size=batch_size)
    prompts = load_prompts(data)
    score = load_scorer(scorer)
    settings = {"model": _model_name(model), "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "num_candidates": num_candidates}
    source = source or f"best_of_n:{score.name}"
    output = Path(output)
    files = {"pairs": output}
    if keep_candidates:
        files["candidates"] = sidecar(output, ".candidates.jsonl")
    journal = Journal(Path(str(output) + ".progress.jsonl"), files, "best-of-n",
                      {**settings, "scorer": score.name, "pairing": pairing, "min_gap": min_gap,
                       "source": source, "keep_candidates": keep_candidates})
    keys = [item_key([p["prompt"], p.get("id")]) for p in prompts]
    report = BestOfNReport(output, len(prompts), candidates=files.get("candidates"))
    with journal:
        done = journal.open()
        check_committed(done, keys, [p["origin"] for p in prompts], journal.log)
        report.prompts_done_before = len(done)
        todo = [i for i in range(len(prompts)) if i not in done]
        if not todo:
            return report
        if isinstance(model, (str, os.PathLike)):
            from prefalign.models import load_causal_lm, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(str(model), chat_template=chat_template,
                                                    text_as_chat=text_as_chat)
            if progress:
                from prefalign.data.chat import tokens_line

                print(tokens_line(tokenizer), flush=True)
            model = load_causal_lm(str(model))
            model.to("cuda" if torch.cuda.is_available() else "cpu")
        elif tokenizer is None:
            raise ConfigError("generate_preferences: a loaded model needs its tokenizer")
        bar = tqdm(total=len(prompts), initial=len(done), desc="best-of-n", unit="prompt",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                items = [prompts[i] for i in chunk]
                groups = sample_candidates(model, tokenizer, [p["prompt"] for p in items],
                                           chunk, sampling)
                texts = [[g.text for g in group] for group in groups]
                repeated = [p for p in items for _ in range(num_candidates)]
                flat = score([scorer_prompt(tokenizer, p["prompt"]) for p in repeated],
                             [t for ts in texts for t in ts], row_columns(repeated))
                extra = candidate_fields([g for gs in groups for g in gs]) if candidate_fields \
                    else [{}] * len(chunk)
                commits = []
                for k, (index, item) in enumerate(zip(chunk, items)):
                    scores = flat[k * num_candidates:(k + 1) * num_candidates]
                    rows = _rows(item, index, texts[k], scores, groups[k], settings, source,
                                 pairing, min_gap, report.skipped, extra[k])
                    report.pairs += len(rows["pairs"])
                    commits.append((index, keys[index], rows))
                journal.commit(commits)
                bar.update(len(chunk))
                bar.set_postfix(pairs=report.pairs)
    return report


def _rows(item: dict, index: int, texts: list[str], scores: list[float], gens: list[Any],
          settings: dict, source: str, pairing: str, min_gap: float, skipped: Counter,
          extra: dict) -> dict[str, list[dict]]:
    pairs, left_out = select_pairs(texts, scores, pairing, min_gap)
    skipped.update(left_out)
    ident = {"id": item["id"]} if item.get("id") is not None else {}
    rows = [{"prompt": item["prompt"], "chosen": texts[b], "rejected": texts[w],
             "source": source, "score_chosen": scores[b], "score_rejected": scores[w],
             **settings, **ident} for b, w in pairs]
    candidates = {"prompt": item["prompt"], "candidates": texts, "scores": scores,
                  "finished": [g.finished for g in gens], "prompt_index": index, **ident,
                  **extra}
    return {"pairs": rows, "candidates": [candidates]}


# ---- command line -------------------------------------------------------------------------

DESCRIPTION = ("Sample N candidates per prompt, score them with a scorer or reward model and "
               "write best-vs-worst preference pairs. Progress is committed after every batch "
               "of prompts; the same command again continues where it stopped.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefalign.data.chat import add_chat_arguments
    from prefalign.hub import DOWNLOAD_HELP
    from prefalign.preferences.scorer_spec import SCORER_HELP

    add = parser.add_argument
    add("--model", required=True, help="policy to sample from: model or adapter directory")
    add("--data", required=True, help="prompts: rows with prompt or messages (or preference rows)")
    add("--scorer", required=True, help=SCORER_HELP)
    add("--allow-download", action="store_true", help=DOWNLOAD_HELP)
    add("--output", required=True, help="JSONL of preference pairs")
    add("--num-candidates", type=int, default=4, help="candidates per prompt (default: 4)")
    add("--max-new-tokens", type=int, default=128, help="tokens per candidate (default: 128)")
    add("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    add("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    add("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add("--batch-size", type=int, default=8, help="prompts per forward batch (default: 8)")
    add("--pairing", choices=PAIRINGS, default="extremes",
        help="extremes: best vs worst, 2nd vs 2nd worst, ...; all: every pair whose score gap "
        "is at least --min-gap (default: extremes)")
    add("--min-gap", type=float, default=0.0, help="smallest score gap of a pair (default: 0)")
    add("--source", help="source column of the pairs (default: best_of_n:SCORER)")
    add("--keep-candidates", action="store_true",
        help="also write every candidate and score to OUTPUT.candidates.jsonl (the input of "
        "prefalign annotate and prefalign judge)")
    add_chat_arguments(parser, whose="--model's tokenizer")


def run(args: argparse.Namespace) -> int:
    report = generate_preferences(
        args.model, args.data, args.output, args.scorer, num_candidates=args.num_candidates,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, batch_size=args.batch_size, pairing=args.pairing,
        min_gap=args.min_gap, keep_candidates=args.keep_candidates, source=args.source,
        chat_template=args.chat_template, text_as_chat=args.text_as_chat)
    print(report.format())
    return 0
