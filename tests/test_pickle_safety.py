"""A Megatron checkpoint from someone else cannot run code through its pickles: the
``.metadata`` pickle and non-tensor items are checked before megatron-core or torch read them,
and everything this project writes passes the check."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.convert.importer import ImportConfig, import_hf
from megatron_cpt.errors import UserError
from megatron_cpt.training.pickle_safety import check_checkpoint_pickles
from tests.test_checkpoint import ARCH, make, train
from tests.test_convert import make_tiny_hf

REPO = Path(__file__).resolve().parent.parent


class _RunsCode:
    """Unpickling this runs ``touch marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_tiny_hf("mha-tied", root / "hf")
    import_hf(ImportConfig(str(root / "hf"), str(root / "mc")))
    return root / "mc" / "iter_0000000"


def test_trainer_checkpoint_with_optimizer_and_rng_passes(tmp_path):
    from megatron_cpt.training import checkpointing as ck

    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    model, opt, sched = make(3)
    train(model, opt, sched, 1)
    saved = ck.save_checkpoint(tmp_path, 1, model, opt, sched, arch=ARCH)
    metadata = check_checkpoint_pickles(saved)
    assert any("rng_state" in key for key in metadata.state_dict_metadata)


def test_numpy_rng_state_round_trips_through_a_weights_only_form():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    np.random.seed(5)
    np.random.random(3)
    state = platform.get_rng_state()
    first = np.random.random(4)
    np.random.random(7)
    platform.set_rng_state(state)
    assert np.array_equal(np.random.random(4), first)


def test_metadata_pickle_that_runs_code_is_refused_before_unpickling(converted, tmp_path):
    import shutil

    evil = tmp_path / "evil" / "iter_0000000"
    shutil.copytree(converted.parent, evil.parent)
    marker = tmp_path / "pwned"
    (evil / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UserError, match=r"\.metadata: refusing to unpickle (posix|os)\.system"):
        check_checkpoint_pickles(evil)
    assert not marker.exists()

    # loading it for training/evaluation, exporting it and merging it all refuse it in one
    # line (the CLIs exit 2), and nothing has run
    from megatron_cpt.convert.loading import load_megatron_model

    with pytest.raises(UserError, match="refusing to unpickle"):
        load_megatron_model(evil.parent)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {evil.parent}\n"
                      "    parameters: {weight: 1.0}\n")  # fmt: skip
    for argv in (
        ["convert_checkpoint.py", "mcore-to-hf", "--load", str(evil.parent), "--out",
         str(tmp_path / "out")],
        ["merge_models.py", str(recipe), str(tmp_path / "merged")],
    ):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "refusing to unpickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_non_tensor_item_that_runs_code_is_refused(tmp_path):
    """megatron-core saves a ShardedObject by pickling it into the .distcp file, and torch
    loads those items with weights_only=False: the check must catch it there too."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    platform.init_distributed()
    marker = tmp_path / "pwned"
    sharded = {
        "w": ShardedTensor.from_rank_offsets("w", torch.ones(4)),
        "evil": ShardedObject("evil", _RunsCode(marker), (1,), (0,), replica_id=0),
    }
    (tmp_path / "ckpt").mkdir()
    from megatron_cpt.training.writer_processes import owned_writer_processes

    with owned_writer_processes():  # megatron-core's own Manager would outlive the test
        dist_checkpointing.save(sharded, str(tmp_path / "ckpt"))
    assert not marker.exists()
    with pytest.raises(UserError, match=r"item evil.*weights_only=True"):
        check_checkpoint_pickles(tmp_path / "ckpt")
    assert not marker.exists()
