"""Quality guard: the engine's answers against the fp32 reference on the same weights.

- Greedy answers on a fixed set of prompts: the engine (Engine.generate, the product's
  parameters) and plain transformers `generate` in fp32 with the same parameters (greedy, the same
  repetition penalty, the same stop tokens, the same budget). Counted as matching when the texts
  are equal.
- Perplexity of a fixed text, read as the assistant's reply to a fixed question: through the
  engine's own scoring (Engine.score_reply, on the weights replies are decoded with) and through
  a plain fp32 forward pass. The ratio shows what an optimisation (e.g. quantisation) costs; the
  target allows 3%.
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
    "harbour walls to warn ships of danger and to guide them safely into port. For centuries a "
    "keeper lived beside the tower, trimming the wick, cleaning the lenses and winding the "
    "clockwork that turned the lamp through the night. Each lighthouse has its own pattern of "
    "flashes, so that sailors can tell one from another in the dark. Today most of them are "
    "automatic, powered by electricity and watched from far away, but many are still kept as "
    "museums, and people visit them to climb the narrow stairs and look out over the water."
)


def run(report: Report, quick: bool) -> None:
    section = report.section(KEY, "Quality guard: engine vs fp32 reference (same weights)")
    prompts = PROMPTS[:4] if quick else PROMPTS
    with workers.engine_worker() as engine, workers.reference_worker() as reference:
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
        scored = reference.request(op="score", messages=messages, text=SCORED_TEXT)
    matching = sum(a["engine"] == a["reference"] for a in answers)
    tokens = scored["tokens"]
    engine_ppl = math.exp(-engine_logprob / tokens)
    reference_ppl = math.exp(-scored["logprob"] / tokens)
    ppl_ratio = engine_ppl / reference_ppl

    section.data.update(
        {
            "answers": answers,
            "matching": matching,
            "params": params,
            "scored_tokens": tokens,
            "engine_perplexity": engine_ppl,
            "reference_perplexity": reference_ppl,
            "perplexity_ratio": ppl_ratio,
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
    report.target(
        "Quality: same greedy answers, or perplexity within 3% of fp32",
        "all equal, or ppl ratio <= 1.03",
        f"{matching}/{len(answers)} equal; ppl ratio {ppl_ratio:.4f}",
        matching == len(answers) or ppl_ratio <= 1.03,
    )
