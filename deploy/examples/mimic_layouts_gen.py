#!/usr/bin/env python3
"""Stand-in generator writing rounds exactly as the real demo generators lay them out.

    python3 mimic_layouts_gen.py --layout isaaclab|mimicgen|robomimic --seed S --object NAME \\
        --batch_size N --out DIR/FILE.hdf5

No simulator runs: each demo's values come from (--seed, --object, its index), but every
group, dataset, dtype, shape, compression and attribute is written the way the real writer
writes it, so a Quarry job can be tried (and tested) on the layout before the simulator is
installed. The layouts, and the source each one mirrors field by field:

isaaclab   IsaacLab Mimic's scripts/imitation_learning/isaaclab_mimic/generate_dataset.py, whose
           recorders (isaaclab/envs/mdp/recorders/recorders.py, ActionStateRecorderManagerCfg)
           hand episodes to HDF5DatasetFileHandler.write_episode
           (isaaclab/utils/datasets/hdf5_dataset_file_handler.py), IsaacLab main at
           032e26b76a26c4eafb3165b8e3611c9334811a21:
             data.attrs       total (int, sum of num_samples), env_args json.dumps({"env_name",
                              "type": 2})
             data/demo_<i>    attrs num_samples (= len(actions)), seed (int), success (bool)
               actions (T,7), processed_actions (T,8), obs/<term> (T,k) (policy terms, not
               concatenated), states/articulation/robot/{root_pose (T,7), root_velocity
               (T,6), joint_position (T,9), joint_velocity (T,9)},
               states/rigid_object/<name>/{root_pose, root_velocity},
               initial_state/<same tree as states> with first axis 1 (recorded once, after
               reset); every dataset float32 (torch .cpu().numpy()), gzip-compressed; no mask
           generate_dataset.py exports only the successful episodes (EXPORT_SUCCEEDED_ONLY)
           and writes no statistics file (the success count is only printed).
mimicgen   MimicGen's mimicgen/scripts/generate_dataset.py at
           14fc947ba692a2b6d2a94021c44c8f0ef67a45d7: one file per demo from
           mimicgen/utils/file_utils.py write_demo_to_hdf5, merged by merge_all_hdf5
           (08d0fb2c7e467ee2cbe84a3c704e9faa335d7b7f) into demo.hdf5:
             data.attrs       total, env_args (json.dumps(env.serialize(), indent=4)), and
                              here also timestamp (float) and readable_timestamp
                              ("date_%m_%d_%Y_time_%H_%M_%S") as write_demo_to_hdf5 sets them,
                              different in every round
             data/demo_<i>    attrs model_file (robosuite XML), num_samples
               actions (T,7) f8, states (T,45) f8 (one array), obs/<k> gzip,
               datagen_info/{eef_pose (T,4,4), target_pose (T,4,4), gripper_action (T,1)},
               datagen_info/object_poses/<obj> (T,4,4),
               datagen_info/subtask_term_signals/<sig> (T,) i8,
               src_demo_inds (number of subtasks,) i8, src_demo_labels (T,1) i8
           and beside it demo_failed.hdf5 (the failed trials, same layout) and
           important_stats.json (generation_path, success_rate, failure_rate, num_success,
           num_failures, num_attempts, num_problematic, ep_length_* and "time spent (hrs)").
           A round attempts --batch_size trials (guarantee off) and keeps the successes.
robomimic  robomimic's own layout (robomimic/utils/dataset.py SequenceDataset reads it) after
           robomimic/scripts/split_train_val.py at 4958d8ca26c3ab987234aaf44e0db6a954514ee6:
           mask/train and mask/valid (np.array(keys, dtype="S")), a 10% split of the demo
           names sorted as strings, shuffled with np.random.seed(0).

Everything depends only on the flags: the same command always writes the same files.
Needs numpy and h5py.
"""

import argparse
import datetime
import json
import os
import sys
import zlib

import h5py
import numpy as np

ISAACLAB_ENV = "Isaac-Stack-Cube-Franka-IK-Rel-Mimic-v0"
ISAACLAB_OBS = {"eef_pos": 3, "eef_quat": 4, "gripper_pos": 2, "cube_positions": 9, "joint_pos": 9}
ISAACLAB_CUBES = ("cube_1", "cube_2", "cube_3")
MIMICGEN_OBS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "object": 14}
MIMICGEN_OBJECTS = ("square_nut", "square_peg")
MIMICGEN_SIGNALS = ("grasp",)
N_SUBTASKS = 2


def rng_for(args, index):
    key = "%s/%s/%d/%d" % (args.layout, args.object, args.seed, index)
    return np.random.default_rng(zlib.crc32(key.encode()))


def isaaclab_state(rng, rows):
    """InteractiveScene.get_state(is_relative=True): articulations and rigid objects."""
    f4 = lambda *shape: rng.standard_normal((rows,) + shape).astype(np.float32)  # noqa: E731
    state = {
        "articulation": {
            "robot": {
                "root_pose": f4(7),
                "root_velocity": f4(6),
                "joint_position": f4(9),
                "joint_velocity": f4(9),
            }
        },
        "rigid_object": {c: {"root_pose": f4(7), "root_velocity": f4(6)} for c in ISAACLAB_CUBES},
    }
    return state


def write_isaaclab(args):
    # HDF5DatasetFileHandler.create: data.attrs total = 0, env_args {"env_name", "type": 2}.
    with h5py.File(args.out, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = 0
        data.attrs["env_args"] = json.dumps({"env_name": ISAACLAB_ENV, "type": 2})
        for i in range(args.batch_size):
            rng = rng_for(args, i)
            T = int(rng.integers(20, 60))
            episode = {
                "initial_state": isaaclab_state(rng, 1),
                "actions": rng.standard_normal((T, 7)).astype(np.float32),
                "obs": {k: rng.standard_normal((T, n)).astype(np.float32) for k, n in ISAACLAB_OBS.items()},
                "states": isaaclab_state(rng, T),
                "processed_actions": rng.standard_normal((T, 8)).astype(np.float32),
            }
            # write_episode: the group, then num_samples, seed, success, then the datasets.
            g = data.create_group("demo_%d" % i)
            g.attrs["num_samples"] = len(episode["actions"])
            g.attrs["seed"] = args.seed
            g.attrs["success"] = True

            def create(group, key, value):
                if isinstance(value, dict):
                    sub = group.create_group(key)
                    for k, v in value.items():
                        create(sub, k, v)
                else:
                    group.create_dataset(key, data=value, compression="gzip")

            for k, v in episode.items():
                create(g, k, v)
            data.attrs["total"] += g.attrs["num_samples"]


def mimicgen_demo(rng, grp, T):
    """write_demo_to_hdf5's demo group."""
    grp.create_dataset("actions", data=rng.standard_normal((T, 7)))
    grp.create_dataset("states", data=rng.standard_normal((T, 45)))
    for k, n in MIMICGEN_OBS.items():
        grp.create_dataset("obs/%s" % k, data=rng.standard_normal((T, n)), compression="gzip")
    grp.create_dataset("datagen_info/eef_pose", data=rng.standard_normal((T, 4, 4)))
    for o in MIMICGEN_OBJECTS:
        grp.create_dataset("datagen_info/object_poses/%s" % o, data=rng.standard_normal((T, 4, 4)))
    for s in MIMICGEN_SIGNALS:
        grp.create_dataset("datagen_info/subtask_term_signals/%s" % s, data=(np.arange(T) >= T // 2).astype(np.int64))
    grp.create_dataset("datagen_info/target_pose", data=rng.standard_normal((T, 4, 4)))
    grp.create_dataset("datagen_info/gripper_action", data=rng.standard_normal((T, 1)))
    inds = rng.integers(0, 10, N_SUBTASKS)
    grp.create_dataset("src_demo_inds", data=np.array(inds))
    grp.create_dataset("src_demo_labels", data=np.repeat(inds, [T // 2, T - T // 2])[:, None])
    grp.attrs["model_file"] = '<mujoco model="nut_assembly_%d"/>' % int(rng.integers(0, 1000))
    grp.attrs["num_samples"] = T


def mimicgen_file(path, args, trials):
    """merge_all_hdf5 of write_demo_to_hdf5's files, plus the first file's timestamps."""
    stamp = 1.7e9 + args.seed * 3600.0 + len(trials)
    readable = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("date_%m_%d_%Y_time_%H_%M_%S")
    env = {"env_name": "NutAssemblySquare_D0", "env_version": "1.4.1", "type": 1,
           "env_kwargs": {"robots": ["Panda"], "object": args.object, "control_freq": 20}}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["timestamp"] = stamp
        data.attrs["readable_timestamp"] = readable
        total = 0
        for i, (rng, T) in enumerate(trials):
            mimicgen_demo(rng, data.create_group("demo_%d" % i), T)
            total += T
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(env, indent=4)


def write_mimicgen(args):
    succeeded, failed = [], []
    for i in range(args.batch_size):
        rng = rng_for(args, i)
        T = int(rng.integers(20, 60))
        # At least one success a round: merge_all_hdf5 of no files writes env_args "".
        (succeeded if i == 0 or rng.random() < 0.7 else failed).append((rng, T))
    folder = os.path.dirname(os.path.abspath(args.out))
    mimicgen_file(args.out, args, succeeded)
    mimicgen_file(os.path.join(folder, "demo_failed.hdf5"), args, failed)
    lengths = np.array([T for _, T in succeeded])
    n_ok, n = len(succeeded), args.batch_size
    stats = dict(
        generation_path=folder,
        success_rate=100.0 * n_ok / n,
        failure_rate=100.0 * (n - n_ok) / n,
        num_success=n_ok,
        num_failures=n - n_ok,
        num_attempts=n,
        num_problematic=0,
        ep_length_mean=float(np.mean(lengths)),
        ep_length_std=float(np.std(lengths)),
        ep_length_max=int(np.max(lengths)),
        ep_length_3std=int(np.ceil(np.mean(lengths) + 3.0 * np.std(lengths))),
    )
    stats["time spent (hrs)"] = "0.00"
    with open(os.path.join(folder, "important_stats.json"), "w") as f:
        json.dump(stats, f, sort_keys=False, indent=4)


def write_robomimic(args):
    with h5py.File(args.out, "w") as f:
        data = f.create_group("data")
        total = 0
        for i in range(args.batch_size):
            rng = rng_for(args, i)
            T = int(rng.integers(20, 60))
            g = data.create_group("demo_%d" % i)
            g.create_dataset("actions", data=rng.standard_normal((T, 7)))
            g.create_dataset("rewards", data=rng.random(T))
            g.create_dataset("dones", data=(np.arange(T) == T - 1).astype(np.int64))
            g.create_dataset("states", data=rng.standard_normal((T, 32)))
            for k, n in MIMICGEN_OBS.items():
                g.create_dataset("obs/%s" % k, data=rng.standard_normal((T, n)))
                g.create_dataset("next_obs/%s" % k, data=rng.standard_normal((T, n)))
            g.attrs["num_samples"] = T
            total += T
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"object": args.object}})
    # split_train_val_from_hdf5(path, val_ratio=0.1) after np.random.seed(0).
    np.random.seed(0)
    with h5py.File(args.out, "r") as f:
        demos = sorted(list(f["data"].keys()))
    num_val = int(0.1 * len(demos))
    mask = np.zeros(len(demos))
    mask[:num_val] = 1.0
    np.random.shuffle(mask)
    mask = mask.astype(int)
    with h5py.File(args.out, "a") as f:
        for name, inds in (("train", (1 - mask).nonzero()[0]), ("valid", mask.nonzero()[0])):
            f["mask/%s" % name] = np.array([demos[i] for i in inds], dtype="S")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=["isaaclab", "mimicgen", "robomimic"], required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--batch_size", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    {"isaaclab": write_isaaclab, "mimicgen": write_mimicgen, "robomimic": write_robomimic}[args.layout](args)


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        # Warm mode (generator.mode = "warm"): rounds come from the agent, through
        # deploy/python's quarry_generator (installed, or found beside this directory).
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from quarry_generator import round_flags, serve_cli

        # Its yield sidecar is important_stats.json, written beside the output.
        sys.exit(serve_cli(main, flags=lambda r: round_flags(r, stats=False)))
    sys.exit(main())
