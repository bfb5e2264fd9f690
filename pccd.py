"""PCCD, point-cloud crystal diffusion (Li et al., arXiv:2401.13192): the one command (paper Table
S1: the presets and training; its experiments, Fig. 1-3, Table 1-2, Fig. S1, S2, S4, as commands).
`python pccd.py --help` lists the commands, `python pccd.py COMMAND --help` what each takes.
Read in order: presets, checkpoints, train, sampling, reconstruct, generate and evaluate, the
smaller commands, the command line. Threads: see idle_cores.
"""
import argparse
import collections
import copy
import errno
import functools
import glob
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings


def stopped_while_loading(signum, frame):
    """Ctrl-C, SIGTERM or SIGHUP while numpy, torch and pymatgen load: one line, not a traceback
    through them (nor silence), and the exit code run_as_program's handlers give."""
    try:
        os.write(2, b"interrupted\n" if signum == signal.SIGINT else
                 f"terminated ({signal.Signals(signum).name})\n".encode())
    except OSError:
        pass
    os._exit(128 + signum)


STOPPING = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
if __name__ == "__main__":
    for signum in STOPPING:
        if signal.getsignal(signum) is not signal.SIG_IGN:      # nohup's SIGHUP stays ignored
            signal.signal(signum, stopped_while_loading)         # run_as_program() sets its own
# Set before spglib loads: its "failed" lines for odd cells are noise here.
os.environ.setdefault("SPGLIB_WARNING", "OFF")
# Read when torch loads: a value OpenMP cannot use would print its own complaint, then be ignored.
if not all(re.fullmatch(r"\s*[0-9]+\s*", n) and 1 <= int(n) <= 256
           for n in os.environ.get("OMP_NUM_THREADS", "1").split(",")):
    print(f"warning: OMP_NUM_THREADS={os.environ.pop('OMP_NUM_THREADS')!r} is not a number of threads "
          f"from 1 to 256; ignored", file=sys.stderr)

HERE = os.path.dirname(os.path.realpath(__file__))      # through a link to this file too: the bundled files
if HERE not in map(os.path.realpath, filter(None, sys.path)):  # python -I or PYTHONSAFEPATH: data.py is here
    sys.path.insert(0, HERE)
try:
    import numpy as np
    import torch
    from pymatgen.core import Composition

    import data
    import diffusion
    import evaluate
    import unet
except ImportError as e:                                 # not installed, or too little memory to load
    if __name__ != "__main__":
        raise
    sys.exit(f"pccd.py: cannot import {e.name or 'a library'} ({' '.join(str(e).split())}): install what it needs "
             f"with python -m pip install -r {os.path.join(HERE, 'requirements.txt')}")
BUNDLED_TRAIN = os.path.join(HERE, "datasets", "mp20_train.csv.gz")
BUNDLED_VAL = os.path.join(HERE, "datasets", "mp20_val.csv.gz")
DEFAULT_RUN = os.path.join("runs", "default")
CHECKPOINT = "checkpoint.pt"
SHIPPED_CHECKPOINT = os.path.join(HERE, "checkpoints", "pccd_mp20.pt")

# Training presets: Table S1 where measurements kept it, our values where they did not (README,
# "Training"). A flag given on the command line overrides the preset.
BOTH_PRESETS = dict(data="datasets/mp20_train.csv.gz", prediction="v", condition_above=250,
                    property_drop=0.3, translate=False, widths=list(unet.UNetConfig.widths), seed=0,
                    composition_given=0.0,
                    guidance=3.0)          # the guidance scale sampling uses by default
PRESETS = {
    "quick": BOTH_PRESETS | dict(steps=3600, batch_size=64, lr=2e-3, schedule="cosine"),
    "long": BOTH_PRESETS | dict(steps=24000, batch_size=64, lr=2e-3, schedule="cosine"),
}
EMA_DECAY = 0.995      # the moving average of the weights that sampling uses
SAVE_EVERY = 250       # steps between checkpoints (and one at the end)
HELD_OUT = 512         # val crystals whose loss train reports at every checkpoint


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`timeout`, a scheduler, a closed terminal), handled as Ctrl-C is: `train`
    saves its checkpoint, a sampling command removes its unfinished folder."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequests:
    """While training: Ctrl-C, SIGTERM and SIGHUP are recorded (`signum`) and acted on between two
    steps, so the checkpoint then saved is one that --resume continues exactly."""

    SIGNALS = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]

    def __enter__(self):
        self.signum, self.before = None, {}
        if threading.current_thread() is threading.main_thread():        # only it may set handlers
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:     # nohup's SIGHUP stays ignored
                    self.before[signum] = signal.signal(signum, self.request)
        return self

    def request(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.before.items():
            signal.signal(signum, handler)


class QuietPipe:
    """stdout or stderr that, once it cannot be written (its reader has gone: `python pccd.py
    generate ... | head -1`; a full disk), sends what is written to /dev/null instead of failing:
    the command finishes its work and keeps its files. A reader that stopped reading (a broken pipe)
    was the user's choice; any other failure is kept in `lost` and makes the exit status 1."""

    def __init__(self, stream):
        self.stream, self.gone, self.lost = stream, False, None

    def write(self, text):
        try:
            return len(text) if self.gone else self.stream.write(text)
        except UnicodeEncodeError:                        # a console that cannot show a path's é: escaped
            encoding = self.stream.encoding or "ascii"
            return self.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except BlockingIOError:                           # a busy non-blocking reader: not gone
            raise
        except OSError as e:
            self.reader_gone(e)
            return len(text)

    def flush(self):
        try:
            self.gone or self.stream.flush()
        except BlockingIOError:
            raise
        except OSError as e:
            self.reader_gone(e)

    def reader_gone(self, error):
        self.gone = True
        if not isinstance(error, BrokenPipeError):
            self.lost = self.lost or error.strerror or str(error)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())        # Python's own flush at exit goes there too
            os.close(devnull)
        except (OSError, AttributeError, ValueError):
            pass
        if not isinstance(error, BrokenPipeError) and self.stream is not sys.__stderr__:
            print(f"warning: output cannot be written ({error.strerror or error}); the command goes on",
                  file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def load_or_fail(path, only_encodable=True, skipped=None, length_range=None, named=None, decodable=False):
    """The structures of a CSV, folder or file (that a model of this length range can encode), and one
    line saying what was skipped and why (also counted into `skipped`, and listed as (name, why) in
    `named` if given); the error if nothing is left."""
    skipped = {} if skipped is None else skipped
    try:
        crystals = data.load_structures(path, False, only_encodable, skipped, length_range, named, progress=True,
                                        decodable=decodable)
    except (OSError, ValueError) as e:
        raise UserError(str(e))
    if not crystals:
        raise UserError(data.describe_load(path, crystals, skipped))
    print(data.describe_load(path, crystals, skipped), file=sys.stderr)
    return crystals


def portable_path(path):
    """A path as stored in a checkpoint: relative to this folder when inside it, so a shipped
    checkpoint still finds the bundled data on another machine."""
    path = os.path.abspath(path)
    return os.path.relpath(path, HERE) if path.startswith(HERE + os.sep) else path


def portable_val(path):
    """--val as stored in a run's settings: 'none', or a portable path."""
    return path if path == "none" else portable_path(path)


def shown_path(path):
    """A path as a user here would type it: relative to the current folder when it lies below it,
    else absolute (as given on another drive)."""
    try:
        relative = os.path.relpath(path)
    except ValueError:                    # Windows: another drive
        return path
    return os.path.abspath(path) if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def resolve_path(path):
    return path if os.path.isabs(path) else os.path.join(HERE, path)


def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything needed to sample later, written atomically
# ----------------------------------------------------------------------------------------------
# A checkpoint is a dict: `ema` (the weights sampling uses), `model_config`, `length_range`,
# `sampling` (how to sample: prediction, T, condition_above, guidance, composition_given), `settings`
# (how it was trained), `train_ids` and `train_compositions` (for the count baseline and novelty), the
# band-gap classes and orderings it saw (`trained_conditions`; older runs lack it), `data_digest` (what
# it trained on), `losses`, `step`; a run's own also `model`, `optimizer`, `rng`, `threads` and
# `val_digest`, so that --resume continues exactly (on the run's thread count), on the same data and
# held-out set.

CHECKPOINT_KEYS = ("ema", "model_config", "length_range", "sampling", "settings", "train_ids",
                   "train_compositions", "losses", "step")
TRAINING_KEYS = ("model", "optimizer", "rng")          # what --resume needs besides (older runs: no digests)


class SavedElsewhere(UserError):
    """A checkpoint that could not be written where it belongs, but was to a spare file."""


def save_checkpoint(path, state, spare=False, new=False):
    """Write through a temporary file (data.written), so an interrupted run never leaves a broken
    one; new=True: never over a file (export), else the run's own is replaced. A save that fails (a
    full disk, a read-only folder) is one UserError naming `path`; with `spare`, the state is
    written to a new file in the system's temporary folder instead if it can be, and the error
    (SavedElsewhere) says where."""
    said = None
    try:
        with data.written(path, new=new) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as e:         # torch: "[enforce fail at inline_container.cc:672] . unexpected pos"
                said = re.sub(r"\[enforce fail at [^]]*\][ .]*", "", str(e).replace(tmp, path))
                raise
    except Exception as e:                    # OSError, or torch's RuntimeError from its zip writer
        reason = e.strerror if isinstance(e, OSError) and e.strerror else \
            f"is the disk full or the folder read-only? (torch: {said or e})"
        message = f"cannot write {path}: {reason}" + (" (the checkpoint saved before is kept)"
                                                       if os.path.exists(path) and not new else "")
        if spare:
            handle, spare = tempfile.mkstemp(prefix="pccd-checkpoint-", suffix=".pt")
            try:
                with os.fdopen(handle, "wb") as f:
                    torch.save(state, f)
            except Exception:
                os.remove(spare)
            else:
                raise SavedElsewhere(f"{message}; step {state['step']} saved to {spare} instead: move it to "
                                     f"{path} and continue with --resume") from None
        raise UserError(message) from None


def read_checkpoint(source, device="cpu"):
    """torch.load of tensors, numbers, strings, lists and dicts alone (weights_only: a file whose
    pickle would run code is refused, not run), and numpy's scalars, which runs saved before their
    learning rates were Python floats hold."""
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    names = [(scalar, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")]    # numpy 1 or 2 saved it
    with torch.serialization.safe_globals([*names, np.dtype, type(np.dtype(np.float64))]):
        return torch.load(source, map_location=device, weights_only=True)


def load_checkpoint(path, device="cpu", advice="train one first (python pccd.py train) or name one with --checkpoint"):
    """Returns (model with EMA weights, in eval mode, on device; the checkpoint dict, with
    `loaded_from`: the file's absolute path and the SHA-256 of the bytes read, never saved again)."""
    if os.path.isdir(path) and os.path.basename(os.path.normpath(path)) != CHECKPOINT:    # a run folder
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: {advice}")
    if not os.path.isfile(path):                  # a named pipe: torch.load would wait for a writer
        raise UserError(f"{path} is not a regular file: {advice}")
    try:
        with open(path, "rb") as f:                # read once: what is hashed is what is loaded
            raw = f.read()
        ckpt = read_checkpoint(io.BytesIO(raw), device)
        model = unet.UNet(unet.UNetConfig(**ckpt["model_config"])).to(device)
        model.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})   # fp16 -> fp32
        finite = all(torch.isfinite(p).all() for p in model.parameters())
    except Exception as e:  # a truncated or foreign file: say so in one line
        said = re.sub(r"^\[enforce fail at [^]]*\] \.? *", "", str(e).strip())   # torch's C++ source line: not for users
        said = (said.splitlines() or [""])[0].split(". ")[0]                   # its first sentence
        if "Weights only load failed" in said:         # torch names what it refused
            refused = re.search(r"GLOBAL (\S+)", str(e))       # "unsupported GLOBAL posix.system whose ..."
            said = f"it holds {refused[1]}, not only tensors, numbers and text: a pickle that could run code, " \
                "not loaded" if refused else "not a file torch saved"             # text, an image: no pickle at all
        raise UserError(f"{path} is not a PCCD checkpoint ({type(e).__name__}: {said})")
    if "sampling" not in ckpt:
        raise UserError(f"{path} was written by an earlier PCCD (no 'sampling' entry): train it again")
    if not finite:
        raise UserError(f"{path} holds weights that are not finite numbers (a run that diverged): train again "
                        f"with a smaller learning rate")
    if missing := [key for key in CHECKPOINT_KEYS if key not in ckpt]:
        raise UserError(f"{path} is not a whole PCCD checkpoint (no {', '.join(map(repr, missing))}): "
                        f"name a training run's {CHECKPOINT}, or a file export wrote from one")
    try:
        low, high = map(float, ckpt["length_range"])
    except (TypeError, ValueError):
        low = high = float("nan")
    sampling = ckpt["sampling"] if isinstance(ckpt["sampling"], dict) else {}
    whole = lambda v, low=0: isinstance(v, int) and not isinstance(v, bool) and v >= low     # noqa: E731
    names = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)            # noqa: E731
    conditions = ckpt.get("trained_conditions", {})
    wrong = [f"{what} {value!r}" for what, value, right in (          # edited, or from another program
        ("length range", ckpt["length_range"], 0.1 <= low < high <= 1000),
        ("T", sampling.get("T"), sampling.get("T") == diffusion.T),
        ("prediction", sampling.get("prediction"), sampling.get("prediction") in ("eps", "v")),
        ("condition_above", sampling.get("condition_above"),
         whole(sampling.get("condition_above")) and sampling["condition_above"] <= diffusion.T),
        ("guidance", sampling.get("guidance"), isinstance(sampling.get("guidance"), (int, float))
         and not isinstance(sampling["guidance"], bool) and 0 <= sampling["guidance"] <= 100),   # as --guidance
        ("composition_given", sampling.get("composition_given"), isinstance(sampling.get("composition_given", False),
                                                                            bool)),
        ("step", ckpt["step"], whole(ckpt["step"])),
        ("settings", ckpt["settings"], isinstance(ckpt["settings"], dict) and whole(ckpt["settings"].get("steps", 1), 1)),
        ("training ids", "...", names(ckpt["train_ids"]) and names(ckpt["train_compositions"])
         and len(ckpt["train_ids"]) == len(ckpt["train_compositions"])),
        ("trained conditions", conditions, isinstance(conditions, dict)
         and all(names(conditions.get(k, [])) for k in ("band_gap", "ordering")))) if not right]
    if wrong:
        raise UserError(f"{path} is not a PCCD checkpoint (its {', '.join(wrong)}: not what PCCD writes)")
    ckpt["loaded_from"] = dict(checkpoint=os.path.abspath(path), checkpoint_step=ckpt["step"],
                               checkpoint_sha256=hashlib.sha256(raw).hexdigest())
    return model.eval(), ckpt


def sampling_entry(settings):
    """The checkpoint's `sampling` entry: what a sampler (or a port) must know of the network."""
    return dict(prediction=settings["prediction"], T=diffusion.T,
                condition_above=settings["condition_above"], guidance=settings["guidance"],
                composition_given=settings["composition_given"] > 0)


def sampling_of(ckpt, args):
    """The diffusion process of a checkpoint's network; --guidance and --condition-above default
    to its `sampling` entry."""
    entry = ckpt["sampling"]
    args.known_clean = entry.get("composition_given", False)
    args.guidance = entry["guidance"] if args.guidance is None else args.guidance
    args.condition_above = entry["condition_above"] if args.condition_above is None else args.condition_above
    return diffusion.Diffusion(T=entry["T"], prediction=entry["prediction"])


def load_for_sampling(args):
    """(device, network, checkpoint, diffusion) of --checkpoint, or of `default_checkpoint`."""
    device = pick_device(args.device)
    if args.checkpoint:                                   # named: no advice to train one
        model, ckpt = load_checkpoint(args.checkpoint, device, advice="name a run folder or a .pt file")
    else:
        args.checkpoint = default_checkpoint()
        model, ckpt = load_checkpoint(args.checkpoint, device)
        if args.checkpoint != SHIPPED_CHECKPOINT:         # your own run wins: said, with the way back
            print(f"using your own {args.checkpoint} (step {ckpt['step']}, {len(ckpt['train_ids'])} crystals), not "
                  f"the shipped model: --checkpoint {shown_path(SHIPPED_CHECKPOINT)} names that", file=sys.stderr)
    planned = ckpt.get("settings", {}).get("steps")
    if planned and ckpt.get("step", planned) < planned:     # a train stopped early (Ctrl-C, SIGTERM)
        if os.path.isdir(args.checkpoint):                # the run's folder, if it is one
            named = args.checkpoint
        elif os.path.basename(args.checkpoint) == CHECKPOINT:
            named = os.path.dirname(args.checkpoint) or "."
        else:                                             # a copy under another name: no folder to resume
            named = None
        advice = "an export of an unfinished run" if "optimizer" not in ckpt else \
            f"a stopped one continues with python pccd.py train --resume --out {named}" if named else \
            f"a stopped run's copy: as {CHECKPOINT} in a folder, train --resume continues it there"
        print(f"warning: {args.checkpoint} is at step {ckpt['step']} of {planned}, stopped early or still "
              f"training ({advice}); name another with --checkpoint", file=sys.stderr)
    return device, model, ckpt, sampling_of(ckpt, args)


def run_record(args, ckpt):
    """What a results file records of its run, to repeat it: the command as typed, every option's
    value (defaults included) and the checkpoint sampled (its path, step and the SHA-256 of its bytes:
    a run still training replaces the file), and the CPU threads it ran on (they order the sums)."""
    options = {}
    for key, value in vars(args).items():
        try:
            options[key] = json.loads(json.dumps(value))       # --formula's (elements, counts, text) a list
        except TypeError:                                      # the command's function: not an option
            pass
    for key in ("argv", "made", "kept", "refine_default", "known_clean"):     # the program's own, not options
        options.pop(key, None)
    return dict(command=shlex.join(["python", "pccd.py", *args.argv]), options=options,
                threads_used=torch.get_num_threads()) | ckpt["loaded_from"]


def default_checkpoint():
    """What reconstruct and generate use without --checkpoint: the model `python pccd.py train`
    left in runs/default, or else the one shipped in the repository."""
    own = os.path.join(DEFAULT_RUN, CHECKPOINT)
    return own if os.path.exists(own) else SHIPPED_CHECKPOINT


# ----------------------------------------------------------------------------------------------
# train (paper Table S1, Eq. S4, Fig. S4)
# ----------------------------------------------------------------------------------------------

def resolve_settings(args, resumed):
    """Every training setting, decided here: a flag given on the command line, else the resumed
    run's own setting (and preset), else the preset's."""
    earlier = resumed["settings"] if resumed else {}
    preset = earlier.get("preset") or args.preset or "quick"
    given = {k: getattr(args, k) for k in PRESETS[preset] if getattr(args, k, None) is not None}
    if "data" in given:
        given["data"] = portable_path(given["data"])
    return {**PRESETS[preset], **earlier, **given, "preset": preset}


def learning_rate(settings, step):
    """The learning rate at `step`: constant, or cosine-decayed from lr to 0 over the run."""
    if settings["schedule"] == "cosine":
        return settings["lr"] * 0.5 * (1 + np.cos(np.pi * step / settings["steps"]))
    return settings["lr"]


def drop_properties(band_gap, magnetic, p):
    """Replace each crystal's band-gap class, and separately its magnetic ordering, by 'unknown'
    with probability p. The MP-20 rows all carry a band gap, so without this the 'unknown' class
    (generate's default) would be an embedding that training never touched."""
    unknown_bg = data.BAND_GAP_CLASSES.index("unknown")
    unknown_mag = data.MAGNETIC_ORDERINGS.index("unknown")
    band_gap = torch.where(torch.rand(band_gap.shape) < p, unknown_bg, band_gap)
    magnetic = torch.where(torch.rand(magnetic.shape) < p, unknown_mag, magnetic)
    return band_gap, magnetic


def held_out_loss(model, ddpm, held_out, condition_above):
    """The training loss (Eq. S4, unweighted) on crystals training never sees, with the steps t
    spread evenly over 0 .. T-1 and the noise fixed: the same number every time it is asked for
    the same weights, so two runs compare on it directly. Leaves the random state untouched."""
    x0, elements, band_gap, magnetic = held_out
    t = torch.linspace(0, ddpm.T - 1, len(x0)).round().long()
    total = 0.0
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for lo in range(0, len(x0), 128):
            sl = slice(lo, lo + 128)
            drop = (t[sl] < condition_above).float()                  # as in training, never at random
            total += ddpm.loss(model, x0[sl], elements[sl], band_gap[sl], magnetic[sl], drop, t=t[sl]).item() \
                * len(x0[sl])
    return total / len(x0)


def cmd_train(args):
    with RunLock(args):
        train(args)


class RunLock:
    """One `train` at a time in a run folder: an flock on OUT/train.lock, held while training (two
    trainings in one folder would overwrite each other's checkpoints). A folder made here is removed
    if the run fails before its first checkpoint (args.made, as for the sampling commands)."""

    def __init__(self, args):
        self.args, self.lock = args, os.path.join(args.out, "train.lock")

    def __enter__(self):
        if os.path.exists(self.args.out) and not os.path.isdir(self.args.out):
            raise UserError(f"--out {self.args.out} is a file, not a folder")
        link = os.path.normpath(self.args.out)              # dangling/ too
        if os.path.islink(link) and not os.path.exists(link):
            raise UserError(f"--out {self.args.out} is a link to {os.readlink(link)}, which does not "
                            f"exist: remove the link or choose another --out")
        if not os.path.isdir(self.args.out):
            parents = make_parents(self.args.out, self.args)
            os.mkdir(self.args.out)
            self.args.made = [self.args.out, *parents]
        if os.path.islink(self.lock) or os.path.exists(self.lock) and not os.path.isfile(self.lock):
            raise UserError(f"{self.lock} is not a lock file (a link or a folder): move it away, or choose "
                            f"another --out")
        try:                                              # opened as it is: a file of that name is not emptied
            self.file = os.fdopen(os.open(self.lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644))
        except OSError as e:                              # a read-only run folder: nothing can be saved
            raise UserError(f"cannot write in {self.args.out} ({e.strerror}): training could save nothing "
                            f"there; " + ("make it writable, or copy the folder elsewhere and resume the copy"
                                          if self.args.resume else "choose another --out")) from None
        try:
            import fcntl                                  # POSIX; elsewhere runs are not locked
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
            held = os.fstat(self.file.fileno())
            try:
                named = os.stat(self.lock)
            except FileNotFoundError:
                named = None
            if not named or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):   # a run that ended
                raise BlockingIOError                     # removed it as this opened it: a third may hold a new one
        except ImportError:
            locked = False
        except BlockingIOError:
            self.file.close()
            self.file = None
            self.args.made = None                         # the folder is the other run's now
            raise UserError(f"another train is running in {self.args.out}: wait for it, or choose another --out")
        self.locked = locked
        stale = glob.glob(os.path.join(glob.escape(self.args.out), f".{CHECKPOINT}.*.tmp")) if locked else []
        stale.sort()
        for tmp in stale:                                 # a save cut short by SIGKILL or a crash: never whole
            os.remove(tmp)
        if stale:
            print(f"removed {len(stale)} partial checkpoint file{'s' * (len(stale) != 1)} left in {self.args.out} by "
                  f"a run killed while saving ({os.path.basename(stale[0])}{', ...' if len(stale) > 1 else ''})",
                  file=sys.stderr)
        return self

    def __exit__(self, kind, error, traceback):
        if self.file:
            if not self.locked:                           # Windows: an open file cannot be removed
                self.file.close()
            try:                                          # removed while still held, unless it holds
                if os.path.getsize(self.lock) == 0:       # something: then it was not this run's
                    os.remove(self.lock)
            except OSError as e:                          # a folder made read-only: say the error before
                if kind is None:
                    print(f"warning: could not remove {self.lock} ({e.strerror})", file=sys.stderr)
            self.file.close()


def data_digest(crystals, decimals=None):
    """A digest of the training crystals (names, conditions, species, lattice parameters and
    positions as float32): --resume refuses data that changed under the same names, and sampling
    checks novelty only against the data the model trained on.

    Float32, not decimals: a CIF's a, b, c, alpha, beta, gamma become a cell matrix and back, and two
    CPUs (AVX2 and AVX-512 numpy, say) can differ in the last bits of the float64 results. Rounded to
    1e-6, every number given to 7 decimals ending in 5 (4,107 of MP-20's, given to 8) sits on a tie
    that those bits decide; a decimal of up to 8 digits is never a tie of float32. Positions go to
    [1, 2) first, so that 1e-17 and -1e-17 (a hair below 1 once wrapped) are the same 0. With
    decimals=6: the digest of runs saved before, still accepted from them (`holds_digest`)."""
    h = hashlib.sha256()
    for c in crystals:
        st = c.structure
        h.update(f"{c.material_id}|{c.band_gap_class}|{c.ordering}|{' '.join(str(x.species) for x in st)}".encode())
        if decimals:
            numbers = np.concatenate([st.lattice.parameters, (np.round(st.frac_coords % 1.0, decimals) % 1.0).ravel()])
            h.update((np.round(numbers, decimals) + 0.0).tobytes())              # + 0.0: -0.0 is 0.0
        else:
            positions = (st.frac_coords % 1.0 + 1.0).astype(np.float32) % np.float32(1.0)
            h.update(np.concatenate([np.float32(st.lattice.parameters), positions.ravel()]).tobytes())
    return h.hexdigest()


def holds_digest(saved, crystals, digest=None):
    """Whether a checkpoint's digest is of these crystals (`digest`, their data_digest, if known):
    today's, or the decimals of a run saved before it (read on the CPU that saved it); None, a run
    saved before digests, holds any."""
    return saved is None or saved == (digest or data_digest(crystals)) or saved == data_digest(crystals, decimals=6)


def train(args):
    path = os.path.join(args.out, CHECKPOINT)
    if os.path.exists(path) and not args.resume:
        try:
            exported = "optimizer" not in read_checkpoint(path)
        except Exception:                     # truncated, or not a checkpoint at all: nothing to continue
            raise UserError(f"{path} exists and is not a readable checkpoint (a truncated copy?): choose another "
                            f"--out") from None
        raise UserError(f"{path} exists" + (" (an exported, sampling-only checkpoint): choose another --out" if exported
                                            else ": continue it with --resume, or choose another --out"))
    others = [] if args.resume or getattr(args, "made", None) else sorted(
        name for name in os.listdir(args.out) if name != "train.lock" and not name.startswith("."))   # .DS_Store
    if others:                                # a folder of other files: its loss.png would be replaced
        raise UserError(f"{args.out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                        f"train into a new or empty folder")
    resumed = load_checkpoint(path, advice="--resume continues the run in --out (default runs/default)")[1] \
        if args.resume else None
    if resumed and "optimizer" not in resumed:
        raise UserError(f"{path} is an exported, sampling-only checkpoint and cannot be resumed: "
                        f"resume the run it was exported from, or train a new one")
    if resumed and (missing := [key for key in TRAINING_KEYS if key not in resumed]):
        raise UserError(f"{path} is not a whole training checkpoint (no {', '.join(map(repr, missing))}): "
                        f"it cannot be resumed; train a new run")
    figure = os.path.join(args.out, "loss.png")           # a finished run whose curve was never drawn: drawn
    undrawn = resumed and resumed["step"] == resumed["settings"]["steps"] and args.steps in (None, resumed["step"]) \
        and not os.path.exists(figure)
    if resumed:
        own = resumed["settings"]
        changed = [flag for flag, given, same in (                  # --data: where the same crystals are now
            ("--seed", args.seed, lambda v: v == own.get("seed", v)),   # the random state is the run's own
            ("--widths", args.widths, lambda v: list(v) == list(own["widths"])),
            ("--prediction", args.prediction, lambda v: v == own["prediction"]),
            ("--condition-above", args.condition_above, lambda v: v == own.get("condition_above", v)),
            ("--composition-given", args.composition_given, lambda v: v == own.get("composition_given", v)),
            ("--property-drop", args.property_drop, lambda v: v == own.get("property_drop", v)),
            ("--translate", args.translate, lambda v: v == own.get("translate", v)),
            ("--preset", args.preset, lambda v: v == own.get("preset")),
            ("--batch-size", args.batch_size, lambda v: v == own["batch_size"]),
            ("--lr", args.lr, lambda v: v == own["lr"]),
            ("--schedule", args.schedule, lambda v: v == own["schedule"]),
            ("--val", args.val, lambda v: portable_val(v) == own.get("val", portable_val(v))   # older runs: any
             or v != "none" and resumed.get("val_digest") is not None))   # moved: its crystals checked below
            if given is not None and not same(given)]
        if changed:
            raise UserError(f"--resume continues the run's own held-out set, random state, network, objective, "
                            f"optimiser and preset ({own.get('preset')}): leave out {', '.join(changed)}")
        for flag, given, what, where in (("--data", args.data, "data", own["data"]),
                                         ("--val", args.val, "held-out set", own.get("val", "none"))):
            if given is None and where != "none" and not os.path.exists(resolve_path(where)) and not undrawn:
                raise UserError(f"the run's {what}, {where}, is gone: if it moved, name it with {flag}")
    s = resolve_settings(args, resumed)
    if resumed and s["steps"] <= resumed["step"] and not undrawn:      # a finished run without loss.png: drawn
        raise UserError(f"{path} is at step {resumed['step']} already, of {s['steps']}: give --steps above it")
    if undrawn:                                   # stopped after its last save: no data needed to draw it
        args.kept = args.out
        evaluate.plot_loss(resumed["losses"], resumed.get("val_losses", []), figure,
                           resumed.get("loss_name", "held-out loss"))
        print(f"{path} holds the finished run (step {resumed['step']}): drew its loss curve, {figure}")
        return
    s["val"] = portable_val(args.val) if args.val is not None else \
        resumed["settings"].get("val", portable_val(BUNDLED_VAL)) if resumed else portable_val(BUNDLED_VAL)
    device = pick_device(args.device)
    crystals = load_or_fail(resolve_path(s["data"]), decodable=True)
    digest, where = data_digest(crystals), shown_path(resolve_path(s["data"]))
    if resumed and sorted(c.material_id for c in crystals) == sorted(resumed["train_ids"]) and \
            [c.material_id for c in crystals] != resumed["train_ids"]:
        raise UserError(f"{where} holds the run's crystals in another order than when this run began: --resume "
                        f"would draw other batches; put the rows back in their order, or start a new run")
    own_data = resumed and shown_path(resolve_path(resumed["settings"]["data"]))
    how = "it has changed since this run began" if not resumed or own_data == where else \
        f"the run began on {own_data}"                               # --data named another file
    if resumed and [c.material_id for c in crystals] != resumed["train_ids"]:
        raise UserError(f"{where} is not the run's data: {how} ({len(resumed['train_ids'])} crystals "
                        f"then, {len(crystals)} now): --resume would train on other data; start a new run")
    if resumed and not holds_digest(resumed.get("data_digest"), crystals, digest):     # saved before: names only
        raise UserError(f"{where} is not the run's data: {how} (other structures under the same names): "
                        f"--resume would train on other data; start a new run")
    length_range = resumed["length_range"] if resumed else data.fit_length_range([c.structure for c in crystals])
    try:
        encoded = data.encode_dataset(crystals, length_range)
    except ValueError as e:                              # a resumed run's length range, new data
        raise UserError(f"{s['data']}: {e}") from None
    if not np.isfinite(encoded[0]).all():
        raise UserError(f"the clouds of {s['data']} are not all finite numbers; nothing trained")
    clouds, elements, band_gap, magnetic = map(torch.from_numpy, encoded)
    x0_all = diffusion.to_model(clouds)                                  # (N, 3, 128, 3) in [-1, 1]
    held_out = val_digest = None
    loss_name = "held-out loss"
    if s["val"] != "none":
        val = load_or_fail(resolve_path(s["val"]), length_range=length_range)
        val = [val[i] for i in np.random.default_rng(0).permutation(len(val))[:HELD_OUT]]
        same = lambda c: (c.structure.composition.reduced_formula, *np.round(c.structure.lattice.abc, 3))  # noqa: E731
        if {same(c) for c in val} & {same(c) for c in crystals}:       # by structure: names may be "row 0"
            print(f"warning: {s['val']} shares crystals with the training data: its loss is not a held-out "
                  f"loss", file=sys.stderr)
            loss_name = "--val loss (not held out)"
        val_digest = data_digest(val)
        if resumed and not holds_digest(resumed.get("val_digest"), val, val_digest):    # older runs: any
            raise UserError(f"{shown_path(resolve_path(s['val']))} is not the run's held-out set (it has changed "
                            f"since this run began, or is another): its held-out losses would not "
                            f"compare with the run's earlier ones; start a new run")
        v_clouds, *v_condition = map(torch.from_numpy, data.encode_dataset(val, length_range))
        held_out = [diffusion.to_model(v_clouds).to(device)] + [c.to(device) for c in v_condition]

    if resumed and s["steps"] != resumed["settings"]["steps"]:      # more (or fewer) steps than the run planned
        s["replanned"] = resumed["settings"].get("replanned", []) + [[resumed["step"], resumed["settings"]["steps"]]]
        before, now = learning_rate(resumed["settings"], resumed["step"] - 1), learning_rate(s, resumed["step"])
        if f"{before:.2g}" != f"{now:.2g}":
            print(f"warning: the cosine decay was planned for {resumed['settings']['steps']} steps; spread over "
                  f"{s['steps']}, the learning rate goes from {before:.2g} at step {resumed['step']} to {now:.2g} at "
                  f"step {resumed['step'] + 1} (recorded in the run's settings as 'replanned')", file=sys.stderr)
    torch.manual_seed(s["seed"])
    config = unet.UNetConfig(widths=tuple(s["widths"]))
    model = unet.UNet(config).to(device)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=s["lr"], betas=(0.9, 0.99))   # Table S1
    batches = torch.Generator().manual_seed(s["seed"])                   # which crystals, per step
    ddpm = diffusion.Diffusion(prediction=s["prediction"])
    step, losses, val_losses = 0, [], []
    if resumed:
        model.load_state_dict(resumed["model"]), ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, losses, val_losses = resumed["step"], resumed["losses"], resumed.get("val_losses", [])
        torch.set_rng_state(resumed["rng"]["torch"]), batches.set_state(resumed["rng"]["batches"])
        if device.type == "cuda" and resumed["rng"].get("cuda") is not None:     # the noise drawn on the GPU
            torch.cuda.set_rng_state(resumed["rng"]["cuda"], device)
        run_threads = resumed.get("threads") if device.type == "cpu" else None   # other counts add in another order
        if run_threads and args.threads is None and "OMP_NUM_THREADS" not in os.environ \
                and run_threads <= torch.get_num_threads():           # never more than the idle cores
            torch.set_num_threads(run_threads)
        if run_threads and torch.get_num_threads() != run_threads:
            print(f"warning: the run trained on {run_threads} thread{'s' * (run_threads != 1)}, this goes on with "
                  f"{torch.get_num_threads()}: "
                  f"its sums, and so its weights, differ from one run on {run_threads}", file=sys.stderr)
    print(f"training a {unet.count_parameters(model) / 1e6:.2f} M-parameter U-Net on {len(crystals)} "
          f"crystal{'s' * (len(crystals) != 1)}, device {device}, steps {step} -> {s['steps']}, batch "
          f"{s['batch_size']}, lr {s['lr']:g} ({s['schedule']}), predicting {s['prediction']}, no condition below step "
          f"{s['condition_above']}, property dropout {s['property_drop']:g}"
          f"{', composition given for ' + format(100 * s['composition_given'], 'g') + '%' if s['composition_given'] else ''}"
          f"{', random translations' if s['translate'] else ''}, widths {'/'.join(map(str, s['widths']))}, "
          f"seed {s['seed']}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}, lattice "
          f"lengths {length_range[0]:.3g}-{length_range[1]:.3g} A (the cells it can make)", flush=True)

    trained_conditions = dict(band_gap=sorted({c.band_gap_class for c in crystals}),   # what sampling may ask
                              ordering=sorted({c.ordering for c in crystals}))

    def state():
        return dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                    rng=dict(torch=torch.get_rng_state(), batches=batches.get_state(),
                             cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
                    threads=torch.get_num_threads(),
                    step=step, losses=losses, val_losses=val_losses, model_config=config.to_dict(),
                    length_range=length_range,
                    settings=s, sampling=sampling_entry(s), train_ids=[c.material_id for c in crystals],
                    data_digest=digest, val_digest=val_digest,
                    train_compositions=[c.structure.composition.formula for c in crystals], loss_name=loss_name,
                    trained_conditions=trained_conditions)

    progress = Progress(s["steps"], "step", done=step)

    saved = [step] if resumed else []     # the step the run's checkpoint holds

    def diverged(what):                   # nothing more is saved over what was
        raise UserError(f"{what}: training diverged (--lr {s['lr']:g} too large?); "
                        + (f"{path} holds step {saved[0]}" if saved else "nothing was saved"))

    def save():                           # where the run's folder cannot be written: a spare file, and the folder kept
        if not all(torch.isfinite(p).all() for p in ema.parameters()):
            diverged(f"the weights are not finite numbers at step {step}")
        try:
            save_checkpoint(path, state(), spare=True)
        except SavedElsewhere:
            args.made = None
            raise
        args.made = None                  # a folder with a checkpoint is kept
        saved[:] = [step]
    model.train()
    with StopRequests() as stop:
        while step < s["steps"]:
            if stop.signum:                               # Ctrl-C, SIGTERM, SIGHUP: keep the steps done
                if step % SAVE_EVERY:
                    save()
                if os.path.exists(path):
                    print(f"{path} holds step {step}: continue with --resume", file=sys.stderr)
                    try:
                        evaluate.plot_loss(losses, val_losses, os.path.join(args.out, "loss.png"), loss_name)
                    except Exception as e:            # a full disk: the steps are saved, the figure is not
                        print(f"warning: loss.png not drawn ({e})", file=sys.stderr)
                raise KeyboardInterrupt if stop.signum == signal.SIGINT else Terminated(stop.signum)
            idx = torch.randint(0, len(x0_all), (s["batch_size"],), generator=batches)
            bg, mag = drop_properties(band_gap[idx], magnetic[idx], s["property_drop"])
            x0 = diffusion.translate_randomly(x0_all[idx]) if s["translate"] else x0_all[idx]
            t = torch.randint(0, ddpm.T, (len(idx),), device=device)        # each crystal's step
            # Below condition_above the condition is always dropped: those steps learn to denoise
            # any crystal without being told which, as sampling then runs them.
            cond_drop = torch.where(t < s["condition_above"], 1.0, diffusion.COND_DROP)
            for group in optimizer.param_groups:
                group["lr"] = float(learning_rate(s, step))         # a float, not numpy's
            given = (torch.rand(len(idx)) < s["composition_given"]).to(device) if s["composition_given"] else None
            loss = ddpm.loss(model, x0.to(device), elements[idx].to(device), bg.to(device), mag.to(device),
                             cond_drop, t=t, composition_given=given)   # Eq. S4 (eps or v)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - EMA_DECAY)
            step += 1
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                diverged(f"the loss is {losses[-1]} at step {step}")
            progress.update(1, f"loss {np.mean(losses[-50:]):.4f}", out=sys.stdout)
            if step % SAVE_EVERY == 0 or step == s["steps"]:
                if held_out:
                    val_losses.append((step, held_out_loss(ema, ddpm, held_out, s["condition_above"])))
                    print(f"step {step}: {loss_name} {val_losses[-1][1]:.4f} (EMA weights, {len(held_out[0])} "
                          f"crystal{'s' * (len(held_out[0]) != 1)} of {shown_path(resolve_path(s['val']))})", flush=True)
                save()
    args.kept = args.out                        # the checkpoint is saved: an error drawing the curve says so
    try:
        evaluate.plot_loss(losses, val_losses, os.path.join(args.out, "loss.png"), loss_name)
    except (KeyboardInterrupt, Terminated):
        print(f"{path} holds the finished run (step {step}); its loss.png was not drawn: train --resume --out "
              f"{args.out} draws it", file=sys.stderr)
        raise
    print(f"checkpoint: {path}\nloss curve: {os.path.join(args.out, 'loss.png')}  (final loss, mean "
          f"of last {min(50, len(losses))} steps: {np.mean(losses[-50:]):.4f}; {progress.done - progress.first} steps in "
          f"{progress.elapsed() / 60:.1f} min)")


def cmd_export(args):
    """A run's checkpoint -> a small file for sampling only: the EMA weights in half precision (so
    its samples differ a little from the run's own: other crystals for some seeds) and what
    sampling needs (model configuration, length range, `sampling`, `settings`, the training set's
    identities); no optimizer state, so it cannot be resumed. Golden tensors beside it."""
    golden = os.path.splitext(args.out)[0] + "_golden.npz"
    for path in (args.out, golden):
        if os.path.lexists(path):
            raise UserError(f"{path} exists: remove it or choose another --out")
    _, ckpt = load_checkpoint(args.source, advice="name a run folder or its checkpoint.pt")
    if ckpt["step"] < ckpt["settings"].get("steps", 0):           # stopped early, or still training
        print(f"warning: {args.source} is at step {ckpt['step']} of {ckpt['settings']['steps']}: exported as it is",
              file=sys.stderr)
    print(f"writing {args.out}, then its golden tensors (DDIM samples of 20 and 74 steps; ~10-30 s) ...",
          file=sys.stderr, flush=True)
    small = {k: ckpt[k] for k in CHECKPOINT_KEYS + ("data_digest", "trained_conditions") if k in ckpt}  # sampling's
    small["ema"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    make_parents(args.out, args)
    save_checkpoint(args.out, small, new=True)
    try:                                                  # both files, or neither
        model, _ = load_checkpoint(args.out)
        write_npz(golden, **diffusion.golden_tensors(model, small["sampling"]))
    except BaseException as e:
        os.remove(args.out)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {golden}: {e.strerror or e} ({args.out} removed again)") from None
        raise
    print(f"{args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB, EMA weights in float16, "
          f"step {small['step']}; {golden}: golden tensors for checking a port")


# ----------------------------------------------------------------------------------------------
# Shared by reconstruct and generate
# ----------------------------------------------------------------------------------------------

class Progress:
    """A progress line every 10 seconds and at the end: done / total, time spent and left (not with
    estimate=False: work whose steps grow dearer, as screening's uniqueness check does)."""

    def __init__(self, total, unit, done=0, estimate=True):
        self.total, self.unit, self.first, self.done, self.start, self.last = total, unit, done, done, time.time(), 0
        self.estimate = estimate

    def elapsed(self):
        return time.time() - self.start

    def update(self, n, note="", out=None):
        self.done, now = self.done + n, self.elapsed()
        if now - self.last > 10 or self.done >= self.total - 1e-6:    # fractions of a batch add up to 2.9999...
            self.last, left = now, max(0.0, now / (self.done - self.first) * (self.total - self.done) / 60)
            print(f"{self.unit} {self.done:>6.0f}/{self.total}  {note}  {now:5.0f} s elapsed"
                  + (f", {left:5.1f} min left" if self.estimate else ""), file=out or sys.stderr, flush=True)


def make_parents(path, args):
    """Make the missing folders above `path`, one level at a time, recording in args.made those
    this command made, innermost first (as [None, ...]: no result folder yet): what main() removes
    again, each only if it is still empty, if the command fails -- here too. Returns them."""
    missing, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    args.made = [None]
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
            args.made.insert(1, folder)
        except FileExistsError:                           # another command made it: not ours to remove
            pass
        except OSError as e:                              # /proc, a read-only disk: said, not "no such file"
            raise UserError(f"cannot make the folder {folder} ({e.strerror}): name a writable place") from None
    return args.made[1:]


def fresh_dir(args):
    """A new folder for results: --out, or --out-2, -3, ... Made by os.mkdir, which fails if it
    exists, so two runs never share one. main() removes it, and the empty folders made above it,
    if the command fails before its results are written (args.made; None once they are)."""
    out = os.path.normpath(args.out)                  # runs/x/ -> runs/x, so -2 goes beside it
    if os.path.basename(out) in ("", ".", ".."):                   # "", for /
        raise UserError(f"--out {args.out} is an existing folder, not a new one: name a new folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {args.out} is a file, not a folder")
    parents = make_parents(out, args)
    k = 1
    while True:
        candidate = out if k == 1 else f"{out}-{k}"
        try:
            os.mkdir(candidate)
            args.made = [candidate, *parents]
            return candidate
        except FileExistsError:
            k += 1
        except OSError as e:
            raise UserError(f"cannot make the folder {candidate} ({e.strerror}): name a writable place with "
                            f"--out") from None


def write_structure(structure, path, fmt="cif"):
    """A crystal as CIF or POSCAR, through data.written: never half a file."""
    with data.written(path) as tmp:
        structure.to(filename=tmp, fmt=fmt)


def write_npz(path, **arrays):
    """Arrays, compressed, through data.written."""
    with data.written(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def write_json(path, value):
    """JSON that strict parsers read: numpy numbers as numbers, NaN and infinities as null."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(v) else None
        return v.item() if isinstance(v, np.generic) else v
    with data.written(path) as tmp, open(tmp, "w") as f:
        json.dump(plain(value), f, indent=1, allow_nan=False)


def condition_tensors(conditions, device):
    """[(elements, band_gap_class, ordering)] -> the three long tensors the model takes."""
    encoded = [data.encode_condition(*c) for c in conditions]
    return tuple(torch.tensor(column, device=device) for column in zip(*encoded))


def physics_for(element_sets, count_lists, length_range, volumes):
    """A diffusion.Physics for these samples: their atom layouts from the given counts, or (count_lists
    None) read from x0 by the clustering decoder when the sampler commits; volumes: per-element
    volumes (evaluate.atomic_volumes) for the smallest cell."""
    volume_of = functools.partial(evaluate.element_volume, volumes=volumes)
    if count_lists is not None:
        return diffusion.Physics(length_range, layout=data.atom_layouts(element_sets, count_lists, volume_of))
    return diffusion.Physics(length_range, read_layout=lambda clouds: data.atom_layouts(
        element_sets, [data.read_counts(c, e, length_range) for c, e in zip(clouds, element_sets)], volume_of))


def file_name(material_id):
    """A material id as part of a file name: a structure file's own suffix dropped (x.cif, x.cif#2:
    x, x_2), letters, digits, '.', '-', '+' kept, the rest '_', at most 80 characters ('icsd/123'
    would name a folder)."""
    stem = re.sub(r"\.(cif|vasp|poscar)(?=#\d+$|$)", "", material_id, flags=re.I)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", stem)[:80]


def refine_run(args, t_start=diffusion.T - 1):
    """How many refinement passes sampling runs: --refine, or none (said) where no visited step is
    at or below REFINE_FROM (DDIM from step 999 with fewer than 20 steps)."""
    asked = args.refine_default if args.refine is None else args.refine
    visited = diffusion.ddim_timesteps(t_start, args.steps) if args.sampler == "ddim" else [0]
    if asked and min(visited) > diffusion.REFINE_FROM:
        if args.refine:                   # asked for, not the default
            print(f"warning: --refine needs a visited step at or below {diffusion.REFINE_FROM} (--steps 20 or "
                  f"more): no refinement", file=sys.stderr)
        return 0
    return asked


def steps_run(args, t_start=diffusion.T - 1):
    """How many steps sampling from t_start runs (what the results record; refinement passes are
    recorded apart): every one for DDPM, DDIM's distinct visited steps (--steps, or fewer)."""
    return len(diffusion.ddim_timesteps(t_start, args.steps)) if args.sampler == "ddim" else t_start + 1


def sample_in_batches(model, ddpm, conditions, args, device, x_T=None, t_start=None, trajectory=None, known=None,
                      physics=None):
    """Denoise len(conditions) clouds, --batch-size at a time, with a progress line; known: None or
    (mask, x0 (N, 3, 128, 3)), what inpainting holds; physics: None, or (count_lists or None, length
    range) for physics-aware sampling (`physics_for`). Returns ((N, 3, 128, 3) in [0, 1], seconds, the
    atom counts each sample was committed to: None where it was not, or physics is off)."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    n, out, committed = len(conditions), [], []
    visited = diffusion.ddim_timesteps(ddpm.T - 1 if t_start is None else t_start, args.steps) \
        if args.sampler == "ddim" else [0]
    if physics and min(visited) > diffusion.PHYSICS_FROM:
        print(f"warning: physics-aware sampling acts at steps <= {diffusion.PHYSICS_FROM} and --steps "
              f"{args.steps} visits none: these are the network's own samples (--steps 2 or more)", file=sys.stderr)
    progress = Progress(n, "structures")
    for lo in range(0, n, args.batch_size):
        hi = min(n, lo + args.batch_size)
        element_sets = [c[0] for c in conditions[lo:hi]]
        counts = physics and physics[0] and physics[0][lo:hi]
        batch_physics = physics and physics_for(element_sets, counts, *physics[1:])
        clouds = ddpm.sample(model, condition_tensors(conditions[lo:hi], device), guidance=args.guidance,
                             condition_above=args.condition_above, sampler=args.sampler, steps=args.steps,
                             refine=args.refine, t_start=t_start,
                             known=None if known is None else (known[0], known[1][lo:hi].to(device)),
                             known_clean=known is not None and args.known_clean, physics=batch_physics,
                             x_T=None if x_T is None else x_T[lo:hi].to(device),
                             generator=generator, progress=lambda i, steps: progress.update((hi - lo) / steps),
                             trajectory=trajectory if lo == 0 else None)
        out.append(clouds.cpu().numpy())
        committed += batch_physics.layout["counts"] if physics and batch_physics.layout else [None] * (hi - lo)
    return np.concatenate(out), progress.elapsed(), committed


# ----------------------------------------------------------------------------------------------
# reconstruct (paper Fig. 1, Table 1, Fig. 2)
# ----------------------------------------------------------------------------------------------

def cmd_reconstruct(args):
    device, model, ckpt, ddpm = load_for_sampling(args)
    t, length_range = ddpm.T if args.t is None else args.t, ckpt["length_range"]
    args.refine = refine_run(args, t - 1)
    if ckpt["settings"].get("composition_given", 0) >= 1:
        print("warning: this model was trained with the composition always given (--composition-given 1): it "
              "never learned to denoise channel 1, which reconstruction asks of it", file=sys.stderr)
    own = args.data is None                         # the model's own training data, where it still is
    if own:
        args.data = resolve_path(ckpt["settings"]["data"])
        if not os.path.exists(args.data):
            raise UserError(f"the model's training data, {ckpt['settings']['data']}, is gone: name structures "
                            f"with --data")
    skipped = {}
    crystals = load_or_fail(args.data, skipped=skipped, length_range=length_range)
    loaded = data.describe_load(shown_path(args.data), crystals, skipped)       # kept with the results
    learned = own and trained_on(data.load_structures(args.data, verbose=False), ckpt)
    if own and not learned:
        print(f"warning: {args.data} has changed since the model was trained on it: these are not the "
              f"crystals it learned", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    everything, crystals = crystals, [crystals[i] for i in rng.permutation(len(crystals))[: args.n]]
    usable = [(c, *data.encode(c.structure, length_range=length_range)) for c in crystals]
    out = fresh_dir(args)

    # Forward process to step t (Eq. 3), stored so that the run can be repeated.
    x0 = diffusion.to_model(torch.from_numpy(np.stack([cloud for _, cloud, _ in usable])))
    g = torch.Generator().manual_seed(args.seed)
    x_t = ddpm.q_sample(x0, torch.full((len(x0),), t - 1), torch.randn(x0.shape, generator=g))
    write_npz(os.path.join(out, "noised.npz"), x_t=x_t.numpy(), t=t,
              material_id=[c.material_id for c, _, _ in usable])
    conditions = [(elements, c.band_gap_class, c.ordering) for c, _, elements in usable]
    warn_never_learned(conditions, everything if learned else None, ckpt, ddpm, args.guidance)
    clouds, seconds, _ = sample_in_batches(model, ddpm, conditions, args, device, x_T=x_t, t_start=t - 1)
    write_npz(os.path.join(out, "denoised.npz"), clouds=clouds,
              elements=np.array([" ".join(e) for e, _, _ in conditions]))
    recon, reasons = data.decode_all(clouds, [e for e, _, _ in conditions], length_range)
    warn_at_length_limit(recon, length_range)

    print(f"measuring {len(recon)} pairs (StructureMatcher{', CrystalNN' if args.fig2 else ''}) ...",
          file=sys.stderr, flush=True)
    pairs = []
    for (c, _, _), s, why in zip(usable, recon, reasons):
        pairs.append(evaluate.compare_reconstruction(c.structure, s, fig2=args.fig2)
                     | dict(material_id=c.material_id, decode_error=why))
        if s is not None:
            write_structure(s, os.path.join(out, f"{len(pairs) - 1:04d}_{file_name(c.material_id)}.cif"))
    summary = dict(data=os.path.abspath(args.data), data_loaded=loaded, t=t,
                   sampler=args.sampler, steps=steps_run(args, t - 1), guidance=args.guidance,
                   condition_above=args.condition_above, refine=args.refine, seed=args.seed, seconds=seconds)
    summary |= evaluate.summarise_reconstruction(pairs, ckpt["train_compositions"]) | run_record(args, ckpt)
    write_json(os.path.join(out, "results.json"), dict(summary=summary, pairs=pairs))
    args.made, args.kept = None, out            # finished: kept, whatever happens to what follows
    data.write_csv(os.path.join(out, "pairs.csv"), pairs, evaluate.PAIR_FIELDS)
    evaluate.plot_reconstruction(pairs, summary, os.path.join(out, "fig1.png"))
    print(evaluate.format_reconstruction(summary))
    print(f"results: {out}/ (results.json, pairs.csv, fig1.png, noised.npz, denoised.npz, "
          f"{summary['decoded']} CIFs)")


# ----------------------------------------------------------------------------------------------
# generate and evaluate (paper Fig. 3, Table 2)
# ----------------------------------------------------------------------------------------------

def reference_path(path, named):
    """Where the novelty check's training structures are: a named --reference (from the current
    folder) must exist; a checkpoint's own data path is portable (`portable_path`)."""
    if named and not os.path.exists(path):
        raise UserError(f"--reference {path}: no such file or folder")
    where = path if named else resolve_path(path)
    if os.path.exists(where):
        return where
    print(f"warning: reference structures not found ({path}); novelty not checked", file=sys.stderr)


FEW_FOR_VOLUMES = 100       # reference crystals below which the per-element volumes are said to be unreliable


def load_reference(path, named="--reference", notes=None):
    """The training crystals novelty is judged against (and atomic volumes fitted to): every
    readable one, whatever its size or number of elements (a copy of any of them is not novel).
    `named`: what the errors call it (the flag, or where the path came from); `notes`, a list to
    hold what it says until the caller knows it will not fail (then one line, the error, is all)."""
    say = notes.append if notes is not None else lambda line: print(line, file=sys.stderr)
    if not path:
        return []
    skipped = {}
    try:
        reference = data.load_structures(path, verbose=False, only_encodable=False, skipped=skipped)
    except (OSError, ValueError) as e:       # not UTF-8, no 'cif' column: said by the loader, in one line
        raise UserError(f"{named} {path}: {e}") from None
    said = ", ".join(f"{n} {why}" for why, n in skipped.items())
    if not reference:
        raise UserError(f"{named} {path} holds no readable structure{f' (skipped: {said})' if said else ''}: "
                        f"novelty cannot be judged against it")
    if skipped:
        say(f"{named} {path}: skipped {said}")
    if len(reference) < FEW_FOR_VOLUMES:     # EXPERIMENTS.md, Per-element volumes from a small reference
        say(f"warning: {named} {path} holds {len(reference)} crystal{'s' * (len(reference) != 1)}: per-element "
            f"volumes fitted to fewer than {FEW_FOR_VOLUMES} judge V / V_pred (and scale physics-aware cells) "
            f"unreliably")
    return reference


def trained_on(crystals, ckpt):
    """Whether these crystals (the encodable ones of a file, as train keeps them) are the ones the
    checkpoint was trained on: not if the file has changed since (other names, compositions or,
    where the run recorded it, structures). Rows reordered are the same data (rows of one name
    paired in their order)."""
    if sorted(c.material_id for c in crystals) != sorted(ckpt["train_ids"]):
        return False
    def occurrences(names):                  # (name, k): the k-th row of that name, so a repeated id pairs up
        seen, keys = collections.Counter(), []
        for name in names:
            seen[name] += 1
            keys.append((name, seen[name]))
        return keys
    position = {key: i for i, key in enumerate(occurrences(ckpt["train_ids"]))}     # rows reordered: the same
    keys = occurrences(c.material_id for c in crystals)                                 # crystals, learned alike
    crystals = [c for _, c in sorted(zip(keys, crystals), key=lambda kc: position[kc[0]])]
    return [c.structure.composition.formula for c in crystals] == ckpt["train_compositions"] and \
        holds_digest(ckpt.get("data_digest"), crystals)                   # older checkpoints hold none


def untrained_conditions(band_gaps, orderings, crystals, ckpt):
    """The asked-for band-gap classes and magnetic orderings the model never trained on: none of its
    training crystals had it (the checkpoint's record, else `crystals`, else not known), or property
    dropout 1 hid it ('unknown' is trained by property dropout, and with a dropout of 1 it is all
    that is). Their embeddings are random."""
    p = ckpt["settings"].get("property_drop", 0)
    trained = lambda classes: (set() if p >= 1 else classes) | ({"unknown"} if p > 0 else set())  # noqa: E731
    record = ckpt.get("trained_conditions")
    return [f"{what} {value}" for what, asked, seen in (
        ("band gap", band_gaps, record["band_gap"] if record else data.BAND_GAP_CLASSES if crystals is None
         else {c.band_gap_class for c in crystals}),
        ("magnetic ordering", orderings, record["ordering"] if record else data.MAGNETIC_ORDERINGS
         if crystals is None else {c.ordering for c in crystals}))
        for value in sorted(set(asked)) if value not in trained(set(seen))]


def warn_never_learned(conditions, crystals, ckpt, ddpm, guidance):
    """Say what sampling asks of the model that it never learned: a band-gap class or ordering
    (untrained_conditions), any condition at all (trained with --condition-above T), an element.
    Guidance 0 never tells the network its condition: only an unseen element is said."""
    band_gaps, orderings = [b for _, b, _ in conditions], [m for _, _, m in conditions]
    if guidance != 0 and (untrained := untrained_conditions(band_gaps, orderings, crystals, ckpt)):
        print(f"warning: the model never trained on {' or '.join(untrained)}: that condition is untrained "
              f"(random) in this model", file=sys.stderr)
    if guidance != 0 and ckpt["settings"].get("condition_above", 0) >= ddpm.T:
        print(f"warning: this model was trained without its condition (--condition-above "
              f"{ckpt['settings']['condition_above']}): the condition's embeddings are untrained", file=sys.stderr)
    unseen = sorted({e for s, _, _ in conditions for e in s}
                    - {e.symbol for comp in ckpt["train_compositions"] for e in Composition(comp).elements})
    if unseen:
        print(f"warning: the model never saw {' '.join(unseen)} in training; expect poor structures",
              file=sys.stderr)


def warn_at_length_limit(structures, length_range):
    """Say how many cells have a lattice length at (within 1% of) an end of the model's range:
    sampling clips the network's output there, so a cell that wants to be larger (or smaller) stops
    at it (a one-atom cell, whose atom meets its own images, most often)."""
    ends, decoded = np.array(length_range), [s for s in structures if s is not None]
    n = sum(bool(np.isclose(np.array(s.lattice.abc)[:, None], ends, rtol=1e-2).any()) for s in decoded)
    if n:
        print(f"warning: {n} of {len(decoded)} cell{'s' * (len(decoded) != 1)} {'has' if n == 1 else 'have'} a "
              f"lattice length at an end of the model's range ({ends[0]:.3g}-{ends[1]:.3g} A, fitted to its "
              f"training data): it cannot make larger or smaller cells", file=sys.stderr)


def cmd_generate(args):
    elements, counts, given = args.formula or (args.elements, None, None)   # both checked as they were parsed
    as_given = re.findall(r"([A-Z][a-z]?)([0-9]*)", given or "")
    if counts and [(e, int(n.lstrip("0") or 1)) for e, n in as_given] != list(zip(elements, counts)):  # Fe2O3Fe
        read = "".join(e + str(n) * (n != 1) for e, n in zip(elements, counts))
        print(f"--formula {given} read as {read} ({sum(counts)} atom{'s' * (sum(counts) != 1)})", file=sys.stderr)
    device, model, ckpt, ddpm = load_for_sampling(args)
    args.refine = refine_run(args)
    rng = np.random.default_rng(args.seed)
    if elements:
        element_sets = [elements] * args.n
    elif args.pool == "train":              # element sets of randomly drawn training crystals
        compositions = rng.choice(ckpt["train_compositions"], size=args.n)
        element_sets = [[e.symbol for e in Composition(c).elements] for c in compositions]
    else:
        element_sets = data.draw_element_sets(args.pool, args.n, rng)
    element_sets = [data.canonical_order(s) for s in element_sets]   # the slot order of training
    out = fresh_dir(args)                   # a bad --out fails first, then a bad reference: not after sampling
    reference_file = reference_path(args.reference or ckpt["settings"]["data"], named=args.reference is not None)
    reference = load_reference(reference_file, "--reference" if args.reference else "the training data")
    training = [c for c in reference if not data.unencodable_reason(c.structure, decodable=True)]  # what train kept
    if reference and args.reference is None and not trained_on(training, ckpt):
        print(f"warning: {reference_file} has changed since the model was trained on it: novelty not checked "
              f"(name the training data with --reference)", file=sys.stderr)
        reference, reference_file = [], None
    if not counts and ckpt["settings"].get("composition_given", 0) >= 1:
        print("warning: this model was trained with the composition always given (--composition-given 1): it "
              "never learned to make channel 1; name one with --formula", file=sys.stderr)
    unused = "--guidance 0 takes the network's unconditional output alone" if args.guidance == 0 else \
        f"the condition acts at steps >= {args.condition_above} only, and none is" \
        if args.condition_above >= ddpm.T > ckpt["settings"].get("condition_above", 0) else ""     # asked so
    if not counts and unused:
        print(f"warning: {unused}: the network is not told the elements, band gap or ordering asked for "
              f"(--formula holds a composition without it)", file=sys.stderr)
    conditions = [(s, args.band_gap, args.magnetic) for s in element_sets]
    warn_never_learned(conditions, training if reference and args.reference is None else None, ckpt, ddpm,
                       args.guidance)
    trajectory = {} if args.trajectory else None
    lay = data.element_layout(elements, counts) if counts else None      # --formula: channel 1 held
    known = diffusion.known_channels(np.stack([[0 * lay, lay, 0 * lay]] * args.n), [1]) if counts else None
    if not reference and not args.no_physics:
        print("warning: no reference structures: cells are scaled to volumes from covalent radii", file=sys.stderr)
    physics = None if args.no_physics else (counts and [counts] * args.n, ckpt["length_range"],
                                            evaluate.atomic_volumes([c.structure for c in reference]))
    clouds, seconds, committed = sample_in_batches(model, ddpm, conditions, args, device, trajectory=trajectory,
                                                   known=known, physics=physics)
    if trajectory:
        evaluate.plot_trajectory(trajectory, element_sets[0], os.path.join(out, "trajectory.png"))
    write_npz(os.path.join(out, "clouds.npz"), clouds=clouds,   # to decode again later
              elements=np.array([" ".join(e) for e in element_sets]))
    count_lists = [counts or c for c in committed]            # decoded by blocks where the counts are known
    structures, reasons = data.decode_all(clouds, element_sets, ckpt["length_range"], count_lists)
    warn_at_length_limit(structures, ckpt["length_range"])
    unsymmetrised = structures
    structures, symmetrised = symmetrise_all(structures, args)
    names = []
    for i, s in enumerate(structures):
        names.append(f"{i:04d}_{data.formula(s.composition) if s else 'failed'}")
        if s is not None:
            write_structure(s, os.path.join(out, names[-1] + ".cif"))
            write_structure(s, os.path.join(out, names[-1] + ".vasp"), fmt="poscar")
    args.made, args.kept = None, out            # the crystals are written: kept, whatever follows
    decoded = sum(s is not None for s in structures)
    print(f"screening {decoded} structure{'s' * (decoded != 1)} ...", file=sys.stderr, flush=True)
    try:
        rows, summary = evaluate.screen(structures, [c.structure for c in reference],
                                        Progress(decoded, "screened", estimate=False).update)
    except BaseException:
        again = f" --reference {reference_file}" if reference_file else ""
        print(f"the crystals are kept in {out}/: screen them with python pccd.py evaluate {out}{again}",
              file=sys.stderr)
        raise
    lacking = [[e for e in element_set if s and e not in s.composition]       # an asked element missing
               for s, element_set in zip(structures, element_sets)]
    for row, name, why, element_set, missing in zip(rows, names, reasons, element_sets, lacking):
        row.update(name=name, elements=" ".join(element_set),
                   reason=why or (f"no {' '.join(missing)}, which was asked for" if missing else ""))
    data.write_csv(os.path.join(out, "summary.csv"), rows, evaluate.SCREENING_FIELDS)
    summary.update(seconds=seconds, sampler=args.sampler, steps=steps_run(args), guidance=args.guidance,
                   condition_above=args.condition_above, refine=args.refine, seed=args.seed,
                   physics=not args.no_physics, novelty_checked=reference_file is not None,
                   missing_elements=sum(map(bool, lacking)))
    if not args.no_physics:
        summary.update(uncommitted=sum(c is None for c in count_lists))
    summary.update(symmetrised=symmetrised)
    if symmetrised:
        summary.update(p1_before_symmetrising=sum(evaluate.space_group(s) == "P1" for s in unsymmetrised if s))
    summary |= run_record(args, ckpt)
    write_json(os.path.join(out, "summary.json"), summary)
    print(evaluate.format_screening(summary))
    print(f"structures, summary.csv and the raw clouds (clouds.npz): {out}/")


def without_suffix(path):
    """A file's path without its suffix (x.cif: x; x.csv.gz: x)."""
    return path[:-len(".csv.gz")] if path.lower().endswith(".csv.gz") else os.path.splitext(path)[0]


def cmd_evaluate(args):
    folder = args.folder
    path = args.csv or (os.path.join(folder, "screening.csv") if os.path.isdir(folder)
                        else without_suffix(folder) + "_screening.csv")
    if os.path.lexists(path):                             # a link to nowhere too: it names a file
        raise UserError(f"{path} exists; name another with --csv")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(parent):                      # made now (removed again if screening fails)
        make_parents(path, args)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):         # found now, not after screening
        raise UserError(f"cannot write {path}: {parent} is not a folder, or is read-only")
    notes = []                                # a bad reference fails first; what it says waits for the folder
    skipped, reference = {}, load_reference(reference_path(args.reference, named=True), notes=notes)
    named = []                                # (file, why) of each one skipped
    crystals = load_or_fail(folder, only_encodable=False, skipped=skipped, named=named)
    for note in notes:
        print(note, file=sys.stderr)
    failed = [(name, why) for name, why in named if why not in data.NOT_A_CRYSTAL]
    structures = [c.structure for c in crystals] + [None] * len(failed)     # counted as failed samples
    try:                                          # a generate folder: its undecoded samples left no file
        summary_path = os.path.join(folder, "summary.json")
        if not (os.path.isfile(summary_path) and os.path.getsize(summary_path) < 1e6):   # a pipe: not waited on
            raise ValueError("not generate's summary")
        with open(summary_path) as f:
            made = json.load(f)
        lost = int(made["generated"]) - int(made["decoded"])
    except Exception:                             # not one, or not readable: nothing to say
        lost = 0
    if lost > 0:
        print(f"note: {os.path.join(folder, 'summary.json')} says generate made {made['generated']} here, {lost} of "
              f"which did not decode and left no file: the rates below are of the {len(structures)} files "
              f"(generate's own summary counts all {made['generated']})", file=sys.stderr)
    largest = max((len(c.structure) for c in crystals), default=0)
    print(f"screening {len(crystals)} structure{'s' * (len(crystals) != 1)} ..." + (
        f" (the largest has {largest} atoms: matching it may take minutes)" if largest > 200 else ""),
        file=sys.stderr, flush=True)
    progress = Progress(len(crystals), "screened", estimate=False)     # each is matched against those before
    rows, summary = evaluate.screen(structures, [c.structure for c in reference], progress.update)
    for row, (name, why) in zip(rows, [(c.material_id, "") for c in crystals] + failed):
        row.update(name=name, reason=why)
    print(evaluate.format_screening(summary), flush=True)   # shown even when the disk is full
    data.write_csv(path, rows, [f for f in evaluate.SCREENING_FIELDS if f != "elements"])   # with why a file failed
    print(f"per-structure flags: {path}")


def cmd_csp(args):
    """Crystal structure prediction: for each of N structures, K samples of its composition (channel 1
    held by inpainting), matched at CDVAE's tolerances: the first and the best of K, RMSE."""
    device, model, ckpt, ddpm = load_for_sampling(args)
    args.refine = refine_run(args)
    skipped, length_range = {}, ckpt["length_range"]
    crystals = load_or_fail(args.data, skipped=skipped, length_range=length_range)
    loaded = data.describe_load(shown_path(args.data), crystals, skipped)       # kept with the results
    crystals = [crystals[i] for i in np.random.default_rng(args.seed).permutation(len(crystals))[: args.n]]
    out, n = fresh_dir(args), len(crystals)
    trained = set(zip(ckpt["train_ids"], ckpt["train_compositions"]))
    seen = sum((c.material_id, c.structure.composition.formula) in trained for c in crystals)
    if seen:                                      # --data the training file, or sharing its crystals
        print(f"warning: {seen} of the {n} crystals drawn are ones this model trained on (same material id and "
              f"formula): their match rate is not one of unseen crystals", file=sys.stderr)
    compositions = [data.parse_formula(c.structure.composition.formula) for c in crystals]
    truth = [data.encode(c.structure, elements, length_range)[0] for c, (elements, _) in zip(crystals, compositions)]
    conditions = [(e, c.band_gap_class, c.ordering) for c, (e, _) in zip(crystals, compositions)] * args.k
    known = diffusion.known_channels(np.stack(truth * args.k), [1])          # the composition, held
    count_lists = [c for _, c in compositions] * args.k
    training = resolve_path(ckpt["settings"]["data"])        # for the atoms' volumes (none: from radii)
    if not os.path.exists(training) and not args.no_physics:
        print(f"warning: training data not found ({ckpt['settings']['data']}); cells are scaled to volumes "
              f"from covalent radii", file=sys.stderr)
    training = load_reference(training, "the training data") if os.path.exists(training) and not args.no_physics else []
    physics = None if args.no_physics else (count_lists, length_range,
                                            evaluate.atomic_volumes([c.structure for c in training]))
    warn_never_learned(conditions[:n], None, ckpt, ddpm, args.guidance)
    clouds, seconds, _ = sample_in_batches(model, ddpm, conditions, args, device, known=known, physics=physics)
    predicted, _ = data.decode_all(clouds, [e for e, _ in compositions] * args.k, length_range, count_lists)
    warn_at_length_limit(predicted, length_range)
    unsymmetrised = predicted
    predicted, symmetrised = symmetrise_all(predicted, args)
    p1 = lambda structures: sum(evaluate.space_group(s) == "P1" for s in structures[:n] if s) / n   # noqa: E731
    symmetry = dict(p1_1=p1(predicted)) | (dict(p1_1_before_symmetrising=p1(unsymmetrised)) if symmetrised else {})
    print(f"matching {len(predicted)} structures ...", file=sys.stderr, flush=True)
    rows = evaluate.csp_scores([c.structure for c in crystals], [predicted[i::n] for i in range(n)])
    for i, (row, c) in enumerate(zip(rows, crystals)):
        row.update(material_id=c.material_id, formula=c.structure.composition.formula)
        if predicted[i]:
            write_structure(predicted[i], os.path.join(out, f"{i:04d}_{file_name(c.material_id)}_predicted.cif"))
    summary = evaluate.summarise_csp(rows, args.k) | dict(seconds=seconds, sampler=args.sampler, steps=steps_run(args),
                                                          guidance=args.guidance, condition_above=args.condition_above,
                                                          refine=args.refine, seed=args.seed,
                                                          physics=not args.no_physics, symmetrised=symmetrised,
                                                          train_crystals=len(ckpt["train_ids"]),
                                                          seen_in_training=seen, data=os.path.abspath(args.data),
                                                          data_loaded=loaded) | symmetry | run_record(args, ckpt)
    write_json(os.path.join(out, "results.json"), dict(summary=summary, rows=rows))
    args.made, args.kept = None, out            # finished: kept, whatever happens to what follows
    for i in [i for i, p in enumerate(predicted) if p][:1]:               # the first that decoded
        row, which = rows[i % n], "its first sample" if i < n else f"sample {i // n + 1}"
        scored = ("matched, RMS %.3f" % row["rms_1"]) if row["match_1"] else "not matched"
        evaluate.plot_prediction(crystals[i % n].structure, predicted[i], os.path.join(out, "predicted.png"),
                                 f"{crystals[i % n].material_id}, {which}" + (f": {scored}" if i < n else ""))
    written = ["results.json"] + ["predicted.png"] * any(predicted) + ["first samples as CIF"] * any(predicted[:n])
    print(evaluate.format_csp(summary) + f"\nresults: {out}/ ({', '.join(written)})")


# ----------------------------------------------------------------------------------------------
# download (the paper's 52,028 Materials Project crystals), show (Fig. S1), bench, roundtrip
# ----------------------------------------------------------------------------------------------

def cmd_download(args):
    """Query the Materials Project (pymatgen's MPRester) for every crystal with <= 3 elements and
    <= 16 sites, with band gap, magnetic ordering, formation energy and energy above hull, and
    write OUT/mp_train.csv, mp_val.csv, mp_test.csv (80/10/10 by a hash of the material id)."""
    from pymatgen.core import SETTINGS
    key = args.api_key or os.environ.get("MP_API_KEY") or SETTINGS.get("PMG_MAPI_KEY")
    if not key:
        raise UserError("no Materials Project API key: pass --api-key, set MP_API_KEY, or put "
                        "PMG_MAPI_KEY in ~/.config/.pmgrc.yaml (keys: materialsproject.org/dashboard)")
    paths = {split: os.path.join(args.out, f"mp_{split}.csv") for split in ("train", "val", "test")}
    if any(os.path.exists(p) for p in paths.values()):
        raise UserError(f"{args.out} already holds mp_*.csv; choose another --out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):               # found before the query
        raise UserError(f"--out {args.out} is a file, not a folder")
    if not os.path.isdir(args.out):
        parents = make_parents(args.out, args)
        os.mkdir(args.out)
        args.made = [args.out, *parents]
    print("querying the Materials Project; this takes minutes ...", file=sys.stderr, flush=True)
    try:
        rows = data.mp_documents_to_rows(data.query_materials_project(key))
    except Exception as e:  # bad key, no network, API error: one line, no traceback
        said = (str(e).splitlines() or [type(e).__name__])[0]
        said = said if len(said) <= 300 else said[:300].rsplit(" ", 1)[0] + " ..."       # whole words
        raise UserError(f"the Materials Project query failed: {said}")
    for split, path in paths.items():
        chosen = [r for r in rows if data.split_of(r["material_id"]) == split]
        data.write_csv(path, chosen)
        print(f"{path}: {len(chosen)} crystals")


def cmd_show(args):
    """Fig. S1: the three channels of one crystal's cloud."""
    named = os.path.basename(os.path.abspath(args.structure)) or "structure"          # show . : this folder's name
    out = args.out or without_suffix(named) + "_cloud.png"
    if os.path.lexists(out):
        raise UserError(f"{out} exists; name another with --out")
    length_range = load_checkpoint(args.checkpoint, advice="name a run folder or a .pt file")[1]["length_range"] \
        if args.checkpoint else data.DEFAULT_LENGTH_RANGE
    first = load_or_fail(args.structure, length_range=length_range)[0]                  # the first that fits
    try:
        cloud, elements = data.encode(first.structure, length_range=length_range)
    except ValueError as e:
        raise UserError(str(e))
    make_parents(out, args)
    evaluate.plot_cloud(cloud, elements, f"{first.structure.composition.formula.replace(' ', '')} "
                        f"({len(first.structure)} atoms)", out)
    print(f"wrote {out} (the cloud of {first.material_id})")


def cmd_bench(args):
    """Milliseconds per training step and per guided step (both passes), the mean of 20 runs."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model, B = unet.UNet().to(device), args.batch_size
    threads = torch.get_num_threads()
    print(f"device {device} ({threads} thread{'s' * (threads != 1)}), batch {B}", flush=True)   # before the wait
    try:
        train_ms, guided_ms = diffusion.Diffusion().step_milliseconds(model, B, device)
    except (RuntimeError, MemoryError) as e:          # the allocator's "can't allocate memory", CUDA OOM
        if isinstance(e, RuntimeError) and not re.search(r"allocate|out of memory", str(e), re.I):
            raise                                     # not a question of memory: a bug to see whole
        asked = re.search(r"tried to allocate (\d+ bytes|[\d.]+ ?[KMGTP]i?B)", str(e), re.I)
        raise UserError(f"--batch-size {B} does not fit in memory"
                        + (f" (it asked for {asked.group(1)})" if asked else ""))
    print(f"parameters                       {unet.count_parameters(model) / 1e6:8.2f} M   (original PCCD U-Net: 163.7 M)\n"
          f"training step                    {train_ms:8.1f} ms\n"
          f"guided sampling step (2 passes)  {guided_ms:8.1f} ms   (original, batch 32: ~2500 ms on a 2-core CPU)\n"
          f"1000 DDPM steps, per structure   {guided_ms / B:8.2f} s    (at most, in a batch of {B}; original, batch 32: ~78 s)\n"
          f"100 DDIM steps, per structure    {guided_ms / B / 10:8.3f} s   (at most: steps below condition_above run one pass)")


def cmd_roundtrip(args):
    if missing := [path for path in args.data if not os.path.exists(path)]:      # said before any is loaded
        raise UserError(f"no such file or folder: {missing[0]}")
    loaded = [(path, load_or_fail(path, length_range=data.DEFAULT_LENGTH_RANGE)) for path in args.data]  # all first
    print(f"{'data':<40} {'noise':>6} {'matched':>13} {'rate':>8} {'ms/decode':>10}", flush=True)
    progress = Progress(sum(len(crystals) for _, crystals in loaded) * len(args.noise), "structures")
    for path, crystals in loaded:
        for noise in args.noise:
            r = evaluate.roundtrip(crystals, noise=noise, seed=args.seed, tick=progress.update)
            print(evaluate.format_roundtrip(shown_path(path), noise, r), flush=True)


# ----------------------------------------------------------------------------------------------
# The command line: every value is checked where it is parsed
# ----------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line (`pccd.py CMD: error: ...`, exit code 2), an option
    that takes a value is refused when given twice (argparse keeps the last: `--elements Mg
    --elements O` would be O alone), and '-1e5' or '-inf' is a value (argparse reads only '-1' and
    '-.5' so, and '-inf' as an unknown option)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, Once)                         # every add_argument without action=
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")      # a value's newline too


class Once(argparse.Action):
    """Stores an option's value; the same option a second time in one command line is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(self, "parsed", None) is namespace:
            parser.error(f"{'/'.join(self.option_strings)} given twice: give it once"
                         f"{' (with every value after it)' if self.nargs in ('+', '*') else ''}")
        self.parsed = namespace                     # the command line being read (a new one each time)
        setattr(namespace, self.dest, values)


def number(kind, low=-math.inf, high=math.inf, what="", above=False, multiple_of=None):
    """An argparse type: a finite `kind` (int or float) in [low, high] ((low, high] with above)."""
    def parse(text):
        try:
            value = kind(text)
            ok = math.isfinite(value) and (value > low if above else value >= low) and value <= high
            ok = ok and text.isascii() and "_" not in text          # not 1_0, not Arabic-Indic digits
        except (ValueError, OverflowError):
            ok = False
        if not ok or (multiple_of and value % multiple_of):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value + 0                                    # -0.0 is 0.0
    return parse


TRAINING_STEPS = number(int, 1, 10_000_000, what="a number of steps from 1 to 10000000")
SEED = number(int, 0, 2**32 - 1, what="an integer from 0 to 2**32 - 1")
STEP = number(int, 0, diffusion.T, what=f"a diffusion step from 0 to {diffusion.T}")
PROBABILITY = number(float, 0, 1, what="a probability from 0 to 1")
GUIDANCE = number(float, 0, 100, what="a guidance scale from 0 to 100")
WIDTH = number(int, 8, 512, what="a multiple of 8 (GroupNorm's 8 groups) from 8 to 512", multiple_of=8)
COUNT = number(int, 1, 100_000, what="a number from 1 to 100000")
BATCH = number(int, 1, 4096, what="a batch size from 1 to 4096")
THREADS = number(int, 1, 256, what="a number of threads from 1 to 256")


def given_path(text):
    """An argparse type for every path (--out, --data, ...): not an empty string, which would
    otherwise mean the current folder or a default, nor '-', nor a file named as a folder (x.cif/)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a file or folder")
    if text == "-":                  # elsewhere standard input or output; here it would be a folder named -
        raise argparse.ArgumentTypeError("'-': PCCD reads and writes files, not standard input or output "
                                         "(./- names a file called -)")
    if text.endswith(("/", os.sep)) and os.path.isfile(text.rstrip("/" + os.sep)):   # the system: "not a folder"
        raise argparse.ArgumentTypeError(f"{text!r}: {text.rstrip('/' + os.sep)} is a file, not a folder "
                                         "(drop the final /)")
    return text


def csv_path(text):
    """An argparse type for a CSV to write: .csv (a name a folder's loading would take for a crystal,
    x.cif, POSCAR_2, is not one)."""
    name = os.path.basename(given_path(text)).lower()
    if not name.endswith(".csv") or name == ".csv":
        raise argparse.ArgumentTypeError(f"{text!r}: name a .csv file")
    return text


def image_path(text):
    """An argparse type for a figure's path: .png, .pdf or .svg."""
    if os.path.splitext(given_path(text))[1].lower() not in (".png", ".pdf", ".svg"):
        raise argparse.ArgumentTypeError(f"{text!r}: name a .png, .pdf or .svg file")
    return text


def checkpoint_path(text):
    """An argparse type for a checkpoint to write: a .pt file (its golden tensors go beside it)."""
    if given_path(text).endswith(("/", os.sep)) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder: name the file to write, e.g. "
                                         f"{os.path.join(text, 'model.pt')}")
    if os.path.splitext(text)[1].lower() != ".pt":
        raise argparse.ArgumentTypeError(f"{text!r}: name a .pt file (NAME_golden.npz goes beside it)")
    return text


def formula(text):
    """An argparse type: a formula PCCD can make -> (elements in slot order, counts, the text)."""
    try:
        return (*data.parse_formula(text), text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


class ElementsArgument(Once):
    """--elements: 1-3 distinct element symbols, checked as they are parsed."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            super().__call__(parser, namespace, data.check_elements(values), option_string)
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e))


def device(text):
    """auto, cpu, cuda or cuda:N, refused here when torch sees no such device."""
    cuda = re.fullmatch(r"cuda(?::([0-9]+))?", text)              # ASCII digits: torch reads no others
    if text not in ("auto", "cpu") and not cuda:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, cuda or cuda:N")
    if cuda and int(cuda[1] or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return f"cuda:{int(cuda[1])}" if cuda and cuda[1] else text            # cuda:00 is cuda:0


def cpu_quota(cgroup="/sys/fs/cgroup"):
    """The CPUs a container's quota grants (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), rounded up;
    None where there is no quota or no cgroup to read."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            with open(os.path.join(cgroup, quota_file)) as f:
                quota, *period = f.read().split()              # v2: "max 100000" or "200000 100000"
            if period_file:
                with open(os.path.join(cgroup, period_file)) as f:
                    period = f.read().split()
            if quota not in ("max", "-1"):
                return max(1, math.ceil(int(quota) / int(period[0])))
            return None
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def usable_cores(cgroup="/sys/fs/cgroup"):
    """The cores this process may run on, and how many of them its container's CPU quota grants."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return cores, min(len(cores), cpu_quota(cgroup) or len(cores))


def idle_cores(seconds=0.1, stat="/proc/stat", cgroup="/sys/fs/cgroup"):
    """How many of the cores this process may run on are idle now (at least 1, at most what a
    container's quota grants): the time they spent idle over `seconds`, from /proc/stat (Linux),
    else the load average. Threads that wait for each other spin, and a second one beside a busy
    program makes every step 2-3x slower, so torch gets one thread per idle core (README, Threads)."""
    cores, allowed = usable_cores(cgroup)

    def idle_and_total():                   # per core: (idle + iowait ticks, all ticks)
        with open(stat) as f:
            ticks = {line.split()[0]: [int(v) for v in line.split()[1:9]] for line in f if line.startswith("cpu")}
        return [(ticks[f"cpu{c}"][3] + ticks[f"cpu{c}"][4], sum(ticks[f"cpu{c}"])) for c in cores]
    try:
        before = idle_and_total()
        time.sleep(seconds)
        idle = sum((i1 - i0) / max(1, t1 - t0) for (i0, t0), (i1, t1) in zip(before, idle_and_total()))
    except (OSError, KeyError, ValueError, IndexError):
        try:
            idle = len(cores) - os.getloadavg()[0]
        except (AttributeError, OSError):                  # no load average either: every core
            idle = len(cores)
    return max(1, min(allowed, round(idle)))


def add_run_arguments(p, seed=0, resumable=False):
    """--device, --threads and --seed, for every command that runs the network."""
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when present), cpu, cuda "
                   "or cuda:N")
    p.add_argument("--threads", type=THREADS, help="CPU threads for torch (default: "
                   "$OMP_NUM_THREADS if set, else one per core that is idle when the command starts"
                   + ("; --resume: the run's count, if as many are idle)" if resumable else ")"))
    p.add_argument("--seed", type=SEED, default=seed, help=f"random seed (default {seed})" if seed is not None
                   else "random seed (default: the preset's, 0)")


def add_sampling_arguments(p, out, refine):
    p.add_argument("--out", type=given_path, default=os.path.join("runs", out),
                   help=f"results folder (default runs/{out}; runs/{out}-2, -3, ... if it exists)")
    p.add_argument("--checkpoint", type=given_path, default=None, help=f"default: {DEFAULT_RUN}/{CHECKPOINT} if you "
                   f"trained one, else the shipped {os.path.relpath(SHIPPED_CHECKPOINT, HERE)}")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ddpm (default): Eq. 6 "
                   "over every step, the paper's; ddim: deterministic, --steps steps")
    p.add_argument("--steps", type=number(int, 1, diffusion.T, what=f"a number of steps from 1 to {diffusion.T}"),
                   help="DDIM steps (default 100; with --sampler ddim only: ddpm runs every step)")
    p.add_argument("--guidance", type=GUIDANCE, help="classifier-free guidance w: eps = eps_uncond + "
                   "w (eps_cond - eps_uncond), 0 to 100; 1 (conditional) or 0 (unconditional: the condition "
                   "unused): one pass (default: the checkpoint's, 3)")
    p.add_argument("--condition-above", type=STEP, metavar="STEP", help="the condition only at the network's "
                   "steps >= STEP (counted from 0: pure noise is 999), one unconditional pass below (default: "
                   "the checkpoint's, 250)")
    p.set_defaults(refine_default=refine)
    p.add_argument("--refine", type=number(int, 0, 100, what="a number of passes from 0 to 100"),
                   help=f"noise the positions back to the first visited step <= {diffusion.REFINE_FROM} and denoise them again, "
                   f"lattice and elements held, this many times: crowded atoms get another chance to "
                   f"separate (default {refine}{'' if refine else '; on in generate'}; none below 20 DDIM steps)")
    p.add_argument("--batch-size", type=BATCH, default=256, help="clouds denoised at once (default 256; "
                   "another size draws other noise, so other samples for a seed)")
    add_run_arguments(p)


def add_physics_arguments(p, p1_told=False):
    p.add_argument("--no-physics", action="store_true", help="the network's own samples: no projection of "
                   f"its x0 prediction onto a crystal, no pushing of atoms closer than {diffusion.SEPARATION} "
                   f"(r_i + r_j) apart at steps <= {diffusion.PHYSICS_FROM} (diffusion.Physics), and no "
                   "symmetrising unless --symmetrise is given")
    p.add_argument("--symmetrise", type=number(float, 0, 1, what="a tolerance in A from 0 (off) to 1"),
                   metavar="A", help="make each decoded crystal exactly symmetric under the space group spglib "
                   f"finds at this tolerance (data.symmetrise; default {data.SYMMETRY_TOLERANCE}, 0 with "
                   "--no-physics; 0: off)" + ("; the summary gives P1 before and after" if p1_told else ""))


def symmetrise_all(structures, args):
    """The decoded crystals symmetrised at --symmetrise (None stays None); the tolerance used."""
    if args.symmetrise is None:                               # with the physics, or not at all
        args.symmetrise = 0.0 if args.no_physics else data.SYMMETRY_TOLERANCE       # recorded as used
    tolerance = args.symmetrise
    if tolerance == 0:
        return structures, 0.0
    return [None if s is None else data.symmetrise(s, tolerance)[0] for s in structures], tolerance


def build_parser():
    parser = Parser(
        prog="pccd.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="command")
    parser.commands = sub.choices                     # name -> its parser, for errors in its name

    p = sub.add_parser("train", help="train the diffusion model (Table S1; 8-13 min on a 2-core CPU)",
                       description=f"Train PCCD's U-Net (L1 loss, Eq. S4). Writes OUT/checkpoint.pt (every "
                       f"{SAVE_EVERY} steps and at the end) and OUT/loss.png (Fig. S4). A setting not given "
                       "comes from the preset, or, with --resume, from the run itself.")
    p.add_argument("--data", type=given_path, help="training crystals: CDVAE CSV, folder or file (default: the "
                   "bundled MP-20 train split; the val split stays unseen)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="quick (default; 8-13 min on 2 cores) or long "
                   "(69 min; the shipped model): README, Training")
    p.add_argument("--steps", type=TRAINING_STEPS, help="total optimisation steps (presets: 3600, 24000)")
    p.add_argument("--batch-size", type=BATCH, help="crystals per step (presets: 64; Table S1: 128)")
    p.add_argument("--lr", type=number(float, 1e-7, 1, what="a learning rate from 1e-7 to 1 (below, nothing trains)"),
                   help="Adam learning rate (presets: 2e-3; Table S1: 1e-4, much slower here: EXPERIMENTS.md)")
    p.add_argument("--schedule", choices=["constant", "cosine"], help="learning rate over the run: "
                   "constant, or cosine-decayed to 0 at --steps (presets: cosine)")
    p.add_argument("--prediction", choices=["eps", "v"], help="what the network predicts: eps, the "
                   "noise (the paper's), or v = sqrt(abar) eps - sqrt(1 - abar) x0 (presets: v)")
    p.add_argument("--condition-above", type=STEP, metavar="STEP", help="the condition only at the network's "
                   "steps >= STEP (counted from 0: pure noise is 999), in training and sampling (presets: 250; "
                   "0: every step, the paper's)")
    p.add_argument("--property-drop", type=PROBABILITY, help="share of crystals whose band gap, and "
                   "separately ordering, is trained as 'unknown', which then means 'any' (presets: 0.3)")
    p.add_argument("--translate", action="store_true", default=None, help="augment every batch by "
                   "random periodic translations of each crystal (presets: off)")
    p.add_argument("--composition-given", type=PROBABILITY, metavar="P", help="share of crystals trained "
                   "with channel 1 (the composition) shown clean, as structure prediction holds it (presets: 0); "
                   "their channel 1 counts as 0 in the training loss, and the held-out loss scores the whole "
                   "cloud, as generation needs it")
    p.add_argument("--val", type=given_path, metavar="DATA",
                   help="crystals whose loss is reported at every checkpoint and "
                   "never trained on (default: the bundled MP-20 val split, or the resumed run's; none: skip)")
    p.add_argument("--widths", type=WIDTH, nargs=3, metavar="W", help="U-Net channels at 128, 64 "
                   f"and 32 points, multiples of 8 up to 512 (presets: {' '.join(map(str, unet.UNetConfig.widths))})")
    p.add_argument("--out", type=given_path, default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt up to --steps (other than "
                   "the run planned: recorded, and a cosine decay spread over it), on the same crystals and "
                   "held-out set (--data, --val: where they are now, if they moved) with the run's own other settings")
    add_run_arguments(p, seed=None, resumable=True)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("export", help="a small sampling-only copy of a run's checkpoint (how the "
                       "shipped one was made)", description=cmd_export.__doc__)
    p.add_argument("source", type=given_path, metavar="RUN", help="run folder or checkpoint.pt (e.g. runs/long)")
    p.add_argument("--out", type=checkpoint_path, required=True, help="the .pt file to write, NAME_golden.npz "
                   "beside it (never overwritten)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("reconstruct", help="the paper's reconstruction experiment (Fig. 1, Table 1)",
                       description="Noise N structures to step t with the forward process (stored in "
                       "noised.npz), denoise them with the model conditioned on their own elements (at steps >= "
                       "--condition-above), "
                       "decode, and compare with the originals: atom counts, Table 1's box-plot "
                       "statistics, StructureMatcher match rate and RMS, Fig. 2's distances, Fig. 1.")
    p.add_argument("--data", type=given_path, help="structures to reconstruct (default: the model's training "
                   "data, as the paper; datasets/mp20_val.csv.gz for unseen ones)")
    p.add_argument("--n", type=COUNT, default=256, help="at most this many structures, drawn at random "
                   "(default 256)")
    p.add_argument("--t", type=number(int, 1, diffusion.T, what=f"a step from 1 to {diffusion.T}"),
                   help=f"noise to step t, 1..{diffusion.T} (default {diffusion.T} = T), the network's step t - 1 "
                   f"(so --t 250 runs wholly below --condition-above 250: unconditioned)")
    add_sampling_arguments(p, "reconstruct", refine=0)
    p.add_argument("--no-fig2", dest="fig2", action="store_false",
                   help="skip the slower Fig. 2 distances (RMS anonymous, CrystalNN)")
    p.set_defaults(run=cmd_reconstruct)

    p = sub.add_parser("generate", help="sample new crystals of chosen elements and screen them",
                       description="Sample crystals for an element set (--elements), a composition "
                       "(--formula) or random sets from the paper's three batches or the training data "
                       "(--pool), write one CIF and one POSCAR (.vasp) each, summary.csv, summary.json and "
                       "clouds.npz, and screen them: structural and compositional validity, uniqueness, "
                       "novelty (Table 2), crowding, volume, P1 share: physical?")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--elements", nargs="+", metavar="EL", action=ElementsArgument,
                      help="1-3 element symbols, e.g. Mg Mn O")
    what.add_argument("--formula", type=formula, help="a composition to predict structures of, e.g. Li2Co2O4 (all of them "
                   "have exactly it: channel 1 is held by inpainting)")
    what.add_argument("--pool", choices=sorted(data.POOLS) + ["train"], help="an element set per crystal "
                   "from the paper's batches (all, rare-earth-oxides: O + 1-2 metals, common: "
                   + " ".join(data.POOLS["common"]) + ") or of random training crystals")
    p.add_argument("--n", type=COUNT, default=64, help="how many crystals (default 64)")
    p.add_argument("--band-gap", choices=data.BAND_GAP_CLASSES, default="unknown",
                   help="metal, small (< 1.5 eV), large (>= 1.5 eV) or unknown (default)")
    p.add_argument("--magnetic", choices=data.MAGNETIC_ORDERINGS, default="unknown",
                   help="magnetic ordering (default unknown)")
    p.add_argument("--reference", type=given_path, default=None, help="training structures for the novelty check "
                   "and the per-element volumes physics-aware sampling scales cells to (default: the checkpoint's "
                   "training data)")
    add_sampling_arguments(p, "generate", refine=5)   # EXPERIMENTS.md, Crowded atoms
    add_physics_arguments(p, p1_told=True)
    p.add_argument("--trajectory", action="store_true", help="also draw the first sample's points "
                   "at several timesteps into trajectory.png (Fig. S2)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("csp", help="structure prediction from compositions: k samples each, match rate",
                       description=cmd_csp.__doc__)
    p.add_argument("--data", type=given_path, default=BUNDLED_VAL,
                   help="structures to predict (default: the val split)")
    p.add_argument("--n", type=COUNT, default=1000, help="at most this many structures (default 1000)")
    p.add_argument("--k", type=number(int, 1, 100, what="a number of samples from 1 to 100"), default=1,
                   help="samples per composition, 1 to 100 (default 1; the field reports 1 and 20). The k "
                   "samples are drawn together, so a k > 1 run's first samples are not a k = 1 run's")
    add_sampling_arguments(p, "csp", refine=0)
    add_physics_arguments(p)
    p.set_defaults(run=cmd_csp)

    p = sub.add_parser("evaluate", help="screen any folder of CIF/POSCAR files (Table 2)",
                       description="Screen crystals from any generator: structural and compositional "
                       "validity, uniqueness, novelty against --reference, and crowding, volume, symmetry.")
    p.add_argument("folder", type=given_path, help="folder of CIF/POSCAR files (or one file, or a CDVAE CSV)")
    p.add_argument("--reference", type=given_path, default=BUNDLED_TRAIN,
                   help="training structures (default: %(default)s)")
    p.add_argument("--csv", type=csv_path, default=None,
                   help="where to write the flags (default FOLDER/screening.csv, "
                   "or NAME_screening.csv beside a file)")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("download", help="rebuild the paper's dataset from the Materials Project",
                       description=cmd_download.__doc__)
    p.add_argument("--api-key", help="Materials Project API key (default: $MP_API_KEY or "
                   "pymatgen's PMG_MAPI_KEY setting)")
    p.add_argument("--out", type=given_path, default="datasets", help="folder for the CSV files (default %(default)s)")
    p.set_defaults(run=cmd_download)

    p = sub.add_parser("show", help="draw the three channels of a crystal's cloud (Fig. S1)",
                       description="Encode one crystal and draw its cloud: positions, element slots, "
                       "lattice rows (paper Fig. S1).")
    p.add_argument("structure", type=given_path, help="a CIF/POSCAR file (or a CSV: its first usable row)")
    p.add_argument("--checkpoint", type=given_path, default=None, help="use this model's length range "
                   f"(default {data.DEFAULT_LENGTH_RANGE[0]:g}-{data.DEFAULT_LENGTH_RANGE[1]:g} A)")
    p.add_argument("--out", type=image_path, default=None, help="PNG path (default NAME_cloud.png in the current "
                   "folder; .pdf, .svg)")
    p.set_defaults(run=cmd_show)

    p = sub.add_parser("bench", help="parameter count and milliseconds per training/sampling step",
                       description=cmd_bench.__doc__)
    p.add_argument("--batch-size", type=number(int, 1, 10**8, what="a batch size from 1 to 10**8"), default=32,
                   help="clouds per step (default 32)")
    add_run_arguments(p)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("roundtrip", help="encode -> decode every structure and match it back",
                       description="Encode each structure, add Gaussian noise to the cloud, decode, and "
                       "count the crystals StructureMatcher() finds unchanged. Lengths are scaled over the fixed "
                       "range 2-50 A (a trained model: the range fitted to its data, e.g. 1.95-51.13 A).")
    p.add_argument("--data", type=given_path, nargs="+", default=[BUNDLED_TRAIN, BUNDLED_VAL],
                   help="CSV files, folders or structure files (default: the bundled MP-20 train and val splits)")
    p.add_argument("--noise", nargs="+", type=number(float, 0, 1, what="a standard deviation from 0 to 1"),
                   default=[0.0, 0.01, 0.02],
                   help="std of Gaussian noise added to the cloud, 0 to 1 in its [0, 1] units (default 0 0.01 0.02)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the noise (default 0)")
    p.set_defaults(run=cmd_roundtrip)
    return parser


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:                                         # said by the command's parser: "pccd.py train: error"
        parser.commands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)          # recorded with the results
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    if getattr(args, "sampler", None) == "ddpm" and args.steps is not None:
        print(f"pccd.py {args.command}: error: --steps is DDIM's number of steps: add --sampler ddim "
              f"(ddpm runs every step)", file=sys.stderr)
        return 2
    if getattr(args, "sampler", None) == "ddim" and args.steps is None:
        args.steps = 100
    if hasattr(args, "threads") and (args.threads or "OMP_NUM_THREADS" not in os.environ):
        allowed = usable_cores()[1]
        if args.threads and args.threads > allowed:
            print(f"warning: --threads {args.threads} is more than the {allowed} core{'s' * (allowed != 1)} this "
                  f"command may use: the threads take turns, every step slower", file=sys.stderr)
        torch.set_num_threads(args.threads or idle_cores())
    try:
        args.run(args)
        return 0
    except BaseException as e:
        leaf, *parents = getattr(args, "made", None) or [None]   # a command that fails leaves no half-written
        if leaf:                                                   # folder, nor the folders made for it
            shutil.rmtree(leaf, ignore_errors=True)
        for folder in parents:
            try:
                os.rmdir(folder)                  # only if empty: another command may be using it
            except OSError:
                break
        if isinstance(e, Terminated):
            print(f"terminated ({e})", file=sys.stderr)
            return 128 + e.signum
        if isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        if isinstance(e, MemoryError) or isinstance(e, RuntimeError) and re.search(
                r"can't allocate|out of memory", str(e), re.I):     # numpy's, torch's (CPU and CUDA)
            smaller = " or ".join(flag for flag in ("--batch-size", "--n") if flag in parser.commands[args.command]
                                  ._option_string_actions)           # the command's own
            e = f"out of memory: ask for less at once{f' (a smaller {smaller})' if smaller else ''}"
        elif isinstance(e, OSError):              # an unwritable --out, a full disk, ...
            where = e.filename or leaf or getattr(args, "out", None)
            e = f"{e.strerror or e}: {where}" if where else e
        elif not isinstance(e, UserError):
            raise
        kept = f" (the results written before it are kept in {args.kept}/)" if getattr(args, "kept", None) else ""
        print(f"pccd.py {args.command}: error: {' '.join(str(e).split())}{kept}", file=sys.stderr)   # one line
        return 1


def run_as_program():
    """`python pccd.py ...`: main(), with SIGTERM and SIGHUP raised as `Terminated` and output that
    survives a reader that stops reading."""
    def terminate(signum, frame):
        raise Terminated(signum)
    if signal.getsignal(signal.SIGINT) is stopped_while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)      # Ctrl-C: KeyboardInterrupt again
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:   # nohup: stays ignored
            signal.signal(signum, terminate)
    sys.stdout, sys.stderr = (stream and QuietPipe(stream) for stream in (sys.stdout, sys.stderr))   # None: closed
    if sys.stdout is None:               # `python pccd.py generate ... >&-`: said, and the exit status 1
        sys.stdout = QuietPipe(open(os.devnull, "w"))
        sys.stdout.reader_gone(OSError(errno.EBADF, "stdout is closed"))
    warnings.simplefilter("ignore")      # pymatgen's and numpy's: every message here is the project's own
    try:
        code = main()
    except SystemExit as e:              # argparse's: --help (0), a usage mistake (2)
        if not isinstance(e.code, (int, type(None))):
            raise
        code = e.code or 0
    except Terminated as e:              # before a command began (main handles those that did)
        print(f"terminated ({e})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        sys.stdout.flush()               # what is still buffered: a full disk shows only now
    except Exception:
        pass
    lost = getattr(sys.stdout, "lost", None)
    if code == 0 and lost:               # `python pccd.py bench > /dev/full`: what it printed is gone
        command = next((word for word in sys.argv[1:] if not word.startswith("-")), "")
        print(f"pccd.py{' ' * bool(command)}{command}: error: what it printed could not be written ({lost})",
              file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(run_as_program())
