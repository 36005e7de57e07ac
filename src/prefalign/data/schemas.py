"""Rows in other shapes: a column mapping, the common hub schemas and a `system` column.

`read_rows(source, kind, columns, split)` reads rows (data.sources) and rewrites each into
the fields the normalisers read (data.formats, data.instructions, data.unpaired,
data.prompts), in three steps:

1. Column mapping (`--columns prompt=question,system=system`, or `columns:` in YAML as a
   mapping or the same string): each target field takes the value of the named source
   column. A target the loader does not read is refused naming the valid ones; a row
   without a mapped source column is refused naming the file, line and its columns.
2. Hub schemas, recognised from the columns of the first row (after mapping) and applied
   to every row of the file; the loader prints "recognised <schema> rows in FILE":
     UltraFeedback-binarized  prompt, chosen/rejected (whole conversations, with the user
                              turn), messages, score_chosen, score_rejected, prompt_id:
                              preference data reads chosen/rejected (their turns before the
                              last assistant turn are the prompt), SFT reads messages;
                              prompt_id is kept as id
     orca_dpo_pairs           system, question, chosen, rejected strings: prompt = question,
                              system as in step 3
     HH-RLHF                  chosen/rejected transcripts only; read as they are (data.formats)
     Alpaca                   instruction, input, output: prompt = instruction + "\\n\\n" +
                              input (just instruction when input is empty or blank),
                              completion = output
     ShareGPT                 conversations: [{from, value}] with from in human/user,
                              gpt/assistant, system: the conversation as messages
3. A `system` column (the data's own, mapped, or orca's) goes in front of the prompt. A
   conversational row (any of prompt, chosen, rejected, completion, messages is a list of
   messages) gets {"role": "system", "content": system} as its first message (a prompt
   string becomes [system, user]); a text row gets system + "\\n\\n" + prompt. Without a
   prompt field it goes in front of what carries the prompt: messages, text, or both
   chosen and rejected. An empty or blank system is no system.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from prefalign.data.formats import KEPT_COLUMNS, _looks_hh, row_keys, type_name
from prefalign.data.sources import Row, load_rows
from prefalign.errors import ConfigError, DataError

# The fields each loader reads, i.e. the valid targets of a column mapping.
TARGETS = {
    "preference": ("prompt", "system", "chosen", "rejected", "margin", "weight", "source", "id"),
    "unpaired": ("prompt", "system", "completion", "label", "chosen", "rejected", "weight",
                 "source", "id"),
    "sft": ("prompt", "system", "completion", "messages", "text", "source", "id"),
    "prompts": ("prompt", "system", "messages", "id"),
}
TARGETS["auto"] = ("prompt", "system", "chosen", "rejected", "completion", "label", "messages",
                   "text", "margin", "weight", "source", "id")  # every loader's, for data check
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "system": "system"}
SYSTEM_SEPARATOR = "\n\n"  # between a system text and a text prompt, and Alpaca's parts


def parse_columns(value: Any, kind: str = "auto") -> dict[str, str]:
    """'prompt=question,system=system' or {'prompt': 'question'} -> {target: source column}.

    Raises ConfigError for an unknown target (naming the valid ones) or a malformed pair.
    """
    if not value:
        return {}
    if isinstance(value, str):
        mapping = {}
        for item in filter(None, (p.strip() for p in value.split(","))):
            target, sep, source = item.partition("=")
            if not sep:
                raise ConfigError(f"config key 'columns': expected target=source pairs like "
                                  f"prompt=question, got {item!r}")
            if target.strip() in mapping:
                raise ConfigError(f"config key 'columns': target {target.strip()!r} is "
                                  "mapped twice")
            mapping[target.strip()] = source.strip()
    elif isinstance(value, dict):
        mapping = {str(k): str(v) for k, v in value.items()}
    else:
        raise ConfigError(f"config key 'columns': expected target=source pairs or a mapping, "
                          f"got {type_name(value)}")
    valid = TARGETS[kind]
    for target, source in mapping.items():
        if target not in valid:
            close = difflib.get_close_matches(target, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config key 'columns': unknown target {target!r}{hint}; the "
                              f"valid targets are {', '.join(valid)}")
        if not source:
            raise ConfigError(f"config key 'columns': target {target!r} has no source column")
    return mapping


def map_columns(data: Any, columns: dict[str, str], origin: str) -> Any:
    """The row with each target set to its source column's value (the source stays too)."""
    if not columns or not isinstance(data, dict):
        return data
    out = dict(data)
    for target, source in columns.items():
        if source not in data:
            raise DataError(f"{origin}: --columns maps {target}={source}, but the row has no "
                            f"column {source!r} (it has {row_keys(data, most=12)}); fix the "
                            "mapping")
        out[target] = data[source]
    return out


# -- hub schemas -----------------------------------------------------------------------


def _kept(data: dict) -> dict:
    return {k: data[k] for k in KEPT_COLUMNS if k in data}


def _string(data: dict, key: str, origin: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {key!r} must be a string, got {type_name(value)}")
    return value


def _ultrafeedback(data: dict, origin: str, kind: str) -> dict:
    out = _kept(data)
    if data.get("prompt_id") is not None and "id" not in out:
        out["id"] = data["prompt_id"]
    if kind == "sft":
        out["messages"] = data.get("messages")
    else:
        # The prompt column repeats the first user turn of chosen/rejected, which carry it.
        out.update(chosen=data.get("chosen"), rejected=data.get("rejected"))
    return out


def _orca(data: dict, origin: str, kind: str) -> dict:
    out = {**data, "prompt": _string(data, "question", origin)}
    out.pop("question", None)
    return out


def _alpaca(data: dict, origin: str, kind: str) -> dict:
    prompt = _string(data, "instruction", origin)
    extra = _string(data, "input", origin) if data.get("input") is not None else ""
    if extra.strip():
        prompt += SYSTEM_SEPARATOR + extra
    out = {**_kept(data), "prompt": prompt, "completion": _string(data, "output", origin)}
    if "system" in data:
        out["system"] = data["system"]
    return out


def _sharegpt(data: dict, origin: str, kind: str) -> dict:
    turns = data.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f"{origin}: field 'conversations' must be a list of {{from, value}} "
                        f"turns, got {type_name(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{origin}: field 'conversations' turn {i}"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where} must be an object with 'from' and 'value', got "
                            f"{turn!r:.80}")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where} has from {turn['from']!r:.40}; use one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    out = {**_kept(data), "messages": messages}
    if "system" in data:
        out["system"] = data["system"]
    return out


def _hh(data: dict, origin: str, kind: str) -> dict:
    return data


def _is_ultrafeedback(d: dict) -> bool:
    need = {"prompt", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
    return need <= d.keys() and isinstance(d["chosen"], list)


def _is_orca(d: dict) -> bool:
    return {"system", "question", "chosen", "rejected"} <= d.keys() and "prompt" not in d


def _is_hh(d: dict) -> bool:
    return (set(d) - set(KEPT_COLUMNS) == {"chosen", "rejected"}
            and all(isinstance(d[k], str) and _looks_hh(d[k]) for k in ("chosen", "rejected")))


def _is_alpaca(d: dict) -> bool:
    return {"instruction", "output"} <= d.keys() and not {"prompt", "completion"} & d.keys()


def _is_sharegpt(d: dict) -> bool:
    return "conversations" in d and "messages" not in d


# name -> (recognise the first row, convert a row, the kinds it serves, its own kind)
SCHEMAS: dict[str, tuple[Callable, Callable, tuple[str, ...], str]] = {
    "UltraFeedback-binarized": (_is_ultrafeedback, _ultrafeedback,
                                ("preference", "unpaired", "prompts", "sft"), "preference"),
    "orca_dpo_pairs": (_is_orca, _orca, ("preference", "unpaired", "prompts"), "preference"),
    "HH-RLHF": (_is_hh, _hh, ("preference", "unpaired", "prompts"), "preference"),
    "Alpaca": (_is_alpaca, _alpaca, ("sft", "prompts"), "sft"),
    "ShareGPT": (_is_sharegpt, _sharegpt, ("sft", "prompts"), "sft"),
}


def recognise(data: Any, kind: str) -> str | None:
    """The hub schema whose columns the row has (for this kind of data), or None."""
    if not isinstance(data, dict):
        return None
    for name, (test, _, kinds, _) in SCHEMAS.items():
        if (kind in kinds or kind == "auto") and test(data):
            return name
    return None


def guess_kind(data: Any) -> str:
    """For `data check` without --kind: unpaired (KTO) for label + completion, sft for
    messages, text or completion, else preference (whose errors then name what is missing)."""
    if not isinstance(data, dict):
        return "preference"
    if "label" in data and "completion" in data:
        return "unpaired"
    if "chosen" not in data and "rejected" not in data and {"messages", "text",
                                                            "completion"} & data.keys():
        return "sft"
    return "preference"


# -- system ----------------------------------------------------------------------------


def _with_system(value: Any, system: str, key: str, origin: str, chat: bool) -> Any:
    message = {"role": "system", "content": system}
    if isinstance(value, list):
        first = value[0] if value else None
        if isinstance(first, dict) and first.get("role") == "system":
            raise DataError(f"{origin}: field {key!r} starts with a system message and the row "
                            "also has a 'system' column; keep one of them")
        return [message, *value]
    if isinstance(value, str):
        if chat:
            return [message, {"role": "user", "content": value}]
        return system + SYSTEM_SEPARATOR + value
    return value  # the normaliser names the wrong type


def apply_system(data: Any, origin: str) -> Any:
    """The row with its `system` column put in front of the prompt (module docstring)."""
    if not isinstance(data, dict) or "system" not in data:
        return data
    out = dict(data)
    system = out.pop("system")
    if system is None:
        return out
    if not isinstance(system, str):
        raise DataError(f"{origin}: field 'system' must be a string, got {type_name(system)}")
    if not system.strip():
        return out
    chat = any(isinstance(out.get(k), list)
               for k in ("prompt", "chosen", "rejected", "completion", "messages"))
    if out.get("prompt") is not None:
        keys = ("prompt",)
    elif out.get("messages") is not None:
        keys = ("messages",)
    elif out.get("chosen") is not None or out.get("rejected") is not None:
        keys = ("chosen", "rejected")
    elif out.get("text") is not None:
        keys = ("text",)
    else:
        keys = ("completion",)
    for key in keys:
        if out.get(key) is not None:
            # A whole conversation already holds its user turn: a string there is a reply.
            out[key] = _with_system(out[key], system, key, origin, chat and key == "prompt")
    return out


# -- the whole step --------------------------------------------------------------------


def adapt_rows(rows: list[Row], kind: str, columns: Any = None
               ) -> tuple[list[Row], str | None, str]:
    """Rows -> (rows in the normalisers' fields, recognised schema or None, kind).

    kind: "preference", "unpaired", "sft", "prompts", or "auto" (data check), which is
    resolved from the schema or the first row's fields.
    """
    mapping = parse_columns(columns, kind)
    rows = [Row(map_columns(data, mapping, origin), origin) for data, origin in rows]
    schema = recognise(rows[0].data, kind) if rows else None
    if kind == "auto":
        kind = SCHEMAS[schema][3] if schema else guess_kind(rows[0].data if rows else None)
    if schema:
        convert = SCHEMAS[schema][1]
        rows = [Row(convert(data, origin, kind), origin) if isinstance(data, dict)
                else Row(data, origin) for data, origin in rows]
    return [Row(apply_system(data, origin), origin) for data, origin in rows], schema, kind


def read_rows(source: Any, kind: str, columns: Any = None, split: str | None = None,
              log: Callable[[str], None] | None = None) -> tuple[list[Row], str | None, str]:
    """load_rows + adapt_rows; logs "recognised <schema> rows in FILE" when one is."""
    rows, schema, kind = adapt_rows(load_rows(source, split=split), kind, columns)
    if schema and log is not None:
        log(f"recognised {schema} rows in {source_name(source)}")
    return rows, schema, kind


def source_name(source: Any) -> str:
    return "<list>" if isinstance(source, (list, tuple)) else str(source)
