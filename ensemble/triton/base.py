"""The shape every feedserve python backend shares.

Triton hands `execute` a list of requests that the dynamic batcher grouped. One malformed request
must fail alone with INVALID_ARG while the others succeed, so each request is parsed (and
validated) on its own, the valid ones are computed together, and responses keep request order.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from feedserve.artifacts import ARTIFACTS_ENV, ArtifactLayout, default_artifacts_dir
from feedserve.errors import FeedserveError
from feedserve.schema import IO, ModelName
from feedserve.triton.compat import pb_utils

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
P = TypeVar("P")


class RequestError(FeedserveError, ValueError):
    """A problem with one request's input; reported to its client as INVALID_ARG."""


class Unavailable(RequestError):
    """The model could not serve this request now, through no fault of its input (a disk error while
    logging a write); reported as UNAVAILABLE, so a client retries instead of dropping the request."""


class InternalError(RequestError):
    """Reading one request hit a bug rather than bad input; reported as INTERNAL, to that request alone."""


class BatchModel(ABC, Generic[P]):
    """Subclasses set `name` and implement `setup`, `parse` and `compute`."""

    name: ModelName

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":
            # A KIND_GPU instance runs on the device Triton placed it on.
            params["device"] = f"cuda:{args.get('model_instance_device_id', '0')}"
        artifacts = Path(params.get("artifacts") or os.environ.get(ARTIFACTS_ENV) or default_artifacts_dir())
        logger.info("%s: loading artifacts from %s", self.name, artifacts)
        self.setup(ArtifactLayout(artifacts), params)

    @abstractmethod
    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None: ...

    @abstractmethod
    def parse(self, inputs: dict[str, np.ndarray | None]) -> P:
        """Validate one request's inputs; raise RequestError naming the bad tensor or field."""

    @abstractmethod
    def compute(self, items: Sequence[P]) -> list[Arrays | RequestError]:
        """Outputs for every parsed request, in order (or the RequestError of that one request)."""

    def run(self, batch: Sequence[dict[str, np.ndarray | None]]) -> list[Arrays | RequestError]:
        """The per-request error isolation, on plain numpy: what `execute` does minus Triton."""
        results: list[Arrays | RequestError | None] = [None] * len(batch)
        parsed: list[tuple[int, P]] = []
        for i, inputs in enumerate(batch):
            try:
                parsed.append((i, self.parse(inputs)))
            except RequestError as err:
                results[i] = err
            except Exception as err:  # a parser bug must not fail the requests batched with this one
                logger.exception("%s: reading request %d failed", self.name, i)
                results[i] = InternalError(f"{self.name}: could not read the request ({type(err).__name__}: {err})")
        if parsed:
            for (i, _), out in zip(parsed, self.compute([p for _, p in parsed]), strict=True):
                results[i] = out
        return [r for r in results if r is not None]

    # --- Triton glue -------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        io = IO[self.name]
        batch = []
        for request in requests:
            inputs: dict[str, np.ndarray | None] = {}
            for spec in io.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                inputs[spec.name] = None if tensor is None else tensor.as_numpy()
            batch.append(inputs)
        responses = []
        for result in self.run(batch):
            if isinstance(result, RequestError):
                code = pb_utils.TritonError.INVALID_ARG
                if isinstance(result, Unavailable):
                    code = pb_utils.TritonError.UNAVAILABLE
                elif isinstance(result, InternalError):
                    code = pb_utils.TritonError.INTERNAL
                error = pb_utils.TritonError(str(result), code)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        logger.info("%s: unloaded", self.name)


def require(inputs: dict[str, np.ndarray | None], name: str) -> np.ndarray:
    value = inputs.get(name)
    if value is None:
        raise RequestError(f"input tensor {name} is missing")
    return value


def check_2d(name: str, value: np.ndarray, dtype: type) -> np.ndarray:
    if value.dtype != np.dtype(dtype):
        raise RequestError(f"{name}: expected dtype {np.dtype(dtype).name}, got {value.dtype.name}")
    if value.ndim != 2:
        raise RequestError(f"{name}: expected shape [batch, n], got {list(value.shape)}")
    return value
