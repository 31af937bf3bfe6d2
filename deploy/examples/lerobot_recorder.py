"""An example LeRobot generator: records one round of episodes with lerobot's own writer
(`LeRobotDataset.create`, `add_frame`, `save_episode`, `finalize`; lerobot 0.4.x, Python
3.11, torch), seeded by the round, into the dataset root `--out`.

    python lerobot_recorder.py --seed 7 --object cube --batch_size 8 --out out/r7/dataset

The "robot" is a scripted toy (a 6-dim arm state, a 6-dim action and one 96x128 camera
rendering a moving square) standing in for a simulator or a teleoperation loop: replace
`step` with your environment and keep the writer calls. Each episode's task names the object;
the same seed records the same episodes. See lerobot_job.toml.

Both modes: run per round as above, or warm (`generator.mode = "warm"`, QUARRY_REPLY_FD set)
through deploy/python's quarry_generator, which calls `main` once per round with the round's
`--seed --object --batch_size --out`. Warm mode pays the imports of lerobot and torch (about
4 s) once per GPU instead of once per round. A round depends only on its flags: its random
generator comes from `--seed`, and each round creates a fresh `LeRobotDataset` in its own
`--out` (nothing of a previous round's dataset is kept). lerobot orders the features of
`meta/stats.json` by iterating a set of their names, which follows Python's string hashing:
run it with a fixed `PYTHONHASHSEED` (the job file sets 0) and a round writes the same bytes
in every file, warm or cold, videos included (see lerobot_job.toml; Quarry's merge writes the
final's stats.json with sorted keys, so finals agree either way).
"""

import argparse
import os
import sys

import numpy as np

from lerobot.datasets.lerobot_dataset import LeRobotDataset

FPS = 30
H, W = 96, 128
FEATURES = {
    "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
    "action": {"dtype": "float32", "shape": (6,), "names": None},
    "observation.images.front": {
        "dtype": "video",
        "shape": (H, W, 3),
        "names": ["height", "width", "channels"],
    },
}


def step(rng, state, t):
    """One control step of the toy: a noisy proportional move towards a target, and the
    camera's view of it."""
    target = np.sin(np.arange(6) + t / FPS).astype(np.float32)
    action = (target - state + rng.normal(scale=0.05, size=6)).astype(np.float32)
    img = np.zeros((H, W, 3), dtype=np.uint8)
    cy, cx = int((state[0] + 1) * H / 3) % (H - 16), int((state[1] + 1) * W / 3) % (W - 16)
    img[cy : cy + 16, cx : cx + 16] = (255, 128, 0)
    return action, img


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--batch_size", type=int, default=8, help="episodes to record")
    p.add_argument("--out", required=True, help="the dataset root to create")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    rng = np.random.default_rng(a.seed)
    ds = LeRobotDataset.create(
        repo_id=f"quarry/{a.object}_{a.seed}",
        fps=FPS,
        features=FEATURES,
        root=a.out,
        robot_type="toy_arm",
    )
    for _ in range(a.batch_size):
        state = rng.uniform(-1, 1, size=6).astype(np.float32)
        for t in range(int(rng.integers(40, 81))):
            action, img = step(rng, state, t)
            ds.add_frame(
                {
                    "observation.state": state,
                    "action": action,
                    "observation.images.front": img,
                    "task": f"move the {a.object} to the target",
                }
            )
            state = (state + 0.5 * action).astype(np.float32)
        ds.save_episode()
    ds.finalize()
    print(f"lerobot_recorder: {a.object} seed {a.seed}: recorded {a.batch_size} episodes "
          f"to {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        # Warm mode (generator.mode = "warm"): rounds come from the agent, through
        # deploy/python's quarry_generator (installed, or found beside this directory).
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from quarry_generator import serve_cli

        sys.exit(serve_cli(main))
    sys.exit(main())
