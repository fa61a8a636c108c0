"""Tool calling on the request side: which calls a request allows, the grammar that enforces `required`
and a named function, and the conversation as the chat template sees it.

A template that knows tools (it reads a `tools` variable: Qwen2.5, Llama 3.1, Hermes, ...) gets them,
and past calls and results, in the form transformers passes them. A template that does not (SmolLM2's)
gets the fallback: the tools, as JSON schemas, and how to call them, in the system message; past calls
written into the assistant's text in the server's tool format; results as a user turn of
<tool_response> blocks. Its replies are then parsed in that same format.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatMessage, ChatTool, NamedToolChoice
from .tool_parsers import ForcedCallsParser, NamedCallParser, ToolFormat, ToolParser

_TOOLS_VARIABLE = re.compile(r"\btools\b")


def template_knows_tools(template: str | dict | None) -> bool:
    """Whether a chat template renders a `tools` list (a dict of named templates: any of them)."""
    sources = template.values() if isinstance(template, dict) else [template or ""]
    return any(_TOOLS_VARIABLE.search(s) for s in sources)


@dataclass
class ToolRequest:
    """A chat request's tools and how it may call them: choice is "none", "auto", "required" or the
    name of the one function it must call."""

    tools: list[ChatTool]
    choice: str
    parallel: bool

    @classmethod
    def from_request(cls, req: ChatCompletionRequest) -> ToolRequest | None:
        """None when the request offers no tools; a 400 for a tool_choice its tools cannot meet."""
        if req.functions or req.function_call is not None:
            raise bad_request("functions and function_call are deprecated and not supported; use tools "
                              "and tool_choice", "functions")
        choice = req.tool_choice
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in req.tools or []]
            if choice.function.name not in names:
                raise bad_request(f"tool_choice names function {choice.function.name!r}, which is not among "
                                  f"the tools ({', '.join(map(repr, names)) or 'none given'})", "tool_choice")
            choice = choice.function.name
        elif not req.tools:
            if choice == "required":
                raise bad_request("tool_choice \"required\" needs tools", "tool_choice")
            return None
        names = [t.function.name for t in req.tools]
        if len(set(names)) < len(names):
            raise bad_request("tools: function names must be unique", "tools")
        return cls(req.tools, choice or "auto", req.parallel_tool_calls is not False)

    def constraint(self, arguments_key: str) -> dict | None:
        """The structured_outputs fields that force the calls, or None when the model chooses."""
        if self.choice in ("none", "auto"):
            return None
        schemas = {t.function.name: t.function.parameters or {"type": "object"} for t in self.tools}
        if self.choice != "required":
            return {"json": schemas[self.choice]}
        call = [{"type": "object", "properties": {"name": {"const": name}, arguments_key: schema},
                 "required": ["name", arguments_key], "additionalProperties": False}
                for name, schema in schemas.items()]
        calls = {"type": "array", "items": {"anyOf": call}, "minItems": 1}
        if not self.parallel:
            calls["maxItems"] = 1
        return {"json": calls}

    def parser(self, fmt: ToolFormat) -> ToolParser | None:
        """How replies are read: None when they are plain content."""
        if self.choice == "none":
            return None
        if self.choice == "auto":
            return fmt
        return ForcedCallsParser(fmt.arguments_key) if self.choice == "required" else NamedCallParser(self.choice)


def _arguments(text: str) -> dict | str:
    """A past call's arguments as templates take them: an object where the text is one."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def conversation(messages: list[ChatMessage], tools: ToolRequest | None, template: str | dict | None,
                 fmt: ToolFormat) -> tuple[list[dict], list[dict] | None]:
    """(the messages as the chat template takes them, the tools to pass it or None)."""
    offered = tools.tools if tools is not None and tools.choice != "none" else []
    native = template_knows_tools(template)
    out: list[dict] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls or []]
        if native:
            msg = {"role": role, "content": m.content or ""}
            msg.update({k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id)) if v is not None})
            if calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": call}
                                     for c, call in zip(m.tool_calls, calls, strict=True)]
            out.append(msg)
        elif role == "tool":
            result = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results: one turn
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            text = "\n".join(t for t in (m.content, fmt.render_calls(calls) if calls else None) if t)
            out.append({"role": role, "content": text})
    for msg in out:
        msg.pop("tool_results", None)
    if native:
        return out, [t.model_dump(exclude_none=True) for t in offered] or None
    if offered:
        prompt = _fallback_prompt(offered, tools.choice, fmt)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _fallback_prompt(tools: list[ChatTool], choice: str, fmt: ToolFormat) -> str:
    """The system text that offers tools to a model whose template knows none."""
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    ask = {"auto": "Call a function when it helps to answer; otherwise answer in plain text.",
           "required": "Answer by calling one or more of the functions."}.get(
        choice, f"Answer by calling the function {choice}.")
    return (f"You have functions you can call. Each is described by a JSON schema:\n<tools>\n{listed}\n</tools>\n"
            f"{fmt.instructions()}\n{ask}")
