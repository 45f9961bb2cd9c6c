"""The language models `featuregeom explain` talks to: a local transformers model (the packaged one by
default, offline) or any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server,
Ollama...). Both answer the same two questions: a short completion, and P(Yes) for a yes/no question.

The endpoint is reached with the standard library (urllib): one POST per question, no extra package.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any, Protocol

from precompute.errors import FeatureGeomError


class ExplainError(FeatureGeomError):
    """The explainer or scorer model could not answer (unreachable endpoint, bad reply)."""


class LanguageModel(Protocol):
    name: str

    def complete(self, messages: list[dict[str, str]], max_new_tokens: int) -> str: ...

    def yes_probability(self, messages: list[dict[str, str]]) -> float: ...


def _merge_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """For chat templates without a system role: the system text goes first in the user turn."""
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest:
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


class LocalModel:
    """A model `precompute.model.load.load_model` can load, answering greedily."""

    def __init__(self, spec: str, device: str = "auto") -> None:
        from precompute.model.load import load_model

        self.lm = load_model(spec, device=device)
        self.name = f"local:{self.lm.name}"
        tok = self.lm.tokenizer
        self._yes_no = [tok.encode(word, add_special_tokens=False)[0] for word in ("Yes", "No")]

    def _ids(self, messages: list[dict[str, str]]) -> Any:
        import torch
        from jinja2 import TemplateError

        tok = self.lm.tokenizer
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:
            text = tok.apply_chat_template(
                _merge_system(messages), tokenize=False, add_generation_prompt=True
            )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], device=self.lm.device)

    def complete(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        import torch

        ids = self._ids(messages)
        tok = self.lm.tokenizer
        with torch.inference_mode():
            generate: Any = self.lm.model.generate  # typed as a Module attribute by torch's stubs
            out = generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    def yes_probability(self, messages: list[dict[str, str]]) -> float:
        import torch

        with torch.inference_mode():
            logits = self.lm.model(self._ids(messages)).logits[0, -1].float()
        yes, no = (float(logits[i]) for i in self._yes_no)
        return 1.0 / (1.0 + math.exp(no - yes))


class OpenAICompatible:
    """POST {base_url}/chat/completions, temperature 0."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float = 120.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.name = f"openai:{model}@{base_url}"

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url,
            data=json.dumps({"model": self.model, "temperature": 0, **payload}).encode(),
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise ExplainError(f"{self.url} answered HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ExplainError(f"cannot reach {self.url} ({exc}); check --api-base and the network") from exc
        except json.JSONDecodeError as exc:
            raise ExplainError(f"{self.url} did not answer JSON ({exc})") from exc

    @staticmethod
    def _content(reply: dict[str, Any]) -> str:
        try:
            return str(reply["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise ExplainError(
                f"the endpoint's reply has no choices[0].message.content: {str(reply)[:200]}"
            ) from exc

    def complete(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        return self._content(self._post({"messages": messages, "max_tokens": max_new_tokens}))

    def yes_probability(self, messages: list[dict[str, str]]) -> float:
        """From the first token's log-probabilities when the endpoint returns them, else 1/0 from the word."""
        reply = self._post({"messages": messages, "max_tokens": 1, "logprobs": True, "top_logprobs": 10})
        try:
            top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            p = {"yes": 0.0, "no": 0.0}
            for item in top:
                word = str(item["token"]).strip().lower()
                if word in p:
                    p[word] += math.exp(float(item["logprob"]))
            if p["yes"] + p["no"] > 0:
                return p["yes"] / (p["yes"] + p["no"])
        except (KeyError, IndexError, TypeError, ValueError):
            pass
        word = self._content(reply).strip().lower()
        if word.startswith("yes"):
            return 1.0
        if word.startswith("no"):
            return 0.0
        raise ExplainError(f"the scorer answered {word!r}, not Yes or No")
