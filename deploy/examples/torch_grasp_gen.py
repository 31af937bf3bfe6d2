#!/usr/bin/env python3
"""Example GPU generator for Quarry: a small batched gradient-based grasp optimizer in PyTorch.

    python3 torch_grasp_gen.py --name N --object_code O --batch_size B \\
        --num_iterations I --seed S --gpu G [--device auto|cuda|cpu] [extra flags]

It smoke-tests a GPU cluster without the research code: the same command line as the legacy
grasp optimizer (and deploy/examples/grasp_gen.py), the same output format and layout, and
real GPU work. B grasps (two hands, 12 joints each) are optimized together with Adam for I
iterations against a toy energy: fingertips of a made-up hand model should touch a sphere of
the object's scale without entering it. The result is written to

    <out_root>/<N>/results/<O>.npy

(<out_root> defaults to ../data/experiments, the legacy layout; --output PATH writes PATH
instead) as an object array of dicts, exactly the keys grasp_gen.py writes: object_code,
scale, qpos_left, qpos_right ({joint: float}), energy, E_pen, E_dis, valid, note, seed, index.

Device: `--device auto` (default) uses CUDA when PyTorch sees a GPU, else the CPU, so the
same job runs on a laptop. Under Quarry the agent sets CUDA_VISIBLE_DEVICES to its GPU, so
the generator always uses device 0 (`--gpu` is only printed, like the legacy optimizer's).
Threads: PyTorch's CPU pool follows OMP_NUM_THREADS, which the agent sets per GPU.

Determinism: the starting grasps come from a CPU generator seeded with --seed, so a seed gives
the same batch on every machine of the same device type; CUDA and CPU results differ in the
last bits (run a job on one kind of device for byte-identical finals).

Warm mode: started by a Quarry agent with generator.mode = "warm" (QUARRY_REPLY_FD set), it
serves rounds through deploy/python's quarry_generator (installed, or found beside this
directory): each round runs main() with the flags the process was started with plus the
round's --name, --object_code, --seed, --batch_size, --num_iterations and --output, so both
modes write the same bytes, and PyTorch's import (about 1.5 s) and CUDA context are paid once
per GPU instead of once per round. Nothing carries over between rounds: the starting grasps
come from a generator seeded by the round, the optimizer and its tensors are made afresh.
deploy/examples/torch_grasp_job.toml runs it; deploy/examples/warm_check.py compares both modes.

Needs PyTorch (and numpy only if grasp_gen.py is not beside this file: it writes the .npy
with grasp_gen's pure-Python writer when it can, else with numpy). Without PyTorch it exits 2
with a message. Unknown flags are accepted and ignored.
"""

import argparse
import math
import os
import sys
import time

# The joints of each hand, as grasp_gen.py names them.
JOINTS = (
    "WRJTx", "WRJTy", "WRJTz", "WRJRx", "WRJRy", "WRJRz",
    "FFJ4", "FFJ3", "FFJ2", "FFJ1", "MFJ3", "THJ5",
)
SCALES = (0.06, 0.08, 0.1, 0.12, 0.15)
# Fingertips per hand in the toy hand model.
TIPS = 3
VALID_PEN = 0.02


def log(msg):
    print(f"[torch_grasp_gen] {msg}", flush=True)


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--name", required=True, help="experiment (round) name")
    p.add_argument("--object_code", required=True, help="object to grasp")
    p.add_argument("--batch_size", type=int, default=64, help="grasps optimized together")
    p.add_argument("--num_iterations", type=int, default=200, help="Adam steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--gpu", default="0", help="GPU id, only printed (default 0)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available, else CPU (default)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--out_root", default=None,
                   help="results root (default ../data/experiments relative to the cwd)")
    p.add_argument("--output", default=None,
                   help="write the results here instead of <out_root>/<name>/results/<O>.npy")
    return p


def hand_tips(torch, q):
    """Fingertip positions of the toy hand model: (B, 2, 12) joints -> (B, 2, TIPS, 3).

    The wrist sits at its translation joints; each fingertip is a unit direction set by the
    wrist rotation and two finger joints, at a reach of 0.05 + 0.1 * sigmoid(third joint)."""
    wrist = 0.2 * q[..., 0:3]
    rot = q[..., 3:6]
    fingers = q[..., 6:12]
    tips = []
    for k in range(TIPS):
        a = rot[..., 0] + fingers[..., k % 6] + 2.0 * math.pi * k / TIPS
        b = rot[..., 1] + 0.5 * fingers[..., (k + 1) % 6]
        reach = 0.05 + 0.1 * torch.sigmoid(fingers[..., (k + 2) % 6] + rot[..., 2])
        d = torch.stack(
            (torch.cos(a) * torch.cos(b), torch.sin(a) * torch.cos(b), torch.sin(b)), dim=-1
        )
        tips.append(wrist + reach.unsqueeze(-1) * d)
    return torch.stack(tips, dim=2)


def energies(torch, q, scale):
    """(energy, E_pen, E_dis), each (B,): fingertips outside the sphere of radius `scale`
    cost their squared distance, tips inside cost their depth (weighted 100 in energy)."""
    tips = hand_tips(torch, q)
    signed = tips.norm(dim=-1) - scale.view(-1, 1, 1)
    e_dis = signed.clamp(min=0).pow(2).sum(dim=(1, 2))
    e_pen = (-signed).clamp(min=0).sum(dim=(1, 2))
    reg = 1e-3 * q.pow(2).sum(dim=(1, 2))
    return e_dis + 100.0 * e_pen + reg, e_pen, e_dis


def optimize(torch, args, device):
    gen = torch.Generator().manual_seed(args.seed)
    b = args.batch_size
    q0 = torch.rand(b, 2, len(JOINTS), generator=gen, dtype=torch.float32) * 2.0 - 1.0
    pick = torch.randint(len(SCALES), (b,), generator=gen)
    scale = torch.tensor(SCALES, dtype=torch.float32)[pick]
    q = q0.to(device).requires_grad_(True)
    scale = scale.to(device)
    opt = torch.optim.Adam([q], lr=args.lr)
    iters = max(0, args.num_iterations)
    step = max(1, iters // 5)
    for it in range(iters):
        energy, _, _ = energies(torch, q, scale)
        opt.zero_grad(set_to_none=True)
        energy.sum().backward()
        opt.step()
        with torch.no_grad():
            q.clamp_(-1.5, 1.5)
        if (it + 1) % step == 0 or it + 1 == iters:
            log(f"iter {it + 1}/{iters} mean energy={energy.mean().item():.6f}")
    with torch.no_grad():
        energy, e_pen, e_dis = energies(torch, q, scale)
    return (q.detach().cpu(), scale.cpu(), energy.cpu(), e_pen.cpu(), e_dis.cpu())


def samples(args, result):
    q, scale, energy, e_pen, e_dis = result
    out = []
    for i in range(q.shape[0]):
        left = q[i, 0].tolist()
        right = q[i, 1].tolist()
        pen = float(e_pen[i])
        out.append({
            "object_code": args.object_code,
            "scale": float(scale[i]),
            "qpos_left": dict(zip(JOINTS, (float(v) for v in left))),
            "qpos_right": dict(zip(JOINTS, (float(v) for v in right))),
            "energy": float(energy[i]),
            "E_pen": pen,
            "E_dis": float(e_dis[i]),
            "valid": pen < VALID_PEN,
            "note": None,
            "seed": args.seed,
            "index": i,
        })
    return out


def save(path, items):
    """Writes the object array as grasp_gen.py does (its pure-Python writer when it is beside
    this file), else with numpy's np.save."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        import grasp_gen  # noqa: PLC0415 (optional sibling module)
    except ImportError:
        grasp_gen = None
    finally:
        sys.path.pop(0)
    if grasp_gen is not None:
        header, payload = grasp_gen.npy_object(items)
        grasp_gen.write_atomic(path, header + payload)
        return
    import numpy as np  # noqa: PLC0415
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None):
    args, unknown = build_parser().parse_known_args(argv)
    if args.batch_size < 0:
        print("torch_grasp_gen: --batch_size must be >= 0", file=sys.stderr)
        return 2
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        print("torch_grasp_gen: needs PyTorch (pip install torch); "
              "deploy/examples/grasp_gen.py needs nothing", file=sys.stderr)
        return 2
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("torch_grasp_gen: --device cuda but PyTorch sees no GPU "
              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    log(f"name={args.name} object={args.object_code} seed={args.seed} batch={args.batch_size} "
        f"iterations={args.num_iterations} gpu={args.gpu} device={device} ({name}) "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')} "
        f"threads={torch.get_num_threads()}")
    if unknown:
        log(f"ignoring unknown flags: {' '.join(unknown)}")
    started = time.monotonic()
    result = optimize(torch, args, device)
    items = samples(args, result)
    if args.output:
        path = args.output
    else:
        out_root = args.out_root or os.path.join("..", "data", "experiments")
        path = os.path.join(out_root, args.name, "results", f"{args.object_code}.npy")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save(path, items)
    valid = sum(1 for s in items if s["valid"])
    log(f"saved {len(items)} samples ({valid} valid) to {path} "
        f"in {time.monotonic() - started:.1f} s")
    return 0


def round_flags(r):
    """The flags of one warm round, after the ones the process was started with."""
    return ["--name", r.round_name, "--object_code", r.object, "--seed", str(r.seed),
            "--batch_size", str(r.batch_size), "--num_iterations", str(r.num_iterations),
            "--output", r.output]


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        # Warm mode (generator.mode = "warm"): rounds come from the agent, through
        # deploy/python's quarry_generator (installed, or found beside this directory).
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from quarry_generator import serve_cli

        sys.exit(serve_cli(main, flags=round_flags))
    sys.exit(main())
