"""Quality guard: the engine's answers against the fp32 reference on the same weights.

- Greedy answers on a fixed set of prompts: the engine (Engine.generate, the product's
  parameters) and plain transformers `generate` in fp32 with the same parameters (greedy, the same
  repetition penalty, the same stop tokens, the same budget). Counted as matching when the texts
  are equal.
- Perplexity of a fixed text (about 500 tokens: on a text of 100 the ratio moved by 4% with
  the rounding of one operation), read as the assistant's reply to a fixed question: through the
  engine's own scoring (Engine.score_reply, on the weights replies are decoded with) and through
  a plain fp32 forward pass. The ratio shows what an optimisation (e.g. quantisation) costs; the
  target allows 3%. Scored again by the engine as on a CPU with AVX2 and no AVX-512
  (workers.AVX2_ENV: its own kernels), under the same target.
"""

from __future__ import annotations

import math

from . import common, workers
from .report import Report, fmt

KEY = "quality"
ANSWER_TOKENS = 48

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain what a prime number is.",
    "Write a haiku about the sea.",
    "How do I make a cup of tea?",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Why do cats purr?",
]
SCORED_QUESTION = "Tell me about lighthouses."
SCORED_TEXT = (
    "Lighthouses are towers with a bright light at the top, built on coasts, islands and "
    "harbour walls to warn ships of danger and to guide them safely into port. The oldest "
    "known lighthouse stood at Alexandria in Egypt, where a fire burned on top of a stone "
    "tower more than a hundred metres tall. For many centuries afterwards, lights along the "
    "coast were little more than wood or coal fires in iron baskets, and on a stormy night "
    "they were hard to see and harder to keep alight.\n\n"
    "Everything changed in the nineteenth century. Oil lamps with hollow wicks gave a "
    "steadier flame, and the French engineer Augustin Fresnel designed a lens made of rings "
    "of glass prisms that gathered the light and sent it out in a narrow, powerful beam. A "
    "lamp that could be seen for a few kilometres could now be seen for more than thirty. The "
    "great lenses were turned by clockwork, so that the beam swept around the horizon and "
    "each lighthouse flashed in its own pattern. Sailors carried lists of these patterns, and "
    "by counting the seconds between flashes they could tell which light they were looking "
    "at and find their place on the chart.\n\n"
    "A keeper and his family usually lived beside the tower. Their work never ended: every "
    "evening the lamp had to be lit, the wick trimmed and the clockwork wound, and every "
    "morning the soot had to be cleaned from the glass. In fog they rang bells or sounded "
    "horns for hours at a time. Some lighthouses stood on lonely rocks far out at sea, where "
    "the keepers stayed for weeks before a boat could reach them with food and fresh water. "
    "Storms sometimes broke the windows at the top of the tower, and waves were known to "
    "throw stones as high as the lantern.\n\n"
    "In the twentieth century electricity replaced oil, and radio beacons and later satellite "
    "navigation gave ships other ways to find their position. One by one the lighthouses "
    "were made automatic. Today a computer switches the light on at dusk and off at dawn, and "
    "engineers watch over many towers from an office far away. The last keepers left their "
    "stations at the end of the century.\n\n"
    "Yet lighthouses have not disappeared. Many still shine every night, because a light on "
    "the shore is simple, cheap and works when other systems fail. Others have become "
    "museums, hotels or homes for artists. Visitors climb the narrow spiral stairs, look out "
    "over the water from the gallery, and imagine what it was like to keep the light burning "
    "through a long winter night."
)


def run(report: Report, quick: bool) -> None:
    section = report.section(KEY, "Quality guard: engine vs fp32 reference (same weights)")
    prompts = PROMPTS[:4] if quick else PROMPTS
    with (
        workers.engine_worker() as engine,
        workers.engine_worker(env=workers.AVX2_ENV) as avx2,
        workers.reference_worker() as reference,
    ):
        answers = []
        for prompt in prompts:
            messages = common.chat(prompt)
            ours = engine.request(op="generate", messages=messages, max_new_tokens=ANSWER_TOKENS)
            theirs = reference.request(
                op="generate",
                messages=messages,
                max_new_tokens=ANSWER_TOKENS,
                repetition_penalty=ours["params"]["repetition_penalty"],
            )
            answers.append({"prompt": prompt, "engine": ours["text"], "reference": theirs["text"]})
        params = ours["params"]
        # Scoring last, so that the answers above are timed and computed as on the server.
        messages = common.chat(SCORED_QUESTION)
        engine_logprob = engine.request(op="score", messages=messages, text=SCORED_TEXT)["logprob"]
        avx2_logprob = avx2.request(op="score", messages=messages, text=SCORED_TEXT)["logprob"]
        scored = reference.request(op="score", messages=messages, text=SCORED_TEXT)
    matching = sum(a["engine"] == a["reference"] for a in answers)
    tokens = scored["tokens"]
    engine_ppl = math.exp(-engine_logprob / tokens)
    reference_ppl = math.exp(-scored["logprob"] / tokens)
    ppl_ratio = engine_ppl / reference_ppl
    avx2_ppl = math.exp(-avx2_logprob / tokens)
    avx2_ratio = avx2_ppl / reference_ppl

    section.data.update(
        {
            "answers": answers,
            "matching": matching,
            "params": params,
            "scored_tokens": tokens,
            "engine_perplexity": engine_ppl,
            "reference_perplexity": reference_ppl,
            "perplexity_ratio": ppl_ratio,
            "avx2_perplexity": avx2_ppl,
            "avx2_perplexity_ratio": avx2_ratio,
        }
    )
    report.row(
        KEY,
        "Greedy answers equal to the fp32 reference",
        f"{matching} / {len(answers)}",
        f"up to {ANSWER_TOKENS} tokens each, the product's repetition penalty",
    )
    report.row(
        KEY,
        "Perplexity of a fixed text",
        f"engine {fmt(engine_ppl, 3)}",
        f"reference {fmt(reference_ppl, 3)}; ratio {ppl_ratio:.4f} over {tokens} tokens",
    )
    report.row(
        KEY,
        "Perplexity, AVX2 only",
        f"engine {fmt(avx2_ppl, 3)}",
        f"ratio {avx2_ratio:.4f}: torch limited to AVX2, our AVX2 kernels",
    )
    report.target(
        "Quality, AVX2 only: perplexity within 3% of fp32",
        "ppl ratio <= 1.03",
        f"{avx2_ratio:.4f}",
        avx2_ratio <= 1.03,
    )
    report.target(
        "Quality: same greedy answers, or perplexity within 3% of fp32",
        "all equal, or ppl ratio <= 1.03",
        f"{matching}/{len(answers)} equal; ppl ratio {ppl_ratio:.4f}",
        matching == len(answers) or ppl_ratio <= 1.03,
    )
