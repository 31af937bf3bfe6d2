#!/usr/bin/env python3
"""Example episode collector for Quarry: writes one round of a scripted collector's episode
directory.

    python3 episode_collector.py --seed S --object ENV --batch_size N --out DIR [--stats PATH]

It attempts N episodes of environment ENV; each succeeds with probability --success_rate and
only successes are saved, so DIR holds S <= N episodes:

    DIR/episodes/episode_00000.pkl          pickle of (data_dict, attrs_dict)
    DIR/metadata/episode_00000_meta.json    {"episode_idx", "filepath", "timestamp",
                                             "statistics": {"num_timesteps", "num_objects",
                                              "num_contacts", "num_actions", "object_names"}}
    DIR/metadata/collection_summary.json    {"env_name", "collection_date", "duration_seconds",
                                             "total_episodes", "successful_episodes",
                                             "failed_episodes", "total_timesteps",
                                             "avg_timesteps_per_episode",
                                             "avg_duration_per_episode", "success_rate",
                                             "camera_names", "num_points", "voxel_size",
                                             "error_log"}
    DIR/logs/collect.log

data_dict holds numpy arrays: obs/{robot0_eef_pos (T, 3) f4, robot0_gripper_qpos (T, 2) f4,
point_cloud (T, P, 3) f4, agentview_rgb (T, 8, 8, 3) u1}, actions (T-1, 7) f4, rewards (T,) f4,
dones (T,) bool, contacts: a list of {"step", "a", "b", "force"} dicts. attrs_dict holds the
env name, seed, attempt, object and camera names and the success flag. The summary's averages
are the collector's: avg_timesteps_per_episode = total_timesteps / successful_episodes (the
timesteps of saved episodes), avg_duration_per_episode = duration_seconds / total_episodes,
success_rate = successful_episodes / total_episodes (0 when a divisor is 0).

Everything depends only on (--object, --seed) and the flags: the same command always writes
the same bytes (timestamps are derived from the seed, not the clock). Needs numpy (for the
arrays); --arrays lists writes plain lists instead, needing only the standard library.

  --stats PATH          write {"attempts": N, "successes": S} there
  --success_rate P      chance an attempt succeeds (default 0.8)
  --protocol K          pickle protocol (default 4)
  --num_points P        points per point cloud frame (default 16)
  --fail_seeds L        print an error and exit 3 for these seeds (comma separated)
  --truncate_seeds L    write the dataset, then cut episode 0's file in half (a crash's
                        leftovers), exiting 0

Exit codes: 0 success, 2 bad usage, 3 --fail_seeds.
"""

import argparse
import datetime
import json
import os
import pickle
import random
import sys

CAMERAS = ["agentview", "robot0_eye_in_hand"]
OBJECTS = ["cubeA", "cubeB", "cubeC", "plate", "mug"]
EPOCH = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)


def seed_list(text):
    try:
        return frozenset(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma separated list of integers: {text!r}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--seed", type=int, required=True, help="round seed")
    p.add_argument("--object", required=True, help="environment name (env_name)")
    p.add_argument("--batch_size", type=int, required=True, help="episodes to attempt")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--stats", default=None, help="yield sidecar JSON path")
    p.add_argument("--success_rate", type=float, default=0.8)
    p.add_argument("--protocol", type=int, default=4, choices=range(0, pickle.HIGHEST_PROTOCOL + 1))
    p.add_argument("--num_points", type=int, default=16)
    p.add_argument("--arrays", choices=("numpy", "lists"), default="numpy")
    p.add_argument("--fail_seeds", type=seed_list, default=frozenset(), metavar="L")
    p.add_argument("--truncate_seeds", type=seed_list, default=frozenset(), metavar="L")
    return p


def iso(seconds):
    return (EPOCH + datetime.timedelta(seconds=seconds)).isoformat()


def make_episode(args, rng, attempt, np):
    """One attempted episode: (data_dict, attrs_dict, statistics, duration, success)."""
    steps = rng.randint(30, 90)
    n_obj = rng.randint(2, 4)
    objects = rng.sample(OBJECTS, n_obj)
    success = rng.random() < args.success_rate
    duration = round(steps * 0.05 + rng.random(), 3)
    n_contacts = rng.randint(0, steps // 2)
    contacts = [{"step": rng.randrange(steps), "a": rng.choice(objects), "b": "gripper",
                 "force": round(rng.uniform(0.0, 20.0), 4)} for _ in range(n_contacts)]
    arr_seed = rng.getrandbits(32)
    if np is not None:
        g = np.random.default_rng(arr_seed)
        f4 = lambda *shape: g.standard_normal(shape).astype(np.float32)
        obs = {
            "robot0_eef_pos": f4(steps, 3),
            "robot0_gripper_qpos": f4(steps, 2),
            "point_cloud": f4(steps, args.num_points, 3),
            "agentview_rgb": g.integers(0, 256, (steps, 8, 8, 3), dtype=np.uint8),
        }
        data = {"obs": obs, "actions": f4(steps - 1, 7), "rewards": f4(steps),
                "dones": np.arange(steps) == steps - 1, "contacts": contacts}
    else:
        g = random.Random(arr_seed)
        fl = lambda n: [g.gauss(0.0, 1.0) for _ in range(n)]
        obs = {"robot0_eef_pos": [fl(3) for _ in range(steps)],
               "robot0_gripper_qpos": [fl(2) for _ in range(steps)],
               "point_cloud": [[fl(3) for _ in range(args.num_points)] for _ in range(steps)]}
        data = {"obs": obs, "actions": [fl(7) for _ in range(steps - 1)], "rewards": fl(steps),
                "dones": [i == steps - 1 for i in range(steps)], "contacts": contacts}
    attrs = {"env_name": args.object, "seed": args.seed, "attempt": attempt,
             "object_names": objects, "camera_names": CAMERAS, "success": success}
    stats = {"num_timesteps": steps, "num_objects": n_obj, "num_contacts": n_contacts,
             "num_actions": steps - 1, "object_names": objects}
    return data, attrs, stats, duration, success


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 0:
        parser.error("--batch_size must be >= 0")
    if not 0.0 <= args.success_rate <= 1.0:
        parser.error("--success_rate must be in [0, 1]")
    if args.seed in args.fail_seeds:
        print(f"episode_collector: injected failure for seed {args.seed}", file=sys.stderr)
        return 3
    np = None
    if args.arrays == "numpy":
        try:
            import numpy as np
        except ImportError:
            parser.error("numpy is not installed; install it or pass --arrays lists")

    rng = random.Random(f"{args.object}:{args.seed}")
    out = args.out
    eps_dir, meta_dir, log_dir = (os.path.join(out, d) for d in ("episodes", "metadata", "logs"))
    for d in (eps_dir, meta_dir, log_dir):
        os.makedirs(d, exist_ok=True)
    clock = args.seed * 86400.0
    start = clock
    saved, total_steps, errors, log = 0, 0, [], []
    for attempt in range(args.batch_size):
        data, attrs, stats, duration, success = make_episode(args, rng, attempt, np)
        clock += duration
        if not success:
            errors.append(f"attempt {attempt}: task not completed in {stats['num_timesteps']} steps")
            log.append(f"{iso(clock)} attempt {attempt} failed")
            continue
        name = f"episode_{saved:05d}.pkl"
        path = os.path.join(eps_dir, name)
        with open(path, "wb") as f:
            pickle.dump((data, attrs), f, protocol=args.protocol)
        meta = {"episode_idx": saved, "filepath": os.path.join(out, "episodes", name),
                "timestamp": iso(clock), "statistics": stats}
        with open(os.path.join(meta_dir, f"episode_{saved:05d}_meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        log.append(f"{iso(clock)} attempt {attempt} saved as {name}")
        total_steps += stats["num_timesteps"]
        saved += 1

    attempts = args.batch_size
    duration = round(clock - start, 3)
    summary = {
        "env_name": args.object,
        "collection_date": iso(start),
        "duration_seconds": duration,
        "total_episodes": attempts,
        "successful_episodes": saved,
        "failed_episodes": attempts - saved,
        "total_timesteps": total_steps,
        "avg_timesteps_per_episode": total_steps / saved if saved else 0.0,
        "avg_duration_per_episode": duration / attempts if attempts else 0.0,
        "success_rate": saved / attempts if attempts else 0.0,
        "camera_names": CAMERAS,
        "num_points": args.num_points,
        "voxel_size": 0.005,
        "error_log": errors,
    }
    with open(os.path.join(meta_dir, "collection_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(log_dir, "collect.log"), "w") as f:
        f.write("".join(line + "\n" for line in log))

    if args.seed in args.truncate_seeds and saved:
        path = os.path.join(eps_dir, "episode_00000.pkl")
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        print(f"episode_collector: cut {path} to {size // 2} bytes (injected)", flush=True)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump({"attempts": attempts, "successes": saved}, f)
    print(f"episode_collector: {args.object} seed {args.seed}: saved {saved}/{attempts} "
          f"episodes to {out}", flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        # Warm mode (generator.mode = "warm"): rounds come from the agent, through
        # deploy/python's quarry_generator (installed, or found beside this directory).
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from quarry_generator import serve_cli

        sys.exit(serve_cli(main))
    sys.exit(main())
