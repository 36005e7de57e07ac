"""Label Studio tasks: the JSON list Label Studio imports and its "JSON" export writes.

When every item has two candidates, export uses the Pairwise tag:

    <View><Text name="prompt" value="$prompt"/>
      <Pairwise name="pw" toName="text1,text2"/>
      <Text name="text1" value="$text1"/><Text name="text2" value="$text2"/></View>

    {"data": {"prompt": "...", "text1": "...", "text2": "...", "item_id": 7},
     "annotations": [{"result": [{"from_name": "pw", "to_name": "pw", "type": "pairwise",
                                  "value": {"selected": "left"}}]}],
     "meta": {"annotators": ["alice"]}}

otherwise the Ranker tag over a List of the candidates (ids A, B, C, ... as in annotate):

    <View><Text name="prompt" value="$prompt"/>
      <List name="candidates" value="$candidates" title="Candidates"/>
      <Ranker name="rank" toName="candidates"/></View>

    {"data": {"prompt": "...", "candidates": [{"id": "A", "title": "A", "body": "..."}, ...]},
     "annotations": [{"result": [{"from_name": "rank", "to_name": "candidates",
                                  "type": "ranker", "value": {"ranker": {"rank": ["B", "A"]}}}]}]}

A chat prompt (a list of messages) is shown with <Paragraphs name="prompt" value="$prompt"
nameKey="role" textKey="content"/>. Label Studio assigns annotations to the user who
imports them, so the annotators' names travel in the task's meta.annotators (one per
annotation, in order).

Import reads any task with a pairwise result (the two compared texts: the data keys its
to_name names, else text1 and text2) or a ranker result in rank mode (the ranked list: the
data value of {id, body} items; a result with buckets is not a ranking and is refused).
The annotator is meta.annotators[i] when given, else completed_by (its email, or the user
id). Cancelled annotations and annotations without such a result are left out and counted.
"""

from __future__ import annotations

from typing import Any

from prefalign.errors import DataError
from prefalign.preferences.interchange import Task, check_ranks, task_prompt

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PAIR_KEYS = ("text1", "text2")


def to_records(tasks: list[Task]) -> list[dict]:
    pairwise = all(len(t.candidates) == 2 for t in tasks)
    if not pairwise and max(len(t.candidates) for t in tasks) > len(LABELS):
        raise DataError(f"an item has more than {len(LABELS)} candidates; Label Studio export "
                        "labels them A-Z")
    return [_task(task, pairwise) for task in tasks]


def _task(task: Task, pairwise: bool) -> dict:
    data: dict[str, Any] = {"prompt": task.prompt}
    if pairwise:
        data.update(zip(PAIR_KEYS, task.candidates))
    else:
        data["candidates"] = [{"id": LABELS[i], "title": LABELS[i], "body": text}
                              for i, text in enumerate(task.candidates)]
    if task.id is not None:
        data["item_id"] = task.id
    annotations = []
    for who, ranks in task.rankings:
        if len(set(ranks)) != len(ranks):
            raise DataError(f"{who}'s ranking has ties, which Label Studio's Ranker and "
                            "Pairwise cannot hold; leave the tied item out")
        order = sorted(range(len(ranks)), key=ranks.__getitem__)
        if pairwise:
            result = {"from_name": "pw", "to_name": "pw", "type": "pairwise",
                      "value": {"selected": "left" if order[0] == 0 else "right"}}
        else:
            result = {"from_name": "rank", "to_name": "candidates", "type": "ranker",
                      "value": {"ranker": {"rank": [LABELS[i] for i in order]}}}
        annotations.append({"result": [result], "was_cancelled": False})
    out: dict[str, Any] = {"data": data, "annotations": annotations}
    if annotations:
        out["meta"] = {"annotators": [who for who, _ in task.rankings]}
    return out


def settings_note(tasks: list[Task]) -> str:
    chat = any(not isinstance(t.prompt, str) for t in tasks)
    prompt = ('<Paragraphs name="prompt" value="$prompt" nameKey="role" textKey="content"/>'
              if chat else '<Text name="prompt" value="$prompt"/>')
    if all(len(t.candidates) == 2 for t in tasks):
        body = ('<Pairwise name="pw" toName="text1,text2"/><Text name="text1" value="$text1"/>'
                '<Text name="text2" value="$text2"/>')
    else:
        body = ('<List name="candidates" value="$candidates" title="Candidates"/>'
                '<Ranker name="rank" toName="candidates"/>')
    return f"Label Studio labeling config: <View>{prompt}{body}</View>"


def from_records(rows: list, prompt_field: str = "prompt") -> tuple[list[Task], int]:
    """Tasks with every annotation's ranking; and how many annotations were left out."""
    tasks, skipped = [], 0
    for data, origin in rows:
        fields = data.get("data") if isinstance(data, dict) else None
        annotations = data.get("annotations", []) if isinstance(data, dict) else None
        if not isinstance(fields, dict) or not isinstance(annotations, list):
            raise DataError(f"{origin}: not a Label Studio task (needs 'data' and a list of "
                            "'annotations'); give the project's JSON export")
        task_prompt(fields, prompt_field, origin, key="data key")
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        names = meta.get("annotators")
        task = None
        for number, annotation in enumerate(annotations):
            where = f"{origin} annotation {number + 1}"
            result = _result(annotation, where)
            if result is None:
                skipped += 1
                continue
            candidates, ranks = _read_result(result, fields, where)
            if task is None:
                task = Task(fields[prompt_field], candidates, fields.get("item_id"))
            elif candidates != task.candidates:
                raise DataError(f"{where}: compares other texts than the task's first "
                                "annotation; one task holds one comparison")
            who = (names[number] if isinstance(names, list) and len(names) == len(annotations)
                   else _completed_by(annotation, where))
            task.rankings.append((str(who), ranks))
        if task is not None:
            tasks.append(task)
    return tasks, skipped


def _result(annotation: Any, where: str) -> dict | None:
    """The pairwise or ranker result of an annotation; None when cancelled or without one."""
    if not isinstance(annotation, dict) or not isinstance(annotation.get("result", []), list):
        raise DataError(f"{where}: an annotation is an object with a 'result' list")
    if annotation.get("was_cancelled"):
        return None
    found = [r for r in annotation.get("result", []) if isinstance(r, dict)
             and r.get("type") in ("pairwise", "ranker")]
    if len(found) > 1:
        raise DataError(f"{where}: several pairwise/ranker results; export one comparison per "
                        "task")
    return found[0] if found else None


def _read_result(result: dict, fields: dict, where: str) -> tuple[list[str], list[int]]:
    value = result.get("value")
    if result["type"] == "pairwise":
        selected = value.get("selected") if isinstance(value, dict) else None
        if selected not in ("left", "right"):
            raise DataError(f"{where}: a pairwise value is {{\"selected\": \"left\"}} or "
                            "\"right\"")
        keys = _pair_keys(result, fields)
        texts = [fields.get(k) for k in keys]
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: data keys {keys[0]!r} and {keys[1]!r} must hold the two "
                            "compared texts")
        return texts, [1, 2] if selected == "left" else [2, 1]
    ranker = value.get("ranker") if isinstance(value, dict) else None
    if not isinstance(ranker, dict) or len(ranker) != 1:
        raise DataError(f"{where}: a ranker value with buckets is a selection, not a "
                        "ranking; use <Ranker> without <Bucket> tags")
    (order,) = ranker.values()
    items = _items(fields, where)
    ids = [item["id"] for item in items]
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(map(str, ids)):
        raise DataError(f"{where}: the ranker does not order each of the {len(ids)} listed "
                        "items exactly once")
    place = {str(v): i for i, v in enumerate(order, start=1)}
    ranks = check_ranks([place[str(i)] for i in ids], len(ids), where)
    return [item["body"] for item in items], ranks


def _pair_keys(result: dict, fields: dict) -> tuple[str, str]:
    names = result.get("to_name")
    names = names.split(",") if isinstance(names, str) else names
    if isinstance(names, list) and len(names) == 2 and all(n in fields for n in names):
        return names[0], names[1]
    return PAIR_KEYS


def _items(fields: dict, where: str) -> list[dict]:
    """The data value that lists the ranked items: {id, body} objects."""
    lists = [v for v in fields.values() if isinstance(v, list) and v and all(
        isinstance(i, dict) and "id" in i and isinstance(i.get("body"), str) for i in v)]
    if len(lists) != 1:
        raise DataError(f"{where}: expected one data list of {{id, title, body}} items for the "
                        f"ranker, found {len(lists)}")
    return lists[0]


def _completed_by(annotation: dict, where: str) -> str:
    user = annotation.get("completed_by")
    if isinstance(user, dict):
        user = user.get("email") or user.get("id")
    if user is None or isinstance(user, (bool, list, dict)) or str(user).strip() == "":
        raise DataError(f"{where}: no annotator: neither meta.annotators nor completed_by")
    return str(user)
