"""Map actors build their models on one torch thread, and get their thread count back."""

import pytest
import torch

from ksg_ray.engines.one_thread import init_on_one_thread


@init_on_one_thread
class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.threads_in_init = torch.get_num_threads()
        if fail:
            raise ValueError("bad config")

    def __call__(self) -> int:
        return torch.get_num_threads()


def test_init_runs_on_one_thread_and_the_count_comes_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = Recorder()
        assert r.threads_in_init == 1
        assert torch.get_num_threads() == 2 and r() == 2
        with pytest.raises(ValueError, match="bad config"):
            Recorder(fail=True)
        assert torch.get_num_threads() == 2
        assert Recorder.__init__.__doc__ == Recorder.__init__.__wrapped__.__doc__
    finally:
        torch.set_num_threads(before)
