"""Our engine in-process: TorchEngine driven through its asyncio generate() (the same API the
model server calls), prompts given as token ids, end-of-sequence ignored."""

from __future__ import annotations

import asyncio
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(os.path.dirname(HERE)))]

from loadgen import Arrivals, Clock, Record  # noqa: E402
from protocol import serve  # noqa: E402

from services.modelserver.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from services.modelserver.torch_engine import TorchEngine, TorchEngineConfig  # noqa: E402
from services.modelserver.torch_engine.engine_core import CoreRequest  # noqa: E402


class _TokenIdEngine(TorchEngine):
    """Takes the prompt's token ids from the request instead of tokenizing text."""

    def _prepare(self, request: GenerationRequest) -> CoreRequest:
        ids = getattr(request, "prompt_ids", None)
        if ids is None:  # start()'s warm-up request is text
            return super()._prepare(request)
        return CoreRequest(request_id="", prompt_ids=list(ids), sampling=request.sampling)


class MeshServeRunner:
    def __init__(self, config: dict) -> None:
        cfg = TorchEngineConfig(threads=int(config.get("threads", 2)), max_running=64,
                                kv_cache_bytes=int(config.get("kv_cache_bytes", 2 << 30)),
                                step_token_budget=int(config.get("step_token_budget", 512)),
                                max_context=2048, batch_invariant=bool(config.get("batch_invariant", False)),
                                int8_max_tokens=int(config.get("int8_max_tokens", 0)),
                                kv_cache_dtype=str(config.get("kv_cache_dtype", "auto")))
        self.loop = asyncio.new_event_loop()
        self.engine = _TokenIdEngine("smollm2", config.get("source", "embedded"), cfg)
        self.loop.run_until_complete(self.engine.start())
        assert self.engine.core is not None
        self.engine.core.eos_token_ids = frozenset()  # every request runs to its max_tokens
        from services.modelserver.torch_engine import ops

        self.info = {"dtype": str(self.engine.dtype), "threads": cfg.threads,
                     "kv_blocks": self.engine.core.blocks.num_blocks, "block_size": cfg.block_size,
                     "step_token_budget": cfg.step_token_budget, "cpu_ops": ops.status(),
                     "batch_invariant": cfg.batch_invariant, "int8_max_tokens": cfg.int8_max_tokens,
                     "kv_cache_dtype": cfg.kv_cache_dtype, "mode": "in-process TorchEngine"}

    def run(self, scenario: dict) -> list[Record]:
        return self.loop.run_until_complete(self._run(scenario))

    async def _one(self, req: dict, rec: Record, clock: Clock, sampling: dict) -> None:
        seed = sum(ord(c) for c in req["id"]) if sampling.get("temperature") else None
        params = SamplingParams(max_tokens=req["max_tokens"], temperature=float(sampling.get("temperature", 0.0)),
                                top_p=float(sampling.get("top_p", 1.0)), seed=seed)
        gr = GenerationRequest(req["id"], "smollm2", prompt="-", sampling=params)
        gr.prompt_ids = req["prompt_ids"]  # type: ignore[attr-defined]
        try:
            async for chunk in self.engine.generate(gr):
                if chunk.token_ids:
                    rec.token(clock(), len(chunk.token_ids))
        except Exception as e:  # noqa: BLE001 - recorded per request
            rec.error = repr(e)

    async def _run(self, scenario: dict) -> list[Record]:
        arrivals, clock = Arrivals(scenario), Clock()
        records: list[Record] = []
        tasks: set[asyncio.Task] = set()
        while not arrivals.exhausted or tasks:
            for req, rec in arrivals.due(clock(), len(tasks)):
                records.append(rec)
                tasks.add(asyncio.ensure_future(self._one(req, rec, clock, scenario.get("sampling", {}))))
            nxt = arrivals.next_arrival()
            timeout = None if nxt is None else max(0.0, nxt - clock())
            if tasks:
                done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                tasks -= done
            elif timeout is not None:
                await asyncio.sleep(timeout)
        return records


if __name__ == "__main__":
    serve(MeshServeRunner)
