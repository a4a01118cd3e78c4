"""Ray Train's controller unpickles the train function and its config: packed, they must not pull in torch."""

import subprocess
import sys
from pathlib import Path

from ray import cloudpickle

from ksg_ray.common.train_payload import pack, run_packed


def _write_value(config: dict) -> None:
    Path(config["path"]).write_text(str(config["value"]))


def test_the_packed_loop_runs_with_its_config(tmp_path):
    packed = pack(_write_value, {"path": str(tmp_path / "out"), "value": 7})
    assert all(isinstance(v, bytes) for v in packed.values())
    run_packed(packed)
    assert (tmp_path / "out").read_text() == "7"


def test_unpickling_what_the_controller_gets_imports_neither_torch_nor_peft(tmp_path):
    """What `run_torch_trainer` hands Ray Train for a fine-tune (its real loop, a config holding a peft config)."""
    from peft import LoraConfig

    from ksg_ray.server.finetune.trainer import finetune_worker_loop

    blob = tmp_path / "trainer_args.pkl"
    blob.write_bytes(cloudpickle.dumps((run_packed, pack(finetune_worker_loop, {"lora": LoraConfig(r=8)}))))
    code = ("import sys; from ray import cloudpickle; fn, config = cloudpickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # the same, unpacked, is what the controller used to unpickle
    blob.write_bytes(cloudpickle.dumps((finetune_worker_loop, {"lora": LoraConfig(r=8)})))
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, check=True)
    assert "torch" in out.stdout, out.stdout
