"""A realistic mixed sample for ``batcher demo``: chat and embeddings, several models, tags."""

from __future__ import annotations

import random
from collections.abc import Iterator

from batcher.domain import JobSpec, Provider

_TOPICS = ["invoices", "support tickets", "product reviews", "release notes", "contracts", "meeting notes"]
_TASKS = ["Summarise", "Classify the sentiment of", "Extract the named entities from", "Translate to French"]
_CHAT_MODELS = ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]
_EMBED_MODELS = ["text-embedding-3-small"]
_CLAUDE_MODELS = ["claude-haiku-4-5", "claude-sonnet-4-5"]
#: a long shared system prompt, marked for Anthropic's prompt cache
_STYLE_GUIDE = "House style for every answer: " + " ".join(f"rule {i}: be exact and brief." for i in range(60))


def sample_specs(n: int, *, run: str = "demo", seed: int = 7) -> Iterator[JobSpec]:
    """``n`` jobs: about half OpenAI chat over three models, a quarter Anthropic messages (some with a cached
    system prompt), a quarter OpenAI embeddings; tagged by team and topic."""
    rng = random.Random(seed)
    for i in range(n):
        topic = rng.choice(_TOPICS)
        team = rng.choice(["search", "billing", "support"])
        text = f"{rng.choice(_TASKS)} these {topic}: " + " ".join(
            rng.choice(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"])
            for _ in range(rng.randint(20, 120))
        )
        draw = rng.random()
        if draw < 0.25:
            model = rng.choice(_CLAUDE_MODELS)
            params: dict[str, object] = {
                "model": model,
                "max_tokens": rng.choice([64, 128, 256]),
                "messages": [{"role": "user", "content": text}],
            }
            if rng.random() < 0.5:
                params["system"] = [{"type": "text", "text": _STYLE_GUIDE, "cache_control": {"type": "ephemeral"}}]
            yield JobSpec(
                provider=Provider.ANTHROPIC,
                endpoint="/v1/messages",
                model=model,
                custom_id=f"demo-{i:06d}",
                body=params,
                run=run,
                tags={"team": team, "topic": topic},
            )
            continue
        if draw < 0.75:
            model = rng.choice(_CHAT_MODELS)
            endpoint = "/v1/chat/completions"
            body: dict[str, object] = {
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": text},
                ],
                "max_tokens": rng.choice([64, 128, 256]),
            }
        else:
            model = rng.choice(_EMBED_MODELS)
            endpoint = "/v1/embeddings"
            body = {"model": model, "input": text}
        yield JobSpec(
            provider=Provider.OPENAI,
            endpoint=endpoint,
            model=model,
            custom_id=f"demo-{i:06d}",
            body=body,
            run=run,
            tags={"team": team, "topic": topic},
        )
