"""Seconds per training step (forward, backward, AdamW step) of test_resnet and test_vit on random
tensors, one thread: `OMP_NUM_THREADS=1 python results/synthetic_vit/step_time.py`."""

import time

import timm
import torch


def step_time(model: torch.nn.Module, side: int, batch: int, steps: int = 8) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, 16, (batch,))
    for i in range(steps + 2):  # the first two steps are not timed
        if i == 2:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, args in [("test_resnet", {}), ("test_vit", {}), ("test_vit", {"patch_size": 8})]:
        model = timm.create_model(name, num_classes=16, **args)
        if name == "test_resnet":  # as synth_baseline trains it
            model = model.to(memory_format=torch.channels_last)
        for side, batch in [(128, 16), (128, 64), (96, 64)] if not args else [(128, 16)]:
            label = name + "".join(f", {k}={v}" for k, v in args.items())
            print(f"| {label} | {side} | {batch} | {step_time(model, side, batch):.3f} |")
