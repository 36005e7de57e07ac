"""Generation speaks the KV-cache API of the installed transformers: no deprecation warning
(neither Python's warnings nor transformers' own logged notices) about `past_key_values`,
for each tiny architecture, with n > 1 candidates and rows finishing early (the cache is
repeated and sliced)."""

import logging
import warnings

import pytest
import transformers

from prefalign.generation import SamplingConfig, generate


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """Every message transformers logs during the test, its once-only notices included."""
    # `warning_once` remembers what it already said in this process: forget it, or a notice
    # an earlier test triggered would not show here.
    logging.Logger.warning_once.cache_clear()
    logger = transformers.utils.logging.get_logger("transformers")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_uses_the_supported_cache_api(make_model, tokenizer, transformers_log, arch):
    model = make_model(arch)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, batch_size=2, seed=3,
                              eos_token_ids=[tokenizer.convert_tokens_to_ids("a")])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        gens = generate(model, tokenizer, ["The film was", "Hi", "Once upon a time"], sampling)
    assert len(gens) == 6 and all(g.response_ids for g in gens)
    assert not [m for m in transformers_log if "past_key_values" in m or "deprecat" in m]
