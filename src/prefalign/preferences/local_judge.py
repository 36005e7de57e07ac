"""A local causal LM as the judge: the model directory is loaded offline and asked greedily.

`judge(texts, attempt) -> answers`, like http_judge.HttpJudge, plus `label_probs`: the
probability of each verdict label before the model answers (pairwise confidence).
"""

from __future__ import annotations

from prefalign.errors import PrefalignError
from prefalign.preferences.pairwise import LABELS


class LocalJudge:
    """A causal LM: greedy on the first attempt, sampled at retry_temperature on retries."""

    def __init__(self, path: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 retry_temperature: float = 0.7, seed: int = 0, batch_size: int = 8,
                 chat_template: str | None = None):
        import torch

        from prefalign.models import load_causal_lm, load_tokenizer

        self.name, self.settings = path, {"judge": path, "backend": "local",
                                          "max_new_tokens": max_new_tokens,
                                          "temperature": temperature,
                                          "retry_temperature": retry_temperature, "seed": seed}
        self.tokenizer = load_tokenizer(path, chat_template=chat_template)
        self.model = load_causal_lm(path).to("cuda" if torch.cuda.is_available() else "cpu")
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.retry_temperature, self.seed, self.batch_size = retry_temperature, seed, batch_size

    def __call__(self, texts: list[str], attempt: int) -> list[str]:
        from prefalign.generation import SamplingConfig, generate

        chat = bool(getattr(self.tokenizer, "chat_template", None))
        prompts = [[{"role": "user", "content": t}] if chat else t for t in texts]
        sampling = SamplingConfig(
            max_new_tokens=self.max_new_tokens, seed=self.seed + attempt,
            temperature=self.temperature if attempt == 0 else self.retry_temperature,
            batch_size=self.batch_size)
        return [g.text for g in generate(self.model, self.tokenizer, prompts, sampling,
                                         progress=False)]

    def label_probs(self, texts: list[str], labels: tuple[str, ...] = LABELS
                    ) -> list[list[float]]:
        """Per prompt, the next-token probability of each label's first token, normalised
        over the labels: the judge's confidence in each verdict before it answers."""
        import torch

        from prefalign.generation import render_prompts

        chat = bool(getattr(self.tokenizer, "chat_template", None))
        ids = render_prompts(self.tokenizer, [[{"role": "user", "content": t}] if chat else t
                                              for t in texts])
        label_ids = [self._label_token(label) for label in labels]
        if len(set(label_ids)) < len(label_ids):
            raise PrefalignError(f"judge {self.name}: the labels {', '.join(labels)} start "
                                 "with the same token; their probabilities cannot be told apart")
        out = []
        with torch.no_grad():
            for start in range(0, len(ids), self.batch_size):
                logits = self._last_logits(ids[start:start + self.batch_size])
                out += torch.softmax(logits.float()[:, label_ids], -1).tolist()
        return out

    def _last_logits(self, prompts: list[list[int]]):
        """(B, V) next-token logits after each prompt, left-padded into one forward. The
        positions count real tokens only, so a padded prompt gets the logits it gets alone."""
        from prefalign.data.collate import collate_prompts
        from prefalign.decoding import keeps_logits
        from prefalign.logprobs import position_ids_from_mask

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        batch = collate_prompts(prompts, self.tokenizer.eos_token_id if pad is None else pad)
        mask = batch["attention_mask"].to(device)
        extra = {"logits_to_keep": 1} if keeps_logits(self.model) else {}
        return self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                          position_ids=position_ids_from_mask(mask), **extra).logits[:, -1]

    def _label_token(self, label: str) -> int:
        """The first token of `label` that carries its text: a SentencePiece tokenizer may
        put a lone word-start piece ("▁") in front, which every label would share."""
        ids = self.tokenizer.encode(label, add_special_tokens=False)
        for token in ids:
            if label[0] in self.tokenizer.decode([token]):
                return token
        raise PrefalignError(f"judge {self.name}: the tokenizer has no token for the verdict "
                             f"label {label!r}")
