"""Argilla (v2) records: the JSON list `dataset.records.to_json(path)` writes and
`rg.Dataset.from_disk` / `Record.from_dict` read back.

    {"id": "7", "fields": {"prompt": "...", "response-1": "...", "response-2": "..."},
     "metadata": {"item_id": 7}, "suggestions": {}, "vectors": {}, "_server_id": null,
     "responses": {"ranking": [{"value": ["response-2", "response-1"], "user_id": "alice",
                                "status": "submitted"}]}}

Export writes one record per item with a RankingQuestion named "ranking" over the fields
response-1 ... response-N (N: the most candidates of any item; an item with fewer leaves
the rest out, so declare them required=False). A ranking value lists the field names best
first, as the v2 SDK does. `user_id` carries the annotator's name: Argilla needs a user's
UUID there when the responses are logged to a server.

Import reads a ranking question (values as a list of field names, best first, or as the
server's [{"value", "rank"}], where equal ranks are ties: the candidates are the text
fields the rankings name) or a label question over two text fields (the value names the
preferred field). Responses with status "draft" or "discarded" are left out and counted.
"""

from __future__ import annotations

from typing import Any

from prefalign.errors import DataError
from prefalign.preferences.interchange import Task, check_ranks, task_prompt
from prefalign.text import printable

QUESTION = "ranking"
PROMPT = "prompt"
SKIPPED_STATUS = ("draft", "discarded")


def field_name(i: int) -> str:
    return f"response-{i + 1}"


def to_records(tasks: list[Task]) -> list[dict]:
    records = []
    for task in tasks:
        fields = {PROMPT: task.prompt}
        fields.update({field_name(i): text for i, text in enumerate(task.candidates)})
        responses = [{"value": [field_name(i) for i in sorted(range(len(ranks)),
                                                               key=ranks.__getitem__)],
                      "user_id": who, "status": "submitted"}
                     for who, ranks in task.rankings if _strict(ranks, who)]
        records.append({"id": None if task.id is None else str(task.id), "fields": fields,
                        "metadata": {} if task.id is None else {"item_id": task.id},
                        "suggestions": {}, "responses": {QUESTION: responses} if responses
                        else {}, "vectors": {}, "_server_id": None})
    return records


def _strict(ranks: list[int], who: str) -> bool:
    if len(set(ranks)) != len(ranks):
        raise DataError(f"{who}'s ranking has ties, which an Argilla ranking value cannot "
                        "hold; leave the tied item out")
    return True


def settings_note(tasks: list[Task]) -> str:
    n = max(len(t.candidates) for t in tasks)
    chat = any(not isinstance(t.prompt, str) for t in tasks)
    return (f"Argilla settings: fields {PROMPT} ({'ChatField' if chat else 'TextField'}), "
            f"{field_name(0)} ... {field_name(n - 1)} (TextField, required=False); question "
            f"RankingQuestion(name=\"{QUESTION}\", values=[{field_name(0)!r}, ... "
            f"{field_name(n - 1)!r}])")


def from_records(rows: list, prompt_field: str = PROMPT, question: str | None = None
                 ) -> tuple[list[Task], int]:
    """Tasks with the rankings of the records' responses; and how many responses were left
    out (draft or discarded)."""
    tasks, skipped = [], 0
    for data, origin in rows:
        fields = data.get("fields") if isinstance(data, dict) else None
        if not isinstance(fields, dict) or not isinstance(data.get("responses", {}), dict):
            raise DataError(f"{origin}: not an Argilla record (no 'fields' mapping); give the "
                            "JSON that dataset.records.to_json writes")
        task_prompt(fields, prompt_field, origin)
        _, answers = _question(data.get("responses") or {}, question, origin)
        kept = []
        for number, answer in enumerate(answers, start=1):
            where = f"{origin} response {number}"
            if not isinstance(answer, dict) or "value" not in answer:
                raise DataError(f"{where}: a response needs a 'value'")
            if answer.get("status") in SKIPPED_STATUS:
                skipped += 1
            else:
                kept.append((where, answer))
        names = _candidate_fields(fields, prompt_field, [a["value"] for _, a in kept], origin)
        metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
        task = Task(fields[prompt_field], [fields[k] for k in names],
                    metadata.get("item_id", data.get("id")))
        task.rankings = [(_user(answer, where), _ranks(answer["value"], names, where))
                         for where, answer in kept]
        tasks.append(task)
    return tasks, skipped


def _candidate_fields(fields: dict, prompt_field: str, values: list, origin: str) -> list[str]:
    """The candidates: the text fields a ranking names (other fields, such as a context,
    are not ranked), else every text field but the prompt (a label question needs two)."""
    texts = [k for k, v in fields.items() if k != prompt_field and isinstance(v, str)]
    named = {v.get("value") if isinstance(v, dict) else v for value in values
             if isinstance(value, list) for v in value}
    # A name that is no text field, or a single one, is reported by _ranks against all.
    names = [k for k in texts if k in named] if len(named) >= 2 and named <= set(texts) \
        else texts
    if len(names) < 2:
        raise DataError(f"{origin}: fewer than two candidate text fields besides "
                        f"{prompt_field!r}; a ranking compares two or more")
    return names


def _question(responses: dict, question: str | None, origin: str) -> tuple[str | None, list]:
    if question is not None:
        answers = responses.get(question, [])
        if not isinstance(answers, list):
            raise DataError(f"{origin}: responses of {question!r} must be a list")
        return question, answers
    candidates = [k for k, v in responses.items() if isinstance(v, list) and v]
    if len(candidates) > 1:
        raise DataError(f"{origin}: responses to several questions "
                        f"({printable(', '.join(candidates))[:80]}); choose one with --question")
    return (candidates[0], responses[candidates[0]]) if candidates else (None, [])


def _user(answer: dict, where: str) -> str:
    user = answer.get("user_id")
    if not isinstance(user, str) or not user.strip():
        raise DataError(f"{where}: 'user_id' must name the annotator")
    return user.strip()


def _ranks(value: Any, names: list[str], where: str) -> list[int]:
    """Places of the candidate fields `names` from a ranking or label response value."""
    if isinstance(value, str):  # a label question: the preferred of two fields
        if len(names) != 2 or value not in names:
            raise DataError(f"{where}: label {printable(value)[:40]!r} is not one of two "
                            f"candidate fields {names}; a label question compares two fields")
        return [1, 2] if value == names[0] else [2, 1]
    if not isinstance(value, list):
        raise DataError(f"{where}: a ranking value is a list of field names, best first")
    if all(isinstance(v, dict) for v in value):  # the server's [{"value", "rank"}]
        places = {v.get("value"): v.get("rank") for v in value}
    else:
        places = {v: i for i, v in enumerate(value, start=1)}
    unknown = [v for v in places if v not in names]
    if unknown:
        raise DataError(f"{where}: ranks {printable(str(unknown[0]))[:40]!r}, which is not a "
                        f"candidate field ({', '.join(names)})")
    ranks = [places.get(k) for k in names]
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        check_ranks(ranks, len(names), where)  # raises: a candidate without a place
    # Dense places from 1: the server may number tied groups 1, 1, 3 or 1, 1, 2.
    order = sorted(set(ranks))
    return check_ranks([order.index(r) + 1 for r in ranks], len(names), where)
