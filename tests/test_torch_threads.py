"""Models load on one torch thread, and the thread count comes back."""

import pytest
import torch

from ksg_ray.common.torch_threads import one_torch_thread
from ksg_ray.engines.transformers_engine import TransformersEngine


def test_one_torch_thread_restores_the_count_also_on_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="bad config"), one_torch_thread():
            raise ValueError("bad config")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_engine_loads_on_one_thread_and_runs_on_the_callers_count(tiny_model_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or load(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        TransformersEngine(tiny_model_path)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
