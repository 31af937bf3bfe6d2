"""An example LeRobot generator: records one round of episodes with lerobot's own writer
(`LeRobotDataset.create`, `add_frame`, `save_episode`, `finalize`; lerobot 0.4.x, Python
3.11, torch), seeded by the round, into the dataset root `--out`.

    python lerobot_recorder.py --seed 7 --object cube --batch_size 8 --out out/r7/dataset

The "robot" is a scripted toy (a 6-dim arm state, a 6-dim action and one 96x128 camera
rendering a moving square) standing in for a simulator or a teleoperation loop: replace
`step` with your environment and keep the writer calls. Each episode's task names the object;
the same seed records the same episodes. See lerobot_job.toml.
"""

import argparse

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--batch_size", type=int, default=8, help="episodes to record")
    p.add_argument("--out", required=True, help="the dataset root to create")
    a = p.parse_args()
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


if __name__ == "__main__":
    main()
