"""One choice's output as the API shows it: committed token ids in, text / reasoning / tool-call deltas out.

The same objects drive streaming and non-streaming answers (a non-streaming answer is the sum of the deltas),
so both always agree. Text is decoded from all committed ids each time and only the stable part is released:
a trailing partial UTF-8 character and a trailing prefix of a stop string are held back until the next canvas
decides them (or the request ends).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dgemma.chat_format import ReasoningStreamParser, ToolCall, ToolCallStreamParser


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in `text`, or None."""
    best = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may still turn into a stop string or a complete character."""
    hold = 0
    for stop in stops:
        for length in range(min(len(text), len(stop) - 1), 0, -1):
            if stop.startswith(text[-length:]):
                hold = max(hold, length)
                break
    replacement = len(text) - len(text.rstrip("\ufffd"))  # an incomplete multi-byte character decodes to U+FFFD
    return max(hold, replacement)


class TextAssembler:
    """Committed ids -> stable text deltas, cut at the first stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (), include_stop: bool = False):
        self.decode = decode
        self.stops = tuple(stops)
        self.include_stop = include_stop
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string ended the text

    def stop_fn(self) -> Callable[[list[int]], bool] | None:
        """For the engine (runs on its thread): True once the output contains a stop string."""
        if not self.stops:
            return None
        decode, stops = self.decode, self.stops
        return lambda ids: find_stop(decode(ids), stops) is not None

    def add(self, new_ids: Sequence[int], final: bool) -> str:
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        text = self.decode(self.ids)
        hit = find_stop(text, self.stops)
        if hit is not None:
            at, stop = hit
            text = text[: at + (len(stop) if self.include_stop else 0)]
            self.stopped = True
        elif not final:
            text = text[: len(text) - _held_back(text, self.stops)]
        # Text already sent stands, even in the rare case that decoding more ids rewrote its end.
        delta = text[len(self.sent):]
        if len(text) > len(self.sent):
            self.sent = text
        return delta


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI tool_call objects (with index, id, function)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChatChoice:
    """Splits a chat answer into reasoning, content and tool calls as the canvases arrive.

    `prefix` is text the prompt already wrote on the model's behalf (the opening of a forced tool call): it is
    fed to the parsers first, so a forced call parses like one the model wrote itself.
    """

    def __init__(self, assembler: TextAssembler, tools: list[dict] | None, parse_tools: bool,
                 include_reasoning: bool = True, parallel_tool_calls: bool = True, prefix: str = ""):
        self.text = assembler
        self.include_reasoning = include_reasoning
        self.parallel_tool_calls = parallel_tool_calls
        self.reasoning = ReasoningStreamParser()
        self.tool_parser = ToolCallStreamParser(tools) if parse_tools else None
        self._prefix = prefix
        self.calls: list[ToolCall] = []
        self.finished = False

    def feed(self, new_ids: Sequence[int], final: bool) -> Delta:
        delta_text = self._prefix + self.text.add(new_ids, final)
        self._prefix = ""
        reasoning, content = self.reasoning.feed(delta_text)
        calls: list[ToolCall] = []
        if self.tool_parser is not None:
            content, calls = self.tool_parser.feed(content)
        if final:
            tail_reasoning, tail_content = self.reasoning.finish()
            reasoning += tail_reasoning
            if self.tool_parser is not None:
                more, more_calls = self.tool_parser.feed(tail_content)
                last, last_calls = self.tool_parser.finish()
                content += more + last
                calls += more_calls + last_calls
            else:
                content += tail_content
            self.finished = True
        out = Delta(reasoning=reasoning if self.include_reasoning else "", content=content)
        for call in calls:
            if not self.parallel_tool_calls and self.calls:
                break  # parallel_tool_calls=false: the first call only
            out.tool_calls.append({
                "index": len(self.calls), "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json()},
            })
            self.calls.append(call)
        return out

    def finish_reason(self, engine_reason: str | None) -> str:
        if engine_reason == "abort":
            return "abort"
        if self.calls:
            return "tool_calls"
        if self.text.stopped:
            return "stop"
        return engine_reason or "stop"


class TextChoice:
    """A completion: plain text (with the prompt in front when echo is on)."""

    def __init__(self, assembler: TextAssembler, echo_text: str = ""):
        self.text = assembler
        self._echo = echo_text

    def feed(self, new_ids: Sequence[int], final: bool) -> str:
        out = self._echo + self.text.add(new_ids, final)
        self._echo = ""
        return out

    def finish_reason(self, engine_reason: str | None) -> str:
        if engine_reason == "abort":
            return "abort"
        if self.text.stopped:
            return "stop"
        return engine_reason or "stop"
