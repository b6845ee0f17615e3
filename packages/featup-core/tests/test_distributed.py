"""train_jbu under torchrun: two CPU processes (gloo), DistributedDataParallel, sharded data, rank-0
checkpoints, resume. Launches ``python -m torch.distributed.run --nproc_per_node=2 --standalone``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from featup.core.checkpoint import load_checkpoint
from featup.core.training import JBU_STATE_FILE

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys

    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(1)
    from featup.core.training import train_jbu

    out_dir, steps = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ["RANK"])

    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 1, 1, generator=g).expand(8, 3, 16, 16).clone()
    images[:, :, 4:12, 2:9] = torch.rand(8, 3, 1, 1, generator=g)
    seen = []

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 6, 1)
            nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(1))
            self.requires_grad_(False)

        def forward(self, x):
            # remember which corpus images this rank trains on (jittered views never match exactly)
            for item in x:
                seen.extend(i for i in range(len(images)) if torch.equal(item, images[i]))
            return F.avg_pool2d(torch.tanh(self.proj(x)), 4)

    steps_run = []
    up = train_jbu(
        Backbone(), images, steps=steps, batch_size=2, kernel_size=4,
        checkpoint_dir=os.path.join(out_dir, "ckpt"), checkpoint_every=2,
        progress=False, callback=lambda s, logs: steps_run.append(s),
    )
    digest = hashlib.sha256()
    for name, value in sorted(up.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    record = {
        "hash": digest.hexdigest(), "steps_run": steps_run, "seen": seen, "training": up.training,
        "world_size": int(os.environ["WORLD_SIZE"]),
        "group_destroyed": not torch.distributed.is_initialized(),
    }
    with open(os.path.join(out_dir, f"rank{rank}_{steps}.json"), "w") as fh:
        json.dump(record, fh)
    """
)


def _launch(script: str, out_dir: str, steps: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        script,
        out_dir,
        str(steps),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _records(out_dir, steps: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}_{steps}.json").read_text()) for r in range(2)]


def test_torchrun_two_ranks_identical_parameters_sharded_data_and_resume(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)

    _launch(str(script), str(tmp_path), 4)
    r0, r1 = _records(tmp_path, 4)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["hash"] == r1["hash"]  # DDP kept the ranks in lockstep
    assert r0["steps_run"] == r1["steps_run"] == [1, 2, 3, 4]
    assert not r0["training"] and r0["group_destroyed"]
    # 4 steps x batch 2 per rank = two epochs of 8 images over 2 ranks: in each epoch the ranks'
    # shards are disjoint and cover the corpus (the first backbone call probes image 0 of the first batch)
    seen0, seen1 = r0["seen"][1:], r1["seen"][1:]
    assert len(seen0) == len(seen1) == 8
    assert sorted(seen0[:4] + seen1[:4]) == list(range(8))
    assert sorted(seen0[4:] + seen1[4:]) == list(range(8))
    assert seen0[:4] != seen0[4:]  # reshuffled per epoch
    state, cfg = load_checkpoint(tmp_path / "ckpt" / JBU_STATE_FILE)
    assert cfg["step"] == 4 and cfg["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")) == [
        "jbu_stack.json",
        "jbu_stack.safetensors",
        "train_state.json",
        "train_state.safetensors",
    ]

    # a second launch resumes from rank 0's checkpoint: the step count continues
    _launch(str(script), str(tmp_path), 6)
    r0, r1 = _records(tmp_path, 6)
    assert r0["steps_run"] == r1["steps_run"] == [5, 6]
    assert r0["hash"] == r1["hash"]
    assert r0["hash"] != _records(tmp_path, 4)[0]["hash"]
    assert load_checkpoint(tmp_path / "ckpt" / JBU_STATE_FILE)[1]["step"] == 6
