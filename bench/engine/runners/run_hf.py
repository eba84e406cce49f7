"""Hugging Face transformers baselines: `sequential` (one request at a time, generate() per request)
and `static` (wait for a full batch of `batch` requests, left-pad, run generate() to the longest
output). Greedy, bfloat16, EOS suppressed via min_new_tokens so outputs have their exact length."""

from __future__ import annotations

import os
import sys
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from loadgen import Arrivals, Clock, Record, wait_until  # noqa: E402
from protocol import serve  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402


class _StepTimes(BaseStreamer):
    """generate() calls put() once with the prompt, then once per decoding step for the whole batch."""

    def __init__(self, on_step) -> None:
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_step()

    def end(self) -> None:
        pass


class HFRunner:
    def __init__(self, config: dict) -> None:
        torch.set_num_threads(int(config.get("threads", 2)))
        self.mode = config.get("mode", "sequential")
        self.max_wait_s = float(config.get("max_wait_s", 2.0))  # open-loop static batches flush after this
        self.model = AutoModelForCausalLM.from_pretrained(config["folder"], dtype=torch.bfloat16).eval()
        self.info = {"mode": self.mode, "dtype": "bfloat16", "threads": torch.get_num_threads()}

    def _generate(self, batch: list[tuple[dict, Record]], clock: Clock, sampling: dict) -> None:
        width = max(len(r["prompt_ids"]) for r, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (r, _) in enumerate(batch):  # left padding: every row's last prompt token aligns
            n = len(r["prompt_ids"])
            ids[i, width - n:] = torch.tensor(r["prompt_ids"])
            mask[i, width - n:] = 1
        longest = max(r["max_tokens"] for r, _ in batch)

        def on_step() -> None:
            now = clock()
            for _, rec in batch:
                if len(rec.times) < rec.max_tokens:
                    rec.token(now)

        temp = float(sampling.get("temperature", 0.0))
        extra = {"do_sample": True, "temperature": temp, "top_p": float(sampling.get("top_p", 1.0)),
                 "top_k": 0} if temp > 0 else {"do_sample": False}
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                                min_new_tokens=longest, pad_token_id=0, streamer=_StepTimes(on_step), **extra)

    def run(self, scenario: dict) -> list[Record]:
        arrivals, clock = Arrivals(scenario), Clock()
        batch_size = 1 if self.mode == "sequential" else (arrivals.concurrency or int(scenario.get("batch", 8)))
        records: list[Record] = []
        queue: deque[tuple[dict, Record]] = deque()
        while not arrivals.exhausted or queue:
            for item in arrivals.due(clock(), len(queue)):
                records.append(item[1])
                queue.append(item)
            full = len(queue) >= batch_size
            flush = queue and (arrivals.exhausted or (not arrivals.concurrency and clock() - queue[0][1].sent
                                                      >= self.max_wait_s))
            if full or flush:
                batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
                self._generate(batch, clock, scenario.get("sampling", {}))
                continue
            nxt = arrivals.next_arrival()
            if nxt is not None:
                deadline = queue[0][1].sent + self.max_wait_s if queue else nxt
                wait_until(clock, min(nxt, deadline))
        return records


if __name__ == "__main__":
    serve(HFRunner)
