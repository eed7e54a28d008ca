"""Real two-process DDP sync (gloo, CPU) of the OOD metrics: gathered result == one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ood.metrics import METRIC_NAMES, FPRAtTPR, OODMetrics, fpr_at_tpr, ood_metrics

WORLD_SIZE = 2


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Rounded to create ties inside and across ranks.
    return np.round(rng.normal(1.0, 1.0, 1001), 2), np.round(rng.normal(0.0, 1.0, 603), 2)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.set_num_threads(1)
        sid, sood = _data()
        # Uneven, disjoint shares: rank 0 gets the first 40 % of ID and 70 % of OOD.
        cut_id, cut_ood = int(0.4 * len(sid)), int(0.7 * len(sood))
        my_id = sid[:cut_id] if rank == 0 else sid[cut_id:]
        my_ood = sood[:cut_ood] if rank == 0 else sood[cut_ood:]
        metric, fpr_ref = OODMetrics(), FPRAtTPR(method="reference")
        scores = torch.tensor(np.r_[my_id, my_ood], dtype=torch.float32)
        labels = torch.tensor(np.r_[np.ones(len(my_id)), np.zeros(len(my_ood))]).to(torch.int64)
        for m in (metric, fpr_ref):
            m.update(scores[:100], labels[:100])
            m.update(scores[100:], labels[100:])
        out = {k: float(v) for k, v in metric.compute().items()}
        out["fpr95_reference"] = float(fpr_ref.compute())
        out["n_local"] = len(scores)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_gloo_two_ranks_match_single_process(tmp_path: Path) -> None:
    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    sid, sood = _data()
    sid32 = torch.tensor(sid, dtype=torch.float32)
    sood32 = torch.tensor(sood, dtype=torch.float32)
    want = ood_metrics(sid32, sood32)
    want_ref = float(fpr_at_tpr(sid32, sood32, method="reference"))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert sum(r["n_local"] for r in results) == len(sid) + len(sood)
    assert results[0]["n_local"] != results[1]["n_local"]  # uneven shares were padded/gathered
    for res in results:
        for k in METRIC_NAMES:
            assert res[k] == want[k], k
        assert res["fpr95_reference"] == want_ref
