"""Dialogs in the shapes other tools keep them, as this engine's rows.

A row here is MuseQuest's: `data_id`, `item_name`, `image_name`, `dialog` (a JSON string
`{"messages": [...]}` of chat messages whose content is a list of `{"type": "image"}` and
`{"type": "text", "text": ...}` parts) and its images, in the order the image parts come. A record
of another tool is recognised by its dialog field:

- `messages`: OpenAI / TRL / axolotl. A content is a string or a list of parts; an image part is
  `{"type": "image", "image": PATH}` (or OpenAI's `{"type": "image_url", "image_url": {"url": PATH}}`),
  or a bare `{"type": "image"}` whose picture is in the record's `images` list. In a string content,
  `<image>` markers (LLaMA-Factory) stand for the `images` list, in order.
- `conversations`: ShareGPT (LLaMA-Factory): `from` (human, gpt, system) and `value`, with `<image>`
  markers for the `images` list.
- `texts`: the_cauldron's list of `{"user", "assistant"}` turns; its `images` go before the first question.
- `question` and `answer`: one turn about the record's images.
- `dialog`: MuseQuest's own JSON string.

Images are named by `images`, by the parts, or by an imagefolder's `file_name` column; a path is
relative to the folder of the file that names it. Every problem is one sentence naming the file,
the line or row, and the field, found before any model loads.
"""

import csv
import json
import re
from pathlib import Path

from errors import UsageError

DIALOG_FIELDS = ("messages", "conversations", "texts", "dialog", "question")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
IMAGE_MARKER = "<image>"
ENGINE_FIELDS = ("data_id", "item_name", "image_name", "dialog", "images")

Picture = object  # a path as a record writes it, or a picture a data set holds (a PIL image, {"bytes", "path"})
IMAGE_PART = {"type": "image"}


def engine_messages(record: dict, where: str, images: list[Picture] | None) -> tuple[list[dict], list[Picture]]:
    """The record's dialog as engine messages, and its images in the order its image parts come.

    `images` is the record's own list of pictures (its `images` field or column), or None where it has
    none; image parts that carry their picture (a path in the part) need no list.
    """
    form = next((field for field in DIALOG_FIELDS if field in record), None)
    if form is None:
        raise UsageError(f"{where}: no dialog found; a row needs one of the fields {list(DIALOG_FIELDS[:-1])} "
                         "or 'question' and 'answer' (docs/data.md shows each).")
    if form != "question" and isinstance(record[form], str):  # a CSV cell or a string column holds JSON text
        record = {**record, form: _parsed(record[form], f"{where}: its {form!r}")}
    reader = {"messages": _from_messages, "conversations": _from_sharegpt, "texts": _from_cauldron,
              "dialog": _from_musequest, "question": _from_question}[form]
    messages, named = reader(record, where)
    if "assistant" not in [message["role"] for message in messages]:
        raise UsageError(f"{where}: its dialog has no assistant turn to learn from.")
    if form in ("texts", "question"):  # these name no place for their images: they open the first question
        messages[0]["content"][:0] = [dict(IMAGE_PART) for _ in images or []]
        return messages, list(images or [])
    return messages, _paired(named, images, where)


def _from_messages(record: dict, where: str, field: str = "messages") -> tuple[list[dict], list[Picture | None]]:
    """Messages, and what each image part names (None: a bare part or an `<image>` marker, paired later)."""
    messages, named = [], []
    for number, turn in enumerate(_list_of_objects(record[field], f"{where}: its {field!r}"), start=1):
        place = f"{where}: message {number} of its {field!r}"
        role = _role(turn.get("role"), place)
        content = turn.get("content")
        if isinstance(content, str):
            parts = _split_markers(content)
            named += [None] * _image_parts([{"content": parts}])
        elif isinstance(content, list):
            parts = [_part(part, f"{place}, part {index}", named) for index, part in enumerate(content, start=1)]
        else:
            raise UsageError(f"{place}: its content is {_kind(content)}, not a string or a list of parts.")
        messages.append({"role": role, "content": parts})
    return messages, named


def _part(part: object, where: str, named: list[Picture | None]) -> dict:
    """An engine part for one OpenAI / TRL content part; what an image part names is appended to `named`."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise UsageError(f"{where} is {_kind(part)}, not an object with a 'type'.")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise UsageError(f"{where}: a text part needs a 'text' string.")
        return {"type": "text", "text": part["text"]}
    if kind in ("image", "image_url"):
        url = part.get("image_url")
        named.append(part.get("image") if kind == "image" else url.get("url") if isinstance(url, dict) else url)
        return dict(IMAGE_PART)
    raise UsageError(f"{where} has the type {kind!r}; parts are 'text', 'image' or 'image_url'.")


def _from_sharegpt(record: dict, where: str) -> tuple[list[dict], list[Picture | None]]:
    messages = []
    for number, turn in enumerate(_list_of_objects(record["conversations"], f"{where}: its 'conversations'"),
                                  start=1):
        place = f"{where}: turn {number} of its 'conversations'"
        role = _role(turn.get("from"), place)
        if not isinstance(turn.get("value"), str):
            raise UsageError(f"{place}: its 'value' is {_kind(turn.get('value'))}, not a string.")
        messages.append({"role": role, "content": _split_markers(turn["value"])})
    return messages, [None] * _image_parts(messages)


def _from_cauldron(record: dict, where: str) -> tuple[list[dict], list[Picture | None]]:
    messages = []
    for number, turn in enumerate(_list_of_objects(record["texts"], f"{where}: its 'texts'"), start=1):
        if not all(isinstance(turn.get(key), str) for key in ("user", "assistant")):
            raise UsageError(f"{where}: turn {number} of its 'texts' needs 'user' and 'assistant' strings.")
        messages += [_text_message("user", turn["user"]), _text_message("assistant", turn["assistant"])]
    return messages, []


def _from_question(record: dict, where: str) -> tuple[list[dict], list[Picture | None]]:
    if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
        raise UsageError(f"{where}: its 'question' and 'answer' must both be strings.")
    return [_text_message("user", record["question"]), _text_message("assistant", record["answer"])], []


def _from_musequest(record: dict, where: str) -> tuple[list[dict], list[Picture | None]]:
    dialog = record["dialog"]
    if not isinstance(dialog, dict) or "messages" not in dialog:
        raise UsageError(f"{where}: its 'dialog' is not of the form {{\"messages\": [...]}}.")
    return _from_messages(dialog, where)


def _text_message(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _paired(named: list[Picture | None], images: list[Picture] | None, where: str) -> list[Picture]:
    """The picture of each image part: its own where every part names one, else the `images` list in order."""
    if named and all(source is not None for source in named):
        if images:
            raise UsageError(f"{where}: its image parts name their pictures and an 'images' list is given too; "
                             "keep one of the two.")
        return list(named)
    if any(source is not None for source in named):
        raise UsageError(f"{where}: some of its image parts name a picture and some do not; name every one, or "
                         "none and list them in 'images'.")
    if len(named) != len(images or []):
        raise UsageError(f"{where}: its dialog has {len(named)} image part(s) or {IMAGE_MARKER} marker(s) but "
                         f"{len(images or [])} image(s) are given.")
    return list(images or [])


def _split_markers(text: str) -> list[dict]:
    """A string content as parts: an image part for each `<image>` marker, the text around each as a text part
    (stripped of the whitespace beside the marker)."""
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) == 1:
        return [{"type": "text", "text": text}]
    parts = []
    for index, piece in enumerate(pieces):
        if index:
            parts.append(dict(IMAGE_PART))
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _image_parts(messages: list[dict]) -> int:
    return sum(part["type"] == "image" for message in messages for part in message["content"])


def _role(value: object, where: str) -> str:
    if value not in ROLES:
        raise UsageError(f"{where} has the role {value!r}; roles are user, assistant and system (ShareGPT's "
                         "human and gpt too).")
    return ROLES[value]


def _parsed(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where} is not JSON ({error.msg} at character {error.pos}).") from error


def _list_of_objects(value: object, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise UsageError(f"{where} is {_kind(value)}, not a list of objects.")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "missing"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")


# --- files: JSON, JSONL, an imagefolder's metadata -------------------------------------------------------------------

URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
FILE_NAME = re.compile(r"(.*_)?file_name")  # an imagefolder's image column(s): file_name, front_file_name, ...


def read_records(path: Path) -> list[tuple[str, str, dict]]:
    """Every record of a .json (a list of objects), .jsonl or .csv file: where it stands ("FILE line N"), the
    data_id it gets if it has none ("FILE:N"), and the record."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as file:
            return [(f"{path} line {number}", f"{path.name}:{number}", dict(row))
                    for number, row in enumerate(csv.DictReader(file), start=2)]  # line 1: the header
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [(f"{path} line {number}", f"{path.name}:{number}",
                 _object(_parsed(line, f"{path} line {number}"), f"{path} line {number}"))
                for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    document = _parsed(text, str(path))
    if not isinstance(document, list):
        raise UsageError(f"{path} holds {_kind(document)}; a .json data file holds a list of rows (an object "
                         "each), a .jsonl file one object per line.")
    return [(f"{path} row {number}", f"{path.name}:{number}", _object(record, f"{path} row {number}"))
            for number, record in enumerate(document, start=1)]


def _object(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise UsageError(f"{where} is {_kind(record)}, not an object (one row).")
    return record


def file_rows(path: Path) -> list[dict]:
    """The engine rows of a data file, each image a path resolved from the file's folder, checked to exist."""
    rows = []
    for where, default_id, record in read_records(path):
        listed = record.get("images")
        if isinstance(listed, str):  # a CSV cell
            listed = _parsed(listed, f"{where}: its 'images'")
        if listed is not None and not isinstance(listed, list):
            raise UsageError(f"{where}: its 'images' is {_kind(listed)}, not a list of paths.")
        files = [record[key] for key in record if FILE_NAME.fullmatch(key) and record[key]]  # in the file's order
        messages, images = engine_messages(record, where, listed if listed is not None else files or None)
        paths = [str(_image_path(image, path.parent, where)) for image in images]
        rows.append(engine_row(record, default_id, messages, paths))
    return rows


def engine_row(record: dict, default_id: str, messages: list[dict], images: list[Picture]) -> dict:
    """The engine's columns for a record, with its other plain fields (strings, numbers) as strings, which
    --split-by can name."""
    extra = {key: str(value) for key, value in record.items()
             if key not in (*DIALOG_FIELDS, "answer", *ENGINE_FIELDS) and not FILE_NAME.fullmatch(key)
             and isinstance(value, str | int | float | bool)}
    names = "; ".join(Path(image).name for image in images if isinstance(image, str))
    return {**extra, "data_id": str(record.get("data_id", record.get("id", default_id))),
            "item_name": str(record.get("item_name", "")), "image_name": str(record.get("image_name", names)),
            "dialog": json.dumps({"messages": messages}), "images": images}


def _image_path(image: Picture, folder: Path, where: str) -> Path:
    if not isinstance(image, str):
        raise UsageError(f"{where}: an image is {_kind(image)}, not a path.")
    if URL.match(image):
        raise UsageError(f"{where}: the image {image!r} is a URL, which was not fetched (this engine reads images "
                         "from files); download it and give its path.")
    resolved = folder / image
    if not resolved.is_file():
        raise UsageError(f"{where}: the image {image!r} does not exist (looked for {str(resolved)!r}).")
    return resolved
