#!/usr/bin/env python3
"""Example .npz generator for Quarry: grasp candidates for one object, one row per sample.

    python3 npz_gen.py --seed S --object NAME --batch_size N --out PATH.npz \\
        [--stored] [--stats PATH.json]

A round attempts N grasps on NAME; each attempt succeeds with probability about 0.6 and only
successes are written, with np.savez_compressed (or np.savez with --stored):

    pose      float32 (S, 7)    wrist position + quaternion
    joints    float32 (S, 16)   finger joint angles
    energy    float32 (S,)      optimizer energy (lower is better; filter on it)
    E_pen     float32 (S,)      penetration energy
    attempt   int64   (S,)      which attempt of the round each row was

Everything depends only on (seed, object): the same flags give the same arrays.
--stats PATH writes the yield sidecar {"attempts": N, "successes": S}. Needs numpy.
"""

import argparse
import json
import os
import sys
import zlib

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--batch_size", type=int, required=True, help="attempts in this round")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--stored", action="store_true", help="np.savez (no compression)")
    p.add_argument("--stats", help="write {attempts, successes} JSON here")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch_size must be >= 0")

    rng = np.random.default_rng([args.seed, zlib.crc32(args.object.encode())])
    n = args.batch_size
    pose = rng.normal(0.0, 0.05, (n, 7)).astype(np.float32)
    pose[:, 3:] /= np.linalg.norm(pose[:, 3:], axis=1, keepdims=True) + 1e-9
    joints = rng.uniform(-0.3, 1.6, (n, 16)).astype(np.float32)
    e_pen = np.abs(rng.normal(0.0, 0.02, n)).astype(np.float32)
    energy = (e_pen * 10 + rng.gamma(2.0, 0.5, n)).astype(np.float32)
    ok = rng.random(n) < 0.6
    rows = {
        "pose": pose[ok],
        "joints": joints[ok],
        "energy": energy[ok],
        "E_pen": e_pen[ok],
        "attempt": np.nonzero(ok)[0].astype(np.int64),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".partial.npz"
    (np.savez if args.stored else np.savez_compressed)(tmp, **rows)
    os.replace(tmp, args.out)
    if args.stats:
        os.makedirs(os.path.dirname(args.stats) or ".", exist_ok=True)
        with open(args.stats, "w") as f:
            json.dump({"attempts": n, "successes": int(ok.sum())}, f)
    print(f"[npz_gen] {args.object} seed {args.seed}: {int(ok.sum())}/{n} grasps -> {args.out}")
    return 0


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        # Warm mode (generator.mode = "warm"): rounds come from the agent, through
        # deploy/python's quarry_generator (installed, or found beside this directory).
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from quarry_generator import serve_cli

        sys.exit(serve_cli(main))
    sys.exit(main())
