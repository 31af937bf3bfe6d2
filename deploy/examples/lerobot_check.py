"""Loads a Quarry LeRobot final with lerobot's own reader and compares every frame with the
rounds it was merged from.

    python lerobot_check.py FINAL ROUND [ROUND ...]

FINAL is a final's directory, the ROUNDs the rounds it holds, in round order (as the manifest's
`seeds` list them). Needs lerobot (checked with 0.4.4) and torch. Every frame of
`LeRobotDataset(repo_id, root=FINAL)` must equal the rounds' frames in order, cut where the
final ends: every feature (decoded video frames included, as tensors) and the task string;
`episode_index`, `index` and `task_index` must be the final's own numbering. Prints one line per
dataset and `ok <episodes> <frames>`; exits non-zero at the first difference.
"""

import sys

import torch

from lerobot.datasets.lerobot_dataset import LeRobotDataset

# PyAV decodes wherever lerobot runs; torchcodec needs matching FFmpeg libraries.
BACKEND = "pyav"
RENUMBERED = {"episode_index", "index", "task_index"}


def main():
    final_root, round_roots = sys.argv[1], sys.argv[2:]
    final = LeRobotDataset("quarry/final", root=final_root, video_backend=BACKEND)
    print(f"final: {final.num_episodes} episodes, {final.num_frames} frames, fps {final.fps}")
    i = 0
    for r, root in enumerate(round_roots):
        src = LeRobotDataset(f"quarry/round{r}", root=root, video_backend=BACKEND)
        print(f"round {r}: {src.num_episodes} episodes, {src.num_frames} frames")
        for j in range(len(src)):
            if i == len(final):
                break
            a, b = final[i], src[j]
            for k, v in b.items():
                if k in RENUMBERED:
                    continue
                w = a[k]
                same = torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v
                if not same:
                    sys.exit(f"frame {i} (round {r} frame {j}): {k} differs")
            if int(a["index"]) != i:
                sys.exit(f"frame {i}: index is {int(a['index'])}")
            i += 1
    if i != len(final):
        sys.exit(f"the final holds {len(final)} frames but the rounds only {i}")
    print("ok", final.num_episodes, i)


if __name__ == "__main__":
    main()
