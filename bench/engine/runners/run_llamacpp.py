"""llama.cpp through llama-cpp-python's low-level API, as a continuous-batching server would drive it
(llama-server's parallel slots): one llama_decode per step over every running sequence's next token
plus prefill chunks within a 512-token budget, each sequence in its own KV sequence id. Greedy argmax,
or llama.cpp's own sampler chain (top-p, temperature, seeded dist) for the sampled workload.

Best documented CPU configuration: threads = cores, flash attention on, n_batch = n_ubatch = the step
budget (one ubatch per step), and the AMX/repacked weight buffers (use_extra_bufts) on when Linux grants
this process the AMX tile state (requested here through arch_prctl, as torch's _init_amx does); where it
is not granted those buffers die with SIGILL, so they stay off and the run says so."""

from __future__ import annotations

import os
import sys
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ctypes  # noqa: E402

import llama_cpp as L  # noqa: E402
import numpy as np  # noqa: E402
from loadgen import Arrivals, Clock, Record, wait_until  # noqa: E402
from protocol import serve  # noqa: E402

BUDGET = 512  # tokens per llama_decode (n_batch), like our engine's step budget
SEQ_CTX = 800  # per-sequence KV slots: longest prompt 512 + longest output 256


class _Seq:
    def __init__(self, req: dict, rec: Record, slot: int) -> None:
        self.rec, self.slot = rec, slot
        self.prompt = req["prompt_ids"]
        self.pos = 0  # tokens already in this sequence's KV
        self.last = -1  # last sampled token (fed next step)


def request_amx() -> bool:
    """Ask Linux for the AMX tile-data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)."""
    if os.uname().machine != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl
    except (OSError, AttributeError):
        return False


def _enable_flash_attention(cp) -> str:
    names = {f[0] for f in type(cp)._fields_}
    if "flash_attn_type" in names:
        cp.flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED
        return "enabled"
    if "flash_attn" in names:
        cp.flash_attn = True
        return "enabled"
    return "not offered by this version"


class LlamaCppRunner:
    def __init__(self, config: dict) -> None:
        L.llama_backend_init()
        self.max_seqs = int(config.get("max_seqs", 64))
        threads = int(config.get("threads", 2))
        mp = L.llama_model_default_params()
        amx = request_amx()
        mp.use_extra_bufts = bool(config.get("extra_bufts", amx))
        self.model = L.llama_model_load_from_file(config["gguf"].encode(), mp)
        if not self.model:
            raise RuntimeError(f"cannot load {config['gguf']}")
        cp = L.llama_context_default_params()
        cp.n_ctx = SEQ_CTX * self.max_seqs
        cp.n_batch = cp.n_ubatch = BUDGET
        cp.n_seq_max = self.max_seqs
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False
        flash = _enable_flash_attention(cp)
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(BUDGET, 0, 1)
        self.info = {"threads": threads, "n_ctx": cp.n_ctx, "n_seq_max": self.max_seqs,
                     "llama_cpp_python": getattr(L, "__version__", "?"), "weights": "GGUF Q4_1 as shipped",
                     "extra_bufts": bool(mp.use_extra_bufts), "amx_granted": amx, "flash_attention": flash,
                     "n_batch": BUDGET, "n_ubatch": BUDGET}
        self.samplers: dict[int, object] = {}  # per slot, for the sampled workload

    def _sampler(self, slot: int, sampling: dict, seed: int):
        """A fresh chain per sequence: top-p, then temperature, then a seeded draw."""
        old = self.samplers.pop(slot, None)
        if old is not None:
            L.llama_sampler_free(old)
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(float(sampling["top_p"]), 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(float(sampling["temperature"])))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        self.samplers[slot] = chain
        return chain

    def _pick(self, items: list[tuple[_Seq, list[int], bool]], greedy: np.ndarray, sampled: bool) -> list[int]:
        """The next token of each logits row: argmax, or the row's sampler at its batch position."""
        if not sampled:
            return [int(t) for t in greedy]
        out, pos = [], 0
        for seq, toks, wants in items:
            pos += len(toks)
            if wants:
                out.append(int(L.llama_sampler_sample(self.samplers[seq.slot], self.ctx, pos - 1)))
        return out

    def _decode(self, items: list[tuple[_Seq, list[int], bool]], sampled: bool = False) -> np.ndarray:
        """One llama_decode over (sequence, tokens, wants logits); returns argmax per logits row."""
        b = self.batch
        n = 0
        for seq, toks, logits in items:
            for j, t in enumerate(toks):
                b.token[n] = t
                b.pos[n] = seq.pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq.slot
                b.logits[n] = logits and j == len(toks) - 1
                n += 1
            seq.pos += len(toks)
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = sum(1 for _, _, lg in items if lg)
        if not rows or sampled:
            return np.empty(0, dtype=np.int64)
        ptr = L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab)).argmax(axis=1)

    def run(self, scenario: dict) -> list[Record]:
        arrivals, clock = Arrivals(scenario), Clock()
        records: list[Record] = []
        waiting: deque[tuple[dict, Record]] = deque()
        running: list[_Seq] = []
        free = list(range(self.max_seqs))
        sampling = scenario.get("sampling") or {}
        sampled = float(sampling.get("temperature", 0.0)) > 0
        while not arrivals.exhausted or waiting or running:
            for item in arrivals.due(clock(), len(waiting) + len(running)):
                records.append(item[1])
                waiting.append(item)
            while waiting and free:
                req, rec = waiting.popleft()
                running.append(_Seq(req, rec, free.pop()))
                if sampled:
                    self._sampler(running[-1].slot, sampling, seed=len(records) + 1000 * running[-1].slot)
            if not running:
                nxt = arrivals.next_arrival()
                if nxt is not None:
                    wait_until(clock, nxt)
                continue
            budget = BUDGET
            items: list[tuple[_Seq, list[int], bool]] = []
            for s in running:  # decodes first, then prefill chunks
                if s.pos >= len(s.prompt) and budget:
                    items.append((s, [s.last], True))
                    budget -= 1
            for s in running:
                if s.pos < len(s.prompt) and budget:
                    chunk = s.prompt[s.pos:s.pos + budget]
                    items.append((s, chunk, s.pos + len(chunk) == len(s.prompt)))
                    budget -= len(chunk)
            tokens = self._pick(items, self._decode(items, sampled), sampled)
            now = clock()
            row = 0
            for s, _, wants in items:
                if not wants:
                    continue
                s.last = int(tokens[row])
                row += 1
                s.rec.token(now)
            for s in [s for s in running if s.rec.done]:
                L.llama_memory_seq_rm(self.mem, s.slot, -1, -1)
                free.append(s.slot)
                running.remove(s)
        return records


if __name__ == "__main__":
    serve(LlamaCppRunner)
