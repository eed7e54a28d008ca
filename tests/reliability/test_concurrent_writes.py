"""Concurrent writers of one file (two runs filling the same cache entry or checkpoint): both
finish, the last rename wins, and no reader ever sees a half-written file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lightning_ood import io
from lightning_ood.io import atomic_save, atomic_write_text, safe_load

ROOT = Path(__file__).resolve().parents[2]
WRITERS = 3
ROUNDS = 25
#: Elements of each writer's payload (float32: 4 MB), large enough that writes overlap.
NUMEL = 1_000_000


def _writer_script(target: Path, go: Path, writer: int) -> str:
    return textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import torch
        from lightning_ood.io import atomic_save, atomic_write_text
        go = Path({str(go)!r})
        while not go.exists():
            time.sleep(0.001)
        payload = torch.full(({NUMEL},), float({writer}))
        for i in range({ROUNDS}):
            atomic_save({{"writer": {writer}, "round": i, "x": payload}}, {str(target)!r})
            atomic_write_text({str(target) + ".json"!r}, '{{"writer": {writer}}}' * 20000)
        """
    )


def test_concurrent_writers_all_finish_and_the_file_is_one_complete_copy(tmp_path: Path) -> None:
    target = tmp_path / "cache" / ".taps-conv1.pt"
    target.parent.mkdir()
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _writer_script(target, go, w)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WRITERS)
    ]
    time.sleep(0.5)
    go.touch()  # every writer starts together (those still importing torch join a moment later)
    errors = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * WRITERS, "\n".join(errors)

    ckpt = safe_load(target)
    writer = ckpt["writer"]
    assert writer in range(WRITERS)
    assert ckpt["round"] == ROUNDS - 1  # the last rename of some writer won
    assert ckpt["x"].shape == (NUMEL,)
    assert torch.equal(ckpt["x"], torch.full((NUMEL,), float(writer)))  # one writer's, whole
    text = Path(str(target) + ".json").read_text()
    assert text in {f'{{"writer": {w}}}' * 20000 for w in range(WRITERS)}
    leftovers = sorted(p.name for p in target.parent.iterdir())
    assert leftovers == [".taps-conv1.pt", ".taps-conv1.pt.json"]


def _temporary(folder: Path, name: str, age_s: float = 0.0) -> Path:
    tmp = folder / name
    tmp.write_bytes(b"PK\x03\x04 in flight")
    if age_s:
        then = time.time() - age_s
        os.utime(tmp, (then, then))
    return tmp


def test_only_abandoned_temporaries_are_swept(tmp_path: Path) -> None:
    host = io._host_tag()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        in_flight = _temporary(tmp_path, f".last.ckpt.lood-{host}-{live.pid}-abcd1234.tmp")
        killed = _temporary(tmp_path, f".last.ckpt.lood-{host}-{dead.pid}-abcd1234.tmp")
        other_host = _temporary(tmp_path, f".last.ckpt.lood-0000beef-{dead.pid}-abcd1234.tmp")
        old_other_host = _temporary(
            tmp_path, ".last.ckpt.lood-0000beef-1-abcd1234.tmp", age_s=io.STALE_TEMP_AGE_S + 60
        )
        legacy_fresh = _temporary(tmp_path, ".last.ckpt.k3j_9xq2.tmp")
        legacy_old = _temporary(tmp_path, ".last.ckpt.p0q_1zz8.tmp", age_s=io.STALE_TEMP_AGE_S + 60)
        other_target = _temporary(
            tmp_path, f".last.ckpt.bak.lood-{host}-{dead.pid}-abcd1234.tmp", age_s=1e6
        )
        atomic_save({"v": torch.tensor(5)}, tmp_path / "last.ckpt")
    finally:
        live.kill()
        live.wait()
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {
        "last.ckpt",
        in_flight.name,  # its writer still runs
        other_host.name,  # cannot be checked from here, and recent
        legacy_fresh.name,  # recent
        other_target.name,  # belongs to "last.ckpt.bak"
    }
    assert not killed.exists() and not old_other_host.exists() and not legacy_old.exists()
    assert safe_load(tmp_path / "last.ckpt")["v"].item() == 5


def test_a_write_names_its_temporary_after_its_owner(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: object) -> None:
        seen.append(Path(src).name)
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(io.os, "replace", spy)
    atomic_write_text(tmp_path / "r.json", "{}")
    assert len(seen) == 1
    match = io._TEMP_OWNER.fullmatch(seen[0][len(".r.json.") :])
    assert match is not None, seen
    assert (match["host"], int(match["pid"])) == (io._host_tag(), os.getpid())


@pytest.mark.parametrize("pid, alive", [(os.getpid(), True), (0, False), (-5, False)])
def test_pid_alive(pid: int, alive: bool) -> None:
    assert io._pid_alive(pid) is alive
