"""An ensemble of SmolLM2-135M members on 50 arithmetic questions (torch engine, one server).

Members differ in temperature, seed and prompt template; all serve from one deployment. Each
member is asked every question on its own (its accuracy), then the `qa` ensemble (majority vote
over the last number of each answer) is asked through Envoy like any model (the ensemble's
accuracy, as served). Weighted vote and best mean log-probability are computed from the members'
own answers with the router's combiner code (not served), to compare combiners on the same
answers. Reported as measured, whatever it shows.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from meshserve.v1 import traffic_pb2 as tp

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from services.router.traffic.combine import MemberAnswer, combine, normalise

from .common import Control

MODEL = "smollm2"
MAX_TOKENS = 24


@dataclass(frozen=True)
class Member:
    label: str
    temperature: float = 0.0
    seed: int | None = None
    template: str = ""
    weight: float = 1.0


MEMBERS = [
    Member("greedy", weight=2.0),
    Member("t0.7 seed 1", temperature=0.7, seed=1),
    Member("t0.7 seed 2", temperature=0.7, seed=2),
    Member("template: number only", template="{prompt} Reply with only the number."),
    Member("template: step by step", template="{prompt} Work it out, then give the result."),
]


def questions(n: int = 50, seed: int = 12) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        op = "+-*"[i % 3]
        value = a + b if op == "+" else a - b if op == "-" else a * b
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        out.append((f"What is {a} {word} {b}?", str(value)))
    return out


def plan(data_dir: Path) -> MeshPlan:
    return MeshPlan(data_dir=data_dir, base_port=0, routers=1, servers=[ServerPlan(
        "server-0", [f"{MODEL}=torch:embedded"],
        engine_options=["kv_cache_blocks=2048", "max_context=512", "max_running=64"])])


def _request(model: str, question: str, member: Member | None) -> inference_pb2.GenerateRequest:
    """A member's request as the ensemble would make it (template, sampling), or the plain one."""
    req = inference_pb2.GenerateRequest(model=model)
    text = member.template.replace("{prompt}", question) if member and member.template else question
    req.messages.add(role="user", content=text)
    req.sampling.max_tokens = MAX_TOKENS
    req.sampling.logprobs = True
    if member:
        req.sampling.temperature = member.temperature
        if member.seed is not None:
            req.sampling.seed = member.seed
    return req


async def _ask_all(stub, requests: list[inference_pb2.GenerateRequest], concurrency: int) -> list:
    gate = asyncio.Semaphore(concurrency)

    async def one(req):
        async with gate:
            try:
                return await stub.Generate(req, timeout=600)
            except grpc.aio.AioRpcError as exc:
                return exc
    return await asyncio.gather(*(one(r) for r in requests))


def _policy() -> tp.TrafficPolicy:
    members = []
    for m in MEMBERS:
        member = tp.EnsembleMember(target=MODEL, weight=m.weight, prompt_template=m.template)
        member.temperature = m.temperature
        if m.seed is not None:
            member.seed = m.seed
        members.append(member)
    return tp.TrafficPolicy(name="qa", ensemble=tp.EnsemblePolicy(
        members=members, combiner=tp.ENSEMBLE_COMBINER_MAJORITY, quorum=3, answer_format=tp.ANSWER_FORMAT_NUMBER))


async def run(data_dir: Path, quick: bool) -> dict:
    qs = questions(12 if quick else 50)
    mesh = LocalMesh(plan(data_dir))
    await asyncio.to_thread(mesh.start)
    ctl = Control(mesh)
    channel = grpc.aio.insecure_channel(mesh.envoy)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    try:
        await ctl.set_policy(_policy())
        await ctl.wait_ready(MODEL, 1, timeout=300)
        # 16 sequences in flight at a time: the engine batches them, and on a loaded 2-core machine
        # more would wait past the routers' 60 s first-token timeout. The ensemble: 3 questions
        # in flight are 15 member requests.
        flat = await _ask_all(stub, [_request(MODEL, q, m) for m in MEMBERS for q, _ in qs], 16)
        per_member = [flat[i * len(qs):(i + 1) * len(qs)] for i in range(len(MEMBERS))]
        served = await _ask_all(stub, [_request("qa", q, None) for q, _ in qs], 3)
        return _summary(qs, per_member, served)
    finally:
        await channel.close()
        await ctl.close()
        await asyncio.to_thread(mesh.stop)


def _text(answer: inference_pb2.GenerateResponse | Exception) -> str | None:
    return None if isinstance(answer, Exception) else answer.text


def _accuracy(qs: list[tuple[str, str]], answers: list) -> float:
    return sum(1 for (_, exp), a in zip(qs, answers, strict=True)
               if _text(a) is not None and normalise(_text(a) or "", "number") == exp) / len(qs)


def _summary(qs: list[tuple[str, str]], per_member: list[list], served: list) -> dict:
    n = len(qs)
    members = [{"member": m.label, "accuracy": _accuracy(qs, answers),
                "errors": sum(isinstance(a, Exception) for a in answers)}
               for m, answers in zip(MEMBERS, per_member, strict=True)]
    offline: dict[str, float] = {}
    for combiner in ("majority", "weighted_vote", "best_mean_logprob"):
        ok = 0
        for qi, (_, exp) in enumerate(qs):
            got = [MemberAnswer(i, a[qi].text, MEMBERS[i].weight, tuple(a[qi].logprobs))
                   for i, a in enumerate(per_member) if not isinstance(a[qi], Exception)]
            ok += bool(got) and normalise(combine(got, combiner, "number").text, "number") == exp
        offline[combiner] = ok / n
    errors = sorted({f"{a.code().name}: {a.details()}"[:200] for answers in [*per_member, served] for a in answers
                     if isinstance(a, grpc.aio.AioRpcError)})
    sample = [{"question": q, "expected": e, "ensemble": _text(a) or "ERROR",
               "members": [_text(pm[i]) or "ERROR" for pm in per_member]}
              for i, ((q, e), a) in enumerate(zip(qs, served, strict=True)) if i < 5]
    return {"questions": n, "members": members, "majority_served_accuracy": _accuracy(qs, served),
            "served_errors": sum(isinstance(a, Exception) for a in served), "error_kinds": errors[:5],
            "offline_accuracy": offline, "best_member_accuracy": max(_accuracy(qs, answers) for answers in per_member),
            "samples": sample, "max_tokens": MAX_TOKENS, "answer_format": "number (the last number)"}
