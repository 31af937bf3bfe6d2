#!/usr/bin/env python3
"""Example demo generator for Quarry in the robomimic / MimicGen HDF5 layout.

    python3 robomimic_gen.py --seed S --object NAME --batch_size N --out PATH.hdf5 \\
        [--stats PATH.json] [--images] [--min_len 20] [--max_len 80] [--success_rate 0.7]

Like MimicGen, a round attempts --batch_size trials (here: a synthetic reach-and-grasp of
object NAME) and keeps only the successful ones (about --success_rate of them) as demos of
random lengths. It writes

    data                  attrs: total (sum of num_samples), env_args (JSON string)
    data/demo_<i>         attrs: num_samples, model_file, seed, attempt
        actions (T,7) f4, rewards (T,) f8, dones (T,) i8, states (T,32) f8,
        obs/robot0_eef_pos (T,3), obs/robot0_eef_quat (T,4), obs/robot0_gripper_qpos (T,2),
        obs/object (T,10) (f8), next_obs/<same keys>,
        with --images: obs/agentview_image (T,84,84,3) u1, gzip-compressed, one chunk a step
    mask/train, mask/valid  demo names (fixed-length byte strings), a 90/10 split

Everything depends only on (--seed, --object) and the flags: the same command always writes
the same content. env_args depends only on --object, so every round of one object merges.
The file is written to a temporary name and renamed into place.

--stats PATH writes {"attempts": N, "successes": S}: the dataset holds S demos.

Needs numpy and h5py.
"""

import argparse
import json
import os
import sys
import zlib

import numpy as np
import h5py

OBS = {
    "robot0_eef_pos": 3,
    "robot0_eef_quat": 4,
    "robot0_gripper_qpos": 2,
    "object": 10,
}
IMAGE = (84, 84, 3)


def env_args(obj):
    """The environment description robomimic stores: the same for every round of `obj`."""
    return {
        "env_name": "PickPlace_" + obj,
        "type": 1,
        "env_version": "1.4.1",
        "env_kwargs": {
            "robots": ["Panda"],
            "controller_configs": {"type": "OSC_POSE", "control_delta": True},
            "control_freq": 20,
            "has_renderer": False,
            "has_offscreen_renderer": False,
            "use_camera_obs": False,
            "reward_shaping": False,
            "object": obj,
        },
    }


def trajectory(rng, length, images):
    """One successful demo: a smooth reach towards a goal, then a grasp."""
    t = np.linspace(0.0, 1.0, length)[:, None]
    start = rng.uniform(-0.2, 0.2, 3)
    goal = rng.uniform(-0.3, 0.3, 3) + np.array([0.0, 0.0, 0.8])
    eef = start + (goal - start) * (3 * t**2 - 2 * t**3)
    eef += rng.normal(0.0, 0.002, eef.shape)
    quat = np.tile([1.0, 0.0, 0.0, 0.0], (length, 1)) + rng.normal(0, 0.01, (length, 4))
    quat /= np.linalg.norm(quat, axis=1, keepdims=True)
    closing = np.clip((t[:, 0] - 0.7) / 0.3, 0.0, 1.0)
    gripper = np.stack([0.04 * (1 - closing), -0.04 * (1 - closing)], axis=1)
    obj = np.concatenate([np.tile(goal, (length, 1)), rng.normal(0, 0.05, (length, 7))], axis=1)
    obs = {
        "robot0_eef_pos": eef,
        "robot0_eef_quat": quat,
        "robot0_gripper_qpos": gripper,
        "object": obj,
    }
    actions = np.zeros((length, 7), dtype=np.float32)
    actions[:-1, :3] = np.clip(np.diff(eef, axis=0) * 20.0, -1, 1)
    actions[:, 3:6] = rng.normal(0, 0.05, (length, 3))
    actions[:, 6] = np.where(closing > 0, 1.0, -1.0)
    states = np.concatenate([eef, quat, gripper, obj, rng.normal(0, 0.1, (length, 13))], axis=1)
    if images:
        base = rng.integers(0, 200, IMAGE, dtype=np.uint8)
        steps = (np.arange(length) % 50).astype(np.uint8)
        obs["agentview_image"] = base[None] + steps[:, None, None, None]
    rewards = np.zeros(length)
    rewards[-1] = 1.0
    dones = np.zeros(length, dtype=np.int64)
    dones[-1] = 1
    return actions, rewards, dones, states, obs


def write(path, args):
    seed = (args.seed * 1_000_003 + zlib.crc32(args.object.encode())) % 2**63
    rng = np.random.default_rng(seed)
    demos = []
    for attempt in range(args.batch_size):
        trial = np.random.default_rng([seed, attempt])
        if trial.random() >= args.success_rate:
            continue
        length = int(trial.integers(args.min_len, args.max_len + 1))
        demos.append((attempt, length, trial))
    tmp = path + ".tmp"
    total = 0
    with h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        for i, (attempt, length, trial) in enumerate(demos):
            actions, rewards, dones, states, obs = trajectory(trial, length, args.images)
            g = data.create_group("demo_%d" % i)
            g.attrs["num_samples"] = length
            g.attrs["model_file"] = '<mujoco model="%s"/>' % args.object
            g.attrs["seed"] = args.seed
            g.attrs["attempt"] = attempt
            g.create_dataset("actions", data=actions)
            g.create_dataset("rewards", data=rewards)
            g.create_dataset("dones", data=dones)
            g.create_dataset("states", data=states)
            for key, value in obs.items():
                nxt = np.concatenate([value[1:], value[-1:]], axis=0)
                if key == "agentview_image":
                    opts = dict(chunks=(1,) + IMAGE, compression="gzip", compression_opts=4)
                    g.create_dataset("obs/" + key, data=value, **opts)
                    g.create_dataset("next_obs/" + key, data=nxt, **opts)
                else:
                    g.create_dataset("obs/" + key, data=value)
                    g.create_dataset("next_obs/" + key, data=nxt)
            total += length
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(env_args(args.object))
        names = ["demo_%d" % i for i in range(len(demos))]
        order = rng.permutation(len(names))
        n_valid = max(1, len(names) // 10) if len(names) > 1 else 0
        valid = sorted(order[:n_valid].tolist())
        train = sorted(order[n_valid:].tolist())
        mask = f.create_group("mask")
        mask.create_dataset("train", data=np.array([names[i] for i in train], dtype="S"))
        mask.create_dataset("valid", data=np.array([names[i] for i in valid], dtype="S"))
    os.replace(tmp, path)
    return len(demos), total


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=int, required=True, help="round seed")
    p.add_argument("--object", required=True, help="object (task) name")
    p.add_argument("--batch_size", type=int, required=True, help="trials attempted")
    p.add_argument("--out", required=True, help="output .hdf5 path")
    p.add_argument("--stats", help="write {attempts, successes} JSON here")
    p.add_argument("--images", action="store_true", help="add 84x84 RGB agentview images")
    p.add_argument("--min_len", type=int, default=20, help="shortest demo (steps)")
    p.add_argument("--max_len", type=int, default=80, help="longest demo (steps)")
    p.add_argument("--success_rate", type=float, default=0.7, help="chance a trial succeeds")
    args = p.parse_args(argv)
    if args.batch_size < 0 or not 1 <= args.min_len <= args.max_len:
        p.error("need batch_size >= 0 and 1 <= min_len <= max_len")
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    n, total = write(args.out, args)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump({"attempts": args.batch_size, "successes": n}, f)
    print("[robomimic_gen] %s seed %d: %d/%d trials succeeded, %d steps -> %s"
          % (args.object, args.seed, n, args.batch_size, total, args.out))
    return 0


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        # Warm mode (generator.mode = "warm"): rounds come from the agent, through
        # deploy/python's quarry_generator (installed, or found beside this directory).
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from quarry_generator import serve_cli

        sys.exit(serve_cli(main))
    sys.exit(main())
