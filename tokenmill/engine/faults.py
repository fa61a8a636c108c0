"""Fault injection: make chosen requests or steps fail on purpose, to prove that failures stay contained.

Set EngineConfig.fault_injection (or `tokenmill serve --fault-injection`) to a comma-separated list:
  request:MARKER  processing a request whose prompt contains MARKER fails after each sampled token
                  (where detokenizing and stop checks run): that request alone must end with an error
  sampler:MARKER  the batched sampler fails whenever such a request is in the batch: the engine must
                  resample the other rows on their own and fail only that request
  step:N          every step from the N-th on fails (a lost device): the engine must die loudly
Off (None) in normal use; it costs one attribute check per step then.
"""
from __future__ import annotations

from dataclasses import dataclass


class InjectedFault(RuntimeError):
    """The error an injected fault raises."""


@dataclass(frozen=True)
class FaultInjector:
    request_marker: str | None = None
    sampler_marker: str | None = None
    fail_from_step: int | None = None

    @classmethod
    def parse(cls, spec: str | None) -> FaultInjector | None:
        if not spec:
            return None
        fields: dict = {}
        for item in spec.split(","):
            site, _, arg = item.strip().partition(":")
            if site == "request" and arg:
                fields["request_marker"] = arg
            elif site == "sampler" and arg:
                fields["sampler_marker"] = arg
            elif site == "step" and arg.isdigit() and int(arg) >= 1:
                fields["fail_from_step"] = int(arg)
            else:
                raise ValueError(f"fault_injection: cannot read {item!r}; expected request:MARKER, "
                                 "sampler:MARKER or step:N (N >= 1)")
        return cls(**fields)

    def on_step(self, step: int) -> None:
        if self.fail_from_step is not None and step >= self.fail_from_step:
            raise InjectedFault(f"injected step fault (step {step})")

    def on_sample(self, prompts: list[str]) -> None:
        if self.sampler_marker is not None and any(self.sampler_marker in p for p in prompts):
            raise InjectedFault("injected sampler fault")

    def on_token(self, prompt: str) -> None:
        if self.request_marker is not None and self.request_marker in prompt:
            raise InjectedFault("injected request fault")
