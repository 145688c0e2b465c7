"""DDP: two gloo processes launched by torchrun follow one process's loss curve (same global batch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from leanvit import create_model
from leanvit.checkpoint import read_checkpoint
from leanvit.train import TrainConfig, fit

#: Each torchrun process trains and rank 0 writes its per-step losses.
WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from leanvit.train import TrainConfig, fit

    torch.set_num_threads(1)
    result = fit(TrainConfig(**json.loads(sys.argv[1])))
    if os.environ["RANK"] == "0":
        with open(sys.argv[2], "w") as f:
            json.dump({"world": int(os.environ["WORLD_SIZE"]), "losses": [s["loss"] for s in result.steps]}, f)
""")


def test_two_process_gloo_matches_one_process(tmp_path):
    """Also: leanvit's warnings (here: 6x6 patches drop 2 pixels of 32) are printed by rank 0 alone, not per rank."""
    settings = dict(
        model="deit_tiny_patch16_224", data="cifar10-test500", batch_size=8, epochs=2, max_steps_per_epoch=3,
        model_kwargs={"img_size": 32, "patch_size": 6, "depth": 1, "embed_dim": 16, "num_heads": 2},
        lr=3e-3, warmup_epochs=0, no_aug=True, mixup=0, cutmix=0, workers=0, progress=False,
    )
    script, out = tmp_path / "worker.py", tmp_path / "losses.json"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps({**settings, "output": str(tmp_path / "ddp")}), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("cuts 32x32 inputs into 6x6 patches") == 1, run.stderr[-3000:]
    ddp = json.loads(out.read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = fit(TrainConfig(**settings, output=str(tmp_path / "single")))
    finally:
        torch.set_num_threads(threads)
    losses = [s["loss"] for s in single.steps]

    assert ddp["world"] == 2 and len(ddp["losses"]) == len(losses) == 6
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(losses), rtol=1e-4, atol=1e-5)

    torch.manual_seed(0)  # fit's initialisation
    init = create_model(settings["model"], num_classes=10, **settings["model_kwargs"]).state_dict()
    a, b = read_checkpoint(tmp_path / "ddp")[0], read_checkpoint(tmp_path / "single")[0]
    for key in init:  # the same updates, not just the same losses; Adam amplifies rounding a little
        assert (a[key] - b[key]).norm() <= 0.01 * (b[key] - init[key]).norm(), key


def test_ranks_other_than_0_name_only_their_own_corrupt_images():
    """Rank 0 says what every rank would (settings, data folder, model); the training images are split between the
    ranks, so each names the corrupt ones of its share (all silenced on ranks > 0, they went unreported)."""
    import warnings

    from leanvit.data import CorruptImageWarning
    from leanvit.errors import LeanvitWarning
    from leanvit.train.loop import _warnings_of_rank

    for rank, said in ((0, ["set-up", "corrupt"]), (1, ["corrupt"])):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with _warnings_of_rank(rank):
                warnings.warn("set-up", LeanvitWarning)
                warnings.warn("corrupt", CorruptImageWarning)
        assert [str(w.message) for w in seen] == said
