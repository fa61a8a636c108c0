"""The access log: one line per HTTP request, when its response has ended. As text it reads as a sentence;
with `--log-format json` its fields are the line's JSON keys (engine/log_setup.py). Prompts and outputs
appear only with `--log-prompts`."""
from __future__ import annotations

import json
import logging

from .observe import UNTRACED_PATHS, RequestRecord

logger = logging.getLogger("tokenmill.access")


class AccessLog:
    def __init__(self, log_prompts: bool = False):
        self.log_prompts = log_prompts

    def write(self, r: RequestRecord) -> None:
        level = logging.DEBUG if r.path in UNTRACED_PATHS else logging.INFO
        if not logger.isEnabledFor(level):
            return
        t = r.times
        fields = {
            "request_id": r.request_id, "method": r.method, "path": r.path, "route": r.route, "status": r.status,
            "client": r.client, "model": r.model, "version": r.version,
            "prompt_tokens": r.prompt_tokens if r.num_engine_requests else None,
            "output_tokens": r.output_tokens if r.num_engine_requests else None,
            "finish_reason": ",".join(r.finish_reasons) or None,
            "queue_time": _seconds(t and t.queue_time), "ttft": _seconds(t and t.time_to_first_token),
            "duration": _seconds(r.duration), "trace_id": r.trace_id,
        }
        message = _sentence(r)
        if self.log_prompts and r.num_engine_requests:
            fields["prompt"], fields["output"] = r.prompts, r.outputs
            message += (f"; prompt {json.dumps(r.prompts, ensure_ascii=False)}"
                        f", output {json.dumps(r.outputs, ensure_ascii=False)}")
        logger.log(level, message, extra={k: v for k, v in fields.items() if v is not None})


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _sentence(r: RequestRecord) -> str:
    line = f'{r.client or "-"} "{r.method} {r.path}" {r.status} request {r.request_id}'
    if r.model:
        line += f" model {r.model}" + (f":{r.version}" if r.version else "")
    if r.num_engine_requests:
        ttft = r.times and r.times.time_to_first_token
        line += (f": prompt {r.prompt_tokens} tokens, output {r.output_tokens} tokens"
                 f" ({','.join(r.finish_reasons) or 'unfinished'}), TTFT "
                 + (f"{ttft:.3f}s" if ttft is not None else "-"))
    return line + f", total {r.duration:.3f}s"
