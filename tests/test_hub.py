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
