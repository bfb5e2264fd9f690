"""PCCD, point-cloud crystal diffusion (Li et al., arXiv:2401.13192): the one command.

    python pccd.py roundtrip            encode -> decode fidelity of the representation
    python pccd.py <command> --help     what each command does and takes
"""
import argparse
import os
import sys

import data
import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_TRAIN = os.path.join(HERE, "datasets", "mp20_train.csv")
BUNDLED_VAL = os.path.join(HERE, "datasets", "mp20_val.csv")


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def load_or_fail(path):
    try:
        crystals = data.load_structures(path)
    except (OSError, ValueError) as e:
        raise UserError(str(e))
    if not crystals:
        raise UserError(f"{path} holds no structure PCCD can encode (<= 3 elements, <= 16 sites)")
    return crystals


# ----------------------------------------------------------------------------------------------
# roundtrip
# ----------------------------------------------------------------------------------------------

def cmd_roundtrip(args):
    print(f"{'data':<40} {'noise':>6} {'matched':>13} {'rate':>8} {'ms/decode':>10}")
    for path in args.data:
        crystals = load_or_fail(path)
        for noise in args.noise:
            r = evaluate.roundtrip(crystals, noise=noise, seed=args.seed)
            print(f"{os.path.relpath(path):<40} {noise:>6g} {r['matched']:>6}/{r['n']:<6} "
                  f"{100 * r['match_rate']:>7.2f}% {r['ms_per_decode']:>10.1f}", flush=True)
            if r["failures"]:
                print(f"    not matched: {' '.join(r['failures'][:8])}"
                      f"{' ...' if len(r['failures']) > 8 else ''}")


# ----------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="pccd.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("roundtrip", help="encode -> decode every structure and match it back",
                       description="Encode each structure as a (3, 128, 3) point cloud, optionally "
                       "add Gaussian noise, decode it, and count how many decode to the same "
                       "crystal (pymatgen StructureMatcher, default tolerances).")
    p.add_argument("--data", nargs="+", default=[BUNDLED_TRAIN, BUNDLED_VAL],
                   help="CSV files, folders or structure files (default: the bundled MP-20 sample)")
    p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.01, 0.02],
                   help="std of Gaussian noise added to the cloud, in its [0, 1] units")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_roundtrip)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except UserError as e:
        print(f"pccd.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
