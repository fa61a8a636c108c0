"""An Anthropic Messages request in the chat plumbing's terms: chat messages for the chat template, the
tools and how they may be called (ToolRequest), and the sampling fields.

Content blocks map onto chat messages: text blocks join into one message's content; an assistant's
tool_use blocks become its tool calls; each tool_result becomes a tool message, in order (one whose
is_error is set starts with "Error: ", the only way a template can tell); past thinking blocks are
dropped, as chat templates drop past reasoning. Images are refused: the models served take text only.
"""
from __future__ import annotations

import json

from .errors import bad_request
from .protocol import ChatMessage, ChatTool, ChatToolCall, FunctionCall, FunctionDefinition, SamplingFields
from .protocol_anthropic import (
    ImageBlockParam,
    MessageParam,
    MessagesPrompt,
    MessagesRequest,
    TextBlockParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)
from .tools import ToolRequest

# Anthropic's tool_choice types as ToolRequest's choices ("tool" is the tool's name).
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _text(blocks: list[TextBlockParam | ImageBlockParam], where: str) -> str:
    for j, block in enumerate(blocks):
        if isinstance(block, ImageBlockParam):
            raise bad_request(f"{where}[{j}]: this model does not take images; send text blocks", f"{where}[{j}]")
    return "\n".join(block.text for block in blocks)


def _turn(i: int, m: MessageParam) -> list[ChatMessage]:
    """One message's chat messages: tool results each as a tool message, the rest as the role's message."""
    where = f"messages[{i}].content"
    if isinstance(m.content, str):
        return [ChatMessage(role=m.role, content=m.content)]
    out: list[ChatMessage] = []
    texts: list[str] = []
    calls: list[ChatToolCall] = []
    for j, block in enumerate(m.content):
        if isinstance(block, TextBlockParam):
            texts.append(block.text)
        elif isinstance(block, ImageBlockParam):
            _text([block], where)
        elif isinstance(block, ToolUseBlockParam):
            if m.role != "assistant":
                raise bad_request(f"{where}[{j}]: tool_use blocks belong in assistant messages", where)
            calls.append(ChatToolCall(id=block.id, function=FunctionCall(name=block.name,
                                                                         arguments=json.dumps(block.input))))
        elif isinstance(block, ToolResultBlockParam):
            if m.role != "user":
                raise bad_request(f"{where}[{j}]: tool_result blocks belong in user messages", where)
            if texts:  # text before a result stays before it
                out.append(ChatMessage(role="user", content="\n".join(texts)))
                texts = []
            result = block.content if isinstance(block.content, str) else _text(block.content or [],
                                                                                f"{where}[{j}].content")
            out.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                                   content=f"Error: {result}" if block.is_error else result))
    if texts or calls or not out:  # thinking blocks alone leave an empty turn, as the reply had no text
        out.append(ChatMessage(role=m.role, content="\n".join(texts) if texts or not calls else None,
                               tool_calls=calls or None))
    return out


def chat_messages(req: MessagesPrompt) -> list[ChatMessage]:
    """The request's system prompt and messages as chat messages. A 400 for a final assistant message:
    Anthropic continues it (a prefill), which the chat plumbing cannot do yet."""
    if req.messages[-1].role == "assistant":
        raise bad_request("messages: a final assistant message (prefill) is not supported; end with a user "
                          "message", "messages")
    out = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _text(req.system, "system")
        out.append(ChatMessage(role="system", content=system))
    for i, m in enumerate(req.messages):
        out += _turn(i, m)
    return out


def tool_request(req: MessagesPrompt) -> ToolRequest | None:
    """The tools and tool_choice as a ToolRequest (None without tools); a 400 for a choice they cannot meet."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice.type in ("any", "tool"):
            raise bad_request(f"tool_choice {choice.type!r} needs tools", "tool_choice")
        return None
    names = [t.name for t in req.tools]
    if len(set(names)) < len(names):
        raise bad_request("tools: tool names must be unique", "tools")
    if choice is not None and choice.type == "tool" and choice.name not in names:
        raise bad_request(f"tool_choice names tool {choice.name!r}, which is not among the tools "
                          f"({', '.join(map(repr, names))})", "tool_choice")
    tools = [ChatTool(type="function", function=FunctionDefinition(name=t.name, description=t.description,
                                                                   parameters=t.input_schema))
             for t in req.tools]
    kind = choice.type if choice is not None else "auto"
    parallel = not getattr(choice, "disable_parallel_tool_use", None)
    return ToolRequest(tools, choice.name if kind == "tool" else _CHOICES[kind], parallel)


def sampling_fields(req: MessagesRequest) -> SamplingFields:
    """The request's sampling fields under the names the chat plumbing reads (api/errors_anthropic.py
    renames them back in errors); output_config.format is a JSON schema constraint."""
    output = req.output_config.format if req.output_config else None
    return SamplingFields(stream=req.stream, stop=req.stop_sequences, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, structured_outputs={"json": output.schema_} if output else None)


def shows_thinking(req: MessagesPrompt) -> bool:
    """Whether the reply shows the model's reasoning (found by a reasoning parser) as thinking blocks."""
    return req.thinking is not None and req.thinking.type != "disabled"
