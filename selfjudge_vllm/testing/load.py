"""Mixed-load driver for `vllm serve` with the judge (used by the load test and
benchmarks/soak.py). Talks only to servers on 127.0.0.1; every loop is bounded in count
and time.

A workload mixes streaming and non-streaming completions, judged and lossless
(`selfjudge_enabled: false`) requests, greedy and sampled, with random lengths; a share of
streams is dropped by the client mid-way. Lossless greedy responses are compared with the
same request on a reference server without the judge.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from selfjudge_vllm.server_process import Server, exit_cleanly_on_sigterm, free_port, parse_metric, serve_command  # noqa: F401

WORDS = ("one two three four five six seven eight nine ten the model token draft judge "
         "accept verify river stone house tree red green blue").split()


@dataclass
class LoadReport:
    requests: int = 0
    served: int = 0
    errors: list[str] = field(default_factory=list)
    dropped_streams: int = 0
    latencies_s: list[float] = field(default_factory=list)
    lossless_greedy_checked: int = 0
    lossless_mismatches: int = 0

    def percentile(self, q: float) -> float:
        data = sorted(self.latencies_s)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


def make_requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        greedy = rng.random() < 0.6
        requests.append({
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            "max_tokens": rng.randint(4, 48),
            "temperature": 0.0 if greedy else rng.choice([0.7, 1.0]),
            "top_p": 1.0 if greedy else rng.choice([0.9, 1.0]),
            "lossless": i % 2 == 1,  # half judged, half lossless
            "stream": rng.random() < 0.5,
            "drop_after": rng.randint(1, 3) if rng.random() < 0.1 else None,  # client hangs up
        })
    return requests


async def _one(client, model, req, report: LoadReport, texts: dict, index: int, timeout: float):
    extra = {"vllm_xargs": {"selfjudge_enabled": "false"}} if req["lossless"] else {}
    start = time.monotonic()
    try:
        if req["stream"]:
            stream = await client.completions.create(
                model=model, prompt=req["prompt"], max_tokens=req["max_tokens"],
                temperature=req["temperature"], top_p=req["top_p"], stream=True,
                extra_body=extra, timeout=timeout)
            pieces, chunks = [], 0
            async for chunk in stream:
                chunks += 1
                pieces.append(chunk.choices[0].text if chunk.choices else "")
                if req["drop_after"] is not None and chunks >= req["drop_after"]:
                    await stream.close()  # the client disconnects mid-stream
                    report.dropped_streams += 1
                    return
            text = "".join(pieces)
        else:
            out = await client.completions.create(
                model=model, prompt=req["prompt"], max_tokens=req["max_tokens"],
                temperature=req["temperature"], top_p=req["top_p"], extra_body=extra,
                timeout=timeout)
            text = out.choices[0].text
        report.served += 1
        report.latencies_s.append(time.monotonic() - start)
        texts[index] = text
    except Exception as exc:  # every failure is reported, none is hidden
        report.errors.append(f"request {index}: {type(exc).__name__}: {exc}")


async def drive(base_url: str, requests: list[dict], concurrency: int, model="tiny",
                timeout: float = 120.0) -> tuple[LoadReport, dict[int, str]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    report, texts = LoadReport(requests=len(requests)), {}
    gate = asyncio.Semaphore(concurrency)

    async def bounded(i, req):
        async with gate:
            await _one(client, model, req, report, texts, i, timeout)

    await asyncio.gather(*(bounded(i, r) for i, r in enumerate(requests)))
    await client.close()
    return report, texts


async def reference_texts(base_url: str, requests: list[dict], indices: list[int], model="tiny") -> dict[int, str]:
    """Greedy responses of a reference (no-judge) server for the given requests."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    out = {}
    for i in indices:
        r = requests[i]
        resp = await client.completions.create(model=model, prompt=r["prompt"], max_tokens=r["max_tokens"],
                                               temperature=0.0, timeout=120)
        out[i] = resp.choices[0].text
    await client.close()
    return out


def check_lossless(report: LoadReport, requests, texts, reference: dict[int, str]) -> None:
    for i, expected in reference.items():
        if i in texts:
            report.lossless_greedy_checked += 1
            report.lossless_mismatches += texts[i] != expected


def lossless_greedy_indices(requests, texts) -> list[int]:
    return [i for i, r in enumerate(requests)
            if r["lossless"] and r["temperature"] == 0.0 and i in texts]
