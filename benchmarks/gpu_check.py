"""The prepared GPU run (``make gpu-check``): everything worth knowing from a GPU, in one command
that fits 8 minutes, each stage's results saved as soon as it ends.

1. correctness: a small CNN (strided, transposed, depthwise and 1x1 convs, BatchNorm, ReLU)
   converted with ``zeroskip.convert`` trains side by side with torch's for a few steps on the
   GPU (float32); the losses must agree, no call may fall back, and a float16 and a bfloat16
   forward must match torch's;
2. autotuning in the loop: the same model trained from an empty tuning database with
   ``zeroskip.autotune(True)``: each step's time, the cases tuned, the losses against torch's;
3. the suite's Triton kernels against torch (cuDNN), tuned first (``zeroskip bench --device cuda
   --tune --quick``), as long as time is left.

Results: ``benchmarks/results/gpu-check-<date>.json`` (and the bench's ``gpu-<date>.md``/``.json``).
Without a GPU it exits 1 saying why and writes nothing. ``--device cpu`` runs stages 1-2 on the
C kernels (a rehearsal of the script itself, with no GPU)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = 450          # all stages; the bench gets what is left, less a margin
STEPS = 6               # training steps compared with torch
ONLINE_STEPS = 20


def small_cnn() -> nn.Module:
    """Every conv family the kernels have, small enough to compile fast."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),
        nn.Conv2d(64, 64, 1), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 10, 3, padding=2, dilation=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _data(device: torch.device, batch: int = 16):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32, generator=gen).to(device),
             torch.randint(0, 10, (batch,), generator=gen).to(device)) for _ in range(2)]


def _train(model: nn.Module, data, steps: int, sync) -> tuple[list[float], list[float]]:
    """Losses and wall milliseconds of ``steps`` SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses, times = [], []
    for i in range(steps):
        x, y = data[i % len(data)]
        sync()
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(float(loss.detach()))
    return losses, times


def _pair(device: torch.device):
    import copy

    import zeroskip
    torch.manual_seed(0)
    reference = small_cnn().to(device)
    return reference, zeroskip.convert(copy.deepcopy(reference))


def _losses_agree(ours: list[float], theirs: list[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs))


def stage_correctness(device: torch.device, sync, steps: int = STEPS) -> dict:
    import zeroskip
    data = _data(device)
    reference, converted = _pair(device)
    before = zeroskip.stats()
    want, _ = _train(reference, data, steps, sync)
    got, times = _train(converted, data, steps, sync)
    after = zeroskip.stats()
    found = {"losses_torch": want, "losses_zeroskip": got,
             "max_loss_diff": _losses_agree(got, want), "step_ms": times,
             "fallback_calls": after["fallback_calls"] - before["fallback_calls"],
             "kernel_calls": after["kernel_calls"] - before["kernel_calls"]}
    for dtype in (torch.float16, torch.bfloat16) if device.type == "cuda" else ():
        model = small_cnn().to(device, dtype).eval()
        ours = zeroskip.convert(model)
        x = data[0][0].to(dtype)
        with torch.no_grad():
            a, b = ours(x).float(), model(x).float()
        found[f"forward_{str(dtype)[6:]}_max_error"] = float((a - b).abs().max() /
                                                             (b.abs().max() + 1e-6))
    found["ok"] = found["max_loss_diff"] < 1e-2 and not found["fallback_calls"] and \
        found["kernel_calls"] > 0 and all(v < 5e-2 for k, v in found.items()
                                          if k.startswith("forward_"))
    return found


def stage_online(device: torch.device, sync, steps: int = ONLINE_STEPS) -> dict:
    import zeroskip
    from zeroskip.runtime import online, tuning
    data = _data(device)
    reference, converted = _pair(device)
    want, torch_ms = _train(reference, data, steps, sync)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ZEROSKIP_TUNING_DB"] = str(Path(tmp) / "tuning.json")
        tuning.reset()
        before = zeroskip.stats()
        try:
            with online.autotuning(True):
                got, times = _train(converted, data, steps, sync)
        finally:
            os.environ.pop("ZEROSKIP_TUNING_DB")
            tuning.reset()
        after = zeroskip.stats()
    return {"losses_torch": want, "losses_zeroskip": got,
            "max_loss_diff": _losses_agree(got, want), "step_ms": times,
            "torch_step_ms": torch_ms,
            "tuned_cases": after["tuned_cases"] - before["tuned_cases"],
            "tuning_seconds": after["tuning_seconds"] - before["tuning_seconds"],
            "ok": _losses_agree(got, want) < 1e-2}


def stage_bench(left_s: float, stamp: str) -> dict:
    stem = RESULTS / f"gpu-{stamp}"
    command = [sys.executable, "-m", "zeroskip.cli", "bench", "--device", "cuda", "--quick",
               "--tune", "--repeats", "3", "--json", f"{stem}.json", "--markdown",
               f"{stem}.md"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=left_s)
    except subprocess.TimeoutExpired as exc:
        return {"command": command, "timed_out_s": left_s,
                "stdout_tail": (exc.stdout or b"")[-4000:].decode(errors="replace")
                if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-4000:]}
    return {"command": command, "returncode": done.returncode,
            "stdout_tail": done.stdout[-4000:], "stderr_tail": done.stderr[-4000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for all stages (default {BUDGET_S})")
    parser.add_argument("--out", type=Path, help="the results file (default: "
                        "benchmarks/results/gpu-check-<date>.json)")
    parser.add_argument("--steps", type=int, nargs=2, default=(STEPS, ONLINE_STEPS),
                        metavar=("CHECKED", "ONLINE"), help="training steps of stages 1 and 2 "
                        f"(default {STEPS} {ONLINE_STEPS})")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        from zeroskip.runtime import tritonenv
        problem = "no CUDA device" if not torch.cuda.is_available() else \
            tritonenv.problem(device)
        if problem:
            print(f"gpu_check: {problem}; nothing run", file=sys.stderr)
            return 1
        os.environ.pop("TRITON_INTERPRET", None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    start, stamp = time.monotonic(), datetime.date.today().isoformat()
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"gpu-check-{stamp}{'' if device.type == 'cuda' else '-cpu'}.json"
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    stages = [("correctness", lambda: stage_correctness(device, sync, args.steps[0])),
              ("online_autotuning", lambda: stage_online(device, sync, args.steps[1]))]
    if device.type == "cuda":
        stages.append(("bench", lambda: stage_bench(
            max(30.0, args.budget - (time.monotonic() - start) - 20), stamp)))
    ok = True
    for name, run in stages:
        if time.monotonic() - start > args.budget:
            report[name] = {"skipped": "over the time budget"}
            continue
        began = time.monotonic()
        try:
            report[name] = run()
        except Exception:       # noqa: BLE001 - a stage's failure is a result; go on
            report[name] = {"error": traceback.format_exc()[-4000:]}
        report[name]["seconds"] = round(time.monotonic() - began, 1)
        ok = ok and report[name].get("ok", report[name].get("returncode", 1) == 0)
        out.write_text(json.dumps(report, indent=1) + "\n")       # after every stage
        print(f"{name}: {'ok' if report[name].get('ok', True) else 'FAILED'} "
              f"({report[name]['seconds']} s)", flush=True)
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
