"""``SamplingClient``: generate from a training client's live weights or from a saved artifact."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Optional, Union

from .futures import Future
from .types import ComputeLogprobsRequest, ComputeLogprobsResult, SampleRequest, SampleResult

if TYPE_CHECKING:
    from .service_client import ServiceClient


class SamplingClient:
    def __init__(self, service: "ServiceClient", client_id: str, *, owned: bool):
        self._service = service
        self.id = client_id
        self._owned = owned  # a sampler of its own (from an artifact), not a view on a training client
        self._queue = service._queue_for(client_id)

    def __repr__(self) -> str:
        return f"<SamplingClient {self.id}>"

    def sample(self, prompt: Union[str, list[int]], max_tokens: int = 16, temperature: float = 1.0,
               top_p: float = 1.0, top_k: Optional[int] = None, stop: Optional[list[Union[str, int]]] = None,
               seed: Optional[int] = None, num_samples: int = 1) -> Future[SampleResult]:
        request = SampleRequest(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, stop=stop, seed=seed, num_samples=num_samples)
        return self._queue.submit(request)

    def compute_logprobs(self, tokens: list[int]) -> Future[ComputeLogprobsResult]:
        """Log-probability of each token given the ones before it (None for the first)."""
        return self._queue.submit(ComputeLogprobsRequest(tokens=list(tokens)))

    async def sample_async(self, prompt: Union[str, list[int]], **kwargs) -> Future[SampleResult]:
        return await asyncio.to_thread(lambda: self.sample(prompt, **kwargs))

    def close(self) -> None:
        if self._owned:
            self._service._terminate(self.id)
