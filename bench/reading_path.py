"""The path a reader follows from `python train.py` to the first Adagrad update.

    python bench/reading_path.py [--task lm] [-- more train.py options]

Runs train.main(["--task", TASK, "--steps", "1", ...]) under sys.setprofile and prints the project
files whose functions run between entering main() and the first Adagrad.apply_single (module
code run by an import left out), and the distinct caller -> callee file pairs among those calls
(the caller: the nearest project function up the stack). The data come from --data-dir or
$MLX_ADAGRAD_DATA, as for train.py.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IGNORED = (REPO / "bench", REPO / "tests", REPO / ".venv")


class FirstUpdate(Exception):
    """Raised at the first apply_single: the path ends there."""


def project_file(frame):
    path = Path(frame.f_code.co_filename)
    if not path.is_absolute() or REPO not in path.parents or any(d in path.parents for d in IGNORED):
        return None
    return path.relative_to(REPO).as_posix()


def trace(train_args):
    """({file: calls}, {(caller file, callee file): calls}) from main() to the first apply_single."""
    import train

    files, moves, started = Counter(), Counter(), False

    def profile(frame, event, arg):
        nonlocal started
        if event != "call":
            return
        name = project_file(frame)
        if frame.f_code is train.main.__code__:
            started = True
        if not started or name is None:
            return
        caller, back = None, frame.f_back
        while back is not None:
            if back.f_code.co_name == "<module>":
                return  # an import's module code, or something it calls
            if caller is None:
                caller = project_file(back)
            if back.f_code is train.main.__code__:
                break
            back = back.f_back
        files[name] += 1
        if caller is not None and caller != name:
            moves[caller, name] += 1
        if frame.f_code.co_name == "apply_single" and name == "adagrad.py":
            raise FirstUpdate

    sys.setprofile(profile)
    try:
        train.main(train_args)
    except FirstUpdate:
        pass
    finally:
        sys.setprofile(None)
    return files, moves


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lm", choices=("mnist", "lm"))
    parser.add_argument("train_args", nargs="*", help="more train.py options (after --)")
    args = parser.parse_args()
    files, moves = trace(["--task", args.task, "--steps", "1", *args.train_args])
    print(f"python train.py --task {args.task} --steps 1: main() to the first Adagrad.apply_single\n")
    print(f"{'file':<32} {'calls':>6}")
    for name, calls in sorted(files.items()):
        print(f"{name:<32} {calls:>6}")
    print(f"\n{'caller -> callee':<56} {'calls':>6}")
    for (caller, callee), calls in sorted(moves.items()):
        print(f"{caller + ' -> ' + callee:<56} {calls:>6}")
    print(f"\n{len(files)} files, {len(moves)} distinct moves between them")


if __name__ == "__main__":
    main()
