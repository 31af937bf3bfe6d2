#!/usr/bin/env python3
"""Example replay-buffer generator for Quarry, shaped like a MimicGen-style data generator.

    python3 zarr_replay_gen.py --seed S --object NAME --batch_size N --out PATH.zarr \\
        [--format 2|3] [--stats PATH.json]

A round attempts N demonstrations of manipulating NAME; each attempt is a short episode of a
toy pick trajectory that succeeds or fails (about 70% succeed). Only successes are written,
as a zarr replay buffer (the diffusion-policy convention):

    data/action        float32 (T, 7)   end-effector delta pose + gripper
    data/state         float32 (T, 10)  joint positions + object position
    meta/episode_ends  int64   (E,)     cumulative end row of each episode
    meta/success       bool    (E,)     all True (failures are dropped)
    meta/attempt       int64   (E,)     which attempt of the round each episode was

with the root attributes `object`, `seed` and `generator`. --format picks zarr v2 (blosc
lz4 + shuffle, zarr-python's default) or v3 (bytes + zstd, its default). Everything depends
only on (seed, object), so the same flags give the same arrays.

--stats PATH writes the yield sidecar {"attempts": N, "successes": E}.
Needs numpy and zarr >= 3.
"""

import argparse
import json
import os
import shutil
import sys
import zlib

import numpy as np
import zarr


def episode(rng, obj_seed):
    """One attempt: (actions, states, success)."""
    length = int(rng.integers(8, 25))
    t = np.linspace(0.0, 1.0, length, dtype=np.float32)[:, None]
    goal = rng.normal(0.0, 0.1, 3).astype(np.float32) + np.float32(obj_seed % 7) * 0.01
    action = np.zeros((length, 7), np.float32)
    action[:, :3] = goal * (1 - t) / length
    action[:, 3:6] = rng.normal(0.0, 0.01, (length, 3))
    action[:, 6] = (t[:, 0] > 0.6).astype(np.float32)
    joints = np.cumsum(rng.normal(0.0, 0.02, (length, 7)), axis=0).astype(np.float32)
    state = np.concatenate([joints, np.repeat(goal[None, :], length, axis=0)], axis=1)
    success = bool(rng.random() < 0.7)
    return action, state.astype(np.float32), success


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--batch_size", type=int, required=True, help="attempts in this round")
    p.add_argument("--out", required=True, help="output store (a directory, e.g. r.zarr)")
    p.add_argument("--format", type=int, choices=(2, 3), default=3, help="zarr format")
    p.add_argument("--stats", help="write {attempts, successes} JSON here")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch_size must be >= 0")

    obj_seed = zlib.crc32(args.object.encode())
    rng = np.random.default_rng([args.seed, obj_seed])
    actions, states, attempts = [], [], []
    for i in range(args.batch_size):
        a, s, ok = episode(rng, obj_seed)
        if ok:
            actions.append(a)
            states.append(s)
            attempts.append(i)
    ends = np.cumsum([len(a) for a in actions], dtype=np.int64)
    action = np.concatenate(actions) if actions else np.zeros((0, 7), np.float32)
    state = np.concatenate(states) if states else np.zeros((0, 10), np.float32)

    tmp = args.out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(tmp, mode="w", zarr_format=args.format)
    root.attrs.update({"object": args.object, "seed": args.seed, "generator": "zarr_replay_gen"})
    chunk = 256

    def put(name, arr):
        a = root.create_array(name, shape=arr.shape, dtype=arr.dtype,
                              chunks=(chunk,) + arr.shape[1:])
        if arr.size:
            a[...] = arr

    put("data/action", action)
    put("data/state", state)
    put("meta/episode_ends", ends)
    put("meta/success", np.ones(len(ends), bool))
    put("meta/attempt", np.asarray(attempts, np.int64))
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)

    if args.stats:
        with open(args.stats, "w") as f:
            json.dump({"attempts": args.batch_size, "successes": len(ends)}, f)
    print(f"[zarr_replay_gen] {args.object} seed {args.seed}: "
          f"{len(ends)}/{args.batch_size} episodes, {len(action)} steps -> {args.out}")
    return 0


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        # Warm mode (generator.mode = "warm"): rounds come from the agent, through
        # deploy/python's quarry_generator (installed, or found beside this directory).
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from quarry_generator import serve_cli

        sys.exit(serve_cli(main))
    sys.exit(main())
