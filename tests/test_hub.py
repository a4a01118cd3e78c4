"""Model provisioning: the embedded model's one-time GGUF build."""

import gguf
import numpy as np

from ksg_ray.common.hub import _gguf_parsed_once


def _tiny_gguf(path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_build_parses_each_gguf_once_and_restores_gguf_after(tmp_path):
    """transformers opens the GGUF three times and rebuilds the tensor-name map per module: while the build
    runs, the same file gives the same reader and the map is built once per (arch, layers); after it, gguf's own
    functions are back, and a reader still reads what the file holds."""
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    open_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name("model.layers.1.self_attn.q_proj") \
            == "blk.1.attn_q"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (open_reader, name_map)
    again = gguf.GGUFReader(path)
    assert again is not first
    assert np.array_equal(np.asarray(again.tensors[0].data).reshape(3, 4),
                          np.arange(12, dtype=np.float32).reshape(3, 4))


def test_two_callers_in_one_process_build_a_model_once(tmp_path, monkeypatch):
    """`ksg pipeline` builds the first model beside Ray's start; the stage asking for it meanwhile waits for that
    build instead of running a second one."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ksg_ray.common.hub import _cached

    monkeypatch.setenv("KSG_CACHE", str(tmp_path))
    builds, started = [], threading.Event()

    def build(out):
        builds.append(out)
        started.set()
        time.sleep(0.5)
        (out / "config.json").write_text("{}")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_cached, "m", build)
        started.wait(5)
        second = pool.submit(_cached, "m", build)
        assert first.result() == second.result() == tmp_path / "m"
    assert len(builds) == 1 and (tmp_path / "m" / "config.json").is_file()
