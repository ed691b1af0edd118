"""Chat records from JSONL, in the InternVL/LLaVA layout or OpenAI's `messages` layout.

InternVL/LLaVA:  {"image": "a.png" | ["a.png", ...], "conversations": [{"from": "human",
                  "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}
OpenAI:          {"messages": [{"role": "user", "content": "..." | [{"type": "text", "text": ...},
                  {"type": "image_url", "image_url": {"url": "a.png" | "data:image/png;base64,..."}}]},
                  {"role": "assistant", "content": "..."}]}
                 (also "developer" turns, read as system turns; assistant turns with "tool_calls"
                 and "tool" turns with the results, rendered by the model's chat template)

Both become a `ChatRecord`: messages whose text carries one `<image>` placeholder per image, and
the images in order. Every problem is a `DataError` naming the file and line.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lorafleet.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    text: str
    # assistant turns: the calls it made, as chat templates take them:
    # [{"type": "function", "function": {"name": ..., "arguments": {...}}}]
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None  # tool turns: the call this result answers


@dataclass
class ChatRecord:
    messages: list[Message]
    images: list[Path | bytes] = field(default_factory=list)  # a file, or the bytes of a data URL
    source: str = ""  # "file:line", for error messages

    def load_images(self) -> list[Image.Image]:
        loaded = []
        for image in self.images:
            try:
                opened = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
                loaded.append(opened.convert("RGB"))
            except FileNotFoundError as err:
                raise DataError(f"{self.source}: image {image} does not exist") from err
            except OSError as err:
                raise DataError(f"{self.source}: cannot read image {_describe(image)}: {err}") from err
        return loaded


def read_records(path: str | Path, skip_bad: bool = False) -> tuple[list[ChatRecord], list[str]]:
    """All records of a JSONL file, and (with `skip_bad`) the errors of the ones skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    records, skipped = [], []
    for record_or_error in iter_records(path):
        if isinstance(record_or_error, ChatRecord):
            records.append(record_or_error)
        elif skip_bad:
            skipped.append(str(record_or_error))
        else:
            raise record_or_error
    if not records:
        raise DataError(f"{path}: no usable records" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return records, skipped


def iter_records(path: Path) -> Iterator[ChatRecord | DataError]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            source = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield DataError(f"{source}: not UTF-8 text (byte {err.start + 1} of the line); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield parse_record(line, path.parent, source)
            except DataError as err:
                yield err


@dataclass
class JsonlLines:
    lines: list[tuple[int, str]]  # (line number, line) of the non-blank lines that decode
    errors: list[tuple[int, str]]  # (line number, "file:line: ...") of each line that is not UTF-8, in order


def read_jsonl(path: Path) -> JsonlLines:
    """The lines of a JSONL file, each decoded on its own: one line that is not UTF-8 is an error
    naming that line, and the others are still read. A file that cannot be one (missing,
    unreadable, empty, binary) is a DataError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"{path} does not exist") from err
    except IsADirectoryError as err:
        raise DataError(f"{path} is a directory; pass a JSONL file") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from err
    if not data.strip():
        raise DataError(f"{path} is empty: a data file has one JSON record per line")
    if b"\0" in data:
        raise DataError(f"{path} is a binary file, not JSONL text (one JSON record per line)")
    read = JsonlLines([], [])
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as err:
            where = f"{path}:{number}: not UTF-8 text (byte {err.start + 1} of the line is 0x{raw[err.start]:02x})"
            read.errors.append((number, where + "; save the file as UTF-8"))
            continue
        if line.strip():
            read.lines.append((number, line))
    return read


def read_jsonl_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a UTF-8 JSONL file, or a DataError that says
    why the file cannot be one, naming the first line that is not UTF-8."""
    read = read_jsonl(path)
    if read.errors:
        more = f" (and {len(read.errors) - 1} more lines)" if len(read.errors) > 1 else ""
        raise DataError(read.errors[0][1] + more)
    return read.lines


def json_object(line: str, source: str) -> dict:
    """One JSONL line as the JSON object a record is, or a DataError naming `source`."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}: not valid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(raw, dict):
        raise DataError(f"{source}: a record must be a JSON object")
    return raw


def parse_record(line: str, root: Path, source: str) -> ChatRecord:
    raw = json_object(line, source)
    if "conversations" in raw:
        record = _parse_internvl(raw, root, source)
    elif "messages" in raw:
        record = _parse_openai(raw, root, source)
    else:
        raise DataError(f"{source}: a record needs 'conversations' (InternVL/LLaVA) or 'messages' (OpenAI)")
    _check(record)
    return record


def _parse_internvl(raw: dict, root: Path, source: str) -> ChatRecord:
    turns = raw["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: 'conversations' must be a non-empty list")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"{source}: conversations[{index}] needs 'from' (human/gpt/system) and a string 'value'")
        messages.append(Message(_ROLES[turn["from"]], turn["value"]))
    image_field = raw.get("image", [])
    names = [image_field] if isinstance(image_field, str) else image_field
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DataError(f"{source}: 'image' must be a path or a list of paths")
    images: list[Path | bytes] = [root / name for name in names]
    text = "".join(m.text for m in messages)
    if images and IMAGE_PLACEHOLDER not in text:
        # InternVL's convention: an image with no placeholder goes before the first user turn.
        first_user = next((m for m in messages if m.role == "user"), None)
        if first_user is not None:
            first_user.text = (IMAGE_PLACEHOLDER + "\n") * len(images) + first_user.text
    return ChatRecord(messages, images, source)


def _parse_openai(raw: dict, root: Path, source: str) -> ChatRecord:
    messages, images = parse_openai_messages(
        raw["messages"], source, lambda url, where: _image_source(url, root, where)
    )
    return ChatRecord(messages, images, source)


def parse_openai_messages(
    turns: object, source: str, resolve_image: Callable[[str, str], Path | bytes]
) -> tuple[list[Message], list[Path | bytes]]:
    """OpenAI chat messages as our messages and images; `resolve_image(url, where)` fetches an image."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: 'messages' must be a non-empty list")
    messages, images = [], []
    for index, turn in enumerate(turns):
        where = f"{source}: messages[{index}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or turn["role"] not in _OPENAI_ROLES:
            raise DataError(f"{where} needs a 'role' of system, developer, user, assistant or tool")
        role = _OPENAI_ROLES[turn["role"]]
        content = turn.get("content")
        calls = _tool_calls(turn.get("tool_calls"), where) if role == "assistant" else None
        if isinstance(content, str) or (content is None and calls):
            text = _plain_text(content or "", where)
            messages.append(Message(role, text, calls, _tool_call_id(turn, role, where)))
            continue
        if not isinstance(content, list):
            raise DataError(f"{where}: 'content' must be a string or a list of parts")
        text = ""
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text += _plain_text(part["text"], where)
            elif kind == "image_url" and isinstance(part.get("image_url"), dict) and "url" in part["image_url"]:
                url = part["image_url"]["url"]
                if not isinstance(url, str):
                    raise DataError(f"{where}: image_url.url must be a string (a data: URL), got {type(url).__name__}")
                images.append(resolve_image(url, where))
                text += IMAGE_PLACEHOLDER + "\n"
            else:
                raise DataError(f"{where}: a content part must be {{'type': 'text'}} or {{'type': 'image_url'}}")
        messages.append(Message(role, text, calls, _tool_call_id(turn, role, where)))
    return messages, images


_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _tool_calls(calls: object, where: str) -> list[dict] | None:
    """An assistant turn's OpenAI `tool_calls` as chat templates take them (arguments as an object)."""
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise DataError(f"{where}: 'tool_calls' must be a list")
    converted = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: tool_calls[{number}] needs a 'function' with a 'name'")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError as err:
                raise DataError(f"{where}: tool_calls[{number}].function.arguments is not valid JSON") from err
        function = {"name": function["name"], "arguments": arguments}
        converted.append({"type": "function", "id": call.get("id"), "function": function})
    return converted


def _tool_call_id(turn: dict, role: str, where: str) -> str | None:
    if role != "tool":
        return None
    if not isinstance(turn.get("tool_call_id"), str):
        raise DataError(f"{where}: a tool turn needs the 'tool_call_id' of the call it answers")
    return turn["tool_call_id"]


def _plain_text(text: str, where: str) -> str:
    """Text of an OpenAI-layout message: valid Unicode, and no image placeholder (images come as
    image_url parts; a typed one would be taken for an image that is not there)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: the text is not valid Unicode ({err.reason} at character {err.start})") from err
    if IMAGE_PLACEHOLDER in text:
        raise DataError(f"{where}: the text contains {IMAGE_PLACEHOLDER}; send images as image_url parts")
    return text


def decode_data_url(url: str, where: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise DataError(f"{where}: data URLs must be base64 encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise DataError(f"{where}: image data URL is not valid base64") from err


def _image_source(url: str, root: Path, where: str) -> Path | bytes:
    if url.startswith("data:"):
        return decode_data_url(url, where)
    if "://" in url and not url.startswith("file://"):
        raise DataError(f"{where}: training data must be local; {url!r} is a remote URL")
    return root / url.removeprefix("file://")


def _check(record: ChatRecord) -> None:
    placeholders = sum(m.text.count(IMAGE_PLACEHOLDER) for m in record.messages)
    if placeholders != len(record.images):
        raise DataError(f"{record.source}: {placeholders} '<image>' placeholders but {len(record.images)} images")
    if not any(m.role == "assistant" for m in record.messages):
        raise DataError(f"{record.source}: no assistant turn, so nothing to learn from this record")


def _describe(image: Path | bytes) -> str:
    return str(image) if isinstance(image, Path) else f"(data URL, {len(image)} bytes)"


def image_fields(raw: dict) -> Iterator[tuple[dict | list, str | int]]:
    """(container, key) of every image reference of a raw record: InternVL's `image` (a path or a
    list of paths) and the `url` of OpenAI image_url parts (a path or a data URL)."""
    image = raw.get("image")
    if isinstance(image, str):
        yield raw, "image"
    for index in range(len(image)) if isinstance(image, list) else []:
        yield image, index
    for message in raw.get("messages") or []:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                yield part["image_url"], "url"


def write_atomically(path: Path, text: str) -> None:
    """Write beside `path` and rename over it: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
