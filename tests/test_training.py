"""Training on generated kernels: optimizer steps match torch's, DistributedDataParallel
gradients match torch's with one compile per kernel over all ranks, and the DCGAN example runs.

Run as a script (``python tests/test_training.py RANK WORLD PORT OUT``), this file is one rank
of the DDP test."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import zeroskip

ROOT = Path(__file__).resolve().parents[1]


def small_net() -> nn.Sequential:
    """The operators of a DCGAN in three layers: a strided transposed conv (zeros inserted
    between inputs), batch norm, a padded 3x3 conv with bias, a strided 4x4 conv."""
    return nn.Sequential(
        nn.ConvTranspose2d(6, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 2, 4, 2, 1))


def batches(count: int, size: int, dtype: torch.dtype, seed: int = 0):
    """``count`` (input, target) pairs for :func:`small_net`: 5x5 inputs, 5x5 outputs."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, 5, 5, generator=gen, dtype=dtype),
             torch.randn(size, 2, 5, 5, generator=gen, dtype=dtype)) for _ in range(count)]


# ------------------------------------------------------------------ (1) optimizer steps
TOLERANCES = {torch.float64: dict(rtol=1e-11, atol=1e-13),
              torch.float32: dict(rtol=1e-5, atol=1e-7)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sgd_steps_match_torch(dtype):
    """Three steps of SGD with momentum on a converted copy and on torch's model, from the same
    weights on the same batches: every parameter, gradient and batch-norm statistic ends equal
    (measured: float64 ~1e-15 relative, float32 ~3e-6; the tolerances leave 10-1000x). Each
    step changes the weights, so the kernels must repack them each time: running a stale pack
    misses by ~1e-3."""
    torch.manual_seed(0)
    reference = small_net().to(dtype)
    initial = copy.deepcopy(reference)
    converted = zeroskip.convert(copy.deepcopy(reference))
    assert sum(type(m).__module__ == "zeroskip.nn" for m in converted.modules()) == 3
    zeroskip.stats(reset=True)
    losses = {}
    for name, model in (("zeroskip", converted), ("torch", reference)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[name] = []
        for x, target in batches(3, 4, dtype):
            loss = nn.functional.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
        if name == "zeroskip":
            counts = zeroskip.stats()
    # 3 steps x (3 forwards + 2 input gradients + 3 weight gradients), all on kernels.
    assert counts["kernel_calls"] == 3 * 8 and counts["fallback_calls"] == 0
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(torch.tensor(losses["zeroskip"]), torch.tensor(losses["torch"]),
                               rtol=tol["rtol"] * 10, atol=0)
    got, want, start = (dict(m.state_dict()) for m in (converted, reference, initial))
    grads = dict(converted.named_parameters()), dict(reference.named_parameters())
    moved = 0.0
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **tol, msg=key)
        if value.is_floating_point():
            moved = max(moved, float((value - start[key]).abs().max()))
    for key, param in grads[1].items():
        torch.testing.assert_close(grads[0][key].grad, param.grad, **tol, msg=f"{key}.grad")
    assert moved > 1e3 * (tol["atol"] + tol["rtol"])     # the steps did change the weights
    assert losses["torch"][0] != losses["torch"][2]


# ------------------------------------------------------------------ (2) DDP, shared cache
def ddp_worker(rank: int, world: int, port: int, out: Path) -> None:
    """One rank: a converted copy and torch's model under DDP (gloo), one backward each on this
    rank's slice of a global float64 batch; saves the all-reduced gradients, the local ones
    (without DDP), zeroskip.stats() and the kernels this process loaded."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from zeroskip.runtime import loader

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = small_net().double()
    ((x, target),) = batches(1, 3 * world, torch.float64)
    x, target = x.chunk(world)[rank], target.chunk(world)[rank]
    grads = {}
    for name, twin in (("zeroskip", zeroskip.convert(copy.deepcopy(model))),
                       ("torch", copy.deepcopy(model)), ("local", copy.deepcopy(model))):
        wrapped = twin if name == "local" else DDP(twin)
        nn.functional.mse_loss(wrapped(x), target).backward()
        grads[name] = [p.grad for p in twin.parameters()]
    torch.save({"grads": grads, "stats": zeroskip.stats(),
                "kernels": sorted(json.dumps([k.spec.to_dict(), k.variant.name], sort_keys=True)
                                  for k in loader.loaded())},
               out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_entries(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("*/*/meta.json"))


def test_ddp_gradients_match_torch_and_kernels_compile_once(tmp_path):
    world, cache = 2, tmp_path / "cache"
    env = dict(os.environ, ZEROSKIP_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")       # stay on 127.0.0.1
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, __file__, str(rank), str(world), str(port),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    try:
        outputs = [rank.communicate(timeout=180)[0] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 0, output
    found = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for result in found:
        for got, want, local in zip(*(result["grads"][k] for k in ("zeroskip", "torch",
                                                                    "local"))):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
            assert not torch.allclose(want, local)    # DDP did average over the ranks
    for got, want in zip(found[0]["grads"]["zeroskip"], found[1]["grads"]["zeroskip"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

    # Every rank loaded the same kernels; each was compiled once in total, by one rank or the
    # other (the file lock), and the other rank found it in the cache.
    kernels = {k for result in found for k in result["kernels"]}
    assert all(set(result["kernels"]) == kernels for result in found)
    # forwards, input and weight gradients (a layer's sparse variant is a kernel of its own)
    assert len({json.dumps(json.loads(k)[0]) for k in kernels}) == 3 + 2 + 3
    stats = [result["stats"] for result in found]
    assert sum(s["compiles"] for s in stats) == len(kernels) == len(cache_entries(cache))
    assert sum(s["cache_hits"] for s in stats) == (world - 1) * len(kernels)
    for s, result in zip(stats, found):
        assert s["compiles"] + s["cache_hits"] == len(result["kernels"])
        assert s["fallback_calls"] == 0


# ------------------------------------------------------------------ (3) the DCGAN example
def test_train_dcgan_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_dcgan.py"),
                           "--steps", "3", "--batch", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png = tmp_path / "dcgan_losses.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = json.loads((tmp_path / "dcgan_losses.json").read_text())
    assert summary["stats"]["fallback_calls"] == 0 and summary["stats"]["kernel_calls"] > 0
    layers = summary["layers_relative_difference"]          # forward, grad in, grad w
    assert sorted(layers) == ["D.0", "D.2", "D.5", "D.8", "G.0", "G.3", "G.6", "G.9"]
    assert max(v for row in layers.values() for v in row if v is not None) < 1e-4
    curves = summary["curves"]
    assert len(curves["zeroskip"]["loss_d"]) == len(curves["torch"]["loss_g"]) == 3
    assert "OK: the loss curves track torch's" in proc.stdout


if __name__ == "__main__":
    ddp_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
