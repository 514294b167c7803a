"""A pipeline: models of the manifest chained, each step's instances becoming the next step's box prompts.

A manifest entry with ``steps`` in place of ``adapter`` is one::

    [models.text-sam]
    version = "1"
    steps = ["text-regions", "sam"]   # other models of this manifest, run in order

The steps run on the adapters their own models already set up in the worker
process (``AdapterContext.adapter``): a chain opens no session of its own and
shares its steps' encoder-cache entries, and a step's new version is picked up
by the chain as it is loaded.

- The job's prompts go to the first step. Each later step gets, per request,
  one box prompt per instance the step before found (the box around its mask):
  its instances are those boxes' (the first it gives for each box, best first,
  when it gives several), labelled, numbered and framed as the instance the box
  came from; the mask is the step's, and so is the score unless the option
  ``score = "first"`` keeps the first step's (a detector's confidence that the
  object is of the asked class, where the last step's, SAM's predicted IoU,
  rates only the mask's fit to the box it was given). A step before that found
  nothing ends the request with no instance (a step is never run without a
  prompt, which would mean "everything").
- What a pipeline can take (:func:`chain_capabilities`) is what its first step
  takes; it stacks batches only if every step does; every later step must take
  box prompts (:func:`check_chain`, when the manifest is read).
- A step's report (a SAM step's ``embedding``) and timings go to the job's, as
  if the step had run alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from domain.errors import ModelError
from models.adapters.base import (
    AdapterContext,
    AdapterOptions,
    Capabilities,
    Instance,
    ModelAdapter,
    Prompts,
    SegmentRequest,
)


def chain_capabilities(steps: Sequence[Capabilities]) -> Capabilities:
    """A pipeline's capabilities from its steps': the first step's prompts, batches only if all stack them."""
    first = steps[0]
    return Capabilities(first.prompt_kinds, first.requires_prompt, all(s.stacks_batches for s in steps))


def check_chain(names: Sequence[str], steps: Sequence[Capabilities]) -> None:
    """Raise ``ValueError`` unless every step after the first takes box prompts (what it is given)."""
    for name, capabilities in list(zip(names, steps))[1:]:
        if "boxes" not in capabilities.prompt_kinds:
            raise ValueError(
                f"step {name!r} cannot take box prompts, which a step after the first is given "
                f"(it takes: {', '.join(sorted(capabilities.prompt_kinds)) or 'none'})"
            )


def instance_box(instance: Instance) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` around an instance's mask pixels (the pixels' outer edges)."""
    ys, xs = np.nonzero(instance.mask)
    if not len(xs):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def with_prompts(request: SegmentRequest, prompts: Prompts) -> SegmentRequest:
    """The same request (image, tenant, report, timings shared) with other prompts."""
    return dataclasses.replace(request, prompts=prompts)


class PipelineOptions(AdapterOptions):
    """A pipeline's ``options`` in the manifest."""

    # Whose score an instance keeps: the last step's (the mask's maker) or the first step's (what found it).
    score: Literal["last", "first"] = "last"


class PipelineAdapter(ModelAdapter):
    """Runs the models of ``spec.steps`` in order, on their own adapters; see the module docstring."""

    Options = PipelineOptions

    def setup(self, context: AdapterContext) -> None:
        if not self.spec.steps:
            raise ModelError(f"model {self.name}: a pipeline needs steps")
        options = self.read_options()
        assert isinstance(options, PipelineOptions)
        self.keep_first_score = options.score == "first"
        self.steps: list[ModelAdapter] = [context.adapter(name) for name in self.spec.steps]

    def execution_providers(self) -> list[str]:
        return sorted({p for step in self.steps for p in step.execution_providers()})

    def segment(self, requests: Sequence[SegmentRequest]) -> list[list[Instance]]:
        first = results = self.steps[0].segment(requests)
        for step in self.steps[1:]:
            results = self._next(step, requests, results)
        if self.keep_first_score:  # each instance still is the first step's i-th, in its order
            results = [
                [dataclasses.replace(out, score=came.score) for came, out in zip(found, instances)]
                for found, instances in zip(first, results)
            ]
        return results

    def _next(
        self, step: ModelAdapter, requests: Sequence[SegmentRequest], found: list[list[Instance]]
    ) -> list[list[Instance]]:
        todo = [i for i, instances in enumerate(found) if instances]
        results: list[list[Instance]] = [[] for _ in requests]
        if not todo:
            return results
        boxed = [with_prompts(requests[i], Prompts(boxes=tuple(instance_box(x) for x in found[i]))) for i in todo]
        for i, instances in zip(todo, step.segment(boxed)):
            incoming = found[i]
            if not instances or len(instances) % len(incoming):
                raise ModelError(
                    f"model {self.name}: step {step.name!r} gave {len(instances)} instances for "
                    f"{len(incoming)} box prompts"
                )
            per_box = len(instances) // len(incoming)
            results[i] = [
                dataclasses.replace(out, label=came.label, object_id=came.object_id, frame=came.frame)
                for came, out in zip(incoming, instances[::per_box])
            ]
        return results
