"""The reserved KV cache: the same answers as transformers' dynamic cache, with no copy of the cache per step."""

import pytest
import torch
from conftest import save_varied_model

from ksg_ray.engines import SamplingParams
from ksg_ray.engines.kv_cache import ReservedLayer, reserved_cache_kwargs
from ksg_ray.engines.transformers_engine import TransformersEngine

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are a careful doctor who explains every step."},
     {"role": "user", "content": "What should I do about a mild fever that has lasted two days?"}],
    [{"role": "user", "content": "I have had heartburn every night for two weeks. What could it be?"}],
]


@pytest.fixture(scope="module")
def varied_model(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("varied")
    save_varied_model(tiny_model_path, out)
    return str(out)


def kv(batch: int, positions: int) -> torch.Tensor:
    """Distinct keys of shape [batch, 2 heads, positions, 4 dims]."""
    return torch.arange(float(batch * 2 * positions * 4)).reshape(batch, 2, positions, 4)


def test_a_layer_returns_what_concatenation_would_and_writes_in_place():
    layer = ReservedLayer(reserve=3)
    prompt, steps = kv(2, 5), [kv(2, 1) + 1000 * (i + 1) for i in range(3)]
    keys, values = layer.update(prompt, -prompt)
    buffer = keys.data_ptr()
    want = prompt
    for step in steps:
        keys, values = layer.update(step, -step)
        want = torch.cat([want, step], dim=-2)
        torch.testing.assert_close(keys, want)
        torch.testing.assert_close(values, -want)
        assert keys.data_ptr() == buffer  # no new buffer while the reserve lasts
    assert layer.get_seq_length() == 8
    keys, _ = layer.update(steps[0], -steps[0])  # past the reserve: moved to a larger buffer, content kept
    torch.testing.assert_close(keys, torch.cat([want, steps[0]], dim=-2))
    assert keys.data_ptr() != buffer
    layer.batch_select_indices(torch.tensor([1]))  # replaced from outside: the next write starts from it
    keys, _ = layer.update(steps[1][1:], -steps[1][1:])
    torch.testing.assert_close(keys, torch.cat([want, steps[0], steps[1]], dim=-2)[1:])


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12),
                                    SamplingParams(n=2, temperature=0.9, top_p=0.9, max_new_tokens=12, seed=3)],
                         ids=["greedy", "sampled"])
def test_the_engine_answers_the_same_with_either_cache(varied_model, params):
    reserved = TransformersEngine(varied_model, batch_size=2)  # batches of unequal prompt lengths (left padding)
    dynamic = TransformersEngine(varied_model, batch_size=2, reserve_kv_cache=False)
    made = []
    original = reserved.model.generate
    reserved.model.generate = lambda *a, **k: made.append(k) or original(*a, **k)
    assert reserved.generate(PROMPTS, params, seeds=[1, 2, 3]) == dynamic.generate(PROMPTS, params, seeds=[1, 2, 3])
    assert reserved.generate(PROMPTS, params) == dynamic.generate(PROMPTS, params)
    caches = [k.get("cache", k.get("past_key_values")) for k in made]  # the argument's name: see kv_cache
    assert len(made) == 4 and all(isinstance(c.layers[0], ReservedLayer) for c in caches)  # a fresh one per call
    assert len({id(c) for c in caches}) == 4
    streamed = list(reserved.stream(PROMPTS[1], SamplingParams(max_new_tokens=12)))
    assert streamed[-1] == dynamic.generate(PROMPTS[1:2], SamplingParams(max_new_tokens=12))[0][0]


def test_models_with_sliding_window_layers_keep_their_own_cache(varied_model):
    engine = TransformersEngine(varied_model)
    assert reserved_cache_kwargs(engine.model, 8)
    engine.model.config.layer_types = ["sliding_attention"] * engine.model.config.num_hidden_layers
    assert reserved_cache_kwargs(engine.model, 8) == {}
